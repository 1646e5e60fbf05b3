"""The Redis tier against a real redis-server: round trips, and every fault is a counted miss."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
import redis

from kvcache.redis_store import RedisKVStore, RedisTierConfig, redis_key
from serve.local_redis import LocalRedis, free_port, start_redis

pytestmark = pytest.mark.redis


@pytest.fixture
def server() -> Iterator[LocalRedis]:
    srv = start_redis()
    yield srv
    srv.stop()


def store_for(url: str, **kw: float) -> RedisKVStore:
    return RedisKVStore(RedisTierConfig(url, timeout_s=0.2, breaker_cooldown_s=kw.pop("cooldown", 5.0), **kw))  # type: ignore[arg-type]


def h(i: int) -> bytes:
    return bytes([i]) * 32


def test_written_values_come_back_and_missing_ones_are_none(server: LocalRedis) -> None:
    store = store_for(server.url)
    assert store.put([(h(1), lambda: b"one"), (h(2), lambda: b"two")], 100)
    store.flush()
    assert store.fetch([h(1), h(3), h(2)]).result(timeout=2) == [b"one", None, b"two"]
    assert (store.stats.writes, store.stats.hits, store.stats.lookups) == (2, 2, 3)
    assert store.stats.bytes_read == 6 and store.stats.bytes_written == 6
    store.close()


def test_a_value_is_written_once_and_never_overwritten(server: LocalRedis) -> None:
    store = store_for(server.url)
    store.put([(h(1), lambda: b"first")], 100)
    store.flush()
    store.put([(h(1), lambda: b"second")], 100)
    store.flush()
    assert redis.Redis.from_url(server.url).get(redis_key(h(1))) == b"first"
    store.close()


def test_redis_absent_is_a_miss_and_opens_the_breaker() -> None:
    store = store_for(f"redis://127.0.0.1:{free_port()}/0")
    for _ in range(3):
        assert store.fetch([h(1)]).result(timeout=2) == [None]
    assert store.stats.errors == 3 and store.stats.breaker_opened == 1 and store.breaker_open
    started = time.perf_counter()
    assert store.fetch([h(1)]).result(timeout=2) == [None]  # answered without asking
    assert time.perf_counter() - started < 0.05
    assert store.stats.skipped == 1
    assert not store.put([(h(1), lambda: b"x")], 100)
    assert store.stats.dropped_writes == 1
    store.close()


def test_the_breaker_closes_again_once_redis_answers(server: LocalRedis) -> None:
    store = store_for(server.url, cooldown=0.2)
    server.process.send_signal(signal.SIGSTOP)  # Redis hangs
    try:
        for _ in range(3):
            assert store.fetch([h(1)]).result(timeout=2) == [None]
        assert store.breaker_open
    finally:
        server.process.send_signal(signal.SIGCONT)
    time.sleep(0.3)
    store.put([(h(1), lambda: b"back")], 100)
    store.flush()
    assert store.fetch([h(1)]).result(timeout=2) == [b"back"]
    assert not store.breaker_open
    store.close()


def test_a_paused_redis_times_out_quickly(server: LocalRedis) -> None:
    store = store_for(server.url)
    admin = redis.Redis.from_url(server.url)
    admin.execute_command("CLIENT", "PAUSE", "2000", "ALL")
    started = time.perf_counter()
    assert store.fetch([h(1)]).result(timeout=2) == [None]
    assert time.perf_counter() - started < 1.0
    assert store.stats.errors == 1
    admin.execute_command("CLIENT", "UNPAUSE")
    store.close()


def test_redis_killed_mid_run_turns_into_misses(server: LocalRedis) -> None:
    store = store_for(server.url)
    store.put([(h(1), lambda: b"one")], 100)
    store.flush()
    assert store.fetch([h(1)]).result(timeout=2) == [b"one"]
    server.process.kill()
    server.process.wait()
    assert store.fetch([h(1)]).result(timeout=2) == [None]
    assert store.stats.errors >= 1
    store.close()


def test_a_full_write_queue_drops_writes_and_counts_them(server: LocalRedis) -> None:
    store = RedisKVStore(RedisTierConfig(server.url, max_pending_bytes=1000))
    assert not store.put([(h(i), lambda: b"x") for i in range(3)], 1001)
    assert store.stats.dropped_writes == 3
    store.close()
