"""models.host_allocator: forwards reuse freed memory for their activations instead of faulting
in fresh pages (glibc's malloc keeps what is freed)."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch

from core.forward_batch import SequenceInput, pack
from core.kv import PagedKVCache
from models.host_allocator import keep_freed_memory, on_glibc
from models.loader import load_model

TINY_TARGET = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-target"
pytestmark = pytest.mark.skipif(not on_glibc(), reason="mallopt is glibc's")
BLOCK_SIZE = 16


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def sequence(index: int, cached: int, new: int, vocab: int) -> SequenceInput:
    blocks = -(-(cached + new) // BLOCK_SIZE)
    return SequenceInput(
        token_ids=torch.randint(0, vocab, (new,)),
        positions=torch.arange(cached, cached + new),
        block_table=tuple(range(index * 40, index * 40 + blocks)),
        num_cached=cached,
    )


def test_keep_freed_memory_is_applied_once_per_process() -> None:
    assert keep_freed_memory() is True  # every setting accepted (one above glibc's limit is not)
    assert keep_freed_memory() is True


def test_a_prompt_step_then_a_packed_verification_fault_in_no_fresh_pages() -> None:
    model = load_model(TINY_TARGET)  # loading a model keeps freed memory from then on
    decoder, vocab = model.decoder, model.decoder.cfg.vocab_size
    kv = PagedKVCache(decoder.kv_layout(1024, BLOCK_SIZE))
    prompt = pack([sequence(20, 0, 500, vocab)], BLOCK_SIZE)  # activations up to 500 x 2048 floats
    trees = pack([sequence(i, 120, 9, vocab) for i in range(16)], BLOCK_SIZE)  # 144 rows

    def step_pair() -> None:
        for batch in (prompt, trees):
            decoder.logits(decoder(batch, kv))

    for _ in range(3):  # the heap grows to what the two forwards need
        step_pair()
    before = minor_faults()
    for _ in range(5):
        step_pair()
    faults = minor_faults() - before
    # with glibc's defaults this pair faulted in 5,000-12,000 fresh pages every time on the dev machine
    assert faults < 5 * 100, f"{faults} page faults in 5 pairs of forwards"
