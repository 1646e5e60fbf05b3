from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from core.forward_batch import SequenceInput, pack
from core.kv import KVLayout, PagedKVCache
from models.attention import ATTENTION_BACKENDS, SdpaBackend, get_backend
from models.attention.grouping import split_by_query_len
from models.attention.sdpa import attend_folded, build_mask, fold_query_heads


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
    kv = _random_pool(num_blocks=8, seed=0)
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


def test_a_prompt_chunk_among_decode_rows_gets_its_own_call() -> None:
    # 12 queries next to one- and three-token rows: padding all to 12 would be 4x the work
    assert split_by_query_len([1, 12, 3, 1], [40, 30, 41, 39]) == [[0, 2, 3], [1]]


def test_similar_query_lengths_stay_in_one_call() -> None:
    assert split_by_query_len([1, 3, 2, 1], [40, 30, 41, 39]) == [[0, 1, 2, 3]]
    assert split_by_query_len([5], [9]) == [[0]]


def test_sdpa_split_batch_matches_naive_attention_in_packed_order() -> None:
    kv = _random_pool(num_blocks=16, seed=1)
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    seqs = [  # a tree, a 12-token prompt chunk after 2 cached tokens, a decode row: two groups
        SequenceInput(torch.zeros(3, dtype=torch.long), torch.arange(3), (6, 1), 5, attention_mask=tree),
        SequenceInput(torch.zeros(12, dtype=torch.long), torch.arange(12), (2, 8, 9, 10), 2),
        SequenceInput(torch.zeros(1, dtype=torch.long), torch.arange(1), (3,), 2),
    ]
    batch = pack(seqs, 4)
    q = torch.randn(16, 4, 8)
    backend = SdpaBackend()
    meta = backend.prepare(batch, scale=8**-0.5)
    assert len(meta.groups) == 2
    out = backend.attend(q, kv, 0, meta)
    expected = [_naive(q[i], kv, (6, 1), 5 + i + 1, tree[i], 5) for i in range(3)]
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    expected += [_naive(q[3 + i], kv, (2, 8, 9, 10), 2 + i + 1, causal[i, : i + 1], 2) for i in range(12)]
    expected.append(_naive(q[15], kv, (3,), 3, torch.tensor([True]), 2))
    assert torch.allclose(out, torch.stack(expected), atol=1e-5)


@pytest.mark.parametrize("case", ["tree", "causal chunk", "decode row"])
def test_sdpa_one_sequence_matches_naive_attention(case: str) -> None:
    kv = _random_pool(num_blocks=8, seed=2)
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    n, mask = {"tree": (3, tree), "causal chunk": (3, None), "decode row": (1, None)}[case]
    seq = SequenceInput(torch.zeros(n, dtype=torch.long), torch.arange(n), (6, 1), 5, attention_mask=mask)
    q = torch.randn(n, 4, 8)
    backend = SdpaBackend()
    meta = backend.prepare(pack([seq], 4), scale=8**-0.5)
    out = backend.attend(q, kv, 0, meta)
    rows = tree if mask is not None else torch.ones(n, n, dtype=torch.bool).tril()
    expected = [
        _naive(q[i], kv, (6, 1), 5 + n, rows[i] if mask is not None else rows[i, : i + 1], 5)
        for i in range(n)
    ]
    assert torch.allclose(out, torch.stack(expected), atol=1e-5)
    assert (meta.groups[0].mask is None) == (case == "decode row")


def _random_pool(num_blocks: int, seed: int) -> PagedKVCache:
    """One layer, blocks of 4, 2 KV heads of 8 dims, random keys and values."""
    torch.manual_seed(seed)
    kv = PagedKVCache(KVLayout(num_layers=1, num_blocks=num_blocks, block_size=4, num_kv_heads=2, head_dim=8))
    kv.keys.normal_()
    kv.values.normal_()
    return kv


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
    pytest.importorskip("flash_attn", reason="flash-attn is optional (pip install -e .[gpu])")
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


def test_mask_shows_prefix_then_causal_or_tree_and_padded_rows_see_slot_zero() -> None:
    tree = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    mask = build_mask([2, 1], [2, 1], [tree, None], max_q=2, max_kv=4, device=torch.device("cpu"))
    assert mask.shape == (2, 1, 2, 4)
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    # one cached token and one new one; its second query row is padding
    assert mask[1, 0].int().tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_query_heads_folded_into_rows_equal_sdpa_grouping(kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(kv_heads)
    num_seqs, heads, max_q, max_kv, dim = 3, 6, 4, 10, 8
    queries = torch.randn(num_seqs, max_q, heads, dim, generator=gen).transpose(1, 2)  # packed-row view
    keys, values = (torch.randn(num_seqs, max_kv, kv_heads, dim, generator=gen).transpose(1, 2) for _ in "kv")
    mask = torch.rand(num_seqs, 1, max_q, max_kv, generator=gen) > 0.4
    mask[..., 0] = True  # every row (padded ones too) sees something
    grouped = F.scaled_dot_product_attention(queries, keys, values, mask, scale=0.3, enable_gqa=True)
    # the same per-row arithmetic (bit-identical on the dev machine); a mixed-up head or row
    # would be off by O(1)
    torch.testing.assert_close(attend_folded(queries, keys, values, mask, 0.3), grouped, rtol=0, atol=1e-6)


def test_query_heads_are_folded_only_for_several_sequences_of_several_queries() -> None:
    assert fold_query_heads(torch.Size((16, 6, 9, 64)), kv_heads=2)  # 16 requests' 8-node trees
    assert not fold_query_heads(torch.Size((16, 6, 1, 64)), kv_heads=2)  # decode rows
    assert not fold_query_heads(torch.Size((1, 6, 9, 64)), kv_heads=2)  # one sequence
    assert not fold_query_heads(torch.Size((16, 6, 9, 64)), kv_heads=6)  # no grouping to fold
