"""Prefix caching across requests: the pool's local index first, then (optionally) Redis.

A request's prompt has one content hash per full block (``kvcache.block_hash``). At admission
the scheduler asks for the longest cached prefix: blocks indexed in this replica's pool are
shared at once; when a remote tier is configured, the hashes past them are fetched from Redis
in the background and the request waits in its own state until the fetch is back. Loaded values
are checked (``kv_codec.decode``) and written into fresh blocks, in order, up to the first that
fails a check. Blocks a request computes itself are ``publish``-ed: indexed locally and written
to Redis off the engine thread. Nothing here can change an output: a bad value, a Redis fault
or an eviction only means computing the KV again.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from kvcache import kv_codec
from kvcache.block_pool import BlockPool
from kvcache.kv_codec import BlockKV, BlockMeta


class RemoteKV(Protocol):
    """A shared block store (``RedisKVStore``). Neither call may block or raise."""

    def fetch(self, contents: Sequence[bytes]) -> concurrent.futures.Future[list[bytes | None]]: ...

    def put(self, items: Sequence[tuple[bytes, Callable[[], bytes]]], nbytes: int) -> bool: ...


Checked = BlockKV | str | None  # a block's KV, why its value was refused, or no value


@dataclass(frozen=True)
class Fetch:
    """A Redis lookup in flight for blocks ``[first, first + len(contents))`` of a prompt; its
    future gives each block checked and decoded (off the engine thread)."""

    first: int
    contents: tuple[bytes, ...]
    future: concurrent.futures.Future[list[Checked]]
    started: float  # perf_counter


@dataclass
class PrefixStats:
    """Blocks by where their KV came from, since start."""

    local_hits: int = 0  # blocks reused from this replica's pool
    remote_hits: int = 0  # blocks loaded from Redis (checked and written into the pool)
    misses: int = 0  # prompt blocks computed here
    rejected: Counter[str] = field(default_factory=Counter)  # Redis values failing a check, by reason
    published: int = 0  # blocks computed here and offered to Redis
    loads: int = 0  # Redis fetches finished
    load_ms: list[float] = field(default_factory=list)  # recent fetch-to-loaded times (bounded)


class PrefixCache:
    def __init__(self, pool: BlockPool, model: bytes, remote: RemoteKV | None = None) -> None:
        self.pool, self.model, self.remote = pool, model, remote
        self.stats = PrefixStats()
        # checks and decodes fetched values (a checksum over every byte) off the engine thread
        self._decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="covspec-kv-decode")

    def reusable(self, contents: Sequence[bytes], num_tokens: int) -> Sequence[bytes]:
        """The leading block hashes of a sequence of ``num_tokens`` that a cache may serve: its
        last token is always computed (its logits start decoding or a draft tree)."""
        return contents[: (num_tokens - 1) // self.pool.block_size]

    def local(self, contents: Sequence[bytes]) -> list[int]:
        """Acquired blocks holding the longest locally cached prefix of ``contents``."""
        blocks = self.pool.lookup(contents)
        self.pool.acquire(blocks)
        self.stats.local_hits += len(blocks)
        return blocks

    def start_fetch(self, contents: Sequence[bytes]) -> Fetch | None:
        """Ask Redis for the blocks of ``contents`` past the locally cached prefix; None without a
        remote tier or when the pool holds them all."""
        if self.remote is None:
            return None
        first = len(self.pool.lookup(contents))
        if first >= len(contents):
            return None
        wanted = tuple(contents[first:])
        metas = [self._meta(c, first + i) for i, c in enumerate(wanted)]
        checked: concurrent.futures.Future[list[Checked]] = concurrent.futures.Future()

        def decode_all(values: list[bytes | None]) -> None:
            checked.set_result(
                [None if v is None else kv_codec.decode(v, m) for v, m in zip(values, metas, strict=True)]
            )

        def on_values(raw: concurrent.futures.Future[list[bytes | None]]) -> None:
            if raw.exception() is not None:  # a store that broke its promise not to raise: a miss
                self.stats.rejected[f"store failed: {type(raw.exception()).__name__}"] += 1
                checked.set_result([None] * len(wanted))
            else:
                self._decoder.submit(decode_all, raw.result())

        self.remote.fetch(wanted).add_done_callback(on_values)
        return Fetch(first, wanted, checked, time.perf_counter())

    def finish_fetch(self, fetch: Fetch, have: int) -> list[int]:
        """Fresh blocks (ref count 1) with the fetched KV for prompt blocks ``have`` onward, as
        far as the values pass their checks and the pool has free blocks; empty when the
        caller's ``have`` blocks do not reach the fetch (evicted meanwhile)."""
        values = fetch.future.result()
        if have < fetch.first:
            return []
        loaded: list[int] = []
        for i in range(have - fetch.first, len(values)):
            kv = values[i]
            if kv is None or not self.pool.can_allocate(1):
                break
            if isinstance(kv, str):
                self.stats.rejected[kv] += 1
                break
            (block,) = self.pool.allocate(1)
            self._write(block, kv)
            self.pool.register(block, fetch.contents[i])
            loaded.append(block)
        self.stats.remote_hits += len(loaded)
        self.stats.loads += 1
        self.stats.load_ms = [*self.stats.load_ms[-255:], 1000 * (time.perf_counter() - fetch.started)]
        return loaded

    def publish_completed(
        self, table: Sequence[int], contents: Sequence[bytes], published: int, committed: int
    ) -> int:
        """Publish the prompt blocks a sequence completed since ``published`` (blocks of its
        block ``table`` that its ``committed`` tokens fill and ``contents`` has hashes for);
        returns the new count of published blocks."""
        full = min(committed // self.pool.block_size, len(contents))
        if full > published:
            self.publish([(table[i], contents[i], i) for i in range(published, full)])
        return max(full, published)

    def publish(self, blocks: Sequence[tuple[int, bytes, int]]) -> None:
        """Index ``(block, content hash, block index in the prompt)`` computed here; offer them
        to Redis (their KV is copied now; serializing and writing happen on the store's threads)."""
        fresh = [(b, c, i) for b, c, i in blocks if self.pool.register(b, c)]
        self.stats.misses += len(blocks)
        if self.remote is None or not fresh:
            return
        items = [(c, partial(kv_codec.encode, self._meta(c, i), self._read(b))) for b, c, i in fresh]
        block_bytes = self.pool.kv.layout.bytes_per_token() * self.pool.block_size
        if self.remote.put(items, block_bytes * len(items)):
            self.stats.published += len(items)

    def _meta(self, content: bytes, index: int) -> BlockMeta:
        size = self.pool.block_size
        return BlockMeta(self.model, self.pool.kv.layout, content, (index * size, (index + 1) * size))

    def _read(self, block: int) -> BlockKV:
        kv = self.pool.kv
        return BlockKV(kv.keys[:, block].clone(), kv.values[:, block].clone())

    def _write(self, block: int, kv: BlockKV) -> None:
        cache = self.pool.kv
        cache.keys[:, block] = kv.keys.to(cache.keys.device)
        cache.values[:, block] = kv.values.to(cache.values.device)
