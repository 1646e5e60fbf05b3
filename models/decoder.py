"""One decoder for the Llama and Qwen2 families (Qwen2-VL's with M-RoPE), over a packed batch and
the paged KV pool.

Parameter names follow transformers (``layers.N.self_attn.o_proj.weight`` ...) except for two
fused projections: ``qkv_proj`` holds ``q_proj``, ``k_proj`` and ``v_proj`` stacked, and
``gate_up_proj`` holds ``gate_proj`` and ``up_proj``. Fewer, larger matmuls matter on a CPU,
where a small drafter's forward is dominated by per-op overhead. :func:`fuse_hf_weights` turns a
checkpoint's tensors into this layout.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from core.forward_batch import ForwardBatch
from core.kv import KVLayout, PagedKVCache
from models.attention import AttentionBackend, SdpaBackend, get_backend
from models.config import DecoderConfig
from models.linear import Linear
from models.multi_lora import LoraBatch
from models.rope import RotaryEmbedding, apply_rotary

# fused parameter -> the transformers parameters stacked in it, in order (along the output dim)
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def hf_names(names: list[str]) -> list[str]:
    """Our parameter names -> the transformers parameter names they are built from."""
    out = []
    for name in names:
        head, _, leaf = name.rpartition(".")  # "layers.0.self_attn.qkv_proj", "weight"
        key = next((k for k in FUSED if head.endswith(k)), None)
        if key is None:
            out.append(name)
        else:
            out += [f"{head[: -len(key)]}{part}.{leaf}" for part in FUSED[key]]
    return out


def fuse_hf_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack the q/k/v and gate/up tensors of a transformers state dict under our fused names."""
    out = dict(weights)
    for name in weights:
        for fused, parts in FUSED.items():
            if f".{parts[0]}." in f".{name}":
                base, leaf = name.split(f"{parts[0]}.")
                names = [f"{base}{part}.{leaf}" for part in parts]
                if all(n in out for n in names):
                    out[f"{base}{fused}.{leaf}"] = torch.cat([out.pop(n) for n in names])
    return out


def project(
    linear: nn.Linear, x: torch.Tensor, lora: LoraBatch | None, layer: int, name: str
) -> torch.Tensor:
    """``linear(x)`` with each token's own LoRA for the projection ``name`` of ``layer``."""
    return linear(x) if lora is None else lora.project(linear, x, layer, name)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one op instead of eight; fp32 checkpoints match transformers' RMSNorm (tests/models)
        return torch.nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_heads = cfg.num_heads + 2 * cfg.num_kv_heads
        self.qkv_proj = Linear(cfg.hidden_size, qkv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: ForwardBatch,
        kv: PagedKVCache,
        backend: AttentionBackend,
        meta: object,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        t, h = x.shape[0], self.num_heads
        qkv = project(self.qkv_proj, x, lora, self.layer, "self_attn.qkv_proj").view(
            t, h + 2 * self.num_kv_heads, self.head_dim
        )
        qk = apply_rotary(qkv[:, : h + self.num_kv_heads], *rope)  # queries and keys rotate together
        q, k, v = qk[:, :h], qk[:, h:], qkv[:, h + self.num_kv_heads :]
        # each new token owns its slot (no duplicates): index_copy_ is index_put's cheaper twin
        kv.flat_keys(self.layer).index_copy_(0, batch.slot_mapping, k.to(kv.keys.dtype))
        kv.flat_values(self.layer).index_copy_(0, batch.slot_mapping, v.to(kv.values.dtype))
        out = backend.attend(q, kv, self.layer, meta)
        out = out.reshape(t, self.num_heads * self.head_dim)
        return project(self.o_proj, out, lora, self.layer, "self_attn.o_proj")


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        gate, up = project(self.gate_up_proj, x, lora, self.layer, "mlp.gate_up_proj").chunk(2, dim=-1)
        return project(self.down_proj, self.act(gate) * up, lora, self.layer, "mlp.down_proj")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg, layer)
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
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, batch, kv, backend, meta, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


class Decoder(nn.Module):
    """Token (or image) embeddings in, hidden states out; the LM head is applied on demand."""

    def __init__(self, cfg: DecoderConfig, attention_backend: str = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
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

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: PagedKVCache, lora: LoraBatch | None = None) -> torch.Tensor:
        """Write the new tokens' KV into ``kv`` and return final hidden states ``[T, hidden]``
        (on this decoder's device; ``batch`` and ``lora`` may come from the host, they are moved
        here); ``lora`` adds each token's adapter (see ``models.multi_lora``)."""
        device = self.device
        if batch.token_ids.device != device:
            batch = batch.to(device)
            lora = None if lora is None else lora.to(device)
        backend = self.backend if self.backend.supports(batch) else self.fallback_backend
        meta = backend.prepare(batch, scale=self.cfg.head_dim**-0.5)
        x = self.embed(batch)
        rope = self.rotary.tables(batch.positions, x.dtype)
        if batch.embed_positions is not None and batch.embed_index is not None:  # M-RoPE visual rows
            visual = self.rotary.mrope_tables(batch.embed_positions, x.dtype)
            rope = tuple(t.index_copy(0, batch.embed_index, v) for t, v in zip(rope, visual, strict=True))  # type: ignore[assignment]
        for layer in self.layers:
            x = layer(x, rope, batch, kv, backend, meta, lora)
        return self.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` [N, hidden] -> logits [N, vocab] in float32, on the host (acceptance and
        sampling run there; on a CPU this copies nothing)."""
        return self.lm_head(hidden).float().cpu()
