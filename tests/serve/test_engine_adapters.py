"""Drafting with per-user LoRA adapters changes the drafts, never the output."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.sampling import SamplingParams
from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.engine_builder import EngineOptions, build_engine
from tests.lora_helpers import ALL_MODULES, DRAFTER, peft_adapter
from tests.serve.engine_helpers import Oracle, run_checked

TARGET = DRAFTER.parent / "tiny-target"


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-adapters")
    return {
        "u1": peft_adapter(root / "u1", 8, 16, ALL_MODULES, seed=1),
        "u2": peft_adapter(root / "u2", 2, 2, ["q_proj", "v_proj", "down_proj"], seed=2),
    }


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle(TARGET)


@pytest.mark.parametrize("slots", [4, 1])  # 1: the second user's adapter finds every slot pinned
def test_mixed_adapter_users_get_the_targets_greedy_answers(
    oracle: Oracle, adapter_dirs: dict[str, Path], slots: int
) -> None:
    options = EngineOptions(
        policy="fixed", fixed_nodes=6, adapters=tuple(adapter_dirs.items()), adapter_slots=slots
    )
    built = build_engine(TARGET, DRAFTER, options)
    samples = [make_sample(EVAL_SEED_START + 900 + i, ("bob", None, "carol")[i % 3]) for i in range(6)]
    users = ["u1", None, "u2", "u1", "u2", None]
    prompts = [oracle.prompt(s.question.text, s.image(), s.system) for s in samples]
    outs = run_checked(built.engine, prompts, [SamplingParams(max_tokens=32)] * 6, adapters=users)
    for out, s, user in zip(outs, samples, users, strict=True):
        expected = oracle.greedy(s.question.text, s.image(), s.system, 32)
        assert out.token_ids == tuple(expected), f"user adapter {user}, question {s.question.text!r}"
    assert built.adapters is not None
    assert built.adapters.stats.loads >= 1
    assert (built.adapters.stats.no_slot > 0) == (slots == 1)
    assert not built.adapters.pins  # every finished request released its adapter


def test_unknown_adapter_is_refused_when_the_request_is_added(adapter_dirs: dict[str, Path]) -> None:
    built = build_engine(TARGET, DRAFTER, EngineOptions(policy="fixed", adapters=tuple(adapter_dirs.items())))
    sample = make_sample(EVAL_SEED_START)
    prompt = Oracle(TARGET).prompt(sample.question.text, sample.image(), sample.system)
    with pytest.raises(ValueError, match="unknown drafter adapter 'nobody': it is not loaded"):
        built.engine.add_request(prompt, SamplingParams(max_tokens=4), adapter="nobody")


def test_adapters_without_a_drafter_are_refused(adapter_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="adapters need a drafter"):
        build_engine(TARGET, None, EngineOptions(adapters=tuple(adapter_dirs.items())))


def test_drafter_prompt_blocks_are_shared_only_within_one_adapter_and_compression(
    oracle: Oracle, adapter_dirs: dict[str, Path]
) -> None:
    built = build_engine(TARGET, DRAFTER, EngineOptions(policy="fixed", adapters=tuple(adapter_dirs.items())))
    drafter = built.engine.drafter
    assert drafter is not None and drafter.prefix is not None  # type: ignore[attr-defined]
    cache = drafter.prefix  # type: ignore[attr-defined]
    turns = [make_sample(EVAL_SEED_START + 950, "bob", turn=t) for t in range(5)]  # one image and persona
    prompts = [oracle.prompt(s.question.text, s.image(), s.system) for s in turns]
    hits = []
    for prompt, user, ratio in [
        (prompts[0], "u1", 1.0), (prompts[1], "u1", 1.0),  # same adapter: the second one hits
        (prompts[2], "u2", 1.0),  # another adapter: no hit
        (prompts[3], "u1", 0.5),  # other visual tokens kept: no hit
        (prompts[4], None, 1.0),  # the base drafter: no hit
    ]:  # fmt: skip
        before = cache.stats.local_hits
        (out,) = run_checked(built.engine, [prompt], [SamplingParams(max_tokens=16)], [ratio], [user])
        hits.append(cache.stats.local_hits - before)
        s = turns[len(hits) - 1]
        assert out.token_ids == tuple(oracle.greedy(s.question.text, s.image(), s.system, 16))
    assert hits[0] == 0 and hits[1] > 0 and hits[2:] == [0, 0, 0]
