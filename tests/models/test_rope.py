from __future__ import annotations

from typing import Any

import pytest
import torch

from models.config import DecoderConfig
from models.rope import RotaryEmbedding

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}


def _config(rope: dict[str, Any]) -> DecoderConfig:
    return DecoderConfig(
        family="llama", vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=32, rms_norm_eps=1e-5, hidden_act="silu",
        qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings=False, rope_parameters=rope,
    )  # fmt: skip


@pytest.mark.parametrize("rope", [{"rope_type": "default"}, YARN], ids=["default", "yarn"])
def test_looked_up_tables_equal_tables_computed_for_the_positions(rope: dict[str, Any]) -> None:
    rotary = RotaryEmbedding(_config(rope))
    first = torch.tensor([3, 0, 17, 255])  # within the first table
    later = torch.tensor([256, 3, 700, 4000])  # past it: the table grows
    for positions in (first, later, first):
        cos, sin = rotary.tables(positions, torch.float32)
        want_cos, want_sin = rotary._compute(positions, torch.float32)
        assert cos.shape == (4, 1, 32) and torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    assert rotary._tables[(torch.float32, torch.device("cpu"))][0].shape[0] == 4096


def test_tables_per_dtype_are_kept_apart() -> None:
    rotary = RotaryEmbedding(_config({"rope_type": "default"}))
    positions = torch.tensor([1, 9])
    assert rotary.tables(positions, torch.float32)[0].dtype == torch.float32
    assert rotary.tables(positions, torch.bfloat16)[0].dtype == torch.bfloat16
