"""The attention backend contract and its registry."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from core.forward_batch import ForwardBatch
from core.kv import PagedKVCache


class AttentionBackend(Protocol):
    """Attention of a packed batch's queries over each sequence's KV in the paged pool.

    The decoder writes the new tokens' keys and values into the pool *before* calling
    :meth:`attend`, so the pool already holds every entry a query may attend to.
    """

    name: str

    @staticmethod
    def available() -> bool:
        """Whether this backend can run in this process (imports, devices)."""
        ...

    def supports(self, batch: ForwardBatch) -> bool:
        """Whether this backend computes ``batch`` exactly (masks, dtypes, device)."""
        ...

    def prepare(self, batch: ForwardBatch, scale: float) -> Any:
        """Build the per-forward metadata shared by all layers. Mutates nothing."""
        ...

    def attend(self, q: torch.Tensor, kv: PagedKVCache, layer: int, meta: Any) -> torch.Tensor:
        """``q`` [T, heads, head_dim] -> output [T, heads, head_dim]. Mutates nothing."""
        ...


ATTENTION_BACKENDS: dict[str, type] = {}


def register_backend(cls: type) -> type:
    ATTENTION_BACKENDS[cls.name] = cls  # type: ignore[attr-defined]
    return cls


def get_backend(name: str) -> AttentionBackend:
    """Instantiate the backend registered as ``name``; a clear error if unknown or unavailable."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(ATTENTION_BACKENDS)}")
    cls = ATTENTION_BACKENDS[name]
    if not cls.available():
        raise ValueError(f"attention backend {name!r} is not available here (missing package or GPU)")
    backend: AttentionBackend = cls()
    return backend
