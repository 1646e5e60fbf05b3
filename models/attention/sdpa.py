"""PyTorch scaled-dot-product attention over the paged pool; any mask, any device.

Per forward, the sequences are split into at most two groups by query length
(:mod:`models.attention.grouping`: a prompt chunk does not pad every decode row to its length);
for each group, its sequences' KV slots are gathered into a padded ``[G, max_kv]`` index and one
boolean mask ``[G, 1, max_q, max_kv]`` is built, and every layer runs one batched SDPA call per
group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.forward_batch import ForwardBatch
from core.kv import PagedKVCache
from models.attention.grouping import split_by_query_len


@dataclass(frozen=True)
class SdpaGroup:
    """Sequences attended in one padded call."""

    kv_slots: torch.Tensor  # [G, max_kv] int64 flat pool slots, 0 where padded
    query_rows: torch.Tensor  # [G, max_q] int64 rows of the packed batch, 0 where padded
    query_valid: torch.Tensor  # [G, max_q] bool
    mask: torch.Tensor | None  # [G, 1, max_q, max_kv] bool, True = may attend; None = all visible
    rows: torch.Tensor | None  # [n] int64 packed rows of out[query_valid]; None = all rows in order


@dataclass(frozen=True)
class SdpaMetadata:
    groups: tuple[SdpaGroup, ...]
    scale: float
    single: bool  # one sequence: queries are all rows in order, no padding to gather or drop


def gather_kv_slots(
    block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, max_kv: int
) -> torch.Tensor:
    """``[G, max_kv]`` flat slots of each sequence's KV indices 0..context_len-1 (0 past the end)."""
    kv_index = torch.arange(max_kv, device=block_tables.device)
    block_col = (kv_index // block_size).clamp(max=block_tables.shape[1] - 1)
    slots = block_tables[:, block_col] * block_size + kv_index % block_size
    return torch.where(kv_index[None, :] < context_lens[:, None], slots, torch.zeros_like(slots))


def build_mask(
    num_cached: torch.Tensor,  # [G] int64
    context_lens: torch.Tensor,  # [G] int64
    custom_masks: list[torch.Tensor | None],  # per sequence [n, n] bool, None = causal
    max_q: int,
    max_kv: int,
) -> torch.Tensor:
    """``[G, 1, max_q, max_kv]``: cached prefix fully visible, new tokens causal or per their mask."""
    device = context_lens.device
    q = torch.arange(max_q, device=device)[None, :, None]
    j = torch.arange(max_kv, device=device)[None, None, :]
    cached = num_cached[:, None, None]
    num_new = (context_lens - num_cached)[:, None, None]
    in_new = (j >= cached) & (j < cached + num_new)
    mask = (j < cached) | (in_new & (j - cached <= q))
    for b, custom in enumerate(custom_masks):
        if custom is not None:
            n, c = custom.shape[0], int(num_cached[b])
            mask[b, :n, c : c + n] = custom
    mask &= q < num_new
    mask[:, :, 0] |= q[:, :, 0] >= num_new[:, :, 0]  # padded query rows see one slot: no NaN rows
    return mask[:, None]


def prepare_group(batch: ForwardBatch, counts: torch.Tensor, members: list[int] | None) -> SdpaGroup:
    """The padded call over ``members`` (sequence indices in batch order; None = all of them)."""
    pick = slice(None) if members is None else torch.tensor(members, device=counts.device)
    counts, starts = counts[pick], batch.query_starts[:-1][pick]
    context_lens, num_cached = batch.context_lens[pick], batch.num_cached[pick]
    max_q, max_kv = int(counts.max()), int(context_lens.max())
    offsets = torch.arange(max_q, device=counts.device)[None, :]
    valid = offsets < counts[:, None]
    rows = torch.where(valid, starts[:, None] + offsets, torch.zeros_like(offsets))
    customs = list(batch.attention_masks) if members is None else [batch.attention_masks[i] for i in members]
    # the single-sequence decode step (one new token, no tree) sees its whole context: no mask
    needs_mask = not (len(customs) == 1 and max_q == 1)
    return SdpaGroup(
        kv_slots=gather_kv_slots(batch.block_tables[pick], context_lens, batch.block_size, max_kv),
        query_rows=rows,
        query_valid=valid,
        mask=build_mask(num_cached, context_lens, customs, max_q, max_kv) if needs_mask else None,
        rows=None if members is None else rows[valid],
    )


class SdpaBackend:
    name = "sdpa"

    @staticmethod
    def available() -> bool:
        return True

    def supports(self, batch: ForwardBatch) -> bool:
        return True

    def prepare(self, batch: ForwardBatch, scale: float) -> SdpaMetadata:
        counts = batch.query_starts[1:] - batch.query_starts[:-1]
        split = split_by_query_len(counts.tolist(), batch.context_lens.tolist())
        members: list[list[int] | None] = [None] if len(split) == 1 else list(split)
        groups = tuple(prepare_group(batch, counts, m) for m in members)
        return SdpaMetadata(groups=groups, scale=scale, single=batch.num_sequences == 1)

    def attend(self, q: torch.Tensor, kv: PagedKVCache, layer: int, meta: SdpaMetadata) -> torch.Tensor:
        if len(meta.groups) == 1:
            return self._attend_group(q, kv, layer, meta.groups[0], meta)
        out = torch.empty_like(q)
        for group in meta.groups:
            assert group.rows is not None  # a group of a split names its rows
            out.index_copy_(0, group.rows, self._attend_group(q, kv, layer, group, meta))
        return out

    @staticmethod
    def _attend_group(
        q: torch.Tensor, kv: PagedKVCache, layer: int, group: SdpaGroup, meta: SdpaMetadata
    ) -> torch.Tensor:
        """``q`` [T, heads, D] -> [n, heads, D] for the group's queries, in packed order."""
        shape = (*group.kv_slots.shape, *kv.keys.shape[-2:])  # [G, max_kv, kv_heads, D]
        flat_slots = group.kv_slots.flatten()  # index_select is several times faster than [] here
        keys = kv.flat_keys(layer).index_select(0, flat_slots).view(shape).transpose(1, 2)
        values = kv.flat_values(layer).index_select(0, flat_slots).view(shape).transpose(1, 2)
        queries = (q[None] if meta.single else q[group.query_rows]).transpose(1, 2)  # [G, heads, max_q, D]
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=group.mask, scale=meta.scale, enable_gqa=True
        ).transpose(1, 2)
        return out[0] if meta.single else out[group.query_valid]
