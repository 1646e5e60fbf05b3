"""Lossless speculation on the shipped tiny models: eight ShapesWorld users at once, on the CPU
and (tests marked ``gpu``, skipped without one) on a GPU against transformers on the same GPU."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from core.sampling import SamplingParams
from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.engine_builder import EngineOptions, build_engine
from tests.serve.engine_helpers import Oracle, run_checked

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
PERSONAS = (None, "alice", "bob", "carol", "dave")
ON_GPU = pytest.mark.gpu


@cache
def shipped_oracle(device: str) -> Oracle:
    return Oracle(CHECKPOINTS / "tiny-target", device=device)


@pytest.mark.parametrize(
    ("policy", "device", "drafter_device"),
    [
        ("load_aware", "cpu", None),
        ("fixed", "cpu", None),
        pytest.param("load_aware", "cuda", None, marks=ON_GPU),
        pytest.param("fixed", "cuda", "cpu", marks=ON_GPU),  # a GPU target beside a CPU drafter
    ],
)
def test_eight_concurrent_shapesworld_users_get_the_targets_greedy_answers(
    policy: str, device: str, drafter_device: str | None
) -> None:
    oracle = shipped_oracle(device)
    options = EngineOptions(
        policy=policy, fixed_nodes=6, device=device, drafter_device=drafter_device,
        adapters=(("bob", CHECKPOINTS / "adapters" / "bob"),),
    )  # fmt: skip
    built = build_engine(CHECKPOINTS / "tiny-target", CHECKPOINTS / "tiny-drafter", options)
    samples = [make_sample(EVAL_SEED_START + 700 + i, PERSONAS[i % len(PERSONAS)]) for i in range(8)]
    prompts = [oracle.prompt(s.question.text, s.image(), s.system) for s in samples]
    params = [SamplingParams(max_tokens=40)] * len(prompts)
    ratios = [(1.0, 0.5, 0.25)[i % 3] for i in range(len(prompts))]
    users = ["bob" if i % 2 else None for i in range(len(prompts))]  # mixed adapters in each forward
    outs = run_checked(built.engine, prompts, params, ratios, users)
    for out, s in zip(outs, samples, strict=True):
        expected = oracle.greedy(s.question.text, s.image(), s.system, 40)
        assert out.token_ids == tuple(expected), f"persona {s.persona.name}, question {s.question.text!r}"
    assert sum(o.stats.accepted_tokens for o in outs) > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_GPU)])
def test_plain_decoding_of_the_shipped_target_equals_transformers(device: str) -> None:
    oracle = shipped_oracle(device)
    built = build_engine(CHECKPOINTS / "tiny-target", options=EngineOptions(policy="none", device=device))
    s = make_sample(EVAL_SEED_START + 711, kind="describe")
    [out] = run_checked(
        built.engine,
        [oracle.prompt(s.question.text, s.image(), s.system)],
        [SamplingParams(max_tokens=48)],
    )
    assert out.token_ids == tuple(oracle.greedy(s.question.text, s.image(), s.system, 48))
