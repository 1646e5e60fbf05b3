"""Every supported VLM family through the engine equals transformers' greedy ``generate``.

Per family: a random target, a smaller random drafter of the same family (same tokenizer, other
weights: mostly rejected) and a noisy copy of the target (partly accepted). Images of random
shapes give each request its own token count (and, for Qwen2-VL, its own M-RoPE grid), and the
drafter sees them compressed; KV integrity is checked after every step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.sampling import SamplingParams
from drafter_pool.tree_search import TreeShape
from models.random_checkpoints import build_random_vlm
from models.synthetic import RandomLlavaSpec
from scheduler.engine import Completion
from serve.engine_builder import EngineOptions, build_engine
from tests.serve.engine_helpers import Oracle, noisy_copy, random_image, run_checked

FAMILIES = ["llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl"]
QUESTIONS = ["describe the picture", "what is it", "tell me more about the colors"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp(request.param)
    target = build_random_vlm(root / "target", request.param, RandomLlavaSpec(seed=1, num_kv_heads=2))
    small = RandomLlavaSpec(seed=2, hidden_size=32, num_heads=2, num_kv_heads=1, num_layers=1)
    return {
        "target": target,
        "small": build_random_vlm(root / "small", request.param, small),
        "noisy": noisy_copy(target, root / "noisy", scale=0.05, seed=3),
    }


@pytest.fixture(scope="module")
def oracle(family: dict[str, Path]) -> Oracle:
    return Oracle(family["target"])


def test_prompt_expansion_matches_the_family_processor(family: dict[str, Path], oracle: Oracle) -> None:
    built = build_engine(family["target"], options=EngineOptions(policy="none"))
    for seed in range(3):
        image = random_image(seed)
        encoded = built.engine.encode(oracle.prompt("what is it", image, "be brief"))
        assert (
            encoded.token_ids.tolist()
            == oracle.inputs("what is it", image, "be brief")["input_ids"][0].tolist()
        )


def test_plain_decoding_equals_transformers_greedy(family: dict[str, Path], oracle: Oracle) -> None:
    built = build_engine(family["target"], options=EngineOptions(policy="none"))
    image = random_image(1)
    [out] = run_checked(
        built.engine, [oracle.prompt("what is it", image, None)], [SamplingParams(max_tokens=16)]
    )
    assert out.token_ids == tuple(oracle.greedy("what is it", image, None, 16))


@pytest.mark.parametrize("drafter", ["small", "noisy"])
def test_speculative_requests_with_compressed_drafts_equal_transformers(
    family: dict[str, Path], oracle: Oracle, drafter: str
) -> None:
    outs = _speculate(family, oracle, drafter, "cpu")
    if drafter == "noisy":
        assert sum(o.stats.accepted_tokens for o in outs) > 0


def test_a_prefix_with_the_image_is_reused_and_the_answer_stays_exact(
    family: dict[str, Path], oracle: Oracle
) -> None:
    """The second request shares the first's system prompt and image: its blocks (visual rows
    included, at their tiles' or grid's positions) come from the prefix cache, drafter and target."""
    built = build_engine(family["target"], family["noisy"], EngineOptions(policy="fixed", fixed_nodes=4))
    image = random_image(40)
    first, second = (
        oracle.prompt(q, image, "be brief") for q in ("what is it", "tell me more about the colors")
    )
    [a] = run_checked(built.engine, [first], [SamplingParams(max_tokens=8)])
    [b] = run_checked(built.engine, [second], [SamplingParams(max_tokens=8)])
    image_end = max(start + rows for start, rows in built.engine.encode(second).image_rows)
    assert a.stats.cached_tokens == 0 and b.stats.cached_tokens >= image_end // 16 * 16 > 0
    assert b.token_ids == tuple(oracle.greedy("tell me more about the colors", image, "be brief", 8))


@pytest.mark.gpu
def test_on_the_gpu_speculative_requests_equal_transformers_on_the_gpu(family: dict[str, Path]) -> None:
    _speculate(family, Oracle(family["target"], device="cuda"), "small", "cuda")


def _speculate(family: dict[str, Path], oracle: Oracle, drafter: str, device: str) -> list[Completion]:
    """Five requests at once (images of different shapes or none, compression 1 to 0.25): each
    equals transformers' greedy generate; drafts were made; every block comes back."""
    options = EngineOptions(
        policy="fixed", fixed_nodes=5, max_batch_tokens=64, tree=TreeShape(width=3), device=device
    )
    built = build_engine(family["target"], family[drafter], options)
    cases = [
        (QUESTIONS[i % 3], random_image(20 + i) if i % 3 else None, None if i % 2 else "sys", 6 + 3 * i)
        for i in range(5)
    ]
    prompts = [oracle.prompt(q, img, sys) for q, img, sys, _ in cases]
    outs = run_checked(
        built.engine, prompts, [SamplingParams(max_tokens=n) for *_, n in cases], [1.0, 0.5, 0.25, 1.0, 0.5]
    )
    for i, (out, (q, img, sys, n)) in enumerate(zip(outs, cases, strict=True)):
        assert out.token_ids == tuple(oracle.greedy(q, img, sys, n)), f"request {i}"
    assert sum(o.stats.draft_tokens for o in outs) > 0
    assert built.engine.scheduler.pool.num_free_blocks == built.engine.scheduler.pool.num_blocks
    return outs


def test_a_drafter_of_another_family_is_refused_with_what_differs(tmp_path: Path) -> None:
    target = build_random_vlm(tmp_path / "qwen", "qwen2-vl", RandomLlavaSpec(seed=1))
    drafter = build_random_vlm(tmp_path / "llava", "llava-next", RandomLlavaSpec(seed=2))
    with pytest.raises(ValueError, match=r"different tokenizer .*'<\|endoftext\|>': 0 vs None.*same family"):
        build_engine(target, drafter, EngineOptions(policy="fixed"))
