"""FlashAttention-2 varlen over KV gathered from the paged pool (GPU, causal batches only).

Tree masks are not expressible as FlashAttention's causal flag, so batches carrying them are
not ``supported`` here and the decoder runs them through SDPA instead.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from core.forward_batch import ForwardBatch
from core.kv import PagedKVCache


@dataclass(frozen=True)
class FlashMetadata:
    kv_slots: torch.Tensor  # [total_kv] int64 flat slots of all sequences' KV, concatenated
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    cu_seqlens_k: torch.Tensor  # [B + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    scale: float


class FlashAttnBackend:
    name = "flash_attn"

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()

    def supports(self, batch: ForwardBatch) -> bool:
        return not batch.has_custom_masks and batch.token_ids.is_cuda

    def prepare(self, batch: ForwardBatch, scale: float) -> FlashMetadata:
        slots = []
        contexts = batch.host_context_lens  # lengths from the host: no device reads
        for b, context in enumerate(contexts):
            kv_index = torch.arange(context, device=batch.block_tables.device)
            blocks = batch.block_tables[b, kv_index // batch.block_size]
            slots.append(blocks * batch.block_size + kv_index % batch.block_size)
        cu_k = torch.zeros(batch.num_sequences + 1, dtype=torch.int32, device=batch.context_lens.device)
        cu_k[1:] = torch.cumsum(batch.context_lens, 0)
        return FlashMetadata(
            kv_slots=torch.cat(slots),
            cu_seqlens_q=batch.query_starts.to(torch.int32),
            cu_seqlens_k=cu_k,
            max_seqlen_q=max(batch.host_num_new),
            max_seqlen_k=max(contexts),
            scale=scale,
        )

    def attend(self, q: torch.Tensor, kv: PagedKVCache, layer: int, meta: FlashMetadata) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func

        out: torch.Tensor = flash_attn_varlen_func(
            q,
            kv.flat_keys(layer)[meta.kv_slots],
            kv.flat_values(layer)[meta.kv_slots],
            meta.cu_seqlens_q,
            meta.cu_seqlens_k,
            meta.max_seqlen_q,
            meta.max_seqlen_k,
            softmax_scale=meta.scale,
            causal=True,  # bottom-right aligned: new token i sees the cache and new tokens <= i
        )
        return out
