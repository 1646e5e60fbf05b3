"""Batched mixed-adapter LoRA in our decoder vs ``peft.PeftModel`` with one adapter at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from core.forward_batch import pack
from core.kv import PagedKVCache
from models.check import BLOCK_SIZE, ModelChecker, ScrambledBlocks, load_reference
from models.loader import load_model
from models.lora import LoraAdapter, load_adapter
from models.multi_lora import NO_ADAPTER, MultiLora
from tests.lora_helpers import ALL_MODULES, DRAFTER, peft_adapter

TOL = 1e-4
# name -> (rank, alpha, modules, rsLoRA): different ranks, module sets and scalings
ADAPTERS = {
    "all-r8": (8, 16, ALL_MODULES, False),
    "attn-r2": (2, 4, ["q_proj", "v_proj"], False),
    "mlp-r4-rs": (4, 3, ["gate_proj", "down_proj"], True),
}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: peft_adapter(root / name, rank, alpha, modules, seed=i, rslora=rs)
        for i, (name, (rank, alpha, modules, rs)) in enumerate(ADAPTERS.items())
    }


@pytest.fixture(scope="module")
def drafter() -> Any:
    return load_model(DRAFTER, dtype="fp32")


def peft_logits(adapter_dir: Path | None, checker_prompt: Any) -> torch.Tensor:
    from peft import PeftModel

    base = load_reference(DRAFTER, "LlavaForConditionalGeneration")
    model = base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.inference_mode():
        out = model(
            input_ids=checker_prompt.input_ids[None], pixel_values=checker_prompt.images["pixel_values"]
        )
    return out.logits[0].float()


# slots per request, in packing order: shuffled (rows gathered) and sorted (rows a plain slice),
# with a base-drafter request (the delta path); every request adapted (merged weights)
ORDERS = {"shuffled": [2, NO_ADAPTER, 0, 3], "sorted": [NO_ADAPTER, 0, 2, 3], "all adapted": [2, 0, 3, 0]}
SLOT_ADAPTER = {2: "all-r8", 0: "attn-r2", 3: "mlp-r4-rs", NO_ADAPTER: None}


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_mixed_adapter_batch_matches_peft_per_request(
    drafter: Any, adapter_dirs: dict[str, Path], order: str
) -> None:
    adapters = [load_adapter(adapter_dirs[n], drafter.decoder.cfg, max_rank=8) for n in ADAPTERS]
    stack = MultiLora(drafter.decoder.cfg, slots=4, max_rank=8)
    for slot, adapter in zip((2, 0, 3), adapters, strict=True):  # slots out of order on purpose
        stack.load(slot, adapter)
    checker = ModelChecker(drafter, None, seed=0)
    texts = ["what color is the star?", "describe the scene.", "is there a red circle?", "count the shapes."]
    prompts = [checker.prompt(t, image_size=(48, 40), seed=i) for i, t in enumerate(texts)]
    slots = ORDERS[order]
    blocks = ScrambledBlocks(256, seed=1)
    seqs = [checker.sequence(p, blocks, len(p.input_ids)) for p in prompts]
    batch = pack(seqs, BLOCK_SIZE)
    token_slots = torch.cat([torch.full((s.num_new,), slot) for s, slot in zip(seqs, slots, strict=True)])
    kv = PagedKVCache(drafter.decoder.kv_layout(num_blocks=256, block_size=BLOCK_SIZE))
    lora = stack.batch(token_slots)
    assert lora is not None and (lora.span is not None) == (order == "sorted")
    assert lora.merged == (NO_ADAPTER not in slots)
    dirs = [None if SLOT_ADAPTER[s] is None else adapter_dirs[SLOT_ADAPTER[s]] for s in slots]
    ours = drafter.decoder.logits(drafter.decoder(batch, kv, lora))
    start = 0
    for prompt, seq, adapter_dir in zip(prompts, seqs, dirs, strict=True):
        ref = peft_logits(adapter_dir, prompt)
        assert (ours[start : start + seq.num_new] - ref).abs().max() <= TOL, adapter_dir
        start += seq.num_new
    adapted = slots.index(2)  # the rank-8 all-modules adapter's request
    start = sum(s.num_new for s in seqs[:adapted])
    base = peft_logits(None, prompts[adapted])
    assert (ours[start : start + seqs[adapted].num_new] - base).abs().max() > 100 * TOL  # really adapted


def test_batch_without_adapter_tokens_skips_lora(drafter: Any, adapter_dirs: dict[str, Path]) -> None:
    stack = MultiLora(drafter.decoder.cfg, slots=2, max_rank=8)
    stack.load(0, load_adapter(adapter_dirs["attn-r2"], drafter.decoder.cfg, max_rank=8))
    assert stack.batch(torch.full((5,), NO_ADAPTER)) is None


def test_cleared_slot_gives_zero_delta_and_is_refused(drafter: Any, adapter_dirs: dict[str, Path]) -> None:
    cfg = drafter.decoder.cfg
    stack = MultiLora(cfg, slots=2, max_rank=8)
    stack.load(1, load_adapter(adapter_dirs["all-r8"], cfg, max_rank=8))
    stack.clear(1)
    assert all(float(a.abs().sum()) == 0 for a in stack.a.values())
    assert all(float(b.abs().sum()) == 0 for b in stack.b.values())
    with pytest.raises(ValueError, match="hold no adapter"):
        stack.batch(torch.tensor([1, 1]))


def test_reloading_an_adapter_into_another_slot_gives_the_same_delta(
    drafter: Any, adapter_dirs: dict[str, Path]
) -> None:
    cfg = drafter.decoder.cfg
    adapter: LoraAdapter = load_adapter(adapter_dirs["mlp-r4-rs"], cfg, max_rank=8)
    stack = MultiLora(cfg, slots=3, max_rank=8)
    stack.load(0, adapter)
    x = torch.randn(6, cfg.intermediate_size, generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros(6, cfg.hidden_size)
    before = stack.batch(torch.zeros(6, dtype=torch.long)).add_to(zeros.clone(), 1, "mlp.down_proj", x)  # type: ignore[union-attr]
    stack.clear(0)
    stack.load(2, adapter)
    after = stack.batch(torch.full((6,), 2)).add_to(zeros.clone(), 1, "mlp.down_proj", x)  # type: ignore[union-attr]
    assert float(before.abs().max()) > 0
    assert torch.equal(before, after)


@pytest.mark.parametrize(
    "group_sizes,kernel",  # equal trees; a depth level of trees; a long prompt among short ones
    [((6, 6, 6), "bmm over a view"), ((5, 6, 5), "bmm over padded groups"), ((40, 1, 2), "grouped_mm")],
)
def test_lora_kernels_match_a_per_token_reference(
    drafter: Any, adapter_dirs: dict[str, Path], group_sizes: tuple[int, ...], kernel: str
) -> None:
    cfg = drafter.decoder.cfg
    adapters = [load_adapter(adapter_dirs[n], cfg, max_rank=8) for n in ADAPTERS]
    stack = MultiLora(cfg, slots=3, max_rank=8)
    for slot, adapter in enumerate(adapters):
        stack.load(slot, adapter)
    token_slots = torch.cat([torch.full((n,), slot) for slot, n in zip((1, 0, 2), group_sizes, strict=True)])
    token_slots = torch.cat([torch.full((3,), NO_ADAPTER), token_slots])  # base tokens first
    x = torch.randn(len(token_slots), cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    lora = stack.batch(token_slots)
    assert lora is not None
    used = (
        "grouped_mm"
        if lora.padded is None
        else "bmm over " + ("a view" if lora.padded.index is None else "padded groups")
    )
    assert used == kernel
    out = lora.add_to(torch.zeros(len(token_slots), cfg.hidden_size), 1, "self_attn.o_proj", x)
    for row, slot in enumerate(token_slots.tolist()):
        w = None if slot == NO_ADAPTER else adapters[slot].weights.get((1, "o_proj"))
        expected = torch.zeros(cfg.hidden_size) if w is None else w.b @ (w.a @ x[row])
        assert torch.allclose(out[row], expected, atol=1e-5), (row, slot)


def _delta_path(lora: Any, linear: Any, x: torch.Tensor, layer: int, projection: str) -> torch.Tensor:
    """The same projection through base matmul + LoRA delta (the path mixed batches take)."""
    return lora.add_to(linear(x), layer, projection, x)


@pytest.mark.parametrize(
    "token_slots",  # one adapter; three, sorted and equal; shuffled and of unequal counts (padded)
    [[1] * 7, [0, 0, 1, 1, 2, 2], [2, 0, 2, 1, 0, 2, 2]],
)
def test_a_batch_whose_tokens_all_use_adapters_projects_with_merged_weights(
    drafter: Any, adapter_dirs: dict[str, Path], token_slots: list[int]
) -> None:
    cfg = drafter.decoder.cfg
    stack = MultiLora(cfg, slots=3, max_rank=8)
    for slot, name in enumerate(("attn-r2", "all-r8", "mlp-r4-rs")):
        stack.load(slot, load_adapter(adapter_dirs[name], cfg, max_rank=8))
    x = torch.randn(len(token_slots), cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    linear = drafter.decoder.layers[1].self_attn.qkv_proj
    lora = stack.batch(torch.tensor(token_slots))
    assert lora is not None and lora.merged
    with torch.inference_mode():
        merged = lora.project(linear, x, 1, "self_attn.qkv_proj")
        assert torch.allclose(merged, _delta_path(lora, linear, x, 1, "self_attn.qkv_proj"), atol=1e-5)
        adapted = [i for i, slot in enumerate(token_slots) if slot == 1]  # all-r8 adapts q/k/v
        assert not torch.allclose(merged[adapted], linear(x[adapted]), atol=1e-3)


def test_base_tokens_beside_adapter_tokens_keep_the_delta_path(
    drafter: Any, adapter_dirs: dict[str, Path]
) -> None:
    stack = MultiLora(drafter.decoder.cfg, slots=2, max_rank=8)
    stack.load(1, load_adapter(adapter_dirs["all-r8"], drafter.decoder.cfg, max_rank=8))
    assert not stack.batch(torch.tensor([1, NO_ADAPTER, 1])).merged  # type: ignore[union-attr]


def test_reloading_a_slot_drops_its_merged_weights(drafter: Any, adapter_dirs: dict[str, Path]) -> None:
    cfg = drafter.decoder.cfg
    stack = MultiLora(cfg, slots=1, max_rank=8)
    linear = drafter.decoder.layers[0].mlp.down_proj
    x = torch.randn(4, cfg.intermediate_size, generator=torch.Generator().manual_seed(1))
    outs = []
    for name in ("all-r8", "mlp-r4-rs"):  # the second replaces the first in slot 0
        stack.load(0, load_adapter(adapter_dirs[name], cfg, max_rank=8))
        lora = stack.batch(torch.zeros(4, dtype=torch.long))
        assert lora is not None and lora.merged
        with torch.inference_mode():
            outs.append(lora.project(linear, x, 0, "mlp.down_proj"))
            assert torch.allclose(outs[-1], _delta_path(lora, linear, x, 0, "mlp.down_proj"), atol=1e-5)
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)


def test_a_drafter_too_big_for_the_merge_budget_keeps_the_delta_path(
    drafter: Any, adapter_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.multi_lora as multi_lora

    monkeypatch.setattr(multi_lora, "MERGED_BUDGET_BYTES", 1024)
    stack = MultiLora(drafter.decoder.cfg, slots=2, max_rank=8)
    stack.load(0, load_adapter(adapter_dirs["attn-r2"], drafter.decoder.cfg, max_rank=8))
    stack.load(1, load_adapter(adapter_dirs["all-r8"], drafter.decoder.cfg, max_rank=8))
    assert not stack.merges
    assert not stack.batch(torch.zeros(3, dtype=torch.long)).merged  # type: ignore[union-attr]
    assert not stack.batch(torch.tensor([0, 0, 1, 1])).merged  # type: ignore[union-attr]
