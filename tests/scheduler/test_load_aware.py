"""``load_aware``: the argmax of expected tokens per millisecond, driven through scripted steps.

The policy is taught only through ``learn`` with the reports and timings of a scripted world
(``tests/scheduler/scripted_world.py``), and asked only through ``choose`` and ``rate``.
"""

from __future__ import annotations

import itertools
import random

import pytest

from core.draft import NO_DRAFT, DraftBudget
from core.plan import StepLoad, StepReport, StepTiming
from scheduler.cost import CostCurve, CostModel
from scheduler.policy.exploration import Exploration
from scheduler.policy.load_aware import CANDIDATES, LoadAwareDraft, load_aware
from tests.scheduler.scripted_world import World, drive, settled

NEVER = Exploration(every=0)


def _steep() -> CostModel:
    """The verifier costs 10 ms up to 40 tokens, then ~1 ms per token more; a draft level 1 ms."""
    return CostModel(
        verifier=CostCurve(tokens=(1, 40, 1000), ms=(10.0, 10.0, 1000.0)),
        drafter=CostCurve(tokens=(1, 1000), ms=(1.0, 1.0)),
    )


def _as_curves_say(acceptance: float) -> World:
    curves = _steep()
    return World(verify_ms=lambda b, t: curves.verifier(t), level_ms=curves.drafter, acceptance=acceptance)


def test_load_aware_drafts_big_trees_alone_and_none_under_load() -> None:
    policy = load_aware(_steep())
    alone, crowded = policy.choose(StepLoad(1, 0)), policy.choose(StepLoad(32, 0))
    # batch 1: every tree fits in the flat part; tau 1 + .7 + ... makes depth 3-5 worth its levels
    assert alone.max_nodes >= 4 and alone.max_depth >= 3
    # batch 32: 32 sampled tokens already cost 10 ms; any tree pushes the verifier up the steep part
    assert crowded == NO_DRAFT


def test_load_aware_trees_shrink_as_the_batch_grows() -> None:
    policy = load_aware(_steep())
    nodes = [policy.choose(StepLoad(b, 0)).max_nodes for b in (1, 2, 4, 8, 16, 32)]
    assert all(b <= a for a, b in itertools.pairwise(nodes))
    assert nodes[0] > nodes[-1]


@pytest.mark.parametrize(("acceptance", "best"), [(0.5, (4, 2)), (0.4, (4, 2)), (0.1, (0, 0))])
def test_load_aware_weighs_tokens_per_millisecond(acceptance: float, best: tuple[int, int]) -> None:
    # batch 2, flat verifier: no tree 2 * 1 / 10 ms = 0.2 per ms; (4 nodes, depth 2) at p = 0.5:
    # 2 * (1 + .5 + .25) / (10 ms + 2 levels) = 0.29; (4, 4): 2 * 1.94 / 14 = 0.28. At p = 0.4
    # the depth-2 tree gives 2 * 1.56 / 12 = 0.26 (above 0.2 and (4, 4)'s 0.24); at p = 0.1, 0.185
    policy = load_aware(_steep(), candidates=((0, 0), (4, 4), (4, 2)))
    chosen = drive(policy, _as_curves_say(acceptance), 2, 400)  # learns p from the trees it runs
    assert settled(chosen[-200:]) == (DraftBudget(*best) if best[0] else NO_DRAFT)


def test_load_aware_stops_drafting_when_nothing_is_accepted() -> None:
    policy = load_aware(_steep(), exploration=NEVER)
    chosen = drive(policy, _as_curves_say(0.0), 1, 100)
    assert chosen[0] != NO_DRAFT and chosen[-1] == NO_DRAFT


def test_load_aware_keeps_drafting_when_everything_is_accepted() -> None:
    policy = load_aware(_steep(), exploration=NEVER)
    chosen = drive(policy, _as_curves_say(1.0), 1, 60)
    assert all(c.max_nodes >= chosen[0].max_nodes for c in chosen)


def test_asking_twice_gives_the_same_answer() -> None:
    policy = load_aware(_steep())
    drive(policy, _as_curves_say(0.8), 4, 37)
    assert len({policy.choose(StepLoad(4, 0)) for _ in range(10)}) == 1


def test_load_aware_decides_a_prompt_step_for_the_requests_about_to_decode() -> None:
    # one request samples while 31 newcomers are prefilled: the steps to come decode 32 of them
    policy = load_aware(_steep(), exploration=NEVER)
    assert policy.choose(StepLoad(1, 0)) != NO_DRAFT
    assert policy.choose(StepLoad(1, prefill_tokens=500, num_joining=31)) == policy.choose(StepLoad(32, 0))
    assert policy.choose(StepLoad(1, prefill_tokens=500)) == policy.choose(StepLoad(1, 0))


def test_prompt_tokens_do_not_make_trees_look_cheap() -> None:
    # 500 prompt tokens cost ~460 ms whatever the trees; counted in the rate, a tree's extra
    # drafting and verifying would look negligible next to them
    policy = load_aware(_steep(), exploration=NEVER)
    assert policy.choose(StepLoad(32, 0)) == NO_DRAFT
    assert policy.choose(StepLoad(32, prefill_tokens=500)) == NO_DRAFT


def test_prompt_steps_do_not_explore() -> None:
    policy = load_aware(_steep(), exploration=Exploration(every=2))
    drive(policy, _as_curves_say(0.8), 1, 7)  # the next decode step, the 8th, explores
    best = max(CANDIDATES, key=lambda key: policy.rate(1, key))
    decoding = policy.choose(StepLoad(1, 0))
    with_prompt = policy.choose(StepLoad(1, prefill_tokens=30))
    assert decoding != with_prompt == DraftBudget(*best)


def _prompt_step(tokens: int) -> tuple[StepReport, StepTiming]:
    """A step that only prefills ``tokens`` prompt tokens."""
    return StepReport((), StepLoad(0, tokens), NO_DRAFT, (), tokens, 0), StepTiming(0.0, 10.0)


@pytest.mark.parametrize(("prompt_per_token", "drafts"), [(0.5, True), (8.0, False)])
def test_each_emitted_token_pays_for_the_drafters_prefill_of_the_prompt_behind_it(
    prompt_per_token: float, drafts: bool
) -> None:
    # every request's prompt is encoded once by the drafter (0.05 ms a token) before its first
    # tree: with R prompt tokens per emitted token, a tree step pays R * tau * 0.05 ms per request
    world = World(
        verify_ms=lambda b, t: 10.0 + 0.1 * t,
        level_ms=lambda b: 0.5,
        prefill_ms_per_token=0.05,
        acceptance=0.7,
    )
    policy = load_aware(_steep(), candidates=((0, 0), (2, 2)), exploration=Exploration(every=2))
    for _ in range(60):  # decode steps (a new prompt on every third) and the prompts they answer
        emitted = 0
        for i in range(3):
            report, timing = world.step(16, policy.choose(StepLoad(16, 0)), prefill_tokens=300 * (i == 0))
            policy.learn(report, timing)
            emitted += report.emitted_tokens
        policy.learn(*_prompt_step(round(prompt_per_token * emitted)))
    assert policy.prompts.value == pytest.approx(prompt_per_token, rel=0.05)
    assert (policy.choose(StepLoad(16, 0)) == DraftBudget(2, 2)) is drafts


WORLDS = {  # name: (verify ms of (requests, tokens), drafter level ms of requests), the best at 16
    "plain decoding wins": (lambda b, t: 10 + max(t - 40, 0) * 0.5 + 0.3 * b, lambda b: 1 + 0.5 * b),
    "small trees win": (lambda b, t: 10 + max(t - 40, 0) * 0.2 + 0.3 * b, lambda b: 1 + 0.1 * b),
    "big trees win": (lambda b, t: 10 + max(t - 40, 0) * 0.02 + 0.1 * b, lambda b: 0.5 + 0.02 * b),
}


def _true_best(world: World, b: int) -> DraftBudget:
    def rate(key: tuple[int, int]) -> float:
        tau = sum(world.acceptance**i for i in range(key[1] + 1))
        return b * tau / (world.verify_ms(b, b * (1 + key[0])) + key[1] * world.level_ms(b))

    best = max(CANDIDATES, key=rate)
    return DraftBudget(*best) if best[0] else NO_DRAFT


@pytest.mark.parametrize("name", list(WORLDS))
def test_a_cold_start_at_high_load_reaches_what_a_server_warmed_through_lighter_loads_chose(
    name: str,
) -> None:
    # the calibrated curves are far off the world's true costs (~1 ms per token past 40 tokens):
    # both servers must find the best budget at 16 users by measuring, whatever came before
    verify, level = WORLDS[name]

    def world() -> World:
        return World(verify_ms=verify, level_ms=level, acceptance=0.8, rng=random.Random(0))

    cold: LoadAwareDraft = load_aware(_steep())
    cold_choice = settled(drive(cold, world(), 16, 300)[-100:])
    warm, lighter = load_aware(_steep()), world()
    drive(warm, lighter, 1, 150)
    drive(warm, lighter, 4, 150)
    warm_choice = settled(drive(warm, lighter, 16, 300)[-100:])
    assert cold_choice == warm_choice == _true_best(world(), 16)


def test_candidates_must_start_with_plain_decoding() -> None:
    with pytest.raises(ValueError, match="candidates must start with plain decoding"):
        load_aware(_steep(), candidates=((2, 2), (0, 0)))


def _linked(link_ms: float, overlap_tokens: int = 0) -> World:
    world = _as_curves_say(0.8)
    world.link_ms, world.overlap_tokens = link_ms, overlap_tokens
    return world


def _settled_on(world: World, b: int) -> DraftBudget:
    """What a policy settles on (it explores: a tree it gave up early gets measured again)."""
    return settled(drive(load_aware(_steep()), world, b, 600)[-200:])


def test_a_longer_link_round_trip_makes_trees_deeper() -> None:
    """The round trip is paid once per call whatever the tree: the longer it is, the more tokens
    a call must bring back to pay for it."""
    near, far = _settled_on(_linked(0.0), 1), _settled_on(_linked(12.0), 1)
    assert near.max_nodes and far.max_nodes
    assert far.max_depth > near.max_depth


def test_a_link_too_slow_for_drafting_to_pay_stops_it() -> None:
    assert _settled_on(_linked(30.0), 1) == NO_DRAFT


def test_pipelined_the_call_hides_behind_the_other_groups_verification() -> None:
    """The same slow link, but the verifier works on the other group (80 tokens: 50 ms) while the
    call is out: only what outlasts that is waited for, and drafting pays again."""
    assert _settled_on(_linked(30.0), 1) == NO_DRAFT
    assert _settled_on(_linked(30.0, overlap_tokens=80), 1).max_depth >= 4
