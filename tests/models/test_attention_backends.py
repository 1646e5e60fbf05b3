from __future__ import annotations

from typing import Any

import pytest
import torch

from core.forward_batch import SequenceInput, pack
from core.kv import KVLayout, PagedKVCache
from models.attention import ATTENTION_BACKENDS, SdpaBackend, get_backend


def test_registry_lists_sdpa_and_flash_attn() -> None:
    assert {"sdpa", "flash_attn"} <= set(ATTENTION_BACKENDS)


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown attention backend 'xformers'; choose one of"):
        get_backend("xformers")


@pytest.mark.skipif(torch.cuda.is_available(), reason="flash-attn may be available on a GPU")
def test_flash_attn_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not available here"):
        get_backend("flash_attn")


def test_sdpa_matches_naive_attention_with_gqa_and_tree_mask() -> None:
    torch.manual_seed(0)
    layout = KVLayout(num_layers=1, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8)
    kv = PagedKVCache(layout)
    kv.keys.normal_()
    kv.values.normal_()
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    seqs = [
        SequenceInput(torch.zeros(3, dtype=torch.long), torch.arange(3), (6, 1), 5, attention_mask=mask),
        SequenceInput(torch.zeros(1, dtype=torch.long), torch.arange(1), (3,), 2),
    ]
    batch = pack(seqs, 4)
    q = torch.randn(4, 4, 8)
    backend = SdpaBackend()
    out = backend.attend(q, kv, 0, backend.prepare(batch, scale=8**-0.5))
    expected = [_naive(q[i], kv, (6, 1), 5 + (i + 1), mask[i], 5) for i in range(3)]
    expected.append(_naive(q[3], kv, (3,), 3, torch.tensor([True]), 2))
    assert torch.allclose(out, torch.stack(expected), atol=1e-5)


def _naive(
    q: torch.Tensor, kv: PagedKVCache, table: Any, ctx: int, new_mask: torch.Tensor, cached: int
) -> Any:
    slots = torch.tensor([table[j // 4] * 4 + j % 4 for j in range(cached + len(new_mask))])
    visible = torch.cat([torch.ones(cached, dtype=torch.bool), new_mask])
    k = kv.flat_keys(0)[slots].repeat_interleave(2, dim=1)  # [ctx, heads, D]
    v = kv.flat_values(0)[slots].repeat_interleave(2, dim=1)
    scores = torch.einsum("hd,khd->hk", q, k) * 8**-0.5
    scores[:, ~visible] = float("-inf")
    return torch.einsum("hk,khd->hd", scores.softmax(-1), v)


@pytest.mark.gpu
def test_flash_attn_matches_sdpa_on_causal_batches() -> None:
    layout = KVLayout(
        num_layers=1,
        num_blocks=16,
        block_size=16,
        num_kv_heads=2,
        head_dim=64,
        dtype=torch.float16,
        device="cuda",
    )
    kv = PagedKVCache(layout)
    kv.keys.normal_()
    kv.values.normal_()
    seqs = [
        SequenceInput(torch.zeros(5, dtype=torch.long), torch.arange(5), (3, 7), 20),
        SequenceInput(torch.zeros(1, dtype=torch.long), torch.arange(1), (9,), 4),
    ]
    batch = pack(seqs, 16).to("cuda")
    q = torch.randn(6, 4, 64, dtype=torch.float16, device="cuda")
    flash, sdpa = get_backend("flash_attn"), SdpaBackend()
    a = flash.attend(q, kv, 0, flash.prepare(batch, 64**-0.5))
    b = sdpa.attend(q, kv, 0, sdpa.prepare(batch, 64**-0.5))
    assert torch.allclose(a.float(), b.float(), atol=2e-3)
