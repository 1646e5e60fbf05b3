"""One decoder for the Llama and Qwen2 families, over a packed batch and the paged KV pool.

Parameter names follow transformers (``layers.N.self_attn.q_proj.weight`` ...), so a checkpoint's
language-model weights load with a plain ``load_state_dict`` once their prefix is stripped.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from core.forward_batch import ForwardBatch
from core.kv import KVLayout, PagedKVCache
from models.attention import AttentionBackend, SdpaBackend, get_backend
from models.config import DecoderConfig
from models.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        kv: PagedKVCache,
        backend: AttentionBackend,
        meta: object,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(t, self.num_heads, self.head_dim), *rope)
        k = apply_rotary(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim), *rope)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        kv.flat_keys(self.layer)[batch.slot_mapping] = k.to(kv.keys.dtype)
        kv.flat_values(self.layer)[batch.slot_mapping] = v.to(kv.values.dtype)
        out = backend.attend(q, kv, self.layer, meta)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        kv: PagedKVCache,
        backend: AttentionBackend,
        meta: object,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, batch, kv, backend, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token (or image) embeddings in, hidden states out; the LM head is applied on demand."""

    def __init__(self, cfg: DecoderConfig, attention_backend: str = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg)
        self.backend = get_backend(attention_backend)
        self.fallback_backend = SdpaBackend()

    def kv_layout(self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None) -> KVLayout:
        """The pool shape this decoder reads and writes."""
        param = self.embed_tokens.weight
        return KVLayout(
            num_layers=self.cfg.num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=self.cfg.num_kv_heads,
            head_dim=self.cfg.head_dim,
            dtype=dtype or param.dtype,
            device=str(param.device),
        )

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        """``[T, hidden]`` token embeddings with ``batch.embeds`` scattered in (images)."""
        x = self.embed_tokens(batch.token_ids)
        if batch.embed_index is not None and batch.embeds is not None:
            x = x.index_copy(0, batch.embed_index, batch.embeds.to(x.dtype))
        return x

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: PagedKVCache) -> torch.Tensor:
        """Write the new tokens' KV into ``kv`` and return final hidden states ``[T, hidden]``."""
        backend = self.backend if self.backend.supports(batch) else self.fallback_backend
        meta = backend.prepare(batch, scale=self.cfg.head_dim**-0.5)
        x = self.embed(batch)
        rope = self.rotary.tables(batch.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, batch, kv, backend, meta)
        return self.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [N, hidden] -> logits [N, vocab] in float32."""
        return self.lm_head(hidden).float()
