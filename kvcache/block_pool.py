"""Who owns which KV block: a free list and reference counts over one ``PagedKVCache``, and
the local prefix cache: which blocks hold the KV of which content hash.

A block with ref count 0 is free; each owner (a sequence) holds one reference. A block with more
than one reference is read-only: an owner that wants to write into it calls ``make_writable``
first and gets a private copy (copy-on-write).

A full block whose KV is final can be ``register``-ed under its content hash
(``kvcache.block_hash``). When its last owner frees it, it stays indexed as an *idle cached*
block: available to allocate (it counts as free), but found by ``lookup`` until allocation
reclaims it, least recently used first, after the never-cached free blocks run out.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

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
        self._free = list(range(layout.num_blocks))  # min-heap of free, uncached block ids
        self._idle: OrderedDict[int, None] = OrderedDict()  # free but cached blocks, LRU first
        self._hash_of: dict[int, bytes] = {}  # block -> content hash of its KV
        self._block_of: dict[bytes, int] = {}  # content hash -> block (the inverse)
        self.reclaimed = 0  # cached blocks taken back for new KV (prefix cache evictions)

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
        """Blocks ``allocate`` can hand out: free ones plus idle cached ones."""
        return len(self._free) + len(self._idle)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks indexed by content hash (in use or idle)."""
        return len(self._hash_of)

    def ref_count(self, block: int) -> int:
        """Number of owners of ``block`` (0 when free)."""
        self._check_id(block)
        return self._ref[block]

    def can_allocate(self, n: int) -> bool:
        """Whether ``allocate(n)`` would succeed."""
        return 0 <= n <= self.num_free_blocks

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with ref count 1: uncached ones lowest id first, then
        idle cached ones least recently used first (they leave the prefix index).

        Raises ``OutOfBlocksError`` (allocating nothing) when fewer than ``n`` are free.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if not self.can_allocate(n):
            raise OutOfBlocksError(
                f"asked for {n} KV blocks but only {self.num_free_blocks} of {self.num_blocks} are free; "
                "finish or preempt a sequence, or give the pool more blocks"
            )
        fresh = min(n, len(self._free))
        blocks = [heapq.heappop(self._free) for _ in range(fresh)]
        for _ in range(n - fresh):
            block, _ = self._idle.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            self.reclaimed += 1
            blocks.append(block)
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
                if block in self._hash_of:
                    self._idle[block] = None
                else:
                    heapq.heappush(self._free, block)

    # -- prefix cache ---------------------------------------------------------------------

    def register(self, block: int, content: bytes) -> bool:
        """Index ``block`` (in use, full, its KV final) under content hash ``content``.

        False (nothing changes) when that content is already indexed in another block or the
        block already holds another hash: the first copy stays the one ``lookup`` finds.
        """
        self._check_id(block)
        if self._ref[block] == 0:
            raise ValueError(f"cannot register block {block}: it is free")
        if content in self._block_of or block in self._hash_of:
            return False
        self._hash_of[block] = content
        self._block_of[content] = block
        return True

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """Blocks holding the longest indexed prefix of ``hashes`` (a chain: stops at the first miss)."""
        found = []
        for content in hashes:
            block = self._block_of.get(content)
            if block is None:
                break
            found.append(block)
        return found

    def acquire(self, blocks: Iterable[int]) -> None:
        """Add one owner to each of ``blocks`` (from ``lookup``): idle ones come back into use."""
        blocks = list(blocks)
        for block in blocks:
            self._check_id(block)
            if block not in self._hash_of:
                raise ValueError(f"cannot acquire block {block}: it holds no cached KV")
        for block in blocks:
            self._idle.pop(block, None)
            self._ref[block] += 1

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
            self._forget(block)  # its KV is about to change
            return block
        (copy,) = self.allocate(1)
        self._kv.copy_blocks([block], [copy])
        self._ref[block] -= 1
        return copy

    def check_integrity(self) -> None:
        """Raise ``IntegrityError`` if the free list and the ref counts disagree.

        Holds after every public call: the free list has no duplicates and only ids in range;
        each block is either free (ref count 0, not indexed), idle cached (ref count 0, indexed)
        or used (ref count >= 1), so the three cover every block exactly once; the prefix index
        maps hashes and blocks one to one.
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
            if block in free and block in self._hash_of:
                raise IntegrityError(f"block {block} is on the free list but indexed as cached KV")
            if block in self._idle and (ref != 0 or block not in self._hash_of):
                raise IntegrityError(f"idle cached block {block} has ref count {ref} or no hash")
            if block not in free and block not in self._idle and ref < 1:
                raise IntegrityError(f"block {block} is neither free nor owned (ref count {ref})")
        if len(self._block_of) != len(self._hash_of) or any(
            self._hash_of.get(b) != h for h, b in self._block_of.items()
        ):
            raise IntegrityError("the prefix index's hash -> block and block -> hash maps disagree")

    def _forget(self, block: int) -> None:
        content = self._hash_of.pop(block, None)
        if content is not None:
            del self._block_of[content]

    def _check_id(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block id {block} is outside the pool's [0, {self.num_blocks})")
