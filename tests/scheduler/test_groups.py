"""Pipeline groups: requests spread over them, a group planned alone or all together, a plan
split per group with each part's own load, and preemption kept inside a group."""

from __future__ import annotations

from core.plan import StepLoad
from scheduler.policy import Policy
from scheduler.policy.fixed import FixedDraft
from scheduler.scheduler import Scheduler, SchedulerConfig
from tests.scheduler.fakes import ChainDrafter, ScriptedVerifier, make_pool, make_request, step


def _grouped(num_blocks: int = 64, requests: int = 4, **config: int) -> tuple[Scheduler, ScriptedVerifier]:
    sched = Scheduler(make_pool(num_blocks), Policy(FixedDraft(3, 3)), SchedulerConfig(groups=2, **config))
    for rid in range(requests):
        sched.add(make_request(rid, num_prompt=6, max_tokens=20, ignore_eos=True))
    return sched, ScriptedVerifier(sched)


def _group_of(sched: Scheduler, rid: int) -> int:
    req = sched.get(rid)
    assert req is not None
    return req.group


def test_new_requests_go_to_the_group_with_fewest_live_requests() -> None:
    sched, _ = _grouped(requests=5)
    assert [_group_of(sched, rid) for rid in range(5)] == [0, 1, 0, 1, 0]
    sched.abort(0)
    sched.abort(2)
    sched.add(make_request(9, num_prompt=6, max_tokens=4))
    assert _group_of(sched, 9) == 0  # group 0 holds 1 live request now, group 1 holds 2


def test_a_group_is_planned_alone_and_everyone_together_without_a_group() -> None:
    sched, verifier = _grouped()
    step(sched, verifier)  # every prompt prefilled (groups planned together)
    one = sched.schedule(group=1)
    assert {i.request_id for i in one.items} == {1, 3} and {d.request_id for d in one.drafts} == {1, 3}
    sched.update(one.with_trees(ChainDrafter().propose(one.drafts)), verifier.verify(one.items))
    everyone = sched.schedule(group=None)
    assert {i.request_id for i in everyone.items} == {0, 1, 2, 3}


def test_a_split_plan_gives_each_group_its_requests_and_its_own_load() -> None:
    sched, verifier = _grouped()
    step(sched, verifier)
    plan = sched.schedule(group=None, split=2)
    assert plan.load.split == 2 and plan.load.num_sampling == 4
    parts = sched.split(plan)
    assert sorted(parts) == [0, 1]
    assert {i.request_id for i in parts[0].items} == {0, 2}
    assert {d.request_id for d in parts[1].drafts} == {1, 3}
    for g, other in ((0, 1), (1, 0)):
        # 2 sampling requests each; meanwhile the other group's 2 tokens and 2 trees of 3 nodes
        assert parts[g].load == StepLoad(2, 0, 0.0, 0, overlap_tokens=parts[other].num_tokens)
        assert parts[other].num_tokens == 2 + 2 * 3
    for part in parts.values():  # both parts verify and commit as plans of their own
        sched.update(part.with_trees(ChainDrafter().propose(part.drafts)), verifier.verify(part.items))
    sched.check_integrity()


def test_preemption_takes_victims_from_the_planned_group_only() -> None:
    """Group 1's step is on its way while group 0 runs out of KV: group 0 gives up its own newest
    request (2), not the newest overall (3, in the step on its way), and that step still commits."""
    sched, verifier = _grouped(num_blocks=16, requests=4)  # 7 blocks of 4 for each whole request
    step(sched, verifier)  # every prompt prefilled
    on_its_way = sched.schedule(group=1)
    for _ in range(30):
        plan = sched.schedule(group=0)
        for rid in (1, 3):
            req = sched.get(rid)
            assert req is not None and req.blocks is not None and req.preemptions == 0
        if not plan.empty:
            sched.update(plan.with_trees(ChainDrafter().propose(plan.drafts)), verifier.verify(plan.items))
        victim = sched.get(2)
        if victim is not None and victim.preemptions:
            break
    else:
        raise AssertionError("group 0 never ran out of KV")
    trees = ChainDrafter().propose(on_its_way.drafts)
    sched.update(on_its_way.with_trees(trees), verifier.verify(on_its_way.items))
    sched.check_integrity()
