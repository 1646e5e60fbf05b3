"""Lossless speculation on the shipped tiny models: eight ShapesWorld users at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.sampling import SamplingParams
from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.engine_builder import EngineOptions, build_engine
from tests.serve.engine_helpers import Oracle, run_checked

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
PERSONAS = (None, "alice", "bob", "carol", "dave")


@pytest.fixture(scope="module")
def shipped_oracle() -> Oracle:
    return Oracle(CHECKPOINTS / "tiny-target")


@pytest.mark.parametrize("policy", ["load_aware", "fixed"])
def test_eight_concurrent_shapesworld_users_get_the_targets_greedy_answers(
    shipped_oracle: Oracle, policy: str
) -> None:
    built = build_engine(
        CHECKPOINTS / "tiny-target", CHECKPOINTS / "tiny-drafter", EngineOptions(policy=policy, fixed_nodes=6)
    )
    samples = [make_sample(EVAL_SEED_START + 700 + i, PERSONAS[i % len(PERSONAS)]) for i in range(8)]
    prompts = [shipped_oracle.prompt(s.question.text, s.image(), s.system) for s in samples]
    params = [SamplingParams(max_tokens=40)] * len(prompts)
    outs = run_checked(built.engine, prompts, params, [(1.0, 0.5, 0.25)[i % 3] for i in range(len(prompts))])
    for out, s in zip(outs, samples, strict=True):
        expected = shipped_oracle.greedy(s.question.text, s.image(), s.system, 40)
        assert out.token_ids == tuple(expected), f"persona {s.persona.name}, question {s.question.text!r}"
    assert sum(o.stats.accepted_tokens for o in outs) > 0


def test_plain_decoding_of_the_shipped_target_equals_transformers(shipped_oracle: Oracle) -> None:
    built = build_engine(CHECKPOINTS / "tiny-target", options=EngineOptions(policy="none"))
    s = make_sample(EVAL_SEED_START + 711, kind="describe")
    [out] = run_checked(
        built.engine,
        [shipped_oracle.prompt(s.question.text, s.image(), s.system)],
        [SamplingParams(max_tokens=48)],
    )
    assert out.token_ids == tuple(shipped_oracle.greedy(s.question.text, s.image(), s.system, 48))
