"""Attention backends over the paged KV pool, chosen by name from a registry."""

from models.attention.base import ATTENTION_BACKENDS, AttentionBackend, get_backend, register_backend
from models.attention.flash import FlashAttnBackend
from models.attention.sdpa import SdpaBackend

register_backend(SdpaBackend)
register_backend(FlashAttnBackend)

__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "FlashAttnBackend", "SdpaBackend", "get_backend"]
