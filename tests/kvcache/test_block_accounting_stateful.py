"""Random interleavings of pool and sequence operations against a model of owners and contents.

The model tracks every owner (raw block lists held by the test, and sequences) and what each
sequence's committed KV must hold. After every step the pool's ref counts must equal the number
of owners of each block, both integrity checks must pass, and every sequence must read back its
own entries, which catches a write that leaked into a block another owner still shares.
"""

from __future__ import annotations

from collections import Counter

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcache import BlockPool, OutOfBlocksError, SequenceBlocks
from tests.kvcache.kv_tags import SMALL_LAYOUT, assert_tags, write_tags


class BlockAccounting(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(SMALL_LAYOUT)
        self.handles: list[list[int]] = []  # raw owners: each list holds one reference per block
        self.seqs: list[SequenceBlocks] = []
        self.contents: list[list[int]] = []  # contents[i]: tags of seqs[i]'s committed entries
        self.next_tag = 1

    def _tags(self, n: int) -> list[int]:
        tags = list(range(self.next_tag, self.next_tag + n))
        self.next_tag += n
        return tags

    @rule(n=st.integers(0, 6))
    def allocate(self, n: int) -> None:
        free_before = self.pool.num_free_blocks
        if self.pool.can_allocate(n):
            self.handles.append(self.pool.allocate(n))
            assert self.pool.num_free_blocks == free_before - n
        else:
            try:
                self.pool.allocate(n)
            except OutOfBlocksError:
                assert self.pool.num_free_blocks == free_before
            else:
                raise AssertionError("allocate succeeded although can_allocate said no")

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def free_handle(self, data: st.DataObject) -> None:
        self.pool.free(self.handles.pop(data.draw(st.integers(0, len(self.handles) - 1))))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def share_handle(self, data: st.DataObject) -> None:
        handle = self.handles[data.draw(st.integers(0, len(self.handles) - 1))]
        self.pool.share(handle)
        self.handles.append(list(handle))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def share_sequence_blocks(self, data: st.DataObject) -> None:
        """Another owner (say a prefix cache) takes a reference to a sequence's blocks."""
        seq = self.seqs[data.draw(st.integers(0, len(self.seqs) - 1))]
        self.pool.share(seq.block_table)
        self.handles.append(list(seq.block_table))

    @precondition(lambda self: any(self.handles))
    @rule(data=st.data())
    def make_writable(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from([h for h in self.handles if h]))
        i = data.draw(st.integers(0, len(handle) - 1))
        old = handle[i]
        if not self.pool.can_make_writable(old):
            return
        shared = self.pool.ref_count(old) > 1
        slots_of = [old * SMALL_LAYOUT.block_size + k for k in range(SMALL_LAYOUT.block_size)]
        before = [self.pool.kv.flat_keys(layer)[slots_of].clone() for layer in range(SMALL_LAYOUT.num_layers)]
        handle[i] = self.pool.make_writable(old)
        assert (handle[i] != old) == shared
        new_slots = [handle[i] * SMALL_LAYOUT.block_size + k for k in range(SMALL_LAYOUT.block_size)]
        for layer in range(SMALL_LAYOUT.num_layers):
            assert self.pool.kv.flat_keys(layer)[new_slots].equal(before[layer])

    @rule()
    def new_sequence(self) -> None:
        self.seqs.append(SequenceBlocks(self.pool))
        self.contents.append([])

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), n=st.integers(0, 9))
    def over_reserve(self, data: st.DataObject, n: int) -> None:
        """Reserve without a forward; a later commit must give the unused blocks back."""
        seq = self.seqs[data.draw(st.integers(0, len(self.seqs) - 1))]
        table, free_before = seq.block_table, self.pool.num_free_blocks
        if seq.can_reserve(n):
            seq.reserve(n)
            assert seq.capacity >= seq.num_tokens + n
        else:
            try:
                seq.reserve(n)
            except OutOfBlocksError:
                assert (seq.block_table, self.pool.num_free_blocks) == (table, free_before)
            else:
                raise AssertionError("reserve succeeded although can_reserve said no")

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), num_new=st.integers(0, 9))
    def forward_and_commit(self, data: st.DataObject, num_new: int) -> None:
        """Reserve, write ``num_new`` fresh entries as a forward would, keep a random subset."""
        index = data.draw(st.integers(0, len(self.seqs) - 1))
        seq = self.seqs[index]
        if not seq.can_reserve(num_new):
            return
        seq.reserve(num_new)
        tags = self._tags(num_new)
        write_tags(self.pool.kv, seq.slots(seq.num_tokens, seq.num_tokens + num_new), tags)
        keep = sorted(data.draw(st.sets(st.integers(0, num_new - 1))) if num_new else [])
        seq.commit(num_new, keep)
        self.contents[index] += [tags[k] for k in keep]
        assert seq.num_tokens == len(self.contents[index])
        assert len(seq.block_table) == -(-seq.num_tokens // SMALL_LAYOUT.block_size)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.seqs) - 1))
        self.seqs.append(self.seqs[index].fork())
        self.contents.append(list(self.contents[index]))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.seqs) - 1))
        self.seqs.pop(index).release()
        self.contents.pop(index)

    @invariant()
    def accounting_matches_owners(self) -> None:
        self.pool.check_integrity()
        owners: Counter[int] = Counter()
        for handle in self.handles:
            owners.update(handle)
        for seq in self.seqs:
            seq.check_integrity()
            owners.update(seq.block_table)
        for block in range(SMALL_LAYOUT.num_blocks):
            assert self.pool.ref_count(block) == owners[block], f"block {block}"
        assert self.pool.num_free_blocks == SMALL_LAYOUT.num_blocks - len(owners)

    @invariant()
    def sequences_read_back_their_own_entries(self) -> None:
        for seq, tags in zip(self.seqs, self.contents, strict=True):
            assert_tags(self.pool.kv, seq.slots(0, seq.num_tokens), tags)

    def teardown(self) -> None:
        for seq in self.seqs:
            seq.release()
        for handle in self.handles:
            self.pool.free(handle)
        self.pool.check_integrity()
        assert self.pool.num_free_blocks == SMALL_LAYOUT.num_blocks


BlockAccounting.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_block_accounting = BlockAccounting.TestCase
