"""One decoder forward over many sequences: their new tokens packed without padding.

There is no separate prefill or decode phase. Each sequence brings the tokens whose KV is not in
the pool yet (a prompt chunk, a correction token, draft-tree nodes, or any mix) and the KV entries
it already has (``num_cached``). New token ``i`` of a sequence is written at logical KV index
``num_cached + i`` and attends to all ``num_cached`` cached entries plus the new tokens its
``attention_mask`` row allows (causal when no mask is given; ancestors-only for tree nodes).
Positions are explicit, so tree siblings can share a position and compressed visual tokens can
keep their original ones. Under M-RoPE (Qwen2-VL) a text token's one position stands for all three
of its (temporal, height, width) components; visual rows bring their own three in
``embed_positions``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from core.kv import slot_list


@dataclass(frozen=True)
class SequenceInput:
    """The new tokens of one sequence for one forward."""

    token_ids: torch.Tensor  # [n] int64
    positions: torch.Tensor  # [n] int64 RoPE positions
    block_table: tuple[int, ...]  # pool blocks covering KV indices [0, num_cached + n)
    num_cached: int  # KV entries of this sequence already in the pool
    attention_mask: torch.Tensor | None = None  # [n, n] bool among new tokens; None = causal
    embeds: torch.Tensor | None = None  # [m, hidden] replacing the embeddings at embed_index
    embed_index: torch.Tensor | None = None  # [m] int64 indices into this sequence's new tokens
    embed_positions: torch.Tensor | None = None  # [m, 3] int64 M-RoPE (t, h, w) of those rows

    def __post_init__(self) -> None:
        n = self.token_ids.shape[0]
        if self.token_ids.dim() != 1 or n == 0:
            raise ValueError(f"token_ids must be a non-empty 1-D tensor, got {tuple(self.token_ids.shape)}")
        if self.positions.shape != self.token_ids.shape:
            raise ValueError(f"positions {tuple(self.positions.shape)} must match token_ids ({n},)")
        if self.num_cached < 0:
            raise ValueError(f"num_cached must be >= 0, got {self.num_cached}")
        if self.attention_mask is not None and self.attention_mask.shape != (n, n):
            raise ValueError(f"attention_mask must be [{n}, {n}], got {tuple(self.attention_mask.shape)}")
        if (self.embeds is None) != (self.embed_index is None):
            raise ValueError("embeds and embed_index must be given together")
        if (
            self.embeds is not None
            and self.embed_index is not None
            and self.embeds.shape[0] != self.embed_index.shape[0]
        ):
            raise ValueError(
                f"{self.embeds.shape[0]} embeds for {self.embed_index.shape[0]} embed_index entries"
            )
        if self.embed_positions is not None and (
            self.embed_index is None or tuple(self.embed_positions.shape) != (self.embed_index.shape[0], 3)
        ):
            raise ValueError("embed_positions must be [m, 3], one row per embed_index entry")

    @property
    def num_new(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def context_len(self) -> int:
        return self.num_cached + self.num_new


@dataclass(frozen=True)
class ForwardBatch:
    """Packed inputs of one forward; build with :func:`pack`."""

    token_ids: torch.Tensor  # [T] int64, all sequences' new tokens concatenated
    positions: torch.Tensor  # [T] int64
    query_starts: torch.Tensor  # [B + 1] int64, sequence b owns rows query_starts[b]:query_starts[b+1]
    num_cached: torch.Tensor  # [B] int64
    context_lens: torch.Tensor  # [B] int64, num_cached + new tokens
    block_tables: torch.Tensor  # [B, max_blocks] int64, -1 past each table's end
    slot_mapping: torch.Tensor  # [T] int64 flat pool slot written by each new token
    attention_masks: tuple[torch.Tensor | None, ...]  # per sequence [n_b, n_b] bool, None = causal
    embed_index: torch.Tensor | None  # [M] int64 rows of the packed batch whose embedding is replaced
    embeds: torch.Tensor | None  # [M, hidden]
    embed_positions: torch.Tensor | None  # [M, 3] int64 M-RoPE positions of the embed rows, or None
    block_size: int
    # the same lengths as Python ints, for shapes and loops without reading tensors back
    host_num_new: tuple[int, ...]  # [B] new tokens per sequence
    host_num_cached: tuple[int, ...]  # [B]

    @property
    def num_sequences(self) -> int:
        return len(self.host_num_new)

    @property
    def host_context_lens(self) -> tuple[int, ...]:
        return tuple(c + n for c, n in zip(self.host_num_cached, self.host_num_new, strict=True))

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def has_custom_masks(self) -> bool:
        return any(m is not None for m in self.attention_masks)

    def last_token_rows(self) -> torch.Tensor:
        """``[B]`` int64 row of each sequence's last new token."""
        return self.query_starts[1:] - 1

    def to(self, device: torch.device | str) -> ForwardBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return ForwardBatch(
            token_ids=self.token_ids.to(device),
            positions=self.positions.to(device),
            query_starts=self.query_starts.to(device),
            num_cached=self.num_cached.to(device),
            context_lens=self.context_lens.to(device),
            block_tables=self.block_tables.to(device),
            slot_mapping=self.slot_mapping.to(device),
            attention_masks=tuple(move(m) for m in self.attention_masks),
            embed_index=move(self.embed_index),
            embeds=move(self.embeds),
            embed_positions=move(self.embed_positions),
            block_size=self.block_size,
            host_num_new=self.host_num_new,
            host_num_cached=self.host_num_cached,
        )


def _slot_list(seq: SequenceInput, block_size: int) -> list[int]:
    """Flat pool slots of the sequence's new tokens (KV indices ``num_cached .. context_len - 1``)."""
    needed = (seq.context_len + block_size - 1) // block_size
    if len(seq.block_table) < needed:
        raise ValueError(
            f"block table has {len(seq.block_table)} blocks but {seq.context_len} KV entries "
            f"need {needed} blocks of {block_size}"
        )
    return slot_list(seq.block_table, seq.num_cached, seq.context_len, block_size)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def pack(seqs: Sequence[SequenceInput], block_size: int) -> ForwardBatch:
    """Concatenate the sequences' new tokens and derive slots and offsets. Per-sequence values
    are gathered in Python and turned into tensors once each: a drafter's forward over a few
    tokens is dominated by per-op overhead, so this costs fewer ops than vectorising."""
    if not seqs:
        raise ValueError("pack needs at least one sequence")
    num_new = tuple(s.num_new for s in seqs)
    num_cached = tuple(s.num_cached for s in seqs)
    contexts = [c + n for c, n in zip(num_cached, num_new, strict=True)]
    starts = list(accumulate(num_new, initial=0))
    max_blocks = max(len(s.block_table) for s in seqs)
    tables = [[*s.block_table, *[-1] * (max_blocks - len(s.block_table))] for s in seqs]
    slots = [slot for s in seqs for slot in _slot_list(s, block_size)]
    with_embeds = [
        (starts[b], s.embeds, s.embed_index, s.embed_positions)
        for b, s in enumerate(seqs)
        if s.embeds is not None and s.embed_index is not None
    ]
    embed_index = embeds = embed_positions = None
    if with_embeds:
        embed_index = _cat([index + start for start, _, index, _ in with_embeds])
        embeds = _cat([e for _, e, _, _ in with_embeds])
        grids = [p for *_, p in with_embeds]
        if any(p is not None for p in grids):
            if any(p is None for p in grids):
                raise ValueError("either every sequence's visual rows carry M-RoPE positions or none do")
            embed_positions = _cat([p for p in grids if p is not None])
    return ForwardBatch(
        token_ids=_cat([s.token_ids for s in seqs]),
        positions=_cat([s.positions for s in seqs]),
        query_starts=torch.tensor(starts, dtype=torch.long),
        num_cached=torch.tensor(num_cached, dtype=torch.long),
        context_lens=torch.tensor(contexts, dtype=torch.long),
        block_tables=torch.tensor(tables, dtype=torch.long),
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        attention_masks=tuple(s.attention_mask for s in seqs),
        embed_index=embed_index,
        embeds=embeds,
        embed_positions=embed_positions,
        block_size=block_size,
        host_num_new=num_new,
        host_num_cached=num_cached,
    )
