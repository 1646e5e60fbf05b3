"""Who owns which KV block: a free list and reference counts over one ``PagedKVCache``.

A block with ref count 0 is free; each owner (a sequence, a prefix cache entry) holds one
reference. A block with more than one reference is read-only: an owner that wants to write into
it calls ``make_writable`` first and gets a private copy (copy-on-write).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable

from core.kv import KVLayout, PagedKVCache


class OutOfBlocksError(RuntimeError):
    """More KV blocks were asked for than are free; nothing was allocated."""


class IntegrityError(AssertionError):
    """A block-accounting invariant is broken (a bug, never a user error)."""


class BlockPool:
    """The KV memory of one model plus the accounting of its blocks.

    Free blocks are handed out lowest id first, so allocation order is deterministic.
    """

    def __init__(self, layout: KVLayout) -> None:
        self._kv = PagedKVCache(layout)
        self._ref = [0] * layout.num_blocks  # [num_blocks] owners per block
        self._free = list(range(layout.num_blocks))  # min-heap of free block ids

    @property
    def kv(self) -> PagedKVCache:
        return self._kv

    @property
    def num_blocks(self) -> int:
        return self._kv.layout.num_blocks

    @property
    def block_size(self) -> int:
        return self._kv.layout.block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def ref_count(self, block: int) -> int:
        """Number of owners of ``block`` (0 when free)."""
        self._check_id(block)
        return self._ref[block]

    def can_allocate(self, n: int) -> bool:
        """Whether ``allocate(n)`` would succeed."""
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with ref count 1, lowest ids first.

        Raises ``OutOfBlocksError`` (allocating nothing) when fewer than ``n`` are free.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if not self.can_allocate(n):
            raise OutOfBlocksError(
                f"asked for {n} KV blocks but only {len(self._free)} of {self.num_blocks} are free; "
                "finish or preempt a sequence, or give the pool more blocks"
            )
        blocks = [heapq.heappop(self._free) for _ in range(n)]
        for block in blocks:
            self._ref[block] = 1
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """Add one owner to each block; every block must already be in use."""
        blocks = list(blocks)
        for block in blocks:
            self._check_id(block)
            if self._ref[block] == 0:
                raise ValueError(f"cannot share block {block}: it is free (allocate it first)")
        for block in blocks:
            self._ref[block] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one owner from each block (once per occurrence); a block at 0 becomes free.

        All-or-nothing: raises ``ValueError`` without changing anything when any block would be
        freed more times than it has owners (a double free).
        """
        counts = Counter(blocks)
        for block, times in counts.items():
            self._check_id(block)
            if times > self._ref[block]:
                raise ValueError(
                    f"block {block} freed {times} time(s) but has {self._ref[block]} owner(s): double free"
                )
        for block, times in counts.items():
            self._ref[block] -= times
            if self._ref[block] == 0:
                heapq.heappush(self._free, block)

    def can_make_writable(self, block: int) -> bool:
        """Whether ``make_writable(block)`` would succeed."""
        return self.ref_count(block) <= 1 or self.can_allocate(1)

    def make_writable(self, block: int) -> int:
        """Return a block the caller may write into, holding the same KV as ``block``.

        The caller must own ``block``. If it is shared, the caller's reference moves to a fresh
        copy (returned); the other owners keep ``block`` untouched. Otherwise returns ``block``.
        """
        if self.ref_count(block) == 0:
            raise ValueError(f"cannot make block {block} writable: it is free")
        if self._ref[block] == 1:
            return block
        (copy,) = self.allocate(1)
        self._kv.copy_blocks([block], [copy])
        self._ref[block] -= 1
        return copy

    def check_integrity(self) -> None:
        """Raise ``IntegrityError`` if the free list and the ref counts disagree.

        Holds after every public call: the free list has no duplicates and only ids in range, and
        each block is either free with ref count 0 or used with ref count >= 1 (so free + used
        covers every block exactly once).
        """
        free = set(self._free)
        if len(free) != len(self._free):
            dupes = sorted(b for b, c in Counter(self._free).items() if c > 1)
            raise IntegrityError(f"free list holds blocks {dupes} more than once")
        out_of_range = sorted(b for b in free if not 0 <= b < self.num_blocks)
        if out_of_range:
            raise IntegrityError(f"free list holds ids {out_of_range} outside [0, {self.num_blocks})")
        for block, ref in enumerate(self._ref):
            if block in free and ref != 0:
                raise IntegrityError(f"block {block} is on the free list with ref count {ref}")
            if block not in free and ref < 1:
                raise IntegrityError(f"block {block} is neither free nor owned (ref count {ref})")

    def _check_id(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block id {block} is outside the pool's [0, {self.num_blocks})")
