"""Online drafter learning: served samples kept per user (bounded, scoped, forgettable), a user's
LoRA trained on the target's answers and published only when it beats the version in use, and
published versions swapped into the drafter's registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from core.prompt import Prompt
from core.sampling import SamplingParams
from drafter_pool.adapters import AdapterRegistry
from drafter_pool.learner import LearnConfig, OnlineLearner, sync_published
from drafter_pool.samples import SampleStore
from models.loader import load_model
from models.tiny.adapter_data import user_samples
from serve.chat import chat_prompt
from serve.engine_builder import EngineOptions, build_engine
from tests.lora_helpers import DRAFTER

TARGET = DRAFTER.parent / "tiny-target"
FAST = LearnConfig(min_samples=40, holdout=12, steps=60, batch=8)


@pytest.fixture(scope="module")
def served() -> list[tuple[Prompt, tuple[int, ...]]]:
    """48 of carol's prompts with the tiny target's greedy answers: what serving her would keep."""
    built = build_engine(TARGET, options=EngineOptions(policy="none"))
    samples = user_samples("carol", 48, seed=7)
    prompts = [chat_prompt(built.processor, s.question.text, [s.image()], s.system) for s in samples]
    outs = built.engine.generate(prompts, SamplingParams(max_tokens=48))
    return [(p, o.token_ids) for p, o in zip(prompts, outs, strict=True)]


def _fill(store: SampleStore, tenant: str, name: str, served: list[tuple[Prompt, tuple[int, ...]]]) -> None:
    for prompt, answer in served:
        assert store.add(tenant, name, prompt, answer)


def test_samples_are_bounded_scoped_by_tenant_and_forgotten(tmp_path: Path) -> None:
    store = SampleStore(tmp_path, max_samples=3)
    image = Image.new("RGB", (8, 8), "red")
    for i in range(5):
        assert store.add("t1", "carol", Prompt((1, 9, 2), (image,), 9), (4, 5, i))
    assert not store.add("t1", "carol", Prompt((1, 2), (), 9), (4,))  # no image: nothing to learn from
    assert not store.add("t1", "carol", Prompt((1, 9, 2), (image,), 9), ())  # no answer
    store.add("t2", "carol", Prompt((1, 9, 3), (image,), 9), (6,))
    kept = store.samples("t1", "carol")
    assert [s.answer_ids[-1] for s in kept] == [2, 3, 4]  # the oldest two dropped
    assert all(s.prompt.tenant == "t1" for s in kept) and store.count("t1", "carol") == (3, 5)
    assert store.users() == [("t1", "carol"), ("t2", "carol")]
    assert store.forget("carol") == ["t1", "t2"] and store.users() == []
    with pytest.raises(ValueError, match="must be 1-64 letters"):
        store.add("../t", "carol", Prompt((1, 9, 2), (image,), 9), (4,))


def test_a_user_without_an_adapter_gets_a_better_version_published_and_swapped_in(
    served: list[tuple[Prompt, tuple[int, ...]]], tmp_path: Path
) -> None:
    store = SampleStore(tmp_path)
    learner = OnlineLearner(DRAFTER, store, FAST)
    _fill(store, "t-carol", "carol", served[:30])
    assert learner.due() == []  # fewer than min_samples
    _fill(store, "t-carol", "carol", served[30:])
    [outcome] = learner.step()
    assert outcome.published is not None and outcome.published.version == 1
    assert outcome.acceptance > outcome.current_acceptance  # held-out samples, base drafter before
    assert outcome.train_samples == 48 - FAST.holdout
    assert learner.due() == []  # nothing new since
    registry = AdapterRegistry(load_model(DRAFTER).decoder.cfg, slots=2, max_rank=8)
    learned: set[str] = set()
    assert sync_published(registry, store, learned) == ["carol v1"]
    assert registry.version("carol") == 1 and sync_published(registry, store, learned) == []
    store.forget("carol")
    assert sync_published(registry, store, learned) == ["carol forgotten"] and not registry.has("carol")


def test_weights_no_better_than_the_version_in_use_are_refused(
    served: list[tuple[Prompt, tuple[int, ...]]], tmp_path: Path
) -> None:
    store = SampleStore(tmp_path)
    _fill(store, "t-carol", "carol", served)
    learner = OnlineLearner(
        DRAFTER, store, LearnConfig(min_samples=40, holdout=12, steps=2, batch=8, min_gain=1.0)
    )
    [outcome] = learner.step()
    assert outcome.published is None and store.versions("t-carol", "carol") == []
    assert not (tmp_path / "t-carol" / "carol" / ".training").exists()


def test_a_users_samples_only_ever_train_that_users_adapter(
    served: list[tuple[Prompt, tuple[int, ...]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SampleStore(tmp_path)
    mark = {"carol": 11, "erin": 12}  # each user's answers end in their own token
    for i, (prompt, answer) in enumerate(served):
        user = "carol" if i < 24 else "erin"
        store.add(f"t-{user}", user, prompt, (*answer, mark[user]))
    trained: list[tuple[Path, set[int]]] = []

    def record(base: Path, samples: list[Any], config: Any, out: Path, **_: Any) -> None:
        trained.append((out, {s.answer_ids[-1] for s in samples}))
        (out / "marker").write_text("x")

    monkeypatch.setattr("drafter_pool.learner.train_lora", record)
    monkeypatch.setattr("drafter_pool.learner.teacher_forced_acceptance", lambda *a, **k: 0.0)
    learner = OnlineLearner(DRAFTER, store, LearnConfig(min_samples=20, holdout=4, steps=1, batch=4))
    assert sorted(learner.due()) == [("t-carol", "carol"), ("t-erin", "erin")]
    learner.step()
    assert sorted((out.parent.name, used) for out, used in trained) == [("carol", {11}), ("erin", {12})]
