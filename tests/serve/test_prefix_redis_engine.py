"""Prefix KV through a real redis-server: one engine computes, another loads; under every Redis
fault the output stays transformers' greedy output, no request fails and the event is counted."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from core.sampling import SamplingParams
from kvcache import kv_codec
from kvcache.redis_store import redis_key
from serve.engine_builder import BuiltEngine, EngineOptions, build_engine
from serve.local_redis import LocalRedis, free_port, start_redis
from tests.serve.engine_helpers import Oracle, random_image, run_checked

pytestmark = pytest.mark.redis

SYSTEM = "you are a careful assistant who answers every question about the picture"
GREEDY = SamplingParams(max_tokens=10)
BLOCK = 4


@pytest.fixture
def server() -> Iterator[LocalRedis]:
    srv = start_redis()
    yield srv
    srv.stop()


def replica(folders: dict[str, Path], url: str) -> BuiltEngine:
    """An engine replica with its own (empty) KV pool, sharing prefixes through ``url``."""
    options = EngineOptions(policy="none", block_size=BLOCK, redis_url=url)
    return build_engine(folders["target"], options=options)


def computed_by(built: BuiltEngine, oracle: Oracle, seed: int) -> None:
    """``built`` answers one prompt and has written its prefix blocks to Redis."""
    run_checked(built.engine, [oracle.prompt("what is it", random_image(seed), SYSTEM)], [GREEDY])
    assert built.redis is not None
    built.redis.flush()


def answer_matches_oracle(built: BuiltEngine, oracle: Oracle, seed: int) -> int:
    """Run the prompt of ``seed`` on ``built``; assert the oracle's output; its cached tokens."""
    (out,) = run_checked(built.engine, [oracle.prompt("what is it", random_image(seed), SYSTEM)], [GREEDY])
    assert list(out.token_ids) == oracle.greedy("what is it", random_image(seed), SYSTEM, 10)
    assert out.finish_reason in ("stop", "length")
    return out.stats.cached_tokens


def prefix_keys(built: BuiltEngine, oracle: Oracle, seed: int) -> list[bytes]:
    """The Redis keys of the prompt's usable prefix blocks, in order."""
    prompt = oracle.prompt("what is it", random_image(seed), SYSTEM)
    hashes = built.engine.scheduler.admission.block_hashes(prompt, built.engine.encode(prompt))
    return [redis_key(h) for h in hashes[: (built.engine.encode(prompt).num_tokens - 1) // BLOCK]]


def test_a_replica_that_never_saw_a_prefix_loads_it_from_redis(
    folders: dict[str, Path], oracle: Oracle, server: LocalRedis
) -> None:
    writer, reader = replica(folders, server.url), replica(folders, server.url)
    computed_by(writer, oracle, 1)
    cached = answer_matches_oracle(reader, oracle, 1)
    keys = prefix_keys(reader, oracle, 1)
    assert cached == len(keys) * BLOCK > 0
    assert reader.prefix is not None and reader.prefix.stats.remote_hits == len(keys)
    assert reader.prefix.stats.local_hits == 0
    assert answer_matches_oracle(reader, oracle, 1) == cached  # now from its own pool
    assert reader.prefix.stats.local_hits == len(keys)


def test_redis_absent_at_start(folders: dict[str, Path], oracle: Oracle) -> None:
    reader = replica(folders, f"redis://127.0.0.1:{free_port()}/0")
    assert answer_matches_oracle(reader, oracle, 2) == 0
    assert reader.redis is not None and reader.redis.stats.errors >= 1


def test_redis_killed_mid_run(folders: dict[str, Path], oracle: Oracle, server: LocalRedis) -> None:
    writer, reader = replica(folders, server.url), replica(folders, server.url)
    computed_by(writer, oracle, 3)
    server.process.kill()
    server.process.wait()
    assert answer_matches_oracle(reader, oracle, 3) == 0
    assert reader.redis is not None and reader.redis.stats.errors >= 1
    computed_by(writer, oracle, 4)  # writes fail quietly too
    assert writer.redis is not None and writer.redis.stats.dropped_writes > 0


@pytest.mark.parametrize("fault", ["CLIENT PAUSE", "hung process"])
def test_redis_paused_or_hung(
    folders: dict[str, Path], oracle: Oracle, server: LocalRedis, fault: str
) -> None:
    writer, reader = replica(folders, server.url), replica(folders, server.url)
    computed_by(writer, oracle, 5)
    if fault == "CLIENT PAUSE":
        redis.Redis.from_url(server.url).execute_command("CLIENT", "PAUSE", "3000", "ALL")
    else:
        server.process.send_signal(signal.SIGSTOP)  # answers nothing, connections stay open
    try:
        assert answer_matches_oracle(reader, oracle, 5) == 0
    finally:
        server.process.send_signal(signal.SIGCONT)
    assert reader.redis is not None and reader.redis.stats.errors >= 1


def test_redis_evicting_under_a_tiny_maxmemory(folders: dict[str, Path], oracle: Oracle) -> None:
    tiny = start_redis(maxmemory="1mb")
    try:
        writer, reader = replica(folders, tiny.url), replica(folders, tiny.url)
        for seed in range(10, 22):
            computed_by(writer, oracle, seed)
        assert int(redis.Redis.from_url(tiny.url).info("stats")["evicted_keys"]) > 0
        for seed in range(10, 22):
            answer_matches_oracle(reader, oracle, seed)
        assert reader.redis is not None and reader.redis.stats.errors == 0
    finally:
        tiny.stop()


def corrupted(value: bytes, reader: BuiltEngine, content: bytes, index: int) -> bytes:
    flipped = bytearray(value)
    flipped[len(flipped) // 2] ^= 0xFF
    return bytes(flipped)


def from_another_model(value: bytes, reader: BuiltEngine, content: bytes, index: int) -> bytes:
    assert reader.prefix is not None
    layout, tokens = reader.engine.scheduler.pool.kv.layout, (index * BLOCK, (index + 1) * BLOCK)
    kv = kv_codec.decode(value, kv_codec.BlockMeta(reader.prefix.model, layout, content, tokens))
    assert not isinstance(kv, str)
    return kv_codec.encode(kv_codec.BlockMeta(b"x" * 32, layout, content, tokens), kv)


@pytest.mark.parametrize(
    ("tamper", "index", "reason"),
    [(corrupted, 2, "checksum mismatch"), (from_another_model, 0, "header differs in model")],
    ids=["corrupted", "written-by-another-model"],
)
def test_a_bad_value_is_a_miss_from_that_block_on(
    folders: dict[str, Path], oracle: Oracle, server: LocalRedis, tamper: Any, index: int, reason: str
) -> None:
    writer, reader = replica(folders, server.url), replica(folders, server.url)
    computed_by(writer, oracle, 6)
    key = prefix_keys(reader, oracle, 6)[index]
    client = redis.Redis.from_url(server.url)
    client.set(key, tamper(client.get(key) or b"", reader, bytes.fromhex(key[-64:].decode()), index))
    assert answer_matches_oracle(reader, oracle, 6) == index * BLOCK  # the blocks before it still load
    assert reader.prefix is not None and reader.prefix.stats.rejected == {reason: 1}


def test_a_prefix_loaded_from_redis_skips_the_vision_tower(
    folders: dict[str, Path], oracle: Oracle, server: LocalRedis
) -> None:
    writer, reader = replica(folders, server.url), replica(folders, server.url)
    computed_by(writer, oracle, 8)
    calls = []
    encode = reader.engine.encode
    reader.engine.encode = lambda prompt, *a: calls.append(prompt) or encode(prompt, *a)  # type: ignore[method-assign]
    assert answer_matches_oracle(reader, oracle, 8) > 0
    assert calls == []  # every image row came from Redis
    answer_matches_oracle(reader, oracle, 9)  # a new image: encoded when its chunk needs it
    assert len(calls) == 1
