"""The drafter behind a link (the DrafterPool deployment's wire protocol, without Ray): outputs
stay the target's, pipelined or in lockstep, with trees drafted ahead or not, under link delays
and jitter, with mixed adapters, aborts, a pool that dies or restarts mid-request; prompts cross
once, bytes are counted, and every KV block comes back."""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.draft import DraftBudget, DraftProposal, DraftRequest
from core.plan import Completion
from core.prompt import Prompt
from core.sampling import SamplingParams
from drafter_pool.pool import empty_proposal
from models.tiny.samples import EVAL_SEED_START, make_sample
from scheduler.engine import DrafterHealth, Engine
from scheduler.foresight import ProactiveGate
from serve.engine_builder import BuiltEngine, EngineOptions, build_drafter, build_engine
from serve.link import Link
from serve.remote_drafter import RELEASE_BATCH, DraftCall, DrafterPoolServer, RemoteDrafter, pack
from tests.serve.engine_helpers import Oracle, run_checked
from tests.serve.pool_helpers import PoolHandle

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
USERS = ["bob", None, "dave", "bob", None, "dave"]
JITTERY = Link(rtt_ms=4.0, jitter_ms=3.0, bandwidth_mbps=50.0)  # messages overtake each other


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle(CHECKPOINTS / "tiny-target")


def _remote(
    oracle: Oracle, pipeline: bool = True, link: Link = JITTERY, proactive: bool = True
) -> tuple[BuiltEngine, PoolHandle]:
    adapters = tuple((u, CHECKPOINTS / "adapters" / u) for u in ("bob", "dave"))
    opts = EngineOptions(
        policy="fixed", fixed_nodes=6, adapters=adapters, pipeline=pipeline, proactive=proactive
    )
    tokenizer = oracle.processor.tokenizer
    handle = PoolHandle(
        lambda: DrafterPoolServer(build_drafter(CHECKPOINTS / "tiny-drafter", tokenizer, opts))
    )
    built = build_engine(CHECKPOINTS / "tiny-target", None, opts, remote_drafter=RemoteDrafter(handle, link))
    built.engine.health = DrafterHealth(backoff_s=(0.02, 0.1))
    built.engine.gate = ProactiveGate(probe_every=0)  # every chance taken: the calls are exercised
    return built, handle


def _cases(oracle: Oracle, count: int, offset: int) -> tuple[list[Prompt], list[list[int]]]:
    samples = [make_sample(EVAL_SEED_START + offset + i, USERS[i % 6]) for i in range(count)]
    prompts = [oracle.prompt(s.question.text, s.image(), s.system) for s in samples]
    expected = [oracle.greedy(s.question.text, s.image(), s.system, 32) for s in samples]
    return prompts, expected


def _pool_is_empty(built: BuiltEngine, handle: PoolHandle) -> None:
    assert built.engine.drafter is not None
    built.engine.drafter.check_integrity()  # flushes the last releases
    server = handle.server
    assert server.pool.num_free_blocks == server.pool.pool.num_blocks and not server._local


@pytest.mark.parametrize(
    ("pipeline", "proactive"),
    [(True, True), (True, False), (False, False)],
    ids=["pipelined-proactive", "pipelined", "lockstep"],
)
def test_outputs_are_the_targets_across_a_jittery_link_with_mixed_adapters(
    oracle: Oracle, pipeline: bool, proactive: bool
) -> None:
    built, handle = _remote(oracle, pipeline, proactive=proactive)
    assert built.engine.proactive is proactive
    assert built.engine.pipelined is pipeline
    prompts, expected = _cases(oracle, 6, 960)
    outs = run_checked(built.engine, prompts, [SamplingParams(max_tokens=32)] * 6, adapters=USERS)
    assert [list(o.token_ids) for o in outs] == expected
    assert sum(o.stats.accepted_tokens for o in outs) > 0
    assert handle.prompts_sent == 6 and handle.drafts_sent > 6  # once per request, not per step
    totals = built.engine.snapshot.totals
    if pipeline:  # one group's call was out while the other group was verified
        assert totals.draft_hidden_ms > 0
    _pool_is_empty(built, handle)


def test_a_lone_request_pipelined_is_drafted_in_lockstep_and_stays_the_targets(oracle: Oracle) -> None:
    """One request is one group: nothing else to verify while its call is out."""
    built, _ = _remote(oracle, proactive=False)
    prompts, expected = _cases(oracle, 1, 965)
    (out,) = run_checked(built.engine, prompts, [SamplingParams(max_tokens=32)], adapters=["bob"])
    assert list(out.token_ids) == expected[0] and out.stats.accepted_tokens > 0
    assert built.engine.proactive_stats.calls == 0


@pytest.mark.parametrize("user", ["bob", None])
def test_lone_requests_verify_trees_drafted_ahead_and_stay_the_targets(
    oracle: Oracle, user: str | None
) -> None:
    """While its tree is verified the drafter drafts the next one after the path it rates likeliest;
    the steps that accepted that path use it, the others drop it and the pool its KV."""
    built, handle = _remote(oracle)
    prompts, expected = _cases(oracle, 4, 966)
    outs = [
        run_checked(built.engine, [p], [SamplingParams(max_tokens=48)], adapters=[user])[0] for p in prompts
    ]
    assert [list(o.token_ids) for o in outs] == expected
    ahead = built.engine.proactive_stats
    assert ahead.calls == ahead.trees > 0 and 0 < ahead.hits < ahead.trees  # some guesses came true
    # every step has a tree (the first one after the prompt); a step whose tree was drafted
    # ahead costs no call of its own
    assert handle.drafts_sent == sum(o.stats.verify_steps for o in outs) - ahead.hits + ahead.trees
    assert ahead.wasted_nodes > 0  # the misses' trees and the hits' other branches
    _pool_is_empty(built, handle)


def test_the_gate_learns_from_the_steps_after_each_chance_taken_or_not(oracle: Oracle) -> None:
    built, _ = _remote(oracle)
    built.engine.gate = gate = ProactiveGate(probe_every=2)  # every other chance the other choice
    prompts, expected = _cases(oracle, 2, 967)
    outs = [run_checked(built.engine, [p], [SamplingParams(max_tokens=48)])[0] for p in prompts]
    assert [list(o.token_ids) for o in outs] == expected
    ahead = built.engine.proactive_stats
    assert gate.chances == ahead.calls + ahead.declined and ahead.calls > 0 and ahead.declined > 0
    assert gate.waits[True].weight > 0 and gate.waits[False].weight > 0


def test_load_aware_calibrates_the_drafter_across_the_link(oracle: Oracle) -> None:
    """The policy's forward-cost curve of the drafter is measured where the pool runs."""
    tokenizer = oracle.processor.tokenizer
    opts = EngineOptions(policy="load_aware")
    drafter = CHECKPOINTS / "tiny-drafter"
    handle = PoolHandle(lambda: DrafterPoolServer(build_drafter(drafter, tokenizer, opts)))
    built = build_engine(CHECKPOINTS / "tiny-target", None, opts, remote_drafter=RemoteDrafter(handle))
    curves = built.engine.scheduler.policy.draft.cost.curves  # type: ignore[attr-defined]
    assert all(ms > 0 for ms in curves.drafter.ms)
    prompts, expected = _cases(oracle, 2, 975)
    outs = run_checked(built.engine, prompts, [SamplingParams(max_tokens=32)] * 2)
    assert [list(o.token_ids) for o in outs] == expected


def test_link_bytes_are_counted_per_request_both_ways(oracle: Oracle) -> None:
    built, handle = _remote(oracle)
    prompts, expected = _cases(oracle, 4, 970)
    outs = run_checked(built.engine, prompts, [SamplingParams(max_tokens=32)] * 4, adapters=USERS[:4])
    assert [list(o.token_ids) for o in outs] == expected
    ahead = built.engine.proactive_stats  # proactive calls answered after their request finished
    assert sum(o.stats.link_bytes_up for o in outs) + ahead.unbilled_up == handle.bytes_up
    assert sum(o.stats.link_bytes_down for o in outs) + ahead.unbilled_down == handle.bytes_down
    assert ahead.trees > 0
    for out, prompt in zip(outs, prompts, strict=True):
        assert out.stats.link_bytes_up > len(pack(prompt))  # the prompt crossed, with its image
        assert out.stats.link_bytes_down > 0


def _start(engine: Engine, prompts: list[Prompt]) -> list[int]:
    params = SamplingParams(max_tokens=32)
    return [engine.add_request(p, params, adapter=u) for p, u in zip(prompts, USERS, strict=True)]


def _step(engine: Engine, done: dict[int, Completion]) -> None:
    """One step, its finished requests' completions kept, the scheduler's KV checked."""
    for out in engine.step():
        if out.completion is not None:
            done[out.request_id] = out.completion
    engine.scheduler.check_integrity()


def _step_until(engine: Engine, done: dict[int, Completion], ids: list[int], steps: int) -> None:
    for _ in range(steps):
        _step(engine, done)
    assert len(done) < len(ids), "the requests finished before the fault"


def _finish(engine: Engine, done: dict[int, Completion]) -> None:
    while engine.has_unfinished():
        _step(engine, done)


def test_aborts_while_their_trees_are_on_the_way_free_everything(oracle: Oracle) -> None:
    built, handle = _remote(oracle)
    engine = built.engine
    prompts, expected = _cases(oracle, 6, 980)
    ids = _start(engine, prompts)
    done: dict[int, Completion] = {}
    _step_until(engine, done, ids, 6)
    assert engine._flights, "no draft call was out to abort under"
    aborted = {ids[1], ids[4]}
    for rid in aborted:
        engine.abort(rid)
    _finish(engine, done)
    for rid, want in zip(ids, expected, strict=True):
        if rid not in aborted:
            assert list(done[rid].token_ids) == want
    _pool_is_empty(built, handle)


@pytest.mark.parametrize("fault", ["dies", "restarts"])
def test_a_drafter_pool_fault_costs_speculation_not_requests(oracle: Oracle, fault: str) -> None:
    """While the pool is gone the engine decodes plainly (counted); once it is back (a fresh pool
    that knows no request) the prompts go again and drafting resumes; outputs never change."""
    built, handle = _remote(oracle)
    engine = built.engine
    prompts, expected = _cases(oracle, 6, 990)
    ids = _start(engine, prompts)
    done: dict[int, Completion] = {}
    _step_until(engine, done, ids, 5)
    handle.down = fault == "dies"
    handle.restart()
    if handle.down:
        _step_until(engine, done, ids, 4)
        assert engine.snapshot.totals.undrafted_steps > 0 and engine.health.failures > 0
        time.sleep(0.15)  # past the backoff
        handle.down = False
    accepted_before = sum(_accepted(engine, done, i) for i in ids)
    _finish(engine, done)
    assert [list(done[i].token_ids) for i in ids] == expected
    assert handle.server._next > 0, "the new pool never got the prompts again"
    accepted_after = sum(done[i].stats.accepted_tokens for i in ids)
    assert accepted_after > accepted_before, "drafting did not resume"
    _pool_is_empty(built, handle)


def _accepted(engine: Engine, done: dict[int, Completion], rid: int) -> int:
    """Draft tokens accepted for request ``rid`` so far, finished or not."""
    if rid in done:
        return done[rid].stats.accepted_tokens
    req = engine.scheduler.get(rid)
    assert req is not None
    return req.accepted_tokens


def test_a_draft_call_not_answered_in_time_is_decoded_plainly(oracle: Oracle) -> None:
    built, _ = _remote(oracle, link=Link(rtt_ms=400.0))
    engine = built.engine
    engine.draft_timeout_s = 0.05
    prompts, expected = _cases(oracle, 2, 1000)
    outs = engine.generate(prompts[:1], SamplingParams(max_tokens=8))
    assert list(outs[0].token_ids) == expected[0][:8]
    assert engine.snapshot.totals.undrafted_steps > 0 and outs[0].stats.accepted_tokens == 0


def test_releases_go_in_a_call_of_their_own_while_nothing_is_drafted() -> None:
    """A policy drafting nothing sends no draft call for the releases to ride along with: the
    pool still gets them, so it does not hold finished requests' KV."""
    released: list[int] = []
    pool = SimpleNamespace(
        propose=lambda requests, stop: [empty_proposal(r.request_id) for r in requests],
        release=released.append,
        kv_used=lambda: 0.0,
    )
    handle = PoolHandle(lambda: DrafterPoolServer(pool=pool))
    remote = RemoteDrafter(handle)
    budget, prompt = DraftBudget(max_nodes=2, max_depth=2), Prompt((1, 2, 3))
    requests = [DraftRequest(i, prompt, (4,), budget, SamplingParams()) for i in range(RELEASE_BATCH + 1)]
    remote.submit(requests).result(timeout_s=5)
    for r in requests[: RELEASE_BATCH - 1]:
        remote.release(r.request_id)
    assert len(handle.server._local) == RELEASE_BATCH + 1 and not released  # waiting for a call
    remote.release(requests[RELEASE_BATCH - 1].request_id)
    _wait_for(lambda: len(released) == RELEASE_BATCH)
    assert sorted(released) == list(range(RELEASE_BATCH)) and len(handle.server._local) == 1
    remote.release(requests[-1].request_id)  # the last one the pool holds goes at once
    _wait_for(lambda: len(released) == RELEASE_BATCH + 1)
    assert not handle.server._local


def test_a_release_during_the_call_carrying_the_request_reaches_the_pool_once_it_is_answered() -> None:
    """The engine finishes (aborts) the only request it has while that request's draft call is out:
    the release waits for the call, then goes on its own, and the pool ends up holding nothing."""
    released: list[int] = []
    answering = threading.Event()

    def propose(requests: list[DraftRequest], stop: object) -> list[object]:
        answering.wait(5)
        return [empty_proposal(r.request_id) for r in requests]

    pool = SimpleNamespace(propose=propose, release=released.append, kv_used=lambda: 0.0)
    handle = PoolHandle(lambda: DrafterPoolServer(pool=pool))
    remote = RemoteDrafter(handle)
    request = DraftRequest(
        7, Prompt((1, 2, 3)), (4,), DraftBudget(max_nodes=2, max_depth=2), SamplingParams()
    )
    pending = remote.submit([request])
    remote.release(7)  # the call still carries it: it may not overtake the draft
    answering.set()
    pending.result(timeout_s=5)
    _wait_for(lambda: released == [7])
    assert not handle.server._local


def _wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_request_unknown_to_the_pool_without_its_prompt_gets_an_empty_tree_and_is_named() -> None:
    """What a restarted pool answers: the engine sends those prompts again with its next call."""
    pool = SimpleNamespace(propose=lambda requests, stop: [], kv_used=lambda: 0.0)
    server = DrafterPoolServer(pool=pool)
    call = DraftCall(3, None, (1,), None, SamplingParams(), None)  # type: ignore[arg-type]
    reply = server.propose("engine-a", [], [pack(call)])
    assert reply.unknown == (3,)
    (tree,) = [pickle.loads(p) for p in reply.proposals]
    assert tree.request_id == 3 and tree.dropped and tree.tree.num_nodes == 0


def test_a_call_ahead_stops_growing_its_trees_once_another_call_waits() -> None:
    """A proactive call holds the pool only until an ordinary call arrives: the pool's ``stop``
    says so between tree levels (an ordinary call is never cut short)."""
    entered, seen = threading.Event(), []

    def propose(requests: list[DraftRequest], stop: Callable[[], bool] | None) -> list[DraftProposal]:
        seen.append(stop)
        if stop is not None:  # the call ahead: grows levels until another call waits
            entered.set()
            deadline = time.monotonic() + 10
            while not stop() and time.monotonic() < deadline:
                time.sleep(0.001)
            seen.append(stop())
        return [empty_proposal(r.request_id) for r in requests]

    pool = SimpleNamespace(propose=propose, kv_used=lambda: 0.0, release=lambda request_id: None)
    server = DrafterPoolServer(pool=pool)
    prompt = Prompt(token_ids=(1, 2, 3))
    call = pack(DraftCall(1, prompt, (5,), DraftBudget(4, 4), SamplingParams(), None))
    with ThreadPoolExecutor(2) as threads:
        ahead = threads.submit(server.propose, "engine-a", [], [call], True)
        assert entered.wait(10)
        plain = threads.submit(server.propose, "engine-a", [], [call])
        ahead.result(timeout=10), plain.result(timeout=10)
    assert seen[1] is True and seen[2] is None  # the call ahead saw the other waiting; it ran uncut
