"""Block values: a round trip is exact; any value that is not the expected block is refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.kv import KVLayout
from kvcache import kv_codec
from kvcache.kv_codec import BlockKV, BlockMeta

LAYOUT = KVLayout(num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=3)
META = BlockMeta(b"m" * 32, LAYOUT, b"h" * 32, (4, 8))


def random_kv(dtype: torch.dtype = torch.float32) -> BlockKV:
    gen = torch.Generator().manual_seed(0)
    shape = (2, 4, 2, 3)
    return BlockKV(torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    meta = dataclasses.replace(META, layout=dataclasses.replace(LAYOUT, dtype=dtype))
    kv = random_kv(dtype)
    back = kv_codec.decode(kv_codec.encode(meta, kv), meta)
    assert isinstance(back, BlockKV)
    assert torch.equal(back.keys, kv.keys) and torch.equal(back.values, kv.values)
    assert back.keys.dtype == dtype


def flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("reader", "mutate", "reason"),
    [
        (META, lambda d: d[:10], "truncated"),
        (META, lambda d: flip_byte(d, len(d) // 2), "checksum mismatch"),
        (META, lambda d: b"", "truncated"),
        (dataclasses.replace(META, model=b"n" * 32), lambda d: d, "header differs in model"),
        (dataclasses.replace(META, content=b"g" * 32), lambda d: d, "header differs in hash"),
        (dataclasses.replace(META, tokens=(0, 4)), lambda d: d, "header differs in tokens"),
        (
            dataclasses.replace(META, layout=dataclasses.replace(LAYOUT, dtype=torch.bfloat16)),
            lambda d: d,
            "header differs in dtype",
        ),
        (
            dataclasses.replace(META, layout=dataclasses.replace(LAYOUT, num_kv_heads=1)),
            lambda d: d,
            "header differs in layout",
        ),
    ],
    ids=[
        "truncated",
        "corrupted",
        "empty",
        "other-model",
        "other-block",
        "other-range",
        "other-dtype",
        "other-layout",
    ],
)
def test_a_value_that_is_not_the_expected_block_is_refused(
    reader: BlockMeta, mutate: object, reason: str
) -> None:
    data = mutate(kv_codec.encode(META, random_kv()))  # type: ignore[operator]
    assert kv_codec.decode(data, reader) == reason
