"""The scheduler with a prefix cache, over a real BlockPool with a scripted target and a scripted
remote store: requests start after their cached prefix, wait for Redis in their own state, and
publish what they computed."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence

import torch

from kvcache import kv_codec
from kvcache.block_hash import CacheScope, block_hashes, tenant_salt
from kvcache.prefix_cache import PrefixCache
from scheduler.policy import Policy
from scheduler.policy.fixed import NoDraft
from scheduler.request import RequestState, Status
from scheduler.scheduler import Scheduler
from tests.scheduler.fakes import BLOCK_SIZE, Record, ScriptedVerifier, make_pool, make_request, run, step

MODEL = b"m" * 32


class ScriptedRemote:
    """A Redis stand-in: fetches wait until the test answers them; puts are recorded."""

    def __init__(self) -> None:
        self.fetches: list[tuple[tuple[bytes, ...], concurrent.futures.Future[list[bytes | None]]]] = []
        self.stored: dict[bytes, bytes] = {}

    def fetch(self, contents: Sequence[bytes]) -> concurrent.futures.Future[list[bytes | None]]:
        future: concurrent.futures.Future[list[bytes | None]] = concurrent.futures.Future()
        self.fetches.append((tuple(contents), future))
        return future

    def put(self, items: Sequence[tuple[bytes, Callable[[], bytes]]], nbytes: int) -> bool:
        self.stored.update((content, make()) for content, make in items)
        return True


def hashed(req: RequestState) -> RequestState:
    ids = req.encoded.token_ids.tolist()
    req.block_hashes = block_hashes(ids, [], BLOCK_SIZE, CacheScope(MODEL, tenant_salt("")))
    return req


def scheduler(
    remote: ScriptedRemote | None = None, num_blocks: int = 64
) -> tuple[Scheduler, ScriptedVerifier, PrefixCache]:
    pool = make_pool(num_blocks)
    prefix = PrefixCache(pool, MODEL, remote)
    sched = Scheduler(pool, Policy(NoDraft()), prefix=prefix)
    return sched, ScriptedVerifier(sched), prefix


def test_a_second_request_with_the_same_prompt_starts_after_the_cached_blocks() -> None:
    sched, verifier, prefix = scheduler()
    sched.add(hashed(make_request(0, num_prompt=14, max_tokens=3)))
    done = run(sched, verifier)
    sched.add(hashed(make_request(1, num_prompt=14, max_tokens=3)))
    record = Record()
    step(sched, verifier, record=record)
    first = verifier.items[-1]
    assert (first.request_id, first.num_cached, first.token_ids.tolist()) == (1, 12, [12, 13])
    done.update(run(sched, verifier, record=record))
    assert done[1].stats.cached_tokens == 12 and prefix.stats.local_hits == 3
    assert done[1].token_ids == done[0].token_ids


def test_a_request_waiting_for_redis_lets_others_run_then_starts_from_what_came() -> None:
    remote = ScriptedRemote()
    writer, writer_verifier, _ = scheduler(remote)  # another replica computes the prompt
    writer.pool.kv.keys.normal_()  # the scripted target writes no KV: give the blocks content
    writer.pool.kv.values.normal_()
    writer.add(hashed(make_request(0, num_prompt=14, max_tokens=3)))
    step(writer, writer_verifier)  # it asks Redis first: nothing there
    remote.fetches[0][1].set_result([None] * 3)
    writer.wait_for_fetches(timeout_s=5)
    run(writer, writer_verifier)
    assert len(remote.stored) == 3

    sched, verifier, prefix = scheduler(remote)
    reader = hashed(make_request(0, num_prompt=14, max_tokens=3))
    sched.add(reader)
    sched.add(make_request(1, num_prompt=6, max_tokens=3))  # not hashed: nothing to look up
    remote.fetches.clear()
    record = Record()
    step(sched, verifier, record=record)  # request 0 asks Redis and waits; request 1 (other prompt) runs
    assert [i.request_id for i in verifier.items] == [1]
    assert reader.status is Status.WAITING and reader.blocks is None
    (asked, future), *_ = remote.fetches
    future.set_result([remote.stored.get(c) for c in asked])
    sched.wait_for_fetches(timeout_s=5)  # the values are checked on a worker thread
    step(sched, verifier, record=record)
    mine = [i for i in verifier.items if i.request_id == 0]
    assert mine[0].num_cached == 12 and mine[0].token_ids.tolist() == [12, 13]
    done = run(sched, verifier, record=record)
    assert done[0].stats.cached_tokens == 12 and prefix.stats.remote_hits == 3
    kv = sched.pool.kv
    for index, content in enumerate(reader.block_hashes[:3]):  # the stored KV, exactly
        (block,) = sched.pool.lookup([content])
        meta = kv_codec.BlockMeta(MODEL, kv.layout, content, (index * BLOCK_SIZE, (index + 1) * BLOCK_SIZE))
        stored = kv_codec.decode(remote.stored[content], meta)
        assert not isinstance(stored, str)
        assert torch.equal(kv.keys[:, block], stored.keys) and torch.equal(kv.values[:, block], stored.values)
        assert stored.keys.abs().sum() > 0  # the writer's (random) KV, not an empty pool


def test_a_redis_miss_computes_the_whole_prompt() -> None:
    remote = ScriptedRemote()
    sched, verifier, _ = scheduler(remote)
    sched.add(hashed(make_request(0, num_prompt=14, max_tokens=3)))
    step(sched, verifier)
    (asked, future), *_ = remote.fetches
    future.set_result([None] * len(asked))
    sched.wait_for_fetches(timeout_s=5)
    done = run(sched, verifier)
    assert verifier.items[0].num_cached == 0 and done[0].stats.cached_tokens == 0


def test_an_aborted_request_waiting_for_redis_leaves_nothing_behind() -> None:
    remote = ScriptedRemote()
    sched, verifier, _ = scheduler(remote)
    sched.add(hashed(make_request(0, num_prompt=14, max_tokens=3)))
    step(sched, verifier)
    assert sched.abort(0) is not None
    remote.fetches[0][1].set_result([None] * 3)
    assert not sched.has_unfinished()
    sched.check_integrity()
    assert sched.pool.num_free_blocks == sched.pool.num_blocks


def test_a_preempted_request_is_readmitted_from_its_own_published_blocks() -> None:
    sched, verifier, prefix = scheduler(num_blocks=10)  # 40 KV entries: two 26-token sequences do not fit
    for rid in range(2):
        sched.add(hashed(make_request(rid, num_prompt=14, max_tokens=12)))
    done = run(sched, verifier)
    assert sum(c.stats.preemptions for c in done.values()) > 0
    again = [i for i in verifier.items if i.request_id == 1 and i.num_cached > 0 and i.num_cached < 14]
    assert again, "the preempted request recomputed its prompt instead of reusing its blocks"
    assert all(c.stats.cached_tokens == 0 for c in done.values())  # counted at first admission only
    assert prefix.stats.local_hits > 0


def test_a_store_that_raises_is_a_miss_not_a_hang() -> None:
    remote = ScriptedRemote()
    sched, verifier, prefix = scheduler(remote)
    sched.add(hashed(make_request(0, num_prompt=14, max_tokens=3)))
    step(sched, verifier)
    remote.fetches[0][1].set_exception(ConnectionError("boom"))
    sched.wait_for_fetches(timeout_s=5)
    done = run(sched, verifier)
    assert done[0].stats.cached_tokens == 0
    assert prefix.stats.rejected == {"store failed: ConnectionError": 1}
