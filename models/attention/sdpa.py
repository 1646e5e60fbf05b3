"""PyTorch scaled-dot-product attention over the paged pool; any mask, any device.

Per forward, the sequences are split into at most two groups by query length
(:mod:`models.attention.grouping`: a prompt chunk does not pad every decode row to its length);
for each group, its sequences' KV slots are gathered into a padded ``[G, max_kv]`` index and one
boolean mask ``[G, 1, max_q, max_kv]`` is built, and every layer runs one batched SDPA call per
group. A batch of one sequence (a single user's decode step, tree verification or draft level)
pads nothing: its queries are used in place and its mask is a visible prefix plus its tree's.
Several sequences of several queries each (draft trees, chunks) attend with the query heads that
share a KV head folded into the rows of one head (:func:`attend_folded`). Lengths come from the
batch's host-side copies, so preparing a forward reads no tensor back.
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
    # [G, max_q] int64 rows of the packed batch (0 where padded) and bool; None for a batch of
    # one sequence, whose queries are all rows in order
    query_rows: torch.Tensor | None
    query_valid: torch.Tensor | None
    mask: torch.Tensor | None  # [G, 1, max_q, max_kv] bool, True = may attend; None = all visible
    rows: torch.Tensor | None  # [n] int64 packed rows of out[query_valid]; None = all rows in order


@dataclass(frozen=True)
class SdpaMetadata:
    groups: tuple[SdpaGroup, ...]
    scale: float


def gather_kv_slots(
    block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int, max_kv: int
) -> torch.Tensor:
    """``[G, max_kv]`` flat slots of each sequence's KV indices 0..context_len-1 (0 past the end).
    The longest sequence's table covers ``max_kv``, so every block column exists."""
    kv_index = torch.arange(max_kv, device=block_tables.device)
    slots = block_tables[:, kv_index // block_size] * block_size + kv_index % block_size
    return slots.masked_fill_(kv_index >= context_lens[:, None], 0)


def build_mask(
    num_cached: list[int],  # [G]
    num_new: list[int],  # [G]
    custom_masks: list[torch.Tensor | None],  # per sequence [n, n] bool, None = causal
    max_q: int,
    max_kv: int,
    device: torch.device,
) -> torch.Tensor:
    """``[G, 1, max_q, max_kv]``: cached prefix fully visible, new tokens causal or per their mask."""
    q = torch.arange(max_q, device=device)[None, :, None]
    j = torch.arange(max_kv, device=device)[None, None, :]
    cached = torch.tensor(num_cached, device=device)[:, None, None]
    new = torch.tensor(num_new, device=device)[:, None, None]
    # query q sees KV j <= cached + q (its prefix, then causal); padded query rows (q >= new)
    # see slot 0 only, so that no row is all False (NaN)
    mask = (j <= cached + q) & ((q < new) | (j == 0))
    for b, custom in enumerate(custom_masks):
        if custom is not None:
            n, c = custom.shape[0], num_cached[b]
            mask[b, :n, c : c + n] = custom
    return mask[:, None]


def prepare_single(batch: ForwardBatch) -> SdpaGroup:
    """The call of a batch of one sequence: nothing padded, so no query rows to gather, and its
    mask is its tree's mask after a visible prefix (none for one causal token)."""
    (new,), (cached,) = batch.host_num_new, batch.host_num_cached
    custom = batch.attention_masks[0]
    mask = None
    if custom is not None:
        mask = torch.ones(new, cached + new, dtype=torch.bool, device=custom.device)
        mask[:, cached:] = custom
        mask = mask[None, None]
    elif new > 1:
        mask = build_mask([cached], [new], [None], new, cached + new, batch.context_lens.device)
    kv_slots = gather_kv_slots(batch.block_tables, batch.context_lens, batch.block_size, cached + new)
    return SdpaGroup(kv_slots=kv_slots, query_rows=None, query_valid=None, mask=mask, rows=None)


def prepare_group(batch: ForwardBatch, members: list[int] | None) -> SdpaGroup:
    """The padded call over ``members`` (sequence indices in batch order; None = all of them)."""
    if batch.num_sequences == 1:
        return prepare_single(batch)
    everyone = members is None
    members = list(range(batch.num_sequences)) if members is None else members
    device = batch.context_lens.device
    new = [batch.host_num_new[i] for i in members]
    cached = [batch.host_num_cached[i] for i in members]
    contexts = [c + n for c, n in zip(cached, new, strict=True)]
    max_q, max_kv = max(new), max(contexts)
    pick = slice(None) if everyone else torch.tensor(members, device=device)
    offsets = torch.arange(max_q, device=device)[None, :]
    valid = offsets < torch.tensor(new, device=device)[:, None]
    rows = torch.where(valid, batch.query_starts[:-1][pick][:, None] + offsets, 0)
    customs = [batch.attention_masks[i] for i in members]
    # one decode row alone in its group sees its whole context, unpadded: no mask
    needs_mask = not (len(members) == 1 and max_q == 1)
    kv_slots = gather_kv_slots(batch.block_tables[pick], batch.context_lens[pick], batch.block_size, max_kv)
    return SdpaGroup(
        kv_slots=kv_slots,
        query_rows=rows,
        query_valid=valid,
        mask=build_mask(cached, new, customs, max_q, max_kv, device) if needs_mask else None,
        rows=None if everyone else rows[valid],
    )


class SdpaBackend:
    name = "sdpa"

    @staticmethod
    def available() -> bool:
        return True

    def supports(self, batch: ForwardBatch) -> bool:
        return True

    def prepare(self, batch: ForwardBatch, scale: float) -> SdpaMetadata:
        split = split_by_query_len(batch.host_num_new, batch.host_context_lens)
        members: list[list[int] | None] = [None] if len(split) == 1 else list(split)
        groups = tuple(prepare_group(batch, m) for m in members)
        return SdpaMetadata(groups=groups, scale=scale)

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
        rows, valid = group.query_rows, group.query_valid
        queries = (q[None] if rows is None else q[rows]).transpose(1, 2)  # [G, heads, max_q, D]
        if fold_query_heads(queries.shape, keys.shape[1]):
            out = attend_folded(queries, keys, values, group.mask, meta.scale)
        else:
            out = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=group.mask, scale=meta.scale, enable_gqa=True
            )
        out = out.transpose(1, 2)
        return out[0] if valid is None else out[valid]


def fold_query_heads(query_shape: torch.Size, kv_heads: int) -> bool:
    """Whether the query heads sharing a KV head attend as rows of one head: for several
    sequences of several queries each (on the tiny target, a layer of 16 requests' 8-node trees:
    397 us folded against 523 us; of 4 requests' 3-token items: 73 against 101 us; the output
    is bit-identical). One query a sequence (decode) is faster left to SDPA's own grouping (115
    against 163 us for 16 rows), and so is a single sequence (the tiny drafter's levels: 14
    against 30 us)."""
    num_seqs, heads, max_q, _ = query_shape
    return num_seqs > 1 and max_q > 1 and heads > kv_heads


def attend_folded(
    queries: torch.Tensor,  # [G, heads, max_q, D]
    keys: torch.Tensor,  # [G, kv_heads, max_kv, D]
    values: torch.Tensor,  # [G, kv_heads, max_kv, D]
    mask: torch.Tensor | None,  # [G, 1, max_q, max_kv] bool
    scale: float,
) -> torch.Tensor:
    """Grouped-query attention with the ``heads / kv_heads`` query heads of each KV head as
    ``group x max_q`` rows of one head (every row still sees only its own mask row): what
    ``enable_gqa`` computes, row for row the same arithmetic (bit-identical on the dev machine),
    in fewer, larger kernel calls. -> [G, heads, max_q, D]"""
    num_seqs, heads, max_q, dim = queries.shape
    group = heads // keys.shape[1]
    folded = queries.reshape(num_seqs, keys.shape[1], group * max_q, dim)  # rows: (head in group, query)
    rows_mask = None if mask is None else mask.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=rows_mask, scale=scale)
    return out.view(num_seqs, heads, max_q, dim)
