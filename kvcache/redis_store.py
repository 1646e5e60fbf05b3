"""The Redis tier of the prefix cache: best effort, off the engine's thread, never in the way.

The engine thread never waits on Redis: ``fetch`` returns a future and ``put`` queues a write;
both run on this object's own asyncio loop (a daemon thread) through ``redis.asyncio`` with a
bounded connection pool and tight timeouts. Every failure (Redis absent, killed, paused, slow,
a full write queue) is a miss or a dropped write, counted in ``stats``. After
``breaker_failures`` failures in a row a circuit breaker stops asking Redis for
``breaker_cooldown_s``; after that requests go through again, a success closes the breaker and
a failure opens it at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

KEY_PREFIX = b"covspec:kv:"
ValueMaker = Callable[[], bytes]  # builds a value to store (run on a worker thread)


@dataclass(frozen=True)
class RedisTierConfig:
    url: str
    timeout_s: float = 0.25  # per command, connect included
    max_connections: int = 8
    breaker_failures: int = 3  # failures in a row that open the breaker
    breaker_cooldown_s: float = 5.0  # how long it stays open before one probe
    max_pending_bytes: int = 256 * 2**20  # KV queued for writing; more is dropped (counted)


@dataclass
class TierStats:
    """Counters since start (read them from any thread; each field is one int)."""

    lookups: int = 0  # blocks asked for
    hits: int = 0  # blocks Redis returned (valid or not: the caller checks them)
    errors: int = 0  # commands that failed or timed out
    skipped: int = 0  # blocks not asked for because the breaker was open
    bytes_read: int = 0
    bytes_written: int = 0
    writes: int = 0  # blocks written
    dropped_writes: int = 0  # blocks not written (queue full, breaker open, error)
    breaker_opened: int = 0  # times the breaker opened
    fetch_ms: list[float] = field(default_factory=list)  # recent fetch round trips (bounded)


def redis_key(content: bytes) -> bytes:
    return KEY_PREFIX + content.hex().encode()


class RedisKVStore:
    def __init__(self, config: RedisTierConfig) -> None:
        self.config = config
        self.stats = TierStats()
        self._failures = 0
        self._open_until = 0.0  # monotonic time the breaker stays open until (0 = closed)
        self._pending_bytes = 0
        self._lock = threading.Lock()  # guards _pending_bytes (both threads change it)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="covspec-redis", daemon=True)
        self._thread.start()
        self._client: Any = asyncio.run_coroutine_threadsafe(self._connect(), self._loop).result()

    @property
    def breaker_open(self) -> bool:
        return time.monotonic() < self._open_until

    def fetch(self, contents: Sequence[bytes]) -> concurrent.futures.Future[list[bytes | None]]:
        """The stored values of ``contents`` (None where Redis has none or failed); never raises."""
        keys = [redis_key(c) for c in contents]
        self.stats.lookups += len(keys)
        if not keys or self.breaker_open:
            self.stats.skipped += len(keys) if keys else 0
            done: concurrent.futures.Future[list[bytes | None]] = concurrent.futures.Future()
            done.set_result([None] * len(keys))
            return done
        return asyncio.run_coroutine_threadsafe(self._fetch(keys), self._loop)

    def put(self, items: Sequence[tuple[bytes, ValueMaker]], nbytes: int) -> bool:
        """Queue ``(content hash, value maker)`` writes holding about ``nbytes`` of KV; False when
        they were dropped instead (breaker open, or the queue would pass ``max_pending_bytes``).
        Each maker runs once on a worker thread (serializing a block never holds up the caller)."""
        if not items:
            return True
        with self._lock:
            if self.breaker_open or self._pending_bytes + nbytes > self.config.max_pending_bytes:
                self.stats.dropped_writes += len(items)
                return False
            self._pending_bytes += nbytes
        writes = [(redis_key(c), v) for c, v in items]
        asyncio.run_coroutine_threadsafe(self._put(writes, nbytes), self._loop)
        return True

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until queued writes are done (tests and benchmarks; the engine never waits)."""
        deadline = time.monotonic() + timeout_s
        while self._pending_bytes and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    # -- on the store's loop --------------------------------------------------------------

    async def _connect(self) -> Any:
        """A client over a bounded pool; no retries: a miss is cheaper than a second wait."""
        cfg = self.config
        pool = aioredis.BlockingConnectionPool.from_url(
            cfg.url,
            max_connections=cfg.max_connections,
            timeout=cfg.timeout_s,
            socket_timeout=cfg.timeout_s,
            socket_connect_timeout=cfg.timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        return aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))

    async def _fetch(self, keys: list[bytes]) -> list[bytes | None]:
        started = time.perf_counter()
        try:
            values = await asyncio.wait_for(self._client.mget(keys), self.config.timeout_s)
        except (TimeoutError, RedisError, OSError):
            self._failed()
            return [None] * len(keys)
        self._succeeded()
        found = [v if isinstance(v, bytes) else None for v in values]
        self.stats.hits += sum(v is not None for v in found)
        self.stats.bytes_read += sum(len(v) for v in found if v is not None)
        self.stats.fetch_ms = [*self.stats.fetch_ms[-255:], 1000 * (time.perf_counter() - started)]
        return found

    async def _put(self, items: list[tuple[bytes, ValueMaker]], nbytes: int) -> None:
        try:
            if self.breaker_open:
                raise RedisError("breaker open")
            made = await self._loop.run_in_executor(None, lambda: [make() for _, make in items])
            async with self._client.pipeline(transaction=False) as pipe:
                for (key, _), value in zip(items, made, strict=True):
                    pipe.set(key, value, nx=True)
                await asyncio.wait_for(pipe.execute(), self.config.timeout_s)
            self._succeeded()
            self.stats.writes += len(items)
            self.stats.bytes_written += sum(len(v) for v in made)
        except (TimeoutError, RedisError, OSError):
            self._failed()
            self.stats.dropped_writes += len(items)
        finally:
            with self._lock:
                self._pending_bytes -= nbytes

    def _failed(self) -> None:
        self.stats.errors += 1
        self._failures += 1
        if self._failures >= self.config.breaker_failures and not self.breaker_open:
            self._open_until = time.monotonic() + self.config.breaker_cooldown_s
            self.stats.breaker_opened += 1

    def _succeeded(self) -> None:
        self._failures = 0
        self._open_until = 0.0
