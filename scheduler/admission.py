"""Where an admitted request's KV starts: the longest cached prefix of its prompt.

Blocks the local prefix index holds are shared at once. With a Redis tier, the blocks past
them are fetched in the background the first time the request is considered for admission; it
waits in the queue, holding nobody up, until the fetch is back, then starts after the blocks
that are local by then plus the ones loaded. Full prompt blocks a request computes are
published for later requests. Without a prefix cache, every request starts from nothing.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable

from core.prompt import EncodedPrompt, Prompt
from kvcache.block_hash import prompt_block_hashes
from kvcache.block_pool import BlockPool
from kvcache.prefix_cache import PrefixCache
from kvcache.sequence_blocks import SequenceBlocks
from scheduler.request import RequestState


class PrefixAdmission:
    def __init__(self, pool: BlockPool, prefix: PrefixCache | None) -> None:
        self.pool, self.prefix = pool, prefix

    def block_hashes(self, prompt: Prompt, encoded: EncodedPrompt) -> tuple[bytes, ...]:
        """Content hashes of the prompt's full KV blocks in its tenant's (or the public)
        namespace; none without a prefix cache."""
        if self.prefix is None:
            return ()
        return prompt_block_hashes(prompt, encoded, self.pool.block_size, self.prefix.model)

    def start(self, req: RequestState) -> SequenceBlocks | None:
        """Blocks (owned once more) holding the longest cached prefix of ``req``'s prompt, at
        most all but its last token (whose logits it needs); None while Redis is asked."""
        if self.prefix is None or not req.block_hashes:
            return SequenceBlocks(self.pool)
        usable = self.prefix.reusable(req.block_hashes, req.num_tokens)
        if req.fetch is not None:
            if not req.fetch.future.done():
                return None
            local = self.prefix.local(usable)
            loaded = self.prefix.finish_fetch(req.fetch, len(local))
            req.fetch = None
            return SequenceBlocks.from_cached(self.pool, local + loaded)
        if not req.fetched:
            req.fetched = True
            req.fetch = self.prefix.start_fetch(usable)
            if req.fetch is not None:
                return None
        return SequenceBlocks.from_cached(self.pool, self.prefix.local(usable))

    def publish(self, req: RequestState) -> None:
        """Offer the prompt blocks ``req`` completed since the last call to the prefix cache."""
        if self.prefix is not None and req.blocks is not None:
            b = req.blocks
            req.published = self.prefix.publish_completed(
                b.blocks, req.block_hashes, req.published, b.num_tokens
            )

    def wait(self, waiting: Iterable[RequestState], timeout_s: float) -> None:
        """Block until a waiting request's Redis fetch is back (or ``timeout_s``)."""
        pending = [r.fetch.future for r in waiting if r.fetch is not None]
        if pending:
            first = concurrent.futures.FIRST_COMPLETED
            concurrent.futures.wait(pending, timeout=timeout_s, return_when=first)
