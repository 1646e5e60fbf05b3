"""The demo users' shipped drafter adapters: PEFT loads each, and our layer computes what PEFT does."""

from __future__ import annotations

import pytest
import torch

from core.forward_batch import pack
from core.kv import PagedKVCache
from models.check import BLOCK_SIZE, ModelChecker, ScrambledBlocks, load_reference
from models.loader import load_model
from models.lora import load_adapter
from models.multi_lora import MultiLora
from models.tiny.personas import DEMO_USERS
from tests.lora_helpers import DRAFTER

ADAPTERS = DRAFTER.parent / "adapters"


@pytest.mark.parametrize("user", DEMO_USERS)
def test_shipped_adapter_loads_in_peft_and_matches_our_layer(user: str) -> None:
    from peft import PeftModel

    folder = ADAPTERS / user
    assert (folder / "README.md").is_file(), f"{folder} has no card"
    base = load_reference(DRAFTER, "LlavaForConditionalGeneration")
    reference = PeftModel.from_pretrained(base, folder).eval()
    drafter = load_model(DRAFTER)
    stack = MultiLora(drafter.decoder.cfg, slots=1, max_rank=16)
    stack.load(0, load_adapter(folder, drafter.decoder.cfg, max_rank=16))
    checker = ModelChecker(drafter, reference, seed=0)
    prompt = checker.prompt("describe the scene.", image_size=(48, 40), seed=1)
    seq = checker.sequence(prompt, ScrambledBlocks(256, seed=2), len(prompt.input_ids))
    kv = PagedKVCache(drafter.decoder.kv_layout(num_blocks=256, block_size=BLOCK_SIZE))
    lora = stack.batch(torch.zeros(seq.num_new, dtype=torch.long))
    ours = drafter.decoder.logits(drafter.decoder(pack([seq], BLOCK_SIZE), kv, lora))
    with reference.disable_adapter():
        plain = checker.reference_logits(prompt, [])
    adapted = checker.reference_logits(prompt, [])
    assert (ours - adapted).abs().max() <= 1e-4
    assert (adapted - plain).abs().max() > 1e-2  # the adapter is not a no-op
