"""One sequence's block table: which pool blocks hold its KV entries, and how many are committed.

A step goes ``reserve(n)`` -> forward writes ``n`` new entries at KV indices
``[num_tokens, num_tokens + n)`` through ``slots`` -> ``commit(n, keep)``. Speculative decoding
writes a whole draft tree but keeps only the accepted path: ``commit`` moves the kept entries'
KV down to sit right after the committed prefix, so an accepted path is never recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch

from core.kv import slot_list
from kvcache.block_pool import BlockPool, IntegrityError, OutOfBlocksError


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class SequenceBlocks:
    """The blocks of one sequence over a ``BlockPool``; starts empty."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []  # block i holds KV indices [i * block_size, (i + 1) * block_size)
        self.num_tokens = 0  # committed KV entries

    @classmethod
    def from_cached(cls, pool: BlockPool, blocks: Sequence[int]) -> SequenceBlocks:
        """A sequence starting from full cached blocks it already owns one reference to."""
        seq = cls(pool)
        seq.blocks = list(blocks)
        seq.num_tokens = len(blocks) * pool.block_size
        return seq

    @property
    def block_table(self) -> tuple[int, ...]:
        return tuple(self.blocks)

    @property
    def capacity(self) -> int:
        """KV entries the current blocks can hold."""
        return len(self.blocks) * self.pool.block_size

    def can_reserve(self, n: int) -> bool:
        """Whether ``reserve(n)`` would succeed (new blocks plus copy-on-write copies fit)."""
        return self.pool.can_allocate(self._blocks_needed(n))

    def reserve(self, n: int) -> None:
        """Make KV indices ``[num_tokens, num_tokens + n)`` writable by this sequence alone.

        Appends blocks until ``[0, num_tokens + n)`` is covered and replaces each shared block
        that the new range touches with a private copy. All-or-nothing: raises
        ``OutOfBlocksError`` and changes nothing when the pool cannot supply the blocks. A later
        ``fork`` shares the partial last block again, so reserve again after forking.
        """
        needed = self._blocks_needed(n)
        if not self.pool.can_allocate(needed):
            raise OutOfBlocksError(
                f"reserving {n} KV entries needs {needed} blocks but only "
                f"{self.pool.num_free_blocks} are free"
            )
        for i in self._shared_in_range(n):
            self.blocks[i] = self.pool.make_writable(self.blocks[i])
        missing = _ceil_div(self.num_tokens + n, self.pool.block_size) - len(self.blocks)
        self.blocks.extend(self.pool.allocate(max(missing, 0)))

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Flat pool slots ``[end - start]`` int64 of KV indices ``[start, end)``."""
        if not 0 <= start <= end <= self.capacity:
            raise ValueError(f"KV range [{start}, {end}) is outside the reserved [0, {self.capacity})")
        slots = slot_list(self.blocks, start, end, self.pool.block_size)
        return torch.tensor(slots, dtype=torch.long, device=self.pool.kv.keys.device)

    def commit(self, num_new: int, keep: Sequence[int]) -> None:
        """Keep the new entries at offsets ``keep`` of the ``num_new`` just written; drop the rest.

        Before: a forward wrote ``num_new`` entries at ``[num_tokens, num_tokens + num_new)``
        after ``reserve``. ``keep`` is strictly increasing with each offset < ``num_new``. After:
        the kept entries' KV (all layers) sits at ``[num_tokens, num_tokens + len(keep))`` in
        order, ``num_tokens`` grew by ``len(keep)`` and blocks past the committed entries are
        back in the pool.
        """
        self._check_commit(num_new, keep)
        moves = [(offset, i) for i, offset in enumerate(keep) if offset != i]
        if moves:  # keep = [0, 1, ..., k) needs no copy: the entries already sit in place
            new_slots = self.slots(self.num_tokens, self.num_tokens + num_new)
            src = new_slots[[offset for offset, _ in moves]]
            dst = new_slots[[i for _, i in moves]]
            self.pool.kv.copy_slots(src, dst)
        self.num_tokens += len(keep)
        self._trim()

    def truncate(self, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` committed entries and give back the blocks past them
        (a guess the sequence was extended with did not come true)."""
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(f"cannot truncate {self.num_tokens} committed entries to {num_tokens}")
        self.num_tokens = num_tokens
        self._trim()

    def fork(self) -> SequenceBlocks:
        """A new owner of this sequence's committed blocks, with the same ``num_tokens``.

        Blocks reserved beyond the committed entries stay private to this sequence.
        """
        committed = self.blocks[: _ceil_div(self.num_tokens, self.pool.block_size)]
        self.pool.share(committed)
        child = SequenceBlocks(self.pool)
        child.blocks = committed
        child.num_tokens = self.num_tokens
        return child

    def release(self) -> None:
        """Return every block to the pool; the sequence is empty afterwards (and reusable)."""
        self.pool.free(self.blocks)
        self.blocks = []
        self.num_tokens = 0

    def check_integrity(self) -> None:
        """Raise ``IntegrityError`` if the table cannot hold the committed entries or is corrupt."""
        if not 0 <= self.num_tokens <= self.capacity:
            raise IntegrityError(f"{self.num_tokens} committed entries but the blocks hold {self.capacity}")
        if len(set(self.blocks)) != len(self.blocks):
            raise IntegrityError(f"block table {self.blocks} names a block twice")
        for block in self.blocks:
            if self.pool.ref_count(block) < 1:
                raise IntegrityError(f"block table {self.blocks} holds free block {block}")

    def _block_range(self, n: int) -> range:
        """Indices into ``blocks`` that KV indices ``[num_tokens, num_tokens + n)`` fall in."""
        if n <= 0:
            return range(0)
        size = self.pool.block_size
        return range(self.num_tokens // size, (self.num_tokens + n - 1) // size + 1)

    def _shared_in_range(self, n: int) -> list[int]:
        existing = (i for i in self._block_range(n) if i < len(self.blocks))
        return [i for i in existing if self.pool.ref_count(self.blocks[i]) > 1]

    def _blocks_needed(self, n: int) -> int:
        if n < 0:
            raise ValueError(f"cannot reserve a negative number of KV entries ({n})")
        missing = _ceil_div(self.num_tokens + n, self.pool.block_size) - len(self.blocks)
        return max(missing, 0) + len(self._shared_in_range(n))

    def _check_commit(self, num_new: int, keep: Sequence[int]) -> None:
        if not 0 <= num_new <= self.capacity - self.num_tokens:
            raise ValueError(
                f"commit of {num_new} new entries after {self.num_tokens} exceeds the reserved "
                f"{self.capacity}; call reserve({num_new}) before the forward"
            )
        if any(b <= a for a, b in pairwise(keep)):
            raise ValueError(f"keep offsets must be strictly increasing, got {list(keep)}")
        if keep and not 0 <= keep[0] <= keep[-1] < num_new:
            raise ValueError(f"keep offsets must lie in [0, {num_new}), got {list(keep)}")
        for i in self._block_range(num_new):
            if self.pool.ref_count(self.blocks[i]) > 1:
                raise ValueError(
                    f"block {self.blocks[i]} under the new entries is shared; "
                    "call reserve() after fork() and before the forward"
                )

    def _trim(self) -> None:
        """Free the blocks past the committed entries."""
        needed = _ceil_div(self.num_tokens, self.pool.block_size)
        self.pool.free(self.blocks[needed:])
        del self.blocks[needed:]
