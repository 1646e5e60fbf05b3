"""Decoder configuration read from a Hugging Face text config (Llama and Qwen2 families)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# model_type -> whether q/k/v projections carry a bias regardless of `attention_bias`.
# Qwen2 always has q/k/v biases and no o_proj bias; Llama follows `attention_bias` for all four.
_FAMILIES: dict[str, bool] = {"llama": False, "qwen2": True}


@dataclass(frozen=True)
class DecoderConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_embeddings: bool
    rope_parameters: dict[str, Any] = field(default_factory=dict)
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @staticmethod
    def supported_families() -> list[str]:
        return sorted(_FAMILIES)

    @classmethod
    def from_hf(cls, text_config: Any, tie_embeddings: bool | None = None) -> DecoderConfig:
        """Build from a transformers ``LlamaConfig`` / ``Qwen2Config``."""
        family = text_config.model_type
        if family not in _FAMILIES:
            raise ValueError(
                f"unsupported language model type {family!r}; supported: {cls.supported_families()}"
            )
        attention_bias = bool(getattr(text_config, "attention_bias", False))
        num_heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
        tie = text_config.tie_word_embeddings if tie_embeddings is None else tie_embeddings
        return cls(
            family=family,
            vocab_size=text_config.vocab_size,
            hidden_size=text_config.hidden_size,
            intermediate_size=text_config.intermediate_size,
            num_layers=text_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=text_config.rms_norm_eps,
            hidden_act=text_config.hidden_act,
            qkv_bias=_FAMILIES[family] or attention_bias,
            o_bias=attention_bias and not _FAMILIES[family],
            mlp_bias=bool(getattr(text_config, "mlp_bias", False)),
            tie_embeddings=bool(tie),
            rope_parameters=dict(text_config.rope_parameters or {}),
            max_position_embeddings=text_config.max_position_embeddings,
        )
