"""Rotary position embeddings, including the scaling variants Llama / Qwen2 checkpoints use.

Inverse frequencies come from transformers' own RoPE initialisers, so every scaling variant is
computed exactly as the checkpoint's authors intended. Variants whose frequencies depend on the
running sequence length (``dynamic``, ``longrope``) are refused rather than silently approximated.

M-RoPE (Qwen2-VL): each frequency follows one of a token's three positions (temporal, height,
width; ``mrope_section`` says how many frequencies each). A text token's three are equal, so its
tables are the plain ones; visual rows get theirs from :meth:`RotaryEmbedding.mrope_tables`.
"""

from __future__ import annotations

import torch

from models.config import DecoderConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_frequencies(cfg: DecoderConfig) -> tuple[torch.Tensor, float]:
    """Return ``(inv_freq [head_dim // 2] float32, attention_scaling)`` for ``cfg``."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(cfg.rope_parameters)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}")
    theta = float(params.get("rope_theta", 10000.0))
    if rope_type == "default":
        exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim
        return 1.0 / (theta**exponents), 1.0
    proxy = LlamaConfig(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=params,
    )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](proxy, "cpu")
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(torch.nn.Module):
    """Turns positions into ``cos, sin`` tables and rotates query / key heads."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        with torch.device("cpu"):  # real numbers even when the model is built on the meta device
            inv_freq, self.scaling = rope_frequencies(cfg)
            # [head_dim / 2] int64: which of (t, h, w) each frequency follows; None without M-RoPE
            sections = torch.tensor(cfg.mrope_section, dtype=torch.long)
            self.section_of = (
                torch.repeat_interleave(torch.arange(3), sections) if cfg.mrope_section else None
            )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # (dtype, device) -> (cos, signed_sin) [capacity, 1, head_dim] for positions 0..capacity-1
        self._tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [T] -> ``(cos, signed_sin)`` each [T, 1, head_dim], computed in float32.

        ``signed_sin`` is ``sin`` with its first half negated, so that :func:`apply_rotary` needs
        one ``roll`` instead of slicing, negating and concatenating halves in every layer. Rows
        are looked up in tables of every position up to the largest seen (made again, twice as
        long, when a position is past the end): two lookups instead of ten ops per forward.
        """
        key = (dtype, positions.device)
        cos, signed_sin = self._tables.get(key, (None, None))
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if cos is None or signed_sin is None or cos.shape[0] < needed:
            capacity = max(256, 1 << (needed - 1).bit_length())
            cos, signed_sin = self._compute(torch.arange(capacity, device=positions.device), dtype)
            self._tables[key] = (cos, signed_sin)
        return cos.index_select(0, positions), signed_sin.index_select(0, positions)

    def mrope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [m, 3] (t, h, w) -> ``(cos, signed_sin)`` each [m, 1, head_dim]: frequency
        ``j`` rotates by the position its M-RoPE section names (transformers' layout)."""
        if self.section_of is None:
            raise ValueError("this model has one position per token; it takes no (t, h, w) positions")
        per_freq = positions.index_select(1, self.section_of.to(positions.device))  # [m, head_dim / 2]
        return self._compute(per_freq, dtype)

    def _compute(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [n] or [n, head_dim / 2] (one per frequency) -> the tables' rows."""
        pos = positions.float()
        freqs = pos[:, None] * self.inv_freq[None, :] if pos.dim() == 1 else pos * self.inv_freq[None, :]
        cos = freqs.cos().repeat(1, 2)
        sin = freqs.sin()
        signed_sin = torch.cat((-sin, sin), dim=-1)
        if self.scaling != 1.0:
            cos, signed_sin = cos * self.scaling, signed_sin * self.scaling
        return cos.to(dtype)[:, None, :], signed_sin.to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [T, heads, head_dim] by the tables of :meth:`RotaryEmbedding.tables`:
    ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x) * sin == roll(x) * signed_sin``."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
