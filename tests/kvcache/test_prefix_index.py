"""The pool's prefix index: registered blocks outlive their owners until allocation needs them."""

from __future__ import annotations

import dataclasses

import pytest

from kvcache import BlockPool
from tests.kvcache.kv_tags import SMALL_LAYOUT


def h(i: int) -> bytes:
    return bytes([i]) * 32


def small_pool(num_blocks: int) -> BlockPool:
    return BlockPool(dataclasses.replace(SMALL_LAYOUT, num_blocks=num_blocks))


def test_a_freed_registered_block_stays_findable_and_counts_as_free() -> None:
    pool = small_pool(4)
    blocks = pool.allocate(2)
    assert pool.register(blocks[0], h(1)) and pool.register(blocks[1], h(2))
    pool.free(blocks)
    assert pool.num_free_blocks == 4 and pool.num_cached_blocks == 2
    assert pool.lookup([h(1), h(2), h(3)]) == blocks
    pool.acquire(blocks)
    assert [pool.ref_count(b) for b in blocks] == [1, 1]
    assert pool.num_free_blocks == 2
    pool.check_integrity()


def test_lookup_stops_at_the_first_missing_link() -> None:
    pool = small_pool(4)
    a, b = pool.allocate(2)
    pool.register(a, h(1))
    pool.register(b, h(3))
    assert pool.lookup([h(1), h(2), h(3)]) == [a]
    assert pool.lookup([h(2), h(3)]) == []


def test_allocation_takes_uncached_blocks_first_then_least_recently_used_cached() -> None:
    pool = small_pool(4)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.register(b, h(i))
    pool.free([blocks[1]])
    pool.free([blocks[0]])
    pool.free([blocks[2]])  # idle LRU order: 1, 0, 2
    assert pool.allocate(1) == [3]  # never cached
    assert pool.allocate(2) == [blocks[1], blocks[0]]
    assert pool.reclaimed == 2
    assert pool.lookup([h(0)]) == [] and pool.lookup([h(1)]) == []
    assert pool.lookup([h(2)]) == [blocks[2]]
    pool.check_integrity()


def test_a_second_copy_of_indexed_content_is_not_registered() -> None:
    pool = small_pool(4)
    a, b = pool.allocate(2)
    assert pool.register(a, h(1))
    assert not pool.register(b, h(1))
    assert not pool.register(a, h(2))
    assert pool.lookup([h(1)]) == [a]
    pool.free([b])
    assert pool.num_cached_blocks == 1
    pool.check_integrity()


def test_writing_into_a_solely_owned_cached_block_drops_it_from_the_index() -> None:
    pool = small_pool(4)
    (a,) = pool.allocate(1)
    pool.register(a, h(1))
    assert pool.make_writable(a) == a
    assert pool.lookup([h(1)]) == []
    pool.check_integrity()


def test_a_shared_cached_block_is_copied_before_writing_and_stays_indexed() -> None:
    pool = small_pool(4)
    (a,) = pool.allocate(1)
    pool.register(a, h(1))
    pool.acquire([a])
    copy = pool.make_writable(a)
    assert copy != a
    assert pool.lookup([h(1)]) == [a]
    pool.check_integrity()


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (lambda pool: pool.register(0, h(1)), "it is free"),
        (lambda pool: pool.acquire([0]), "holds no cached KV"),
    ],
    ids=["register-free-block", "acquire-uncached-block"],
)
def test_misuse_is_refused(action: object, message: str) -> None:
    pool = small_pool(2)
    with pytest.raises(ValueError, match=message):
        action(pool)  # type: ignore[operator]


def test_integrity_check_catches_an_idle_block_that_lost_its_hash() -> None:
    pool = small_pool(2)
    (a,) = pool.allocate(1)
    pool.register(a, h(1))
    pool.free([a])
    pool._hash_of.pop(a)  # corrupt on purpose
    with pytest.raises(AssertionError, match="idle cached block"):
        pool.check_integrity()
