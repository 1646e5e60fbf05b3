"""The scheduler over a real BlockPool with a scripted target: chunks, finishing, preemption, aborts."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from core.draft import DraftBudget
from scheduler.cost import CostCurve, CostModel
from scheduler.policies import DraftPolicy, FixedDraft, LoadAwareDraft, NoDraft, StepLoad, StepRecord
from scheduler.request import Status
from scheduler.scheduler import Scheduler, SchedulerConfig
from tests.scheduler.fakes import (
    EOS,
    ChainDrafter,
    ScriptedVerifier,
    expected_outputs,
    make_pool,
    make_request,
    next_token,
    run,
    step,
)


def _scheduler(
    num_blocks: int = 64, policy: DraftPolicy | None = None, released: list[int] | None = None, **config: int
) -> tuple[Scheduler, ScriptedVerifier]:
    on_release = released.append if released is not None else (lambda request_id: None)
    sched = Scheduler(make_pool(num_blocks), policy or NoDraft(), SchedulerConfig(**config), on_release)
    return sched, ScriptedVerifier(sched)


def test_long_prompt_is_fed_in_chunks_and_only_the_last_emits() -> None:
    sched, verifier = _scheduler(max_batch_tokens=4)
    sched.add(make_request(0, num_prompt=10, max_tokens=2))
    chunks = []
    for _ in range(3):
        (item,) = step(sched, verifier).items
        chunks.append((item.num_cached, item.token_ids.tolist(), item.emits))
    assert chunks == [(0, [0, 1, 2, 3], False), (4, [4, 5, 6, 7], False), (8, [8, 9], True)]
    assert sched.requests[0].output_ids == [next_token(10)]
    (item,) = step(sched, verifier).items
    assert (item.num_cached, item.token_ids.tolist()) == (10, [next_token(10)])
    assert sched.requests[0].finish_reason == "length"


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
    run(sched, verifier)
    req = sched.requests[0]
    assert (req.output_ids, req.finish_reason, req.status) == (
        expected_outputs(5, 3),
        "length",
        Status.FINISHED,
    )
    assert req.stats().verify_steps == 3
    assert sched.pool.num_free_blocks == sched.pool.num_blocks


def test_accepted_tree_is_cut_at_max_tokens() -> None:
    sched, verifier = _scheduler(policy=FixedDraft(nodes=8))
    sched.add(make_request(0, num_prompt=5, max_tokens=3))
    run(sched, verifier, ChainDrafter(right=8))
    req = sched.requests[0]
    assert (req.output_ids, req.finish_reason) == (expected_outputs(5, 3), "length")
    assert (req.verify_steps, req.accepted_tokens) == (1, 2)  # depth cut to 2: two nodes plus the bonus


def _eos_at(position: int) -> Callable[[int], int]:
    return lambda length: EOS if length == position else next_token(length)


@pytest.mark.parametrize("drafted", [False, True])
def test_finishes_with_stop_at_eos_which_is_kept(drafted: bool) -> None:
    sched, verifier = _scheduler(policy=FixedDraft(nodes=4) if drafted else None)
    verifier.token = _eos_at(7)  # the third output
    sched.add(make_request(0, num_prompt=5, max_tokens=10))
    run(sched, verifier, ChainDrafter(right=4, token=verifier.token) if drafted else None)
    req = sched.requests[0]
    assert req.output_ids == [next_token(5), next_token(6), EOS]
    assert req.finish_reason == "stop"
    if drafted:  # the accepted chain ran past EOS; what followed it was dropped
        assert req.verify_steps == 1
    assert sched.pool.num_free_blocks == sched.pool.num_blocks


def test_eos_is_an_ordinary_token_with_ignore_eos() -> None:
    sched, verifier = _scheduler()
    verifier.token = _eos_at(6)
    sched.add(make_request(0, num_prompt=5, max_tokens=4, ignore_eos=True))
    run(sched, verifier)
    assert sched.requests[0].output_ids == [next_token(5), EOS, next_token(7), next_token(8)]
    assert sched.requests[0].finish_reason == "length"


def _workload(sched: Scheduler, prompts: list[int], max_tokens: int) -> None:
    for rid, num_prompt in enumerate(prompts):
        sched.add(make_request(rid, num_prompt, max_tokens))


def _run_watching_preemptions(sched: Scheduler, verifier: ScriptedVerifier, drafter: ChainDrafter) -> int:
    preempted = 0
    while sched.has_unfinished():
        order = [r.request_id for r in sched.running]
        before = {rid: r.preemptions for rid, r in sched.requests.items()}
        step(sched, verifier, drafter)
        victims = [rid for rid in order if sched.requests[rid].preemptions > before[rid]]
        assert victims == order[len(order) - len(victims) :], "a request older than a victim was preempted"
        still_waiting = [rid for rid in victims if sched.requests[rid].status is Status.WAITING]
        assert [r.request_id for r in sched.waiting][: len(still_waiting)] == still_waiting  # front, in age
        preempted += len(victims)
    return preempted


@pytest.mark.parametrize("policy", [NoDraft(), FixedDraft(nodes=4)], ids=["plain", "tree"])
def test_preemption_under_pressure_gives_the_same_outputs(policy: DraftPolicy) -> None:
    prompts, max_tokens = [6, 7, 5, 6], 12
    outputs = {}
    for num_blocks in (64, 10):
        sched, verifier = _scheduler(num_blocks, policy)
        _workload(sched, prompts, max_tokens)
        preempted = _run_watching_preemptions(sched, verifier, ChainDrafter(right=2))
        assert (preempted > 0) == (num_blocks == 10)
        outputs[num_blocks] = {rid: (r.output_ids, r.finish_reason) for rid, r in sched.requests.items()}
        assert sched.pool.num_free_blocks == num_blocks
    assert outputs[10] == outputs[64]
    assert outputs[64] == {rid: (expected_outputs(p, max_tokens), "length") for rid, p in enumerate(prompts)}


class _RecordingFixed(FixedDraft):
    def __init__(self) -> None:
        super().__init__(nodes=4)
        self.records: list[StepRecord] = []

    def observe_step(self, record: StepRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("num_blocks", [64, 10], ids=["roomy", "preempting"])
def test_drafter_prefill_counts_each_requests_tokens_at_its_first_tree(num_blocks: int) -> None:
    policy = _RecordingFixed()
    sched, verifier = _scheduler(num_blocks, policy)
    _workload(sched, [6, 7, 5, 6], 12)
    drafter, preempted = ChainDrafter(right=2), 0
    while sched.has_unfinished():
        before = {r.request_id: r.preemptions for r in sched.running}
        step(sched, verifier, drafter)
        sched.record_step_time(draft_ms=1.0, verify_ms=1.0)
        preempted += sum(sched.requests[rid].preemptions > n for rid, n in before.items())
    prefills = sum(r.drafter_prefill for r in policy.records)
    assert (preempted > 0) == (num_blocks == 10)
    if not preempted:
        assert prefills == 6 + 7 + 5 + 6  # each prompt once, before its first tree
    else:
        assert prefills > 6 + 7 + 5 + 6  # a preempted request's drafter encodes it all again


class _RecordingLoads(NoDraft):
    def __init__(self) -> None:
        self.loads: list[StepLoad] = []

    def budget(self, load: StepLoad) -> DraftBudget:
        self.loads.append(load)
        return super().budget(load)


def test_the_policy_sees_undrafted_requests_and_the_ones_joining() -> None:
    # request 0 decodes plainly for a while, then 1 and 2 arrive; 2's prompt waits for room
    policy = _RecordingLoads()
    sched, verifier = _scheduler(policy=policy, max_batch_tokens=8)
    sched.add(make_request(0, num_prompt=4, max_tokens=10))
    step(sched, verifier)
    step(sched, verifier)
    sched.add(make_request(1, num_prompt=6, max_tokens=10))
    sched.add(make_request(2, num_prompt=6, max_tokens=10))
    step(sched, verifier)
    load = policy.loads[-1]
    assert load.num_sampling == 1 and load.num_joining == 2  # both newcomers will sample soon
    assert load.undrafted == ((4 + 2, 10 - 2),)  # request 0: its tokens, what it may still emit
    assert load.prefill_tokens == 7  # what is left of the step's 8 tokens after request 0's one


def test_preempted_request_recomputes_its_prompt_in_chunks() -> None:
    # request 1 (10-token prompt) is preempted with 7+ outputs and recomputed in chunks of <= 4
    sched, verifier = _scheduler(num_blocks=7, max_batch_tokens=4)
    sched.add(make_request(0, num_prompt=2, max_tokens=20))
    sched.add(make_request(1, num_prompt=10, max_tokens=8))
    assert _run_watching_preemptions(sched, verifier, ChainDrafter()) > 0
    assert sched.requests[0].output_ids == expected_outputs(2, 20)
    assert sched.requests[1].output_ids == expected_outputs(10, 8)


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
    while pending or sched.has_unfinished():
        for rid in pending[:3]:
            sched.add(make_request(rid, *lengths[rid]))
        del pending[:3]
        step(sched, verifier, drafter)
        live = [r.request_id for r in [*sched.running, *sched.waiting]]
        if live and rng.random() < 0.3:
            victim = rng.choice(live)
            assert sched.abort(victim) is not None
            aborted.add(victim)
            sched.check_integrity()
    assert sched.pool.num_free_blocks == sched.pool.num_blocks
    assert sum(r.preemptions for r in sched.requests.values()) > 0  # the pool did run out
    assert 10 < len(aborted) < 60
    for rid, (num_prompt, max_tokens) in lengths.items():
        req = sched.requests[rid]
        want = expected_outputs(num_prompt, max_tokens)
        assert req.finish_reason == ("abort" if rid in aborted else "length")
        assert req.output_ids == want[: len(req.output_ids)]
        assert rid in aborted or len(req.output_ids) == max_tokens


def test_add_rejects_a_request_beyond_the_context_window() -> None:
    sched, _ = _scheduler(max_model_len=32)
    sched.add(make_request(0, num_prompt=20, max_tokens=12))  # exactly 32 fits
    with pytest.raises(ValueError, match=r"is 33, beyond the 32-token context window"):
        sched.add(make_request(1, num_prompt=20, max_tokens=13))
    with pytest.raises(ValueError, match="already in use"):
        sched.add(make_request(0, num_prompt=2, max_tokens=2))
    with pytest.raises(ValueError, match="more than the whole KV pool holds"):
        _scheduler(num_blocks=4)[0].add(make_request(2, num_prompt=10, max_tokens=7))
    assert list(sched.requests) == [0]


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
    policy = LoadAwareDraft(
        cost=CostModel(CostCurve((1, 1000), (10.0, 10.0)), CostCurve((1, 1000), (1.0, 1.0)))
    )
    sched = Scheduler(make_pool(), policy, SchedulerConfig(), drafter_kv_used=lambda: used[0])
    verifier, drafter = ScriptedVerifier(sched), ChainDrafter()
    sched.add(make_request(0, num_prompt=4, max_tokens=20, compression=None))
    sched.add(make_request(1, num_prompt=4, max_tokens=20, compression=1.0))
    step(sched, verifier, drafter)
    used[0] = 0.9  # the drafter's KV fills up: requests built from now on keep a quarter
    step(sched, verifier, drafter)
    ratios = [(r.request_id, r.budget.compression) for r in drafter.requests]
    assert ratios == [(0, 1.0), (1, 1.0), (0, 0.25), (1, 1.0)]
