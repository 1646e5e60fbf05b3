"""Decoder configuration read from a Hugging Face text config (Llama, Qwen2 and the Qwen2-VL /
Qwen2.5-VL language models, which are Qwen2 with M-RoPE)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# model_type -> whether q/k/v projections carry a bias regardless of `attention_bias`.
# Qwen2 always has q/k/v biases and no o_proj bias; Llama follows `attention_bias` for all four.
_FAMILIES: dict[str, bool] = {"llama": False, "qwen2": True, "qwen2_vl_text": True, "qwen2_5_vl_text": True}
# families whose attention derives head_dim from hidden_size, whatever the config says
_HEAD_DIM_FROM_HIDDEN = {"qwen2_vl_text"}


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
    # M-RoPE: how many of the head_dim / 2 rotary frequencies follow the temporal, height and
    # width position, in that order (Qwen2-VL); () for one position per token
    mrope_section: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.mrope_section and (
            len(self.mrope_section) != 3 or sum(self.mrope_section) * 2 != self.head_dim
        ):
            raise ValueError(
                f"mrope_section {list(self.mrope_section)} must be three counts summing to head_dim / 2 "
                f"({self.head_dim // 2})"
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
        if getattr(text_config, "use_sliding_window", False) or "sliding_attention" in (
            getattr(text_config, "layer_types", None) or ()
        ):
            raise ValueError(
                "sliding-window attention layers are not supported (the paged pool keeps every "
                "position); set use_sliding_window=false if the checkpoint was trained without it"
            )
        attention_bias = bool(getattr(text_config, "attention_bias", False))
        num_heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
        if family in _HEAD_DIM_FROM_HIDDEN:
            head_dim = text_config.hidden_size // num_heads
        tie = text_config.tie_word_embeddings if tie_embeddings is None else tie_embeddings
        rope = dict(text_config.rope_parameters or {})
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
            rope_parameters={k: v for k, v in rope.items() if k != "mrope_section"},
            max_position_embeddings=text_config.max_position_embeddings,
            mrope_section=tuple(rope.get("mrope_section") or ()),
        )
