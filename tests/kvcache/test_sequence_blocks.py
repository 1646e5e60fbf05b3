from __future__ import annotations

import dataclasses

import pytest
import torch

from kvcache import BlockPool, IntegrityError, OutOfBlocksError, SequenceBlocks
from tests.kvcache.kv_tags import SMALL_LAYOUT, assert_tags, write_tags


def prefilled(pool: BlockPool, tags: list[int]) -> SequenceBlocks:
    """A sequence whose committed KV holds ``tags``, written like a prompt forward would."""
    seq = SequenceBlocks(pool)
    seq.reserve(len(tags))
    write_tags(pool.kv, seq.slots(0, len(tags)), tags)
    seq.commit(len(tags), range(len(tags)))
    return seq


def test_reserve_covers_new_range_and_commit_trims_to_committed() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    seq = SequenceBlocks(pool)
    seq.reserve(9)
    assert seq.block_table == (0, 1, 2)
    seq.commit(9, [0, 1, 2, 3, 4])
    assert seq.num_tokens == 5
    assert seq.block_table == (0, 1)
    assert pool.ref_count(2) == 0
    seq.check_integrity()
    pool.check_integrity()


def test_reserve_is_all_or_nothing_when_out_of_blocks() -> None:
    pool = BlockPool(dataclasses.replace(SMALL_LAYOUT, num_blocks=3))
    seq = prefilled(pool, [1, 2, 3, 4, 5])  # 2 blocks, last one partial
    other = seq.fork()
    # 3 more entries fit the partial block, 4 need a new block plus a copy of the shared one.
    assert other.can_reserve(3)
    assert not other.can_reserve(4)
    with pytest.raises(OutOfBlocksError, match="reserving 4 KV entries needs 2 blocks but only 1 are free"):
        other.reserve(4)
    assert other.block_table == seq.block_table
    assert pool.num_free_blocks == 1
    pool.check_integrity()


def test_slots_map_kv_indices_through_block_table() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    held = pool.allocate(2)  # blocks 0 and 1
    seq = SequenceBlocks(pool)
    seq.reserve(2)  # block 2
    seq.commit(2, [0, 1])
    pool.free(held)
    seq.reserve(4)  # KV indices [2, 6): the rest of block 2, then block 0
    assert seq.block_table == (2, 0)
    slots = seq.slots(1, 6)
    assert slots.dtype == torch.int64
    assert slots.tolist() == [9, 10, 11, 0, 1]


def test_slots_outside_reservation_raises() -> None:
    seq = SequenceBlocks(BlockPool(SMALL_LAYOUT))
    seq.reserve(3)
    with pytest.raises(ValueError, match=r"KV range \[0, 5\) is outside the reserved \[0, 4\)"):
        seq.slots(0, 5)


def test_commit_moves_accepted_tree_nodes_kv_in_place() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    seq = prefilled(pool, [1, 2, 3])
    seq.reserve(7)  # tree nodes at KV indices [3, 10): blocks 0, 1, 2
    assert len(seq.block_table) == 3
    tail_block = seq.block_table[2]
    tree_tags = [100, 101, 102, 103, 104, 105, 106]
    write_tags(pool.kv, seq.slots(3, 10), tree_tags)

    seq.commit(7, [0, 2, 5])

    assert seq.num_tokens == 6
    assert_tags(pool.kv, seq.slots(0, 6), [1, 2, 3, 100, 102, 105])
    assert len(seq.block_table) == 2
    assert pool.ref_count(tail_block) == 0
    assert pool.num_free_blocks == SMALL_LAYOUT.num_blocks - 2
    seq.check_integrity()
    pool.check_integrity()


def test_commit_of_identity_prefix_copies_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = BlockPool(SMALL_LAYOUT)
    seq = SequenceBlocks(pool)
    seq.reserve(5)
    write_tags(pool.kv, seq.slots(0, 5), [1, 2, 3, 4, 5])

    def no_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
        raise AssertionError(f"unexpected copy {src.tolist()} -> {dst.tolist()}")

    monkeypatch.setattr(pool.kv, "copy_slots", no_copy)
    seq.commit(5, [0, 1, 2])
    assert seq.num_tokens == 3
    assert_tags(pool.kv, seq.slots(0, 3), [1, 2, 3])


def test_commit_of_nothing_frees_reserved_blocks() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    seq = prefilled(pool, [1, 2, 3, 4])
    seq.reserve(3)
    seq.commit(3, [])
    assert seq.num_tokens == 4
    assert seq.block_table == (0,)
    assert pool.num_free_blocks == SMALL_LAYOUT.num_blocks - 1


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ([2, 1], "strictly increasing"),
        ([1, 1], "strictly increasing"),
        ([0, 3], r"must lie in \[0, 3\)"),
        ([-1, 0], r"must lie in \[0, 3\)"),
    ],
)
def test_commit_rejects_bad_keep_offsets(keep: list[int], message: str) -> None:
    seq = SequenceBlocks(BlockPool(SMALL_LAYOUT))
    seq.reserve(3)
    with pytest.raises(ValueError, match=message):
        seq.commit(3, keep)
    assert seq.num_tokens == 0


def test_commit_beyond_reservation_raises() -> None:
    seq = SequenceBlocks(BlockPool(SMALL_LAYOUT))
    seq.reserve(3)
    with pytest.raises(ValueError, match=r"call reserve\(5\) before the forward"):
        seq.commit(5, [0])


def test_fork_then_reserve_copies_partial_last_block() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    parent = prefilled(pool, [1, 2, 3, 4, 5, 6])  # block 0 full, block 1 holds 2 entries
    child = parent.fork()
    assert child.block_table == parent.block_table == (0, 1)
    assert child.num_tokens == 6
    assert (pool.ref_count(0), pool.ref_count(1)) == (2, 2)

    child.reserve(1)

    assert child.block_table[0] == 0
    assert child.block_table[1] not in parent.block_table
    assert (pool.ref_count(0), pool.ref_count(1)) == (2, 1)
    assert_tags(pool.kv, child.slots(0, 6), [1, 2, 3, 4, 5, 6])
    write_tags(pool.kv, child.slots(6, 7), [70])
    child.commit(1, [0])
    parent.reserve(1)
    write_tags(pool.kv, parent.slots(6, 7), [80])
    parent.commit(1, [0])
    assert_tags(pool.kv, child.slots(0, 7), [1, 2, 3, 4, 5, 6, 70])
    assert_tags(pool.kv, parent.slots(0, 7), [1, 2, 3, 4, 5, 6, 80])
    pool.check_integrity()


def test_fork_at_block_boundary_appends_without_copying() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    parent = prefilled(pool, list(range(1, 9)))  # exactly 2 full blocks
    child = parent.fork()
    child.reserve(1)
    assert child.block_table == (0, 1, 2)
    assert (pool.ref_count(0), pool.ref_count(1)) == (2, 2)


def test_fork_leaves_parent_reservation_beyond_committed_blocks_private() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    parent = prefilled(pool, [1, 2, 3, 4])
    parent.reserve(4)  # block 1, not committed yet
    child = parent.fork()
    assert child.block_table == (0,)
    assert pool.ref_count(parent.block_table[1]) == 1
    parent.commit(4, [0, 1, 2, 3])  # the new entries sit in the private block: allowed
    assert parent.num_tokens == 8


def test_commit_into_block_shared_by_a_fork_raises() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    parent = prefilled(pool, [1, 2])
    parent.reserve(1)
    parent.fork()
    with pytest.raises(ValueError, match=r"block 0 under the new entries is shared; call reserve\(\)"):
        parent.commit(1, [0])


def test_release_of_fork_keeps_parent_blocks() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    parent = prefilled(pool, [1, 2, 3, 4, 5])
    child = parent.fork()
    child.release()
    assert child.block_table == ()
    assert child.num_tokens == 0
    assert (pool.ref_count(0), pool.ref_count(1)) == (1, 1)
    assert_tags(pool.kv, parent.slots(0, 5), [1, 2, 3, 4, 5])
    parent.release()
    assert pool.num_free_blocks == SMALL_LAYOUT.num_blocks
    pool.check_integrity()


def test_check_integrity_detects_duplicate_block_in_table() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    seq = prefilled(pool, [1])
    seq.blocks.append(seq.blocks[0])
    with pytest.raises(IntegrityError, match=r"block table \[0, 0\] names a block twice"):
        seq.check_integrity()


def test_check_integrity_detects_table_too_short_for_committed_entries() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    seq = prefilled(pool, [1, 2])
    seq.num_tokens = 5
    with pytest.raises(IntegrityError, match="5 committed entries but the blocks hold 4"):
        seq.check_integrity()


def test_check_integrity_detects_freed_block_in_table() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    seq = prefilled(pool, [1, 2])
    pool.free(seq.blocks)
    with pytest.raises(IntegrityError, match="holds free block 0"):
        seq.check_integrity()


def test_truncate_keeps_the_leading_entries_and_frees_the_blocks_past_them() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    seq = prefilled(pool, list(range(100, 111)))  # 11 entries: three blocks of four
    free = pool.num_free_blocks
    seq.truncate(5)
    assert seq.num_tokens == 5 and len(seq.blocks) == 2 and pool.num_free_blocks == free + 1
    assert_tags(pool.kv, seq.slots(0, 5), list(range(100, 105)))
    seq.reserve(3)  # the next entries land right after the kept ones
    write_tags(pool.kv, seq.slots(5, 8), [7, 8, 9])
    seq.commit(3, range(3))
    assert_tags(pool.kv, seq.slots(0, 8), [*range(100, 105), 7, 8, 9])
    seq.check_integrity()
    with pytest.raises(ValueError, match="cannot truncate"):
        seq.truncate(9)
