"""Local prefix caching in the engine: reuse within a namespace, never an output change.

Every output is compared with transformers' greedy ``generate`` on the same checkpoint, and KV
integrity is checked after every step (``run_checked``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from core.prompt import Prompt
from core.sampling import SamplingParams
from scheduler.engine import Engine
from serve.engine_builder import EngineOptions, build_engine
from tests.serve.engine_helpers import Oracle, random_image, run_checked

MAX_NEW = 12
SYSTEM = "you are a careful assistant who answers every question about the picture"
GREEDY = SamplingParams(max_tokens=MAX_NEW)


@pytest.fixture
def engine(folders: dict[str, Path]) -> Engine:
    return build_engine(folders["target"], options=EngineOptions(policy="none", block_size=4)).engine


def with_scope(prompt: Prompt, tenant: str, public_tokens: int = 0) -> Prompt:
    return dataclasses.replace(prompt, tenant=tenant, public_tokens=public_tokens)


def system_tokens(oracle: Oracle) -> int:
    """Leading prompt tokens of the system turn (what a deployment may declare public)."""
    turn = oracle.processor.apply_chat_template(
        [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}], add_generation_prompt=False
    )
    return len(oracle.processor.tokenizer(turn)["input_ids"])


def test_a_second_request_with_the_same_image_and_system_prompt_reuses_its_kv(
    engine: Engine, oracle: Oracle
) -> None:
    image = random_image(5)
    first = oracle.prompt("what is it", image, SYSTEM)
    second = oracle.prompt("describe the colors please", image, SYSTEM)
    (a,) = run_checked(engine, [first], [GREEDY])
    (b,) = run_checked(engine, [second], [GREEDY])
    assert a.stats.cached_tokens == 0
    shared = 0  # rows the two prompts share, images expanded
    a_ids, b_ids = engine.encode(first).token_ids.tolist(), engine.encode(second).token_ids.tolist()
    for x, y in zip(a_ids, b_ids, strict=False):
        if x != y:
            break
        shared += 1
    assert b.stats.cached_tokens == shared // 4 * 4 > 0
    assert list(a.token_ids) == oracle.greedy("what is it", image, SYSTEM, MAX_NEW)
    assert list(b.token_ids) == oracle.greedy("describe the colors please", image, SYSTEM, MAX_NEW)


def test_the_same_prompt_again_computes_only_its_last_token(engine: Engine, oracle: Oracle) -> None:
    prompt = oracle.prompt("what is it", random_image(6), SYSTEM)
    first, again = run_checked(engine, [prompt], [GREEDY]) + run_checked(engine, [prompt], [GREEDY])
    n = first.stats.prompt_tokens
    assert again.stats.cached_tokens == (n - 1) // 4 * 4
    expected = tuple(oracle.greedy("what is it", random_image(6), SYSTEM, MAX_NEW))
    assert again.token_ids == first.token_ids == expected


def test_concurrent_requests_sharing_a_prefix_all_equal_transformers(engine: Engine, oracle: Oracle) -> None:
    image = random_image(7)
    questions = ["what is it", "a b c", "tell me more about the colors", "what is it"]
    warm = run_checked(engine, [oracle.prompt("hello", image, SYSTEM)], [GREEDY])
    outs = run_checked(engine, [oracle.prompt(q, image, SYSTEM) for q in questions], [GREEDY] * 4)
    assert warm[0].stats.cached_tokens == 0
    assert all(o.stats.cached_tokens > 0 for o in outs)
    for q, out in zip(questions, outs, strict=True):
        assert list(out.token_ids) == oracle.greedy(q, image, SYSTEM, MAX_NEW)


def test_another_tenant_gets_no_cached_tokens(engine: Engine, oracle: Oracle) -> None:
    prompt = oracle.prompt("what is it", random_image(8), SYSTEM)
    (mine,) = run_checked(engine, [with_scope(prompt, "acme")], [GREEDY])
    (theirs,) = run_checked(engine, [with_scope(prompt, "globex")], [GREEDY])
    (mine_again,) = run_checked(engine, [with_scope(prompt, "acme")], [GREEDY])
    assert theirs.stats.cached_tokens == 0
    assert mine_again.stats.cached_tokens > 0
    assert mine.token_ids == theirs.token_ids == mine_again.token_ids


def test_a_public_system_prompt_is_shared_across_tenants_only_up_to_its_end(
    engine: Engine, oracle: Oracle
) -> None:
    public = system_tokens(oracle)
    prompt = oracle.prompt("what is it", random_image(9), SYSTEM)
    assert prompt.token_ids.index(prompt.image_token_id) >= public  # the image comes after the system turn
    run_checked(engine, [with_scope(prompt, "acme", public)], [GREEDY])
    (theirs,) = run_checked(engine, [with_scope(prompt, "globex", public)], [GREEDY])
    assert theirs.stats.cached_tokens == public // 4 * 4 > 0
    assert list(theirs.token_ids) == oracle.greedy("what is it", random_image(9), SYSTEM, MAX_NEW)


def test_the_same_text_with_another_image_reuses_only_the_blocks_before_the_image(
    engine: Engine, oracle: Oracle
) -> None:
    first = oracle.prompt("what is it", random_image(10), SYSTEM)
    second = oracle.prompt("what is it", random_image(11), SYSTEM)
    assert first.token_ids == second.token_ids
    run_checked(engine, [first], [GREEDY])
    (other,) = run_checked(engine, [second], [GREEDY])
    before_image = first.token_ids.index(first.image_token_id)
    assert other.stats.cached_tokens == before_image // 4 * 4
    assert list(other.token_ids) == oracle.greedy("what is it", random_image(11), SYSTEM, MAX_NEW)


def test_a_small_pool_evicts_cached_blocks_and_preempts_without_changing_outputs(
    folders: dict[str, Path], oracle: Oracle
) -> None:
    options = EngineOptions(policy="none", block_size=4, num_blocks=50, max_batch_tokens=64)
    built = build_engine(folders["target"], options=options)  # a prompt here is 94 tokens, 24 blocks
    images = [random_image(20 + i) for i in range(6)]
    longer = SamplingParams(max_tokens=24)
    prompts = [oracle.prompt("what is it", im, SYSTEM) for im in images]
    outs = run_checked(built.engine, prompts, [longer] * 6)
    again = run_checked(built.engine, prompts[:2], [longer] * 2)
    assert built.engine.scheduler.pool.reclaimed > 0
    assert sum(o.stats.preemptions for o in outs + again) > 0
    for im, out in zip(images + images[:2], outs + again, strict=True):
        assert list(out.token_ids) == oracle.greedy("what is it", im, SYSTEM, 24)


def test_speculative_decoding_over_cached_prefixes_equals_transformers(
    folders: dict[str, Path], oracle: Oracle
) -> None:
    built = build_engine(folders["target"], folders["noisy"], EngineOptions(policy="fixed", block_size=4))
    image = random_image(12)
    prompts = [oracle.prompt(q, image, SYSTEM) for q in ("what is it", "a b c")]
    outs = run_checked(built.engine, prompts, [GREEDY] * 2)
    more = run_checked(built.engine, [oracle.prompt("a b c", image, SYSTEM)], [GREEDY])
    assert more[0].stats.cached_tokens > 0
    for q, out in zip(("what is it", "a b c", "a b c"), outs + more, strict=True):
        assert list(out.token_ids) == oracle.greedy(q, image, SYSTEM, MAX_NEW)


def test_prefix_cache_off_reports_no_cached_tokens(folders: dict[str, Path], oracle: Oracle) -> None:
    built = build_engine(folders["target"], options=EngineOptions(policy="none", prefix_cache=False))
    prompt = oracle.prompt("what is it", random_image(13), SYSTEM)
    outs = run_checked(built.engine, [prompt, prompt], [GREEDY] * 2)
    assert [o.stats.cached_tokens for o in outs] == [0, 0]
    assert built.prefix is None


@pytest.mark.parametrize("images", [0, 1, 2])
def test_the_layout_without_visual_embeddings_has_the_encoded_rows(
    engine: Engine, oracle: Oracle, images: int
) -> None:
    from serve.chat import chat_prompt

    prompt = chat_prompt(
        oracle.processor, "what is it", [random_image(30 + i) for i in range(images)], SYSTEM
    )
    assert engine.layout is not None
    layout, encoded = engine.layout(prompt), engine.encode(prompt)
    assert layout.token_ids.tolist() == encoded.token_ids.tolist()
    assert layout.image_rows == encoded.image_rows and len(layout.image_rows) == images
    assert layout.embeds is None
