"""The engine's greedy output equals transformers' greedy ``generate`` token for token.

Random-weight checkpoints exercise every acceptance path: an unrelated drafter (almost every
draft rejected), a noisy copy of the target (partly accepted) and the target itself as drafter
(all accepted). Requests run alone and many at once, with different prompts, images, budgets
and compression ratios; KV integrity is checked after every step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.sampling import SamplingParams
from drafter_pool.tree_search import TreeShape
from models.synthetic import RandomLlavaSpec, build_random_llava
from serve.engine_builder import EngineOptions, build_engine
from tests.serve.engine_helpers import Oracle, random_image, run_checked

MAX_NEW = 20
QUESTIONS = ["describe the picture", "what is it", "a b c d e f g h", "tell me more about the colors"]


def test_prompt_expansion_matches_the_transformers_processor(
    folders: dict[str, Path], oracle: Oracle
) -> None:
    built = build_engine(folders["target"], options=EngineOptions(policy="none"))
    image = random_image(0)
    prompt = oracle.prompt("what is it", image, "be brief")
    expanded = built.engine.encode(prompt).token_ids.tolist()
    assert expanded == oracle.inputs("what is it", image, "be brief")["input_ids"][0].tolist()


def test_plain_decoding_equals_transformers_greedy(folders: dict[str, Path], oracle: Oracle) -> None:
    built = build_engine(folders["target"], options=EngineOptions(policy="none"))
    image = random_image(1)
    [out] = run_checked(
        built.engine, [oracle.prompt("what is it", image, None)], [SamplingParams(max_tokens=MAX_NEW)]
    )
    assert out.token_ids == tuple(oracle.greedy("what is it", image, None, MAX_NEW))
    assert out.stats.draft_tokens == 0


@pytest.mark.parametrize("drafter", ["unrelated", "noisy", "same"])
@pytest.mark.parametrize("policy", ["fixed", "load_aware"])
def test_speculative_greedy_equals_transformers_for_one_request(
    folders: dict[str, Path], oracle: Oracle, drafter: str, policy: str
) -> None:
    built = build_engine(folders["target"], folders[drafter], EngineOptions(policy=policy, fixed_nodes=6))
    image = random_image(2)
    prompt = oracle.prompt("describe the picture", image, "be brief")
    [out] = run_checked(built.engine, [prompt], [SamplingParams(max_tokens=MAX_NEW)])
    assert out.token_ids == tuple(oracle.greedy("describe the picture", image, "be brief", MAX_NEW))
    if drafter == "same" and policy == "fixed":
        # the drafter's top choice is the target's own: every step but a cut last one accepts
        assert out.stats.accepted_tokens >= out.stats.verify_steps - 1 > 0
    if policy == "fixed":
        assert out.stats.draft_tokens > 0  # (load_aware may stop drafting for a useless drafter)


@pytest.mark.parametrize("drafter", ["unrelated", "noisy"])
def test_many_concurrent_requests_each_equal_transformers(
    folders: dict[str, Path], oracle: Oracle, drafter: str
) -> None:
    options = EngineOptions(policy="fixed", fixed_nodes=5, max_batch_tokens=96, tree=TreeShape(width=3))
    built = build_engine(folders["target"], folders[drafter], options)
    cases = []
    for i in range(10):
        image = random_image(10 + i) if i % 3 else None  # some text-only requests
        cases.append(
            (QUESTIONS[i % len(QUESTIONS)] * (1 + i % 3), image, None if i % 2 else "sys", 8 + 3 * i)
        )
    prompts = [oracle.prompt(q, img, sys) for q, img, sys, _ in cases]
    params = [SamplingParams(max_tokens=n) for *_, n in cases]
    outs = run_checked(built.engine, prompts, params, [(1.0, 0.5, 0.25)[i % 3] for i in range(len(cases))])
    for i, (out, (q, img, sys, n)) in enumerate(zip(outs, cases, strict=True)):
        assert out.token_ids == tuple(oracle.greedy(q, img, sys, n)), f"request {i}"
    assert built.engine.scheduler.pool.num_free_blocks == built.engine.scheduler.pool.num_blocks


def test_drafter_with_another_tokenizer_is_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    other = build_random_llava(tmp_path / "other", RandomLlavaSpec(seed=4, vocab_size=300))
    with pytest.raises(ValueError, match="different tokenizer"):
        build_engine(folders["target"], other)


def test_preemption_in_a_small_pool_keeps_every_output_exact(
    folders: dict[str, Path], oracle: Oracle
) -> None:
    options = EngineOptions(policy="fixed", fixed_nodes=4, num_blocks=14, block_size=8, max_batch_tokens=64)
    built = build_engine(folders["target"], folders["noisy"], options)
    cases = [(QUESTIONS[i % len(QUESTIONS)], random_image(40 + i), 16) for i in range(5)]
    prompts = [oracle.prompt(q, img, None) for q, img, _ in cases]
    outs = run_checked(built.engine, prompts, [SamplingParams(max_tokens=n) for *_, n in cases])
    assert sum(o.stats.preemptions for o in outs) > 0
    for out, (q, img, n) in zip(outs, cases, strict=True):
        assert out.token_ids == tuple(oracle.greedy(q, img, None, n))
    assert built.engine.scheduler.pool.num_free_blocks == built.engine.scheduler.pool.num_blocks


def test_abort_mid_generation_frees_target_and_drafter_kv(folders: dict[str, Path], oracle: Oracle) -> None:
    built = build_engine(folders["target"], folders["noisy"], EngineOptions(policy="fixed", fixed_nodes=4))
    engine = built.engine
    ids = [
        engine.add_request(oracle.prompt(q, random_image(60), None), SamplingParams(max_tokens=30))
        for q in QUESTIONS
    ]
    for _ in range(3):
        engine.step()
    final = engine.abort(ids[1])
    assert final is not None and final.finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
        engine.scheduler.check_integrity()
    assert engine.scheduler.pool.num_free_blocks == engine.scheduler.pool.num_blocks
    assert built.engine.drafter.num_free_blocks == built.engine.drafter.pool.num_blocks
    assert built.engine.drafter.kv_used() == 0.0


def test_a_full_drafter_pool_only_costs_speculation(folders: dict[str, Path], oracle: Oracle) -> None:
    options = EngineOptions(policy="fixed", fixed_nodes=4, drafter_blocks=12, block_size=8)
    built = build_engine(folders["target"], folders["noisy"], options)
    cases = [(QUESTIONS[i], random_image(90 + i), 12) for i in range(4)]
    prompts = [oracle.prompt(q, img, None) for q, img, _ in cases]
    outs = run_checked(built.engine, prompts, [SamplingParams(max_tokens=n) for *_, n in cases])
    for out, (q, img, n) in zip(outs, cases, strict=True):
        assert out.token_ids == tuple(oracle.greedy(q, img, None, n))
    assert any(o.stats.draft_tokens == 0 for o in outs)  # someone found no room in the drafter pool
    assert any(o.stats.draft_tokens > 0 for o in outs)
