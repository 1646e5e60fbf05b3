"""A request's prompt as both models receive it: token ids with one placeholder per image.

Each model expands an image placeholder into its own number of visual tokens (the target and the
drafter have different vision towers), so the prompt carries the images themselves, not any one
model's expansion.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch


def image_digest(image: Any) -> str:
    """SHA-256 of an image's mode, size and pixels (a PIL image), the identity caches key on."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Prompt:
    token_ids: tuple[int, ...]  # [n] with ``image_token_id`` once per image, in image order
    images: tuple[Any, ...] = ()  # PIL RGB images, one per placeholder
    image_token_id: int = -1  # the placeholder id (unused when there are no images)
    digests: tuple[str, ...] = field(default=(), compare=False)  # image_digest per image
    # prefix-cache scope, set by the server (never from client input): the tenant whose private
    # KV namespace the prompt's blocks live in, and how many leading tokens are public (shared
    # across tenants, e.g. a published persona system prompt)
    tenant: str = ""
    public_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("a prompt needs at least one token")
        placeholders = sum(1 for t in self.token_ids if t == self.image_token_id)
        if placeholders != len(self.images):
            raise ValueError(
                f"prompt has {placeholders} image placeholders but {len(self.images)} images; "
                "put exactly one image token per image (the model expands it)"
            )
        if not 0 <= self.public_tokens <= len(self.token_ids):
            raise ValueError(f"public_tokens {self.public_tokens} is outside [0, {len(self.token_ids)}]")
        if not self.digests and self.images:
            object.__setattr__(self, "digests", tuple(image_digest(i) for i in self.images))


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt as one model feeds it: image placeholders expanded, visual embeddings computed."""

    token_ids: torch.Tensor  # [n] int64
    positions: torch.Tensor  # [n] int64 (gaps where compression dropped visual tokens)
    embeds: torch.Tensor | None  # [m, hidden] visual embeddings
    embed_index: torch.Tensor | None  # [m] int64 rows of token_ids they replace, increasing
    image_rows: tuple[tuple[int, int], ...] = ()  # (first row, rows) per image, in prompt order
    # [v, 3] int64 M-RoPE (t, h, w) of the v visual rows, one per embeds row when those are
    # present; None for models whose visual rows have one position like text
    embed_positions: torch.Tensor | None = None

    @cached_property
    def next_position(self) -> int:
        """The position of the token after these rows: one past the largest position taken
        (under M-RoPE an image takes fewer positions than rows, as transformers counts them)."""
        last = int(self.positions.max()) if self.num_tokens else -1
        if self.embed_positions is not None and self.embed_positions.numel():
            last = max(last, int(self.embed_positions.max()))
        return last + 1

    def public_rows(self, prompt: Prompt) -> int:
        """Rows covering ``prompt.public_tokens`` (an image placeholder counts all its rows)."""
        placeholders = [i for i, t in enumerate(prompt.token_ids) if t == prompt.image_token_id]
        rows = [n for _, n in self.image_rows]
        extra = sum(n - 1 for pos, n in zip(placeholders, rows, strict=True) if pos < prompt.public_tokens)
        return prompt.public_tokens + extra

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def chunk(self, start: int, end: int) -> EncodedPrompt:
        """Rows ``[start, end)`` with the embeddings that fall inside, re-indexed to the chunk."""
        if self.embeds is None or self.embed_index is None:
            return EncodedPrompt(self.token_ids[start:end], self.positions[start:end], None, None)
        inside = (self.embed_index >= start) & (self.embed_index < end)
        some = bool(inside.any())
        return EncodedPrompt(
            self.token_ids[start:end],
            self.positions[start:end],
            self.embeds[inside] if some else None,
            self.embed_index[inside] - start if some else None,
            embed_positions=self.embed_positions[inside]
            if some and self.embed_positions is not None
            else None,
        )
