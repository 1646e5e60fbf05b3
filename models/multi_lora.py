"""Many LoRA adapters in one decoder forward: each token uses its own adapter, or none.

Every resident adapter owns a slot; per fused projection of the decoder (q/k/v, o, gate/up,
down) the slots' weights are stacked: A as [slots, in, parts x max_rank] and B as
[slots, parts x max_rank, out], zero-padded to the largest rank, B block-structured so that each
part's rank columns feed only its own output rows. A forward's tokens that use an adapter are
grouped by slot once (``LoraBatch``; the drafter pool packs its requests in slot order, so the
rows are usually a plain slice). Each projection then runs two segmented matmuls over those
tokens: x @ A[slot], then @ B[slot], added to the base output in place. When the groups are of
similar size (a depth level of draft trees) the groups are padded to one length and each matmul
is one batched ``bmm``, whose cost does not grow with the number of adapters; otherwise (a long
prompt next to short ones) it is ``torch.nn.functional.grouped_mm``, the segmented kernel (SGMV)
of Punica and S-LoRA, which on CPUs runs one matmul per group. Either way the work follows the
tokens, not the resident adapters. No adapter is merged into the base weights, and tokens
without an adapter are not touched.

Cheaper still where it applies: when every token of a forward uses an adapter (a level of draft
trees for users who all have one) and the drafter is small, each projection runs as one batched
matmul of the groups against their slots' merged weights ``W + (A B)^T``, replacing the base
matmul, the two LoRA matmuls and the add (on the tiny drafter those cost ~150 us of a ~280 us
layer, more than the projection itself). Merged weights are computed on a slot's first use and
dropped when it is loaded or cleared, and kept only while all slots' copies fit
:data:`MERGED_BUDGET_BYTES` (a few MB for the tiny drafter; a large drafter never merges).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from models.config import DecoderConfig
from models.lora import LoraAdapter, module_shapes

NO_ADAPTER = -1  # the slot of a token drafted by the base drafter
# fused decoder projection -> the transformers modules stacked in its output, in order
PROJECTIONS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}


def segmented_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``x`` [n, k] rows grouped by ``ends`` [G] int32 (cumulative) @ ``w`` [G, k, m] -> [n, m]."""
    if hasattr(torch.nn.functional, "grouped_mm"):
        return torch.nn.functional.grouped_mm(x, w, offs=ends)
    starts = [0, *ends[:-1].tolist()]  # older torch: one matmul per group
    return torch.cat([x[s:e] @ w[g] for g, (s, e) in enumerate(zip(starts, ends.tolist(), strict=True))])


MAX_PADDING = 2.0  # pad the groups to one length while that at most doubles the rows
MERGED_BUDGET_BYTES = 64 * 2**20  # merged per-slot weights, all slots together, at most this


@dataclass(frozen=True)
class PaddedGroups:
    """The grouped rows laid out as [groups, longest group] for batched matmuls."""

    length: int  # L
    # [G * L] int64 grouped row per padded position (padding repeats a row) and [n] int64 padded
    # positions that hold real rows; both None when the groups are all L long (a plain view)
    index: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    def to(self, device: torch.device) -> PaddedGroups:
        if self.index is None or self.valid is None:
            return self
        return PaddedGroups(self.length, self.index.to(device), self.valid.to(device))


@dataclass(frozen=True)
class LoraBatch:
    """The adapters of one forward's tokens, sorted by slot; hand it to ``Decoder.forward``."""

    stack: MultiLora
    order: torch.Tensor  # [n] int64 rows of the adapter tokens, grouped by slot
    slots: torch.Tensor  # [G] int64 the slots in use, in group order
    ends: torch.Tensor  # [G] int32 cumulative token counts of the groups
    span: tuple[int, int] | None  # (start, stop) when ``order`` is that range: rows already sorted
    padded: PaddedGroups | None  # set when padding the groups to one length is cheap
    slot_span: tuple[int, int] | None  # (first, last + 1) when ``slots`` is that range
    merged: bool = False  # every token uses an adapter: project with the slots' merged weights

    def to(self, device: torch.device) -> LoraBatch:
        """This batch with its index tensors on ``device`` (the stack's: the decoder's)."""
        return replace(
            self,
            order=self.order.to(device),
            slots=self.slots.to(device),
            ends=self.ends.to(device),
            padded=None if self.padded is None else self.padded.to(device),
        )

    def project(self, linear: nn.Linear, x: torch.Tensor, layer: int, projection: str) -> torch.Tensor:
        """``linear(x)`` [T, out] with each token's adapter applied for ``projection`` of ``layer``."""
        if not self.merged:
            return self.add_to(linear(x), layer, projection, x)
        weights = self.stack.merged_weights(layer, projection, linear.weight, self.slots, self.slot_span)
        if len(weights) == 1 and self.span:  # one adapter for all rows, in order: a plain matmul
            out = torch.mm(x, weights[0])
        else:
            out = self._unpad(torch.bmm(self._pad(self._grouped_rows(x)), weights))
        if linear.bias is not None:
            out += linear.bias
        if self.span:  # every row uses an adapter, so the span is all of them, in order
            return out
        return torch.empty_like(out).index_copy_(0, self.order, out)

    def _grouped_rows(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.span[0] : self.span[1]] if self.span else x.index_select(0, self.order)

    def _pad(self, rows: torch.Tensor) -> torch.Tensor:
        """Grouped ``rows`` [n, k] -> [G, L, k] (``padded`` must be set)."""
        p = self.padded
        assert p is not None  # merged batches are padded too (see MultiLora.batch)
        groups = rows if p.index is None else rows.index_select(0, p.index)
        return groups.view(len(self.slots), p.length, -1)

    def _unpad(self, out: torch.Tensor) -> torch.Tensor:
        """[G, L, m] -> the grouped rows' [n, m]."""
        p = self.padded
        assert p is not None
        flat = out.flatten(0, 1)
        return flat if p.valid is None else flat.index_select(0, p.valid)

    def add_to(self, out: torch.Tensor, layer: int, projection: str, x: torch.Tensor) -> torch.Tensor:
        """``out`` [T, out] += each adapter token's LoRA output for ``projection`` of ``layer``
        on ``x`` [T, in]; returns ``out``."""
        # slices are views; the gathers only run for rows or slots out of order
        a, b = self.stack.a[(layer, projection)], self.stack.b[(layer, projection)]
        if self.slot_span:
            a, b = a[self.slot_span[0] : self.slot_span[1]], b[self.slot_span[0] : self.slot_span[1]]
        else:
            a, b = a.index_select(0, self.slots), b.index_select(0, self.slots)
        rows = self._grouped_rows(x)
        if self.padded is None:
            delta = segmented_mm(segmented_mm(rows, a, self.ends), b, self.ends)
        else:
            delta = self._unpad(torch.bmm(torch.bmm(self._pad(rows), a), b))
        delta = delta.to(out.dtype)
        if self.span:
            out[self.span[0] : self.span[1]] += delta
            return out
        return out.index_add_(0, self.order, delta)


def padded(counts: torch.Tensor, ends: torch.Tensor) -> PaddedGroups | None:
    """The padded layout of groups of ``counts`` rows, or None when it would cost too much."""
    length, n = int(counts.max()), int(ends[-1])
    if len(counts) * length > MAX_PADDING * n:
        return None
    if len(counts) * length == n:
        return PaddedGroups(length)
    offsets = torch.arange(length)
    index = ((ends - counts)[:, None] + offsets).clamp(max=n - 1).flatten()
    valid = (offsets[None] < counts[:, None]).flatten().nonzero().squeeze(1)
    return PaddedGroups(length, index, valid)


class MultiLora:
    """The stacked LoRA weights of ``slots`` adapter slots (all zero while a slot is empty)."""

    def __init__(
        self,
        cfg: DecoderConfig,
        slots: int,
        max_rank: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",  # the decoder's
    ) -> None:
        if slots < 1 or max_rank < 1:
            raise ValueError(f"need at least one slot and rank 1, got {slots} slots, max rank {max_rank}")
        self.cfg, self.slots, self.max_rank, self.dtype = cfg, slots, max_rank, dtype
        shapes = module_shapes(cfg)
        self.a: dict[tuple[int, str], torch.Tensor] = {}  # [slots, in, parts * max_rank]
        self.b: dict[tuple[int, str], torch.Tensor] = {}  # [slots, parts * max_rank, out]
        for layer in range(cfg.num_layers):
            for projection, parts in PROJECTIONS.items():
                n_in, ranks = shapes[parts[0]][0], len(parts) * max_rank
                n_out = sum(shapes[p][1] for p in parts)
                self.a[(layer, projection)] = torch.zeros(slots, n_in, ranks, dtype=dtype, device=device)
                self.b[(layer, projection)] = torch.zeros(slots, ranks, n_out, dtype=dtype, device=device)
        self.adapters: list[LoraAdapter | None] = [None] * slots
        per_slot = sum(a.shape[1] * b.shape[2] for a, b in zip(self.a.values(), self.b.values(), strict=True))
        self.merges = slots * per_slot * torch.finfo(dtype).bits // 8 <= MERGED_BUDGET_BYTES
        self._merged: dict[tuple[int, str], torch.Tensor] = {}  # (layer, projection) -> [slots, in, out]
        self._fresh: set[tuple[int, int, str]] = set()  # (slot, layer, projection) merged and current

    def merged_weights(
        self,
        layer: int,
        projection: str,
        base: torch.Tensor,  # [out, in] the decoder's weight
        slots: torch.Tensor,  # [G] int64
        slot_span: tuple[int, int] | None,  # (first, last + 1) when ``slots`` is that range
    ) -> torch.Tensor:
        """``[G, in, out]``: ``base`` plus each slot's adapter, transposed for ``x @ w``."""
        key = (layer, projection)
        stack = self._merged.get(key)
        if stack is None:
            out_dim, in_dim = base.shape
            stack = self._merged[key] = torch.empty(
                self.slots, in_dim, out_dim, dtype=base.dtype, device=base.device
            )
        for slot in range(*slot_span) if slot_span else slots.tolist():
            if (slot, layer, projection) not in self._fresh:
                with torch.no_grad():
                    delta = self.a[key][slot] @ self.b[key][slot]  # [in, out]
                    stack[slot] = base.T + delta.to(base.dtype)
                self._fresh.add((slot, layer, projection))
        return stack[slot_span[0] : slot_span[1]] if slot_span else stack.index_select(0, slots)

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Write ``adapter`` into ``slot`` (replacing what was there)."""
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter {adapter.name!r} has rank {adapter.rank} > max rank {self.max_rank}")
        self.clear(slot)
        shapes = module_shapes(self.cfg)
        for projection, parts in PROJECTIONS.items():
            row = 0
            for part, module in enumerate(parts):
                col = part * self.max_rank
                for layer in range(self.cfg.num_layers):
                    w = adapter.weights.get((layer, module))
                    if w is not None:
                        a, b = self.a[(layer, projection)], self.b[(layer, projection)]
                        a[slot, :, col : col + w.rank] = w.a.T.to(self.dtype)
                        b[slot, col : col + w.rank, row : row + w.b.shape[0]] = w.b.T.to(self.dtype)
                row += shapes[module][1]
        self.adapters[slot] = adapter

    def clear(self, slot: int) -> None:
        self._fresh = {k for k in self._fresh if k[0] != slot}
        for key in self.a:
            self.a[key][slot] = 0
            self.b[key][slot] = 0
        self.adapters[slot] = None

    def batch(self, token_slots: torch.Tensor) -> LoraBatch | None:
        """``token_slots`` [T] int64 (``NO_ADAPTER`` for base tokens) -> the forward's LoRA inputs,
        or None when no token uses an adapter (the forward then costs what the base one does)."""
        first = int(token_slots[0]) if len(token_slots) else NO_ADAPTER
        if bool((token_slots == first).all()):  # one slot for all (a single user): no sorting
            return None if first == NO_ADAPTER else self.one_slot(first, len(token_slots))
        rows = (token_slots != NO_ADAPTER).nonzero().squeeze(1)
        if len(rows) == 0:
            return None
        slots, counts = token_slots[rows].unique(return_counts=True)
        self._check_loaded(slots.tolist())
        order = rows[token_slots[rows].argsort(stable=True)]
        start, stop = int(order[0]), int(order[-1]) + 1
        contiguous = stop - start == len(order) and bool((order.diff() == 1).all())
        ends = counts.cumsum(0)
        first, last = int(slots[0]), int(slots[-1])  # unique() sorts them
        layout = padded(counts, ends)
        return LoraBatch(
            self,
            order,
            slots,
            ends.to(torch.int32),
            (start, stop) if contiguous else None,
            layout,
            (first, last + 1) if last - first + 1 == len(slots) else None,
            merged=self.merges and layout is not None and len(rows) == len(token_slots),
        )

    def one_slot(self, slot: int, n: int) -> LoraBatch:
        """The batch of ``n`` tokens that all use ``slot`` (what :meth:`batch` returns for them,
        without reading slots back from a tensor)."""
        self._check_loaded([slot])
        return LoraBatch(
            self,
            order=torch.arange(n),
            slots=torch.tensor([slot]),
            ends=torch.tensor([n], dtype=torch.int32),
            span=(0, n),
            padded=PaddedGroups(n),
            slot_span=(slot, slot + 1),
            merged=self.merges,
        )

    def _check_loaded(self, slots: list[int]) -> None:
        empty = [s for s in slots if not 0 <= s < self.slots or self.adapters[s] is None]
        if empty:
            raise ValueError(f"tokens use adapter slots {empty}, which hold no adapter")
