"""A per-user LoRA on a Qwen2-VL / Qwen2.5-VL drafter, made by PEFT, gives PEFT's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.forward_batch import pack
from core.kv import PagedKVCache
from models.check import BLOCK_SIZE, ModelChecker, ScrambledBlocks, load_reference
from models.loader import load_model
from models.lora import load_adapter
from models.multi_lora import NO_ADAPTER, MultiLora
from models.random_checkpoints import build_random_vlm
from models.synthetic import RandomLlavaSpec
from tests.lora_helpers import ALL_MODULES, peft_adapter


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl"])
def test_peft_lora_on_a_qwen_drafter_matches_peft_beside_a_base_request(family: str, tmp_path: Path) -> None:
    from peft import PeftModel

    base = build_random_vlm(tmp_path / "base", family, RandomLlavaSpec(seed=3, num_kv_heads=2))
    adapter_dir = peft_adapter(tmp_path / "lora", rank=4, alpha=8, modules=ALL_MODULES, seed=1, base=base)
    model = load_model(base, dtype="fp32")
    reference = load_reference(base, model.architecture)
    peft = ModelChecker(model, PeftModel.from_pretrained(reference, adapter_dir).eval(), seed=0)
    plain = ModelChecker(model, load_reference(base, model.architecture), seed=0)
    stack = MultiLora(model.decoder.cfg, slots=2, max_rank=8)
    stack.load(0, load_adapter(adapter_dir, model.decoder.cfg, max_rank=8))
    prompts = [peft.prompt("what is it ?", (40, 56), seed=1), peft.prompt("describe it", (56, 24), seed=2)]
    blocks = ScrambledBlocks(256, seed=0)
    seqs = [peft.sequence(p, blocks, len(p.input_ids)) for p in prompts]
    slots = torch.cat([torch.full((seqs[0].num_new,), 0), torch.full((seqs[1].num_new,), NO_ADAPTER)])
    kv = PagedKVCache(model.decoder.kv_layout(num_blocks=256, block_size=BLOCK_SIZE))
    ours = model.decoder.logits(model.decoder(pack(seqs, BLOCK_SIZE), kv, stack.batch(slots)))
    adapted, unadapted = ours[: seqs[0].num_new], ours[seqs[0].num_new :]
    assert (adapted - peft.reference_logits(prompts[0], [])).abs().max() <= 1e-4
    assert (unadapted - plain.reference_logits(prompts[1], [])).abs().max() <= 1e-4
    # the adapter really changes the output (a zero delta would prove nothing)
    assert (adapted - plain.reference_logits(prompts[0], [])).abs().max() > 1e-2
