"""PyTorch scaled-dot-product attention over the paged pool; any mask, any device.

Per forward, each sequence's KV slots are gathered into a padded ``[B, max_kv]`` index and one
boolean mask ``[B, 1, max_q, max_kv]`` is built; every layer then runs a single batched SDPA call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.forward_batch import ForwardBatch
from core.kv import PagedKVCache


@dataclass(frozen=True)
class SdpaMetadata:
    kv_slots: torch.Tensor  # [B, max_kv] int64 flat pool slots, 0 where padded
    query_rows: torch.Tensor  # [B, max_q] int64 rows of the packed batch, 0 where padded
    query_valid: torch.Tensor  # [B, max_q] bool
    mask: torch.Tensor | None  # [B, 1, max_q, max_kv] bool, True = may attend; None = all visible
    scale: float
    single: bool  # one sequence: queries are all rows in order, no padding to gather or drop


def gather_kv_slots(batch: ForwardBatch, max_kv: int) -> torch.Tensor:
    """``[B, max_kv]`` flat slots of each sequence's KV indices 0..context_len-1 (0 past the end)."""
    device = batch.block_tables.device
    kv_index = torch.arange(max_kv, device=device)
    block_col = (kv_index // batch.block_size).clamp(max=batch.block_tables.shape[1] - 1)
    blocks = batch.block_tables[:, block_col]
    slots = blocks * batch.block_size + kv_index % batch.block_size
    return torch.where(kv_index[None, :] < batch.context_lens[:, None], slots, torch.zeros_like(slots))


def build_mask(batch: ForwardBatch, max_q: int, max_kv: int) -> torch.Tensor:
    """``[B, 1, max_q, max_kv]``: cached prefix fully visible, new tokens causal or per their mask."""
    device = batch.block_tables.device
    q = torch.arange(max_q, device=device)[None, :, None]
    j = torch.arange(max_kv, device=device)[None, None, :]
    cached = batch.num_cached[:, None, None]
    num_new = (batch.context_lens - batch.num_cached)[:, None, None]
    in_new = (j >= cached) & (j < cached + num_new)
    mask = (j < cached) | (in_new & (j - cached <= q))
    for b, custom in enumerate(batch.attention_masks):
        if custom is not None:
            n, c = custom.shape[0], int(batch.num_cached[b])
            mask[b, :n, c : c + n] = custom
    mask &= q < num_new
    mask[:, :, 0] |= q[:, :, 0] >= num_new[:, :, 0]  # padded query rows see one slot: no NaN rows
    return mask[:, None]


class SdpaBackend:
    name = "sdpa"

    @staticmethod
    def available() -> bool:
        return True

    def supports(self, batch: ForwardBatch) -> bool:
        return True

    def prepare(self, batch: ForwardBatch, scale: float) -> SdpaMetadata:
        counts = batch.query_starts[1:] - batch.query_starts[:-1]
        max_q, max_kv = int(counts.max()), int(batch.context_lens.max())
        single = batch.num_sequences == 1
        # the single-sequence decode step (one new token, no tree) sees its whole context: no mask
        needs_mask = not (single and max_q == 1)
        offsets = torch.arange(max_q, device=counts.device)[None, :]
        valid = offsets < counts[:, None]
        rows = torch.where(valid, batch.query_starts[:-1, None] + offsets, torch.zeros_like(offsets))
        return SdpaMetadata(
            kv_slots=gather_kv_slots(batch, max_kv),
            query_rows=rows,
            query_valid=valid,
            mask=build_mask(batch, max_q, max_kv) if needs_mask else None,
            scale=scale,
            single=single,
        )

    def attend(self, q: torch.Tensor, kv: PagedKVCache, layer: int, meta: SdpaMetadata) -> torch.Tensor:
        shape = (*meta.kv_slots.shape, *kv.keys.shape[-2:])  # [B, max_kv, kv_heads, D]
        flat_slots = meta.kv_slots.flatten()  # index_select is several times faster than [] here
        keys = kv.flat_keys(layer).index_select(0, flat_slots).view(shape).transpose(1, 2)
        values = kv.flat_values(layer).index_select(0, flat_slots).view(shape).transpose(1, 2)
        queries = (q[None] if meta.single else q[meta.query_rows]).transpose(1, 2)  # [B, heads, max_q, D]
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=meta.mask, scale=meta.scale, enable_gqa=True
        ).transpose(1, 2)
        return out[0] if meta.single else out[meta.query_valid]  # [T, heads, D] in packed order
