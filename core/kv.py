"""The paged KV pool: the tensors every decoder layer reads and writes.

A sequence's KV lives in fixed-size blocks named by its block table. Logical KV index ``i`` of a
sequence sits in block ``block_table[i // block_size]`` at offset ``i % block_size``; the flat
*slot* of that entry is ``block * block_size + offset``. Who owns which block is decided by
``kvcache.BlockPool``; this class only holds the memory and moves entries around.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def slot_list(block_table: Sequence[int], start: int, stop: int, block_size: int) -> list[int]:
    """Flat slots of a sequence's KV indices ``[start, stop)`` under ``block_table`` (which must
    cover ``stop``), one ``range`` per block touched: for the few indices of a decode step or a
    draft tree, cheaper than the handful of tensor ops a vectorised lookup takes."""
    slots: list[int] = []
    index = start
    while index < stop:
        block, offset = divmod(index, block_size)
        take = min(block_size - offset, stop - index)
        first = block_table[block] * block_size + offset
        slots.extend(range(first, first + take))
        index += take
    return slots


@dataclass(frozen=True)
class KVLayout:
    """Shape and type of a paged KV pool."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element


class PagedKVCache:
    """Key and value tensors of all layers, ``[num_layers, num_blocks, block_size, kv_heads, head_dim]``.

    ``keys[layer]`` is the per-layer pool ``[num_blocks, block_size, kv_heads, head_dim]``.
    """

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout
        shape = (
            layout.num_layers,
            layout.num_blocks,
            layout.block_size,
            layout.num_kv_heads,
            layout.head_dim,
        )
        self.keys = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
        self.values = torch.zeros(shape, dtype=layout.dtype, device=layout.device)
        # per-layer flat views, made once: every layer of every forward reads and writes through them
        flat = (layout.num_layers, layout.num_slots, layout.num_kv_heads, layout.head_dim)
        self._flat_keys = self.keys.view(flat).unbind(0)
        self._flat_values = self.values.view(flat).unbind(0)

    def flat_keys(self, layer: int) -> torch.Tensor:
        """``[num_slots, kv_heads, head_dim]`` view of one layer's keys."""
        return self._flat_keys[layer]

    def flat_values(self, layer: int) -> torch.Tensor:
        """``[num_slots, kv_heads, head_dim]`` view of one layer's values."""
        return self._flat_values[layer]

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the entries at flat slots ``src`` [n] to ``dst`` [n] in every layer.

        Sources are read before any destination is written, so overlapping moves are safe.
        """
        if src.shape != dst.shape:
            raise ValueError(f"copy_slots needs equal shapes, got {src.shape} and {dst.shape}")
        n = self.layout.num_layers
        for cache in (self.keys, self.values):
            flat = cache.view(n, self.layout.num_slots, *cache.shape[3:])
            flat[:, dst] = flat[:, src]

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks ``src[i]`` -> ``dst[i]`` in every layer (copy-on-write)."""
        s = torch.tensor(src, dtype=torch.long, device=self.keys.device)
        d = torch.tensor(dst, dtype=torch.long, device=self.keys.device)
        self.keys[:, d] = self.keys[:, s]
        self.values[:, d] = self.values[:, s]
