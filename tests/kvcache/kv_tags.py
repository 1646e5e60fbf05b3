"""Recognisable KV contents for tests: entry ``tag`` holds ``1000 * layer + tag`` in its keys and
the negation in its values, in every head and dim. Tags start at 1, so a zeroed slot never matches.
"""

from __future__ import annotations

import torch

from core.kv import KVLayout, PagedKVCache

SMALL_LAYOUT = KVLayout(num_layers=2, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=3)


def write_tags(kv: PagedKVCache, slots: torch.Tensor, tags: list[int]) -> None:
    """Write entry ``tags[i]`` at flat slot ``slots[i]`` in every layer, keys and values."""
    for layer in range(kv.layout.num_layers):
        fill = torch.tensor(tags, dtype=kv.layout.dtype)[:, None, None] + 1000 * layer
        kv.flat_keys(layer)[slots] = fill.expand(-1, kv.layout.num_kv_heads, kv.layout.head_dim)
        kv.flat_values(layer)[slots] = -fill.expand(-1, kv.layout.num_kv_heads, kv.layout.head_dim)


def assert_tags(kv: PagedKVCache, slots: torch.Tensor, tags: list[int]) -> None:
    """Assert that flat slots ``slots[i]`` hold entry ``tags[i]`` in every layer, keys and values."""
    for layer in range(kv.layout.num_layers):
        want = torch.tensor(tags, dtype=kv.layout.dtype)[:, None, None] + 1000 * layer
        want = want.expand(-1, kv.layout.num_kv_heads, kv.layout.head_dim)
        got_keys, got_values = kv.flat_keys(layer)[slots], kv.flat_values(layer)[slots]
        assert torch.equal(got_keys, want), f"layer {layer} keys: {got_keys[:, 0, 0].tolist()} != {tags}"
        assert torch.equal(got_values, -want), f"layer {layer} values: {got_values[:, 0, 0].tolist()}"
