from __future__ import annotations

import dataclasses

import pytest
import torch

from kvcache import BlockPool, IntegrityError, OutOfBlocksError
from tests.kvcache.kv_tags import SMALL_LAYOUT, assert_tags, write_tags


def block_slots(pool: BlockPool, block: int) -> torch.Tensor:
    size = pool.block_size
    return torch.arange(block * size, (block + 1) * size)


def test_allocate_hands_out_lowest_free_ids_first() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    assert pool.allocate(3) == [0, 1, 2]
    pool.free([1])
    assert pool.allocate(2) == [1, 3]
    pool.check_integrity()


def test_allocate_all_or_nothing_when_out_of_blocks() -> None:
    pool = BlockPool(dataclasses.replace(SMALL_LAYOUT, num_blocks=4))
    pool.allocate(3)
    assert not pool.can_allocate(2)
    with pytest.raises(OutOfBlocksError, match="asked for 2 KV blocks but only 1 of 4 are free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    assert pool.ref_count(3) == 0
    assert pool.allocate(1) == [3]
    pool.check_integrity()


def test_free_twice_raises() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(ValueError, match=f"block {block} freed 1 time.* 0 owner.*double free"):
        pool.free([block])
    assert pool.num_free_blocks == SMALL_LAYOUT.num_blocks
    pool.check_integrity()


def test_free_of_same_block_twice_in_one_call_changes_nothing() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    a, b = pool.allocate(2)
    with pytest.raises(ValueError, match="double free"):
        pool.free([a, b, b])
    assert (pool.ref_count(a), pool.ref_count(b)) == (1, 1)
    assert pool.num_free_blocks == SMALL_LAYOUT.num_blocks - 2


def test_shared_block_returns_to_free_list_only_after_last_owner_frees() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    (block,) = pool.allocate(1)
    pool.share([block])
    pool.free([block])
    assert pool.ref_count(block) == 1
    assert pool.num_free_blocks == SMALL_LAYOUT.num_blocks - 1
    pool.free([block])
    assert pool.ref_count(block) == 0
    assert pool.num_free_blocks == SMALL_LAYOUT.num_blocks


def test_share_of_free_block_raises() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    with pytest.raises(ValueError, match="cannot share block 5: it is free"):
        pool.share([5])


def test_block_id_out_of_range_raises() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    with pytest.raises(ValueError, match=r"block id 16 is outside the pool's \[0, 16\)"):
        pool.ref_count(16)


def test_copy_on_write_keeps_other_owner_data() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    (shared,) = pool.allocate(1)
    pool.share([shared])
    write_tags(pool.kv, block_slots(pool, shared), [1, 2, 3, 4])

    private = pool.make_writable(shared)
    assert private != shared
    assert (pool.ref_count(shared), pool.ref_count(private)) == (1, 1)
    assert_tags(pool.kv, block_slots(pool, private), [1, 2, 3, 4])

    write_tags(pool.kv, block_slots(pool, private), [11, 12, 13, 14])
    assert_tags(pool.kv, block_slots(pool, shared), [1, 2, 3, 4])
    pool.check_integrity()


def test_make_writable_of_sole_owner_returns_same_block() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    (block,) = pool.allocate(1)
    assert pool.make_writable(block) == block
    assert pool.num_free_blocks == SMALL_LAYOUT.num_blocks - 1


def test_make_writable_without_free_blocks_raises_and_keeps_the_share() -> None:
    pool = BlockPool(dataclasses.replace(SMALL_LAYOUT, num_blocks=2))
    block, _ = pool.allocate(2)
    pool.share([block])
    assert not pool.can_make_writable(block)
    with pytest.raises(OutOfBlocksError):
        pool.make_writable(block)
    assert pool.ref_count(block) == 2


def test_check_integrity_detects_duplicate_in_free_list() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    pool._free.append(3)
    with pytest.raises(IntegrityError, match=r"free list holds blocks \[3\] more than once"):
        pool.check_integrity()


def test_check_integrity_detects_owned_block_on_free_list() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    pool._ref[5] = 1
    with pytest.raises(IntegrityError, match="block 5 is on the free list with ref count 1"):
        pool.check_integrity()


def test_check_integrity_detects_leaked_block() -> None:
    pool = BlockPool(SMALL_LAYOUT)
    (block,) = pool.allocate(1)
    pool._ref[block] = 0
    with pytest.raises(IntegrityError, match=f"block {block} is neither free nor owned"):
        pool.check_integrity()
