"""Content identity of KV blocks: a chained SHA-256 per full block of a prompt.

The KV of block ``i`` depends on every token before its end, so its hash chains the hash of
block ``i - 1`` with the block's own token ids, the images whose visual tokens fall inside it
(content digest and where in the image the block starts) and a namespace. The namespace binds
the hash to the model that computed the KV and to who may reuse it: a tenant's salt, or the
deployment's public salt for the part of a prompt it declared shareable (a published persona
prompt). Two prompts share a block hash only if they share everything before the block's end,
images included, in the same namespace. Hashes are full-width (32 bytes), never truncated.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.prompt import EncodedPrompt, Prompt

HASH_VERSION = b"covspec-kv-block-v1"
ROOT = bytes(32)  # the parent of a prompt's first block


@dataclass(frozen=True)
class ImageRows:
    """Where one image's visual tokens sit in a prompt as the model feeds it."""

    start: int  # first row (index into the expanded token ids)
    length: int  # number of visual tokens
    digest: str  # ``core.prompt.image_digest`` of the image


@dataclass(frozen=True)
class CacheScope:
    """Who may reuse a prompt's KV: the model, the tenant, and how much of it is public."""

    model: bytes  # fingerprint of the weights (and KV dtype) that compute the KV
    tenant_salt: bytes  # derived on the server from the authenticated tenant, never from the client
    public_rows: int = 0  # leading prompt rows any tenant may share (0 = nothing public)

    def namespace(self, public: bool) -> bytes:
        who = b"public" if public else b"tenant:" + self.tenant_salt
        return hashlib.sha256(HASH_VERSION + b"\0" + self.model + b"\0" + who).digest()


def tenant_salt(tenant: str) -> bytes:
    """The salt of a tenant's private KV namespace."""
    return hashlib.sha256(b"covspec-tenant\0" + tenant.encode()).digest()


def block_hashes(
    token_ids: Sequence[int],
    images: Sequence[ImageRows],
    block_size: int,
    scope: CacheScope,
    num_blocks: int | None = None,
) -> tuple[bytes, ...]:
    """Hashes of the first ``num_blocks`` (default: every) full blocks of ``token_ids``.

    A block lies in the public namespace when it ends within ``scope.public_rows``; the first
    block past that point chains from the public ones in the tenant's namespace, so a public
    prefix is shared across tenants exactly up to its last full block.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    full = len(token_ids) // block_size
    count = full if num_blocks is None else min(num_blocks, full)
    ids = np.asarray(token_ids[: count * block_size], dtype="<i8")
    public, private = scope.namespace(public=True), scope.namespace(public=False)
    parent, out = ROOT, []
    for i in range(count):
        start, end = i * block_size, (i + 1) * block_size
        h = hashlib.sha256(HASH_VERSION)
        h.update(parent)
        h.update(public if end <= scope.public_rows else private)
        h.update(ids[start:end].tobytes())
        for img in images:
            if img.start < end and start < img.start + img.length:
                h.update(img.digest.encode())
                h.update(struct.pack("<qq", start - img.start, img.length))
        parent = h.digest()
        out.append(parent)
    return tuple(out)


def prompt_block_hashes(
    prompt: Prompt, encoded: EncodedPrompt, block_size: int, model: bytes
) -> tuple[bytes, ...]:
    """Hashes of the full blocks of ``encoded`` (one model's rows of ``prompt``), in the prompt's
    tenant namespace and, up to its public tokens, the public one; ``model`` names whatever the
    KV depends on besides the rows (weights, dtype, a drafter's adapter and compression)."""
    scope = CacheScope(model, tenant_salt(prompt.tenant), encoded.public_rows(prompt))
    rows = zip(encoded.image_rows, prompt.digests, strict=True)
    images = [ImageRows(start, n, digest) for (start, n), digest in rows]
    return block_hashes(encoded.token_ids.tolist(), images, block_size, scope)
