"""The scheduler over a real BlockPool with a scripted target: chunks, finishing, preemption, aborts."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest

from core.draft import DraftBudget
from core.plan import StepLoad, StepReport, StepTiming
from scheduler.cost import CostCurve, CostModel
from scheduler.policy import DraftPolicy, Policy, PolicyOptions, make_policy
from scheduler.policy.fixed import FixedDraft, NoDraft
from scheduler.request import Status
from scheduler.scheduler import Scheduler, SchedulerConfig
from tests.scheduler.fakes import (
    EOS,
    ChainDrafter,
    Record,
    ScriptedVerifier,
    empty_tree,
    expected_outputs,
    make_pool,
    make_request,
    next_token,
    run,
    step,
)


def _scheduler(
    num_blocks: int = 64,
    policy: DraftPolicy | None = None,
    released: list[int] | None = None,
    drafter: ChainDrafter | None = None,
    **config: int,
) -> tuple[Scheduler, ScriptedVerifier]:
    def on_release(request_id: int) -> None:
        if released is not None:
            released.append(request_id)
        if drafter is not None:
            drafter.release(request_id)

    sched = Scheduler(
        make_pool(num_blocks), Policy(policy or NoDraft()), SchedulerConfig(**config), on_release
    )
    return sched, ScriptedVerifier(sched)


def test_long_prompt_is_fed_in_chunks_and_only_the_last_emits() -> None:
    sched, verifier = _scheduler(max_batch_tokens=4)
    sched.add(make_request(0, num_prompt=10, max_tokens=2))
    chunks, record = [], Record()
    for _ in range(3):
        (item,) = step(sched, verifier, record=record).items
        chunks.append((item.num_cached, item.token_ids.tolist(), item.emits))
    assert chunks == [(0, [0, 1, 2, 3], False), (4, [4, 5, 6, 7], False), (8, [8, 9], True)]
    live = sched.get(0)
    assert live is not None and live.output_ids == [next_token(10)]
    (item,) = step(sched, verifier, record=record).items
    assert (item.num_cached, item.token_ids.tolist()) == (10, [next_token(10)])
    assert record.done[0].finish_reason == "length" and sched.get(0) is None


def test_running_requests_go_first_and_admissions_share_what_is_left() -> None:
    sched, verifier = _scheduler(max_batch_tokens=6)
    sched.add(make_request(0, num_prompt=4, max_tokens=5))
    sched.add(make_request(1, num_prompt=9, max_tokens=5))
    first = step(sched, verifier).items
    assert [(i.request_id, i.token_ids.shape[0], i.emits) for i in first] == [(0, 4, True), (1, 2, False)]
    second = step(sched, verifier).items
    assert [(i.request_id, i.token_ids.shape[0], i.emits) for i in second] == [(0, 1, True), (1, 5, False)]


def test_finishes_with_length_at_max_tokens() -> None:
    sched, verifier = _scheduler()
    sched.add(make_request(0, num_prompt=5, max_tokens=3))
    done = run(sched, verifier)[0]
    assert (list(done.token_ids), done.finish_reason) == (expected_outputs(5, 3), "length")
    assert done.stats.verify_steps == 3
    assert sched.pool.num_free_blocks == sched.pool.num_blocks and not sched.has_unfinished()


def test_accepted_tree_is_cut_at_max_tokens() -> None:
    sched, verifier = _scheduler(policy=FixedDraft(nodes=8))
    sched.add(make_request(0, num_prompt=5, max_tokens=3))
    done = run(sched, verifier, ChainDrafter(right=8))[0]
    assert (list(done.token_ids), done.finish_reason) == (expected_outputs(5, 3), "length")
    assert (done.stats.verify_steps, done.stats.accepted_tokens) == (1, 2)  # depth cut to 2, plus the bonus


def _eos_at(position: int) -> Callable[[int], int]:
    return lambda length: EOS if length == position else next_token(length)


@pytest.mark.parametrize("drafted", [False, True])
def test_finishes_with_stop_at_eos_which_is_kept(drafted: bool) -> None:
    sched, verifier = _scheduler(policy=FixedDraft(nodes=4) if drafted else None)
    verifier.token = _eos_at(7)  # the third output
    sched.add(make_request(0, num_prompt=5, max_tokens=10))
    done = run(sched, verifier, ChainDrafter(right=4, token=verifier.token) if drafted else None)[0]
    assert list(done.token_ids) == [next_token(5), next_token(6), EOS]
    assert done.finish_reason == "stop"
    if drafted:  # the accepted chain ran past EOS; what followed it was dropped
        assert done.stats.verify_steps == 1
    assert sched.pool.num_free_blocks == sched.pool.num_blocks


def test_eos_is_an_ordinary_token_with_ignore_eos() -> None:
    sched, verifier = _scheduler()
    verifier.token = _eos_at(6)
    sched.add(make_request(0, num_prompt=5, max_tokens=4, ignore_eos=True))
    done = run(sched, verifier)[0]
    assert list(done.token_ids) == [next_token(5), EOS, next_token(7), next_token(8)]
    assert done.finish_reason == "length"


def _workload(sched: Scheduler, prompts: list[int], max_tokens: int) -> None:
    for rid, num_prompt in enumerate(prompts):
        sched.add(make_request(rid, num_prompt, max_tokens))


def _run_watching_preemptions(
    sched: Scheduler, verifier: ScriptedVerifier, drafter: ChainDrafter, record: Record | None = None
) -> int:
    preempted, queue = 0, sched.queue
    while sched.has_unfinished():
        order = [r.request_id for r in queue.running]
        before = {rid: r.preemptions for rid, r in queue.requests.items()}
        step(sched, verifier, drafter, record)
        live = {rid: queue.requests.get(rid) for rid in order}
        victims = [rid for rid, r in live.items() if r is not None and r.preemptions > before[rid]]
        assert victims == order[len(order) - len(victims) :], "a request older than a victim was preempted"
        still_waiting = [rid for rid in victims if queue.requests[rid].status is Status.WAITING]
        assert [r.request_id for r in queue.waiting][: len(still_waiting)] == still_waiting  # front, in age
        preempted += len(victims)
    return preempted


@pytest.mark.parametrize("policy", [NoDraft(), FixedDraft(nodes=4)], ids=["plain", "tree"])
def test_preemption_under_pressure_gives_the_same_outputs(policy: DraftPolicy) -> None:
    prompts, max_tokens = [6, 7, 5, 6], 12
    outputs = {}
    for num_blocks in (64, 10):
        sched, verifier = _scheduler(num_blocks, policy)
        _workload(sched, prompts, max_tokens)
        record = Record()
        preempted = _run_watching_preemptions(sched, verifier, ChainDrafter(right=2), record)
        assert (preempted > 0) == (num_blocks == 10)
        outputs[num_blocks] = {rid: (list(c.token_ids), c.finish_reason) for rid, c in record.done.items()}
        assert sched.pool.num_free_blocks == num_blocks
    assert outputs[10] == outputs[64]
    assert outputs[64] == {rid: (expected_outputs(p, max_tokens), "length") for rid, p in enumerate(prompts)}


@dataclass
class _Recording:
    """A policy that decides as ``inner`` does and keeps every load it was asked about and every
    report it learned from."""

    inner: DraftPolicy
    loads: list[StepLoad] = field(default_factory=list)
    reports: list[StepReport] = field(default_factory=list)

    def choose(self, load: StepLoad) -> DraftBudget:
        self.loads.append(load)
        return self.inner.choose(load)

    def learn(self, report: StepReport, timing: StepTiming) -> None:
        self.reports.append(report)


@pytest.mark.parametrize("num_blocks", [64, 10], ids=["roomy", "preempting"])
def test_the_report_counts_the_drafters_prefill_of_each_request_at_its_first_tree(num_blocks: int) -> None:
    policy, drafter = _Recording(FixedDraft(nodes=4)), ChainDrafter(right=2)
    sched, verifier = _scheduler(num_blocks, policy, drafter=drafter)
    _workload(sched, [6, 7, 5, 6], 12)
    preempted = _run_watching_preemptions(sched, verifier, drafter)
    prefills = sum(r.drafter_prefill for r in policy.reports)
    assert (preempted > 0) == (num_blocks == 10)
    if not preempted:
        assert prefills == 6 + 7 + 5 + 6  # each prompt once, before its first tree
    else:
        assert prefills > 6 + 7 + 5 + 6  # a preempted request's drafter encodes it all again


def test_the_report_says_what_each_emitting_request_was_given_and_accepted() -> None:
    policy, drafter = _Recording(FixedDraft(nodes=3)), ChainDrafter(right=2)
    sched, verifier = _scheduler(policy=policy, max_batch_tokens=64)
    sched.add(make_request(0, num_prompt=4, max_tokens=20))
    step(sched, verifier, drafter)
    sched.add(make_request(1, num_prompt=100, max_tokens=20))
    step(sched, verifier, drafter)  # 0 samples with a tree; a chunk of 1's prompt rides along
    report = policy.reports[-1]
    assert [(a.budget.max_nodes, a.num_draft, a.accepted) for a in report.accepted] == [(3, 3, 2)]
    assert (report.verify_tokens, report.tree_nodes) == (1 + 3 + 60, 3)
    assert report.load == StepLoad(num_sampling=1, prefill_tokens=63, num_joining=1)
    assert report.budget == DraftBudget(3, 3)
    assert [o.new_token_ids for o in report.outputs] == [tuple(expected_outputs(4, 6)[3:])]
    assert report.emitted_tokens == 3


def test_a_tree_the_drafter_had_no_room_for_is_counted_as_dropped() -> None:
    class Full(ChainDrafter):
        def propose(self, requests):  # type: ignore[no-untyped-def]
            return [replace(p, tree=empty_tree(), dropped=True) for p in super().propose(requests)]

    policy = _Recording(FixedDraft(nodes=3))
    sched, verifier = _scheduler(policy=policy)
    sched.add(make_request(0, num_prompt=4, max_tokens=5))
    done = run(sched, verifier, Full())[0]
    assert list(done.token_ids) == expected_outputs(4, 5)  # plain decoding each step
    assert [r.drafter_dropped for r in policy.reports] == [1] * 4 + [0]  # the last step has no room left
    assert done.stats.draft_tokens == 0


def test_the_policy_sees_who_samples_and_who_joins_soon() -> None:
    # request 0 decodes plainly for a while, then 1 and 2 arrive; 2's prompt waits for room
    policy = _Recording(NoDraft())
    sched, verifier = _scheduler(policy=policy, max_batch_tokens=8)
    sched.add(make_request(0, num_prompt=4, max_tokens=10))
    step(sched, verifier)
    step(sched, verifier)
    sched.add(make_request(1, num_prompt=6, max_tokens=10))
    sched.add(make_request(2, num_prompt=6, max_tokens=10))
    step(sched, verifier)
    load = policy.loads[-1]
    assert load.num_sampling == 1 and load.num_joining == 2  # both newcomers will sample soon
    assert load.prefill_tokens == 7  # what is left of the step's 8 tokens after request 0's one
    assert not load.decoding and policy.loads[1].decoding


def test_preempted_request_recomputes_its_prompt_in_chunks() -> None:
    # request 1 (10-token prompt) is preempted with 7+ outputs and recomputed in chunks of <= 4
    sched, verifier = _scheduler(num_blocks=7, max_batch_tokens=4)
    sched.add(make_request(0, num_prompt=2, max_tokens=20))
    sched.add(make_request(1, num_prompt=10, max_tokens=8))
    record = Record()
    assert _run_watching_preemptions(sched, verifier, ChainDrafter(), record) > 0
    assert list(record.done[0].token_ids) == expected_outputs(2, 20)
    assert list(record.done[1].token_ids) == expected_outputs(10, 8)


def test_chunk_of_a_preempted_request_stops_inside_the_prompt() -> None:
    req = make_request(0, num_prompt=10, max_tokens=10)
    req.output_ids.extend(expected_outputs(10, 8))  # as after a preemption: outputs kept, no KV
    chunk = req.chunk(4)
    assert chunk.token_ids.tolist() == [0, 1, 2, 3]


def test_abort_of_waiting_and_running_requests_frees_their_blocks() -> None:
    released: list[int] = []
    sched, verifier = _scheduler(released=released, max_running=1)
    sched.add(make_request(0, num_prompt=9, max_tokens=5))
    sched.add(make_request(1, num_prompt=3, max_tokens=5))
    step(sched, verifier)
    assert sched.pool.num_free_blocks < sched.pool.num_blocks
    out = sched.abort(0)
    assert out is not None and (out.finished, out.finish_reason, out.new_token_ids) == (True, "abort", ())
    assert out.completion is not None and out.completion.finish_reason == "abort"
    assert sched.pool.num_free_blocks == sched.pool.num_blocks and released == [0]
    out = sched.abort(1)
    assert out is not None and out.finish_reason == "abort"
    assert released == [0]  # it never held KV
    assert not sched.has_unfinished() and sched.abort(1) is None and sched.abort(99) is None
    sched.check_integrity()


def test_many_requests_with_random_aborts_leak_nothing() -> None:
    rng = random.Random(0)
    sched, verifier = _scheduler(num_blocks=12, policy=FixedDraft(nodes=3), max_running=6)
    drafter, pending, aborted = ChainDrafter(right=1), list(range(100)), set()
    lengths = {rid: (rng.randint(1, 12), rng.randint(1, 10)) for rid in pending}
    record = Record()
    while pending or sched.has_unfinished():
        for rid in pending[:3]:
            sched.add(make_request(rid, *lengths[rid]))
        del pending[:3]
        step(sched, verifier, drafter, record)
        live = list(sched.queue.requests)
        if live and rng.random() < 0.3:
            victim = rng.choice(live)
            out = sched.abort(victim)
            assert out is not None and out.completion is not None
            record.done[victim] = out.completion
            aborted.add(victim)
            sched.check_integrity()
    assert sched.pool.num_free_blocks == sched.pool.num_blocks
    assert sum(c.stats.preemptions for c in record.done.values()) > 0  # the pool did run out
    assert 10 < len(aborted) < 60
    for rid, (num_prompt, max_tokens) in lengths.items():
        done = record.done[rid]
        want = expected_outputs(num_prompt, max_tokens)
        assert done.finish_reason == ("abort" if rid in aborted else "length")
        assert list(done.token_ids) == want[: len(done.token_ids)]
        assert rid in aborted or len(done.token_ids) == max_tokens


def test_add_rejects_a_request_beyond_the_context_window() -> None:
    sched, _ = _scheduler(max_model_len=32)
    sched.add(make_request(0, num_prompt=20, max_tokens=12))  # exactly 32 fits
    with pytest.raises(ValueError, match=r"is 33, beyond the 32-token context window"):
        sched.add(make_request(1, num_prompt=20, max_tokens=13))
    with pytest.raises(ValueError, match="already in use"):
        sched.add(make_request(0, num_prompt=2, max_tokens=2))
    with pytest.raises(ValueError, match="more than the whole KV pool holds"):
        _scheduler(num_blocks=4)[0].add(make_request(2, num_prompt=10, max_tokens=7))
    assert [r.request_id for r in sched.queue.waiting] == [0]


def test_tree_budget_is_cut_by_the_tokens_left_to_emit() -> None:
    sched, _ = _scheduler(policy=FixedDraft(nodes=6, depth=4))
    sched.add(make_request(0, num_prompt=3, max_tokens=1))
    sched.add(make_request(1, num_prompt=3, max_tokens=3))
    sched.add(make_request(2, num_prompt=3, max_tokens=20))
    plan = sched.schedule()
    budgets = {d.request_id: d.budget for d in plan.drafts}
    assert budgets == {1: DraftBudget(max_nodes=6, max_depth=2), 2: DraftBudget(max_nodes=6, max_depth=4)}
    assert [i.request_id for i in plan.items] == [0, 1, 2]


def test_tree_budget_is_cut_by_the_step_token_budget() -> None:
    sched, _ = _scheduler(policy=FixedDraft(nodes=6, depth=4), max_batch_tokens=10)
    sched.add(make_request(0, num_prompt=3, max_tokens=20))
    sched.add(make_request(1, num_prompt=3, max_tokens=20))
    budgets = [d.budget for d in sched.schedule().drafts]
    # 10 - 6 prompt tokens = 4 left: the first tree gets 4 nodes, the second none
    assert budgets == [DraftBudget(max_nodes=4, max_depth=4)]


def test_trees_carry_the_policys_ratio_unless_the_request_pinned_its_own() -> None:
    used = [0.0]
    flat = CostModel(CostCurve((1, 1000), (10.0, 10.0)), CostCurve((1, 1000), (1.0, 1.0)))
    policy = make_policy("load_aware", PolicyOptions(cost=lambda: flat))
    sched = Scheduler(make_pool(), policy, SchedulerConfig(), drafter_kv_used=lambda: used[0])
    verifier, drafter = ScriptedVerifier(sched), ChainDrafter()
    sched.add(make_request(0, num_prompt=4, max_tokens=20, compression=None))
    sched.add(make_request(1, num_prompt=4, max_tokens=20, compression=1.0))
    step(sched, verifier, drafter)
    used[0] = 0.9  # the drafter's KV fills up: requests built from now on keep a quarter
    step(sched, verifier, drafter)
    ratios = [(r.request_id, r.budget.compression) for r in drafter.requests]
    assert ratios == [(0, 1.0), (1, 1.0), (0, 0.25), (1, 1.0)]
