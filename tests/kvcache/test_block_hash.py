"""Block hashes: equal exactly when everything up to the block's end is equal, in one namespace."""

from __future__ import annotations

import pytest

from kvcache.block_hash import CacheScope, ImageRows, block_hashes, tenant_salt

MODEL = b"m" * 32
ALICE = CacheScope(MODEL, tenant_salt("alice"))
BOB = CacheScope(MODEL, tenant_salt("bob"))
TOKENS = list(range(100, 140))  # 40 tokens: 10 full blocks of 4
IMAGE = [ImageRows(start=8, length=12, digest="aa" * 32)]  # rows 8..19: blocks 2, 3, 4


def test_only_full_blocks_are_hashed_and_hashes_are_full_width() -> None:
    hashes = block_hashes(TOKENS[:39], [], 4, ALICE)
    assert len(hashes) == 9
    assert all(len(h) == 32 for h in hashes)
    assert len(set(hashes)) == 9
    assert block_hashes(TOKENS, [], 4, ALICE, num_blocks=3) == block_hashes(TOKENS, [], 4, ALICE)[:3]


def test_a_changed_token_changes_its_block_and_every_later_one() -> None:
    base = block_hashes(TOKENS, [], 4, ALICE)
    changed = block_hashes([*TOKENS[:13], 7, *TOKENS[14:]], [], 4, ALICE)
    assert changed[:3] == base[:3]
    assert all(a != b for a, b in zip(changed[3:], base[3:], strict=True))


def test_another_image_with_the_same_tokens_misses_from_its_first_block() -> None:
    other = [ImageRows(start=8, length=12, digest="bb" * 32)]
    base, changed = block_hashes(TOKENS, IMAGE, 4, ALICE), block_hashes(TOKENS, other, 4, ALICE)
    assert changed[:2] == base[:2]
    assert all(a != b for a, b in zip(changed[2:], base[2:], strict=True))


def test_the_same_image_at_another_offset_misses() -> None:
    moved = [ImageRows(start=12, length=8, digest="aa" * 32)]
    assert block_hashes(TOKENS, moved, 4, ALICE)[3] != block_hashes(TOKENS, IMAGE, 4, ALICE)[3]


def test_tenants_share_nothing_unless_public() -> None:
    assert not set(block_hashes(TOKENS, IMAGE, 4, ALICE)) & set(block_hashes(TOKENS, IMAGE, 4, BOB))


def test_another_model_shares_nothing() -> None:
    other = CacheScope(b"n" * 32, tenant_salt("alice"))
    assert not set(block_hashes(TOKENS, [], 4, ALICE)) & set(block_hashes(TOKENS, [], 4, other))


@pytest.mark.parametrize("public_rows", [0, 3, 4, 10, 21, 40])
def test_public_prefix_is_shared_across_tenants_up_to_its_last_full_block(public_rows: int) -> None:
    a = block_hashes(TOKENS, IMAGE, 4, CacheScope(MODEL, tenant_salt("alice"), public_rows))
    b = block_hashes(TOKENS, IMAGE, 4, CacheScope(MODEL, tenant_salt("bob"), public_rows))
    shared = public_rows // 4
    assert a[:shared] == b[:shared]
    assert all(x != y for x, y in zip(a[shared:], b[shared:], strict=True))


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="block_size must be positive"):
        block_hashes(TOKENS, [], 0, ALICE)
