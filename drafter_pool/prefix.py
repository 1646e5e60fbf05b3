"""The drafter's own prefix cache: prompt blocks of its KV reused across requests.

The drafter's KV for a prompt depends on more than the target's does: the LoRA adapter it was
computed with (by content, not name) and which visual tokens compression kept. All of that goes
into the namespace, next to the tenant, so two requests share drafter blocks only when their
KV is the same. Local to one drafter pool (drafter KV is cheap to recompute; Redis holds the
target's).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from core.prompt import EncodedPrompt, Prompt
from kvcache.block_hash import CacheScope, ImageRows, block_hashes, tenant_salt
from kvcache.block_pool import BlockPool


class DrafterPrefixCache:
    def __init__(self, pool: BlockPool, model: bytes) -> None:
        self.pool, self.model = pool, model
        self.hits = self.misses = 0  # prompt blocks found / computed

    def hashes(
        self, prompt: Prompt, encoded: EncodedPrompt, adapter_digest: str, compression: str
    ) -> tuple[bytes, ...]:
        """Content hashes of the full blocks of ``encoded`` (the drafter's rows of ``prompt``)."""
        namespace = hashlib.sha256(
            b"\0".join([self.model, adapter_digest.encode(), compression.encode()])
        ).digest()
        scope = CacheScope(namespace, tenant_salt(prompt.tenant), encoded.public_rows(prompt))
        rows = zip(encoded.image_rows, prompt.digests, strict=True)
        images = [ImageRows(start, n, digest) for (start, n), digest in rows]
        return block_hashes(encoded.token_ids.tolist(), images, self.pool.block_size, scope)

    def acquire(self, hashes: Sequence[bytes], num_tokens: int) -> list[int]:
        """Blocks (owned once more) of the longest cached prefix, leaving at least one of the
        ``num_tokens`` to compute (its logits start the tree)."""
        blocks = self.pool.lookup(hashes[: (num_tokens - 1) // self.pool.block_size])
        self.pool.acquire(blocks)
        self.hits += len(blocks)
        return blocks

    def publish(self, blocks: Sequence[int], hashes: Sequence[bytes], first: int, committed: int) -> int:
        """Index the prompt blocks from ``first`` that ``committed`` tokens fill; the new first."""
        full = min(committed // self.pool.block_size, len(hashes))
        for i in range(first, full):
            self.pool.register(blocks[i], hashes[i])
        self.misses += max(full - first, 0)
        return max(full, first)
