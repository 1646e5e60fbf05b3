"""Draft policies: the registry, fixed budgets, the acceptance model, cost curves, load-aware trees."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from core.draft import NO_DRAFT, DraftBudget
from scheduler.cost import CostCurve, CostModel, OnlineLinearFit
from scheduler.policies import (
    AcceptanceModel,
    FixedDraft,
    LoadAwareDraft,
    NoDraft,
    StepLoad,
    StepRecord,
    make_policy,
)
from scheduler.throughput import MeasuredStepTimes, MeasuredTokens, load_bucket


def test_unknown_policy_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown draft policy 'eagle'.*\['fixed', 'load_aware', 'none'\]"):
        make_policy("eagle")


@pytest.mark.parametrize("load", [StepLoad(1, 0), StepLoad(64, 4096)])
def test_none_never_drafts(load: StepLoad) -> None:
    policy = make_policy("none")
    assert isinstance(policy, NoDraft)
    assert policy.budget(load) == NO_DRAFT


@pytest.mark.parametrize(
    ("options", "nodes", "depth"), [({}, 8, 8), ({"nodes": 5}, 5, 5), ({"nodes": 12, "depth": 4}, 12, 4)]
)
def test_fixed_gives_its_nodes_and_depth_or_a_chain(options: dict, nodes: int, depth: int) -> None:
    policy = make_policy("fixed", **options)
    assert isinstance(policy, FixedDraft)
    for load in (StepLoad(1, 0), StepLoad(100, 5000)):
        assert policy.budget(load) == DraftBudget(max_nodes=nodes, max_depth=depth)


def test_expected_tokens_with_the_prior_only() -> None:
    model = AcceptanceModel(max_depth=3, prior=0.5)
    assert model.expected_tokens(0) == 1.0  # the target's own token
    assert model.expected_tokens(1) == pytest.approx(1.5)
    assert model.expected_tokens(3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_expected_tokens_rises_with_depth() -> None:
    model = AcceptanceModel(max_depth=7)
    values = [model.expected_tokens(d) for d in range(8)]
    assert all(b > a for a, b in itertools.pairwise(values))


def test_full_acceptance_pushes_expected_tokens_toward_depth_plus_one() -> None:
    model = AcceptanceModel(max_depth=4, prior=0.7, weight=4.0)
    before = model.expected_tokens(4)
    for _ in range(2000):
        model.observe(depth=4, accepted=4)
    assert before < 3.0
    assert model.expected_tokens(4) == pytest.approx(5.0, abs=0.05)


def test_acceptance_counts_only_depths_that_were_reached() -> None:
    model = AcceptanceModel(max_depth=4, prior=0.9, weight=2.0)
    model.observe(depth=4, accepted=1)  # depth 1 accepted, depth 2 tried and rejected, 3 and 4 unseen
    assert model.hits[1:] == [1, 0, 0, 0]
    assert model.tries[1:] == [1, 1, 0, 0]
    # pooled 1/2 replaces the prior: P(1) = (1 + 1) / 3, P(2 | 1) = (0 + 1) / 3, deeper 1/2
    assert model.expected_tokens(3) == pytest.approx(1 + 2 / 3 + 2 / 9 + 1 / 9)


def test_an_unreached_depth_accepts_like_the_depths_seen() -> None:
    model = AcceptanceModel(max_depth=8, prior=0.5)
    for _ in range(100):
        model.observe(depth=3, accepted=3)  # every node of 3-deep chains accepted
    assert model.rate(6) == pytest.approx(1.0)  # not the prior 0.5
    assert model.expected_tokens(6) > 6.5


def test_zero_acceptance_pulls_expected_tokens_toward_one() -> None:
    model = AcceptanceModel(max_depth=5)
    for _ in range(1000):
        model.observe(depth=5, accepted=0)
    assert model.expected_tokens(5) == pytest.approx(1.0, abs=0.01)


def test_cost_curve_interpolates_between_points() -> None:
    curve = CostCurve(tokens=(1, 10, 100), ms=(2.0, 5.0, 50.0))
    assert curve(1) == 2.0
    assert curve(10) == 5.0
    assert curve(100) == 50.0
    assert curve(4) == pytest.approx(3.0)
    assert curve(55) == pytest.approx(27.5)


def test_cost_curve_extrapolates_linearly_and_never_below_zero() -> None:
    curve = CostCurve(tokens=(10, 20, 30), ms=(1.0, 3.0, 4.0))
    assert curve(50) == pytest.approx(6.0)  # slope of the last segment
    assert curve(5) == pytest.approx(0.0)  # slope 0.2 of the first: 1 - 1 = 0
    assert curve(0) == 0.0  # would be -1
    assert curve(7.5) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("tokens", "ms", "message"),
    [
        ((1,), (1.0,), "at least two"),
        ((1, 2), (1.0,), "equal count"),
        ((1, 2, 3), (1.0, 2.0), "equal count"),
        ((1, 5, 5), (1.0, 2.0, 3.0), "must increase"),
        ((4, 2), (1.0, 2.0), "must increase"),
    ],
)
def test_cost_curve_validation(tokens: tuple[int, ...], ms: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CostCurve(tokens, ms)


def _steep_cost() -> CostModel:
    """The verifier costs 10 ms up to 40 tokens, then ~1 ms per token more; a draft level 1 ms."""
    return CostModel(
        verifier=CostCurve(tokens=(1, 40, 1000), ms=(10.0, 10.0, 1000.0)),
        drafter=CostCurve(tokens=(1, 1000), ms=(1.0, 1.0)),
    )


def test_load_aware_drafts_big_trees_alone_and_none_under_load() -> None:
    policy = make_policy("load_aware", cost=_steep_cost())
    assert isinstance(policy, LoadAwareDraft)
    alone, crowded = policy.budget(StepLoad(1, 0)), policy.budget(StepLoad(32, 0))
    # batch 1: every tree fits in the flat part; tau 1 + .7 + ... makes depth 3-5 worth its draft levels
    assert alone.max_nodes >= 4 and alone.max_depth >= 3
    # batch 32: 32 sampled tokens already cost 10 ms; any tree pushes the verifier up the steep part
    assert crowded == NO_DRAFT
    assert alone.max_nodes > crowded.max_nodes


def test_load_aware_trees_shrink_as_the_batch_grows() -> None:
    policy = LoadAwareDraft(cost=_steep_cost())
    nodes = [policy.budget(StepLoad(b, 0)).max_nodes for b in (1, 2, 4, 8, 16, 32)]
    assert all(b <= a for a, b in itertools.pairwise(nodes))
    assert nodes[0] > nodes[-1]


def test_load_aware_weighs_tokens_per_millisecond() -> None:
    # batch 2, flat verifier: no tree 2 * 1 / 10 ms = 0.2; (4 nodes, depth 2): 2 * (1 + .5 + .25)
    # / (10 ms + 2 levels * 1 ms) = 0.29; (4, 4): 2 * 1.9375 / 14 = 0.277
    policy = LoadAwareDraft(cost=_steep_cost(), candidates=((0, 0), (4, 4), (4, 2)), explore_every=0)
    policy.acceptance = AcceptanceModel(max_depth=4, prior=0.5)
    assert policy.budget(StepLoad(2, 0)) == DraftBudget(max_nodes=4, max_depth=2)
    # at acceptance 0.3 the depth-2 tree gives 2 * 1.39 / 12 = 0.23, still above 0.2
    policy.acceptance = AcceptanceModel(max_depth=4, prior=0.3)
    assert policy.budget(StepLoad(2, 0)) == DraftBudget(max_nodes=4, max_depth=2)
    # at 0.15: 2 * 1.1725 / 12 = 0.195 < 0.2
    policy.acceptance = AcceptanceModel(max_depth=4, prior=0.15)
    assert policy.budget(StepLoad(2, 0)) == NO_DRAFT


def test_load_aware_stops_drafting_when_nothing_is_accepted() -> None:
    policy = LoadAwareDraft(cost=_steep_cost(), explore_every=0)
    first = policy.budget(StepLoad(1, 0))
    assert first.max_nodes > 0
    for _ in range(200):
        policy.observe(first, accepted_depth=0)
    assert policy.budget(StepLoad(1, 0)) == NO_DRAFT


def test_load_aware_ignores_steps_without_a_tree() -> None:
    policy = LoadAwareDraft(cost=_steep_cost())
    before = list(policy.acceptance.tries)
    policy.observe(NO_DRAFT, accepted_depth=0)
    assert policy.acceptance.tries == before


def test_load_aware_returns_a_candidate_budget() -> None:
    policy = LoadAwareDraft(cost=_steep_cost(), candidates=((0, 0), (3, 2)))
    for _ in range(200):
        policy.observe(DraftBudget(3, 2), accepted_depth=2)
    assert policy.budget(StepLoad(1, 0)) == DraftBudget(max_nodes=3, max_depth=2)


@pytest.mark.parametrize("used", [0.0, 0.99])
def test_none_and_fixed_compression_ignore_the_drafters_kv_use(used: float) -> None:
    load = StepLoad(4, 0, drafter_kv_used=used)
    assert NoDraft().compression(load) == 1.0
    assert FixedDraft(nodes=4, ratio=0.5).compression(load) == 0.5


@pytest.mark.parametrize(
    ("used", "ratio"), [(0.0, 1.0), (0.49, 1.0), (0.5, 0.5), (0.79, 0.5), (0.8, 0.25), (1.0, 0.25)]
)
def test_load_aware_keeps_fewer_visual_tokens_as_the_drafters_kv_fills(used: float, ratio: float) -> None:
    policy = LoadAwareDraft(cost=_steep_cost())
    assert policy.compression(StepLoad(4, 0, drafter_kv_used=used)) == ratio


def _run_steps(
    policy: LoadAwareDraft, load: StepLoad, steps: int, draft_ms: Any, verify_ms: Any, accepted: int = 1
) -> list[DraftBudget]:
    """``steps`` steps under ``load``; ``draft_ms(budget)`` and ``verify_ms(budget)`` say what they
    cost, every request accepts ``accepted`` nodes (at most its depth)."""
    chosen = []
    for _ in range(steps):
        budget = policy.budget(load)
        chosen.append(budget)
        for _ in range(load.num_sampling):
            policy.observe(budget, accepted_depth=min(accepted, budget.max_depth))
        nodes = load.num_sampling * budget.max_nodes
        tokens = load.prefill_tokens + load.num_sampling + nodes
        policy.observe_step(StepRecord(load, budget, tokens, nodes, draft_ms(budget), verify_ms(budget)))
    return chosen


def _as_predicted(policy: LoadAwareDraft, b: int) -> tuple[Any, Any]:
    """Step costs exactly as the calibrated curves say (no overhead anywhere)."""
    cost = policy.cost
    return (
        lambda budget: budget.max_depth * cost.drafter(1),
        lambda budget: cost.verifier(b * (1 + budget.max_nodes)),
    )


def test_load_aware_keeps_drafting_when_steps_cost_what_was_predicted() -> None:
    policy = LoadAwareDraft(cost=_steep_cost(), explore_every=0)
    first = policy.budget(StepLoad(1, 0))
    chosen = _run_steps(policy, StepLoad(1, 0), 30, *_as_predicted(policy, 1), accepted=12)
    assert first != NO_DRAFT
    assert all(c.max_nodes >= first.max_nodes for c in chosen)  # full acceptance: never smaller


def test_load_aware_learns_that_drafting_costs_more_than_its_forwards() -> None:
    policy = LoadAwareDraft(cost=_steep_cost(), explore_every=0)
    load = StepLoad(4, 0)
    assert policy.budget(load) != NO_DRAFT
    draft, verify = _as_predicted(policy, 4)
    chosen = _run_steps(policy, load, 40, lambda budget: 8 * draft(budget), verify)
    assert chosen[-1] == NO_DRAFT
    assert policy.draft_fit.predict((1, 4)) > 4 * policy.cost.drafter(1)


def test_load_aware_learns_each_requests_share_of_drafting() -> None:
    # a draft level costs 1 ms plus 1.5 ms per request: cheap alone, dear for 8 requests, which
    # the drafter's one-sequence curve (flat at 1 ms) cannot tell
    policy = LoadAwareDraft(cost=_steep_cost(), explore_every=3)
    before = policy.budget(StepLoad(8, 0))
    assert before != NO_DRAFT
    for b in (1, 8, 1, 8, 1, 8):
        verify = _as_predicted(policy, b)[1]
        _run_steps(policy, StepLoad(b, 0), 15, lambda budget, b=b: budget.max_depth * (1 + 1.5 * b), verify)
    per_request = policy.draft_fit.weights[1]
    assert per_request > 0.5  # learned from the few tree steps at 8 before trees stopped there
    assert policy.budget(StepLoad(8, 0)) == NO_DRAFT
    assert policy.budget(StepLoad(1, 0)) != NO_DRAFT


def test_load_aware_learns_what_each_verified_request_adds() -> None:
    policy = LoadAwareDraft(cost=_steep_cost(), explore_every=3)
    for b in (1, 16, 4, 32) * 4:
        draft, verify = _as_predicted(policy, b)
        _run_steps(policy, StepLoad(b, 0), 5, draft, lambda budget, v=verify, b=b: v(budget) + 0.5 * b)
    assert policy.verify_fit.weights == pytest.approx([1.0, 0.5, 0.0], abs=0.05)


def test_load_aware_tries_a_neighbour_every_explore_every_decode_steps() -> None:
    candidates = ((0, 0), (2, 2), (4, 4))
    policy = LoadAwareDraft(cost=_steep_cost(), candidates=candidates, explore_every=4)
    load = StepLoad(1, 0)
    best = policy.budget(load)  # decode step 1
    assert best == DraftBudget(4, 4)
    picks = [policy.budget(load) for _ in range(8)]  # decode steps 2..9
    assert picks[2] == picks[6] == DraftBudget(2, 2)  # steps 4 and 8: the only neighbour of (4, 4)
    assert [p for i, p in enumerate(picks) if i not in (2, 6)] == [best] * 6
    with_prompt = StepLoad(1, prefill_tokens=30)
    assert {policy.budget(with_prompt) for _ in range(8)} == {best}  # prompt steps do not explore


@pytest.mark.parametrize(
    ("candidates", "neighbour", "steps"),
    [
        # a tree: 12 steps past the 16 its own tau needs twice over (one request a step)
        (((0, 0), (2, 2), (4, 4)), (2, 2), 28),
        # plain decoding (its tau is 1): 16 steps past the 4 its correction needs
        (((0, 0), (4, 4)), (0, 0), 20),
    ],
)
def test_load_aware_tries_a_well_measured_neighbour_ever_less_often(
    candidates: tuple[tuple[int, int], ...], neighbour: tuple[int, int], steps: int
) -> None:
    # (a neighbour new to a load is tried on every turn: the test above, with the default backoff)
    tries = {}
    for backoff in (1, 8):
        policy = LoadAwareDraft(
            cost=_steep_cost(), candidates=candidates, explore_every=2, explore_margin=1.0,
            explore_backoff=backoff,
        )  # fmt: skip
        for _ in range(steps):  # measured at one user, as predicted, 2 tokens a step
            policy.measured.add(load_bucket(1), neighbour, 5.0, 5.0)
            if neighbour[0]:
                policy.delivered.add(load_bucket(1), neighbour, 2, 1)
        assert policy.budget(StepLoad(1, 0)) == DraftBudget(4, 4)  # decode step 1
        picks = [policy.budget(StepLoad(1, 0)) for _ in range(64)]  # 32 turns of the neighbour
        tried = DraftBudget(*neighbour) if neighbour[0] else NO_DRAFT
        tries[backoff] = picks.count(tried)
        assert set(picks) == {DraftBudget(4, 4), tried}
    assert tries[1] == 32  # every turn: every 2nd decode step
    assert tries[8] == 4  # three doublings and more: a try every 8th turn


def test_a_lone_first_step_with_the_drafters_prefill_leaves_the_level_cost_alone() -> None:
    # a single user's first step: 2 levels (1 ms each) and a 120-token prompt (6 ms) in one time
    policy = LoadAwareDraft(cost=_steep_cost(), explore_every=0)
    first = policy.budget(StepLoad(1, 120))
    verify = _as_predicted(policy, 1)[1](first)
    policy.observe_step(
        StepRecord(StepLoad(1, 120), first, 121 + first.max_nodes, first.max_nodes, 8.0, verify, 120)
    )
    assert policy.draft_fit.weights == [policy.cost.drafter(1), 0.0]  # the prior: no level was timed alone
    assert policy.prefill_ms(120) > 2 * 120 * policy.cost.drafter(128) / 128  # toward the 6 ms seen
    assert policy.budget(StepLoad(1, 0)) != NO_DRAFT  # so trees still look as cheap as they are


def test_load_aware_explores_a_tree_only_where_the_drafters_prefill_is_affordable() -> None:
    # 32 requests under plain decoding: a tree would first make the drafter encode 32 prompts
    policy = LoadAwareDraft(
        cost=_steep_cost(), candidates=((0, 0), (2, 2)), explore_every=2, explore_margin=0.9
    )
    policy.prefill_fit.weights[0] = 0.05  # ms per prompt token the drafter encodes
    fresh = StepLoad(32, 0, undrafted=((120, 48),) * 32)  # ~190 ms of drafter prefill
    assert {policy.budget(fresh) for _ in range(8)} == {NO_DRAFT}
    drafted = StepLoad(32, 0)  # the drafter already holds every request's KV
    assert {policy.budget(drafted) for _ in range(8)} == {NO_DRAFT, DraftBudget(2, 2)}


def test_online_fit_starts_at_its_prior() -> None:
    fit = OnlineLinearFit(prior=(2.0, 0.5))
    assert fit.predict((1.0, 2.0)) == pytest.approx(3.0)


def test_online_fit_finds_the_true_weights_from_enough_observations() -> None:
    fit = OnlineLinearFit(prior=(0.0, 0.0), prior_weight=0.01, decay=1.0)
    for x1, x2 in [(1, 0), (0, 1), (1, 1), (2, 1), (1, 3)] * 20:
        fit.add((x1, x2), 3 * x1 - 2 * x2)
    assert fit.weights == pytest.approx([3.0, -2.0], abs=0.01)
    assert fit.predict((0.0, 10.0)) == 0.0  # a cost is never negative


def test_online_fit_forgets_an_old_regime() -> None:
    fit = OnlineLinearFit(prior=(1.0,), prior_weight=0.1, decay=0.8)
    for _ in range(50):
        fit.add((1.0,), 10.0)
    for _ in range(50):
        fit.add((1.0,), 2.0)
    assert fit.weights[0] == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prior": ()}, "non-empty prior"),
        ({"prior": (1.0,), "prior_weight": 0.0}, "prior_weight"),
        ({"prior": (1.0,), "decay": 1.5}, "decay"),
    ],
)
def test_online_fit_validation(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OnlineLinearFit(**options)


def test_online_fit_wants_one_value_per_feature() -> None:
    with pytest.raises(ValueError, match="expected 2 features, got 1"):
        OnlineLinearFit(prior=(1.0, 1.0)).add((1.0,), 1.0)


def test_load_aware_prompt_tokens_do_not_make_trees_look_cheap() -> None:
    # 500 prompt tokens cost ~460 ms whatever the trees; counted in the rate, a tree's extra
    # drafting and verifying would look negligible next to them
    policy = LoadAwareDraft(cost=_steep_cost(), explore_every=0)
    assert policy.budget(StepLoad(32, 0)) == NO_DRAFT
    assert policy.budget(StepLoad(32, prefill_tokens=500)) == NO_DRAFT


def test_load_aware_finds_that_trees_stop_paying_at_one_load_only() -> None:
    # verifying trees for 8 requests costs 4x the forwards' time (padding, masks), for 1 request
    # as predicted: exploring every 2nd step, both budgets run at both loads and are measured
    policy = LoadAwareDraft(
        cost=_steep_cost(), candidates=((0, 0), (2, 2)), explore_every=2, explore_margin=1.0
    )
    assert policy.budget(StepLoad(8, 0)) == DraftBudget(2, 2)
    for _ in range(10):
        for b in (1, 8):
            draft, verify = _as_predicted(policy, b)
            dear = 4.0 if b == 8 else 1.0
            cost = lambda budget, v=verify, d=dear: v(budget) * (d if budget.max_nodes else 1.0)  # noqa: E731
            _run_steps(policy, StepLoad(b, 0), 3, draft, cost, accepted=2)
    policy.explore_every = 0
    assert policy.budget(StepLoad(8, 0)) == NO_DRAFT
    assert policy.budget(StepLoad(1, 0)) == DraftBudget(2, 2)
    assert policy.measured.steps(load_bucket(8), (0, 0)) >= 4  # measured there, not only predicted


@pytest.mark.parametrize(("b", "bucket"), [(0, 1), (1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4), (32, 6)])
def test_load_buckets_double(b: int, bucket: int) -> None:
    assert load_bucket(b) == bucket


def test_measured_correction_needs_min_steps_and_fades_old_steps() -> None:
    times = MeasuredStepTimes(decay=0.5)
    times.add(1, (4, 4), measured_ms=1.0, predicted_ms=2.0)
    assert times.correction(1, (4, 4), min_steps=2) is None
    assert times.correction(1, (4, 4), min_steps=1) == 0.5
    times.add(1, (4, 4), measured_ms=2.0, predicted_ms=2.0)  # (0.5 * 1 + 2) / (0.5 * 2 + 2)
    assert times.correction(1, (4, 4), min_steps=2) == pytest.approx(2.5 / 3)
    assert times.correction(2, (4, 4), min_steps=1) is None


def test_measured_tokens_need_min_requests_and_fade_old_ones() -> None:
    tokens = MeasuredTokens(decay=0.5)
    tokens.add(1, (4, 4), tokens=5, requests=1)
    assert tokens.mean(1, (4, 4), min_requests=2) is None
    tokens.add(1, (4, 4), tokens=2, requests=2)  # (0.5 * 5 + 2) / (0.5 * 1 + 2)
    assert tokens.mean(1, (4, 4), min_requests=2) == pytest.approx(4.5 / 2.5)
    assert tokens.mean(2, (4, 4), min_requests=1) is None  # another load: nothing yet
    assert tokens.mean(None, (4, 4), min_requests=3) == pytest.approx(4.5 / 2.5)  # all loads
    tokens.add(3, (4, 4), tokens=8, requests=8)
    assert tokens.mean(3, (4, 4), min_requests=8) == 1.0
    assert tokens.requests(None, (4, 4)) == 11


@pytest.mark.parametrize("make", [MeasuredStepTimes, MeasuredTokens])
def test_measurements_reject_a_decay_outside_0_1(make: Any) -> None:
    with pytest.raises(ValueError, match="decay"):
        make(decay=0.0)


def test_load_aware_scales_a_budgets_predicted_time_by_its_measured_correction_at_that_load() -> None:
    policy = LoadAwareDraft(cost=_steep_cost(), candidates=((0, 0), (2, 2)), explore_every=0)
    assert policy.budget(StepLoad(4, 0)) == DraftBudget(2, 2)
    for _ in range(3):  # fewer steps than min_measured_steps: not trusted yet
        policy.measured.add(load_bucket(4), (2, 2), measured_ms=10.0, predicted_ms=1.0)
    assert policy.budget(StepLoad(4, 0)) == DraftBudget(2, 2)
    policy.measured.add(load_bucket(4), (2, 2), measured_ms=10.0, predicted_ms=1.0)
    assert policy.budget(StepLoad(4, 0)) == NO_DRAFT  # its steps took ten times the prediction there
    assert policy.budget(StepLoad(2, 0)) == DraftBudget(2, 2)  # another load: untouched


def test_an_untried_tree_borrows_the_nearest_measured_trees_correction_at_that_load() -> None:
    candidates = ((0, 0), (2, 2), (4, 4), (8, 8))
    policy = LoadAwareDraft(cost=_steep_cost(), candidates=candidates, explore_every=0)
    raw = {key: policy._rate(StepLoad(1, 0), *key) for key in candidates}
    raw_b2 = policy._rate(StepLoad(2, 0), 8, 8)
    for _ in range(4):  # 4-node tree steps took 1 / 0.6 of their predicted time at this load
        policy.measured.add(load_bucket(1), (4, 4), measured_ms=1.0, predicted_ms=0.6)
        policy.measured.add(load_bucket(1), (0, 0), measured_ms=1.0, predicted_ms=1.0)
    for key in ((2, 2), (8, 8)):  # untried: taken to err as (4, 4) did, not at face value
        assert policy._rate(StepLoad(1, 0), *key) == pytest.approx(0.6 * raw[key], rel=1e-6)
    assert policy._rate(StepLoad(1, 0), 0, 0) == pytest.approx(raw[(0, 0)])
    assert policy._rate(StepLoad(2, 0), 8, 8) == pytest.approx(raw_b2)  # another load: untouched


def test_load_aware_counts_each_budgets_own_tokens_per_request_at_each_load() -> None:
    # two trees of one depth: the chain estimate cannot tell them apart, their requests can
    policy = LoadAwareDraft(cost=_steep_cost(), candidates=((0, 0), (2, 2), (8, 2)), explore_every=0)
    assert policy.tau(1, 2, 2) == policy.tau(1, 8, 2) == policy.acceptance.expected_tokens(2)
    for _ in range(policy.min_measured_requests):
        for budget, accepted in ((DraftBudget(2, 2), 0), (DraftBudget(8, 2), 2)):
            policy.observe(budget, accepted_depth=accepted)
            nodes = budget.max_nodes
            policy.observe_step(StepRecord(StepLoad(1, 0), budget, 1 + nodes, nodes, 1.0, 10.0))
    assert policy.tau(1, 2, 2) == pytest.approx(1.0) and policy.tau(1, 8, 2) == pytest.approx(3.0)
    assert policy.budget(StepLoad(1, 0)) == DraftBudget(8, 2)
    assert policy.tau(16, 8, 2) == pytest.approx(3.0)  # not measured at 16 requests: all loads'
    for _ in range(2):  # at 16 requests the wide tree delivered 1.5 per request (a crowded drafter)
        for i in range(16):
            policy.observe(DraftBudget(8, 2), accepted_depth=i % 2)
        policy.observe_step(StepRecord(StepLoad(16, 0), DraftBudget(8, 2), 16 * 9, 16 * 8, 1.0, 10.0))
    assert policy.tau(16, 8, 2) == pytest.approx(1.5)
    assert policy.tau(1, 8, 2) == pytest.approx(3.0)  # one user's trees still as measured alone


@pytest.mark.parametrize(("prompt_per_token", "drafts"), [(0.5, True), (4.0, False)])
def test_load_aware_charges_each_requests_drafter_prefill_to_its_tokens(
    prompt_per_token: float, drafts: bool
) -> None:
    # trees deliver 1.2x plain decoding's tokens per ms in decode steps; each request's first
    # tree also makes the drafter encode its prompt: 0.05 ms per token (learned), R prompt tokens
    # per emitted token. R = 0.5 adds ~5 % to a tree step (trees still win), R = 4 ~40 %
    policy = LoadAwareDraft(cost=_steep_cost(), candidates=((0, 0), (2, 2)), explore_every=0)
    plain, tree = policy._rate(StepLoad(16, 0), 0, 0), policy._rate(StepLoad(16, 0), 2, 2)
    for _ in range(4):  # measured 1.2x plain's rate: the step took tree / (1.2 plain) of its prediction
        policy.measured.add(load_bucket(16), (2, 2), measured_ms=tree, predicted_ms=1.2 * plain)
    assert policy.budget(StepLoad(16, 0)) == DraftBudget(2, 2)  # no prompts seen yet: R = 0
    policy.prefill_fit.weights[0] = 0.05
    policy.observe_step(StepRecord(StepLoad(0, int(prompt_per_token * 100)), NO_DRAFT, 0, 0, 0.0, 0.0))
    policy._step_tokens = 100  # this step's requests emitted 100 tokens (what observe counts)
    policy.observe_step(StepRecord(StepLoad(16, 0), NO_DRAFT, 16, 0, 0.0, 10.0))
    assert policy.prompt_per_token == pytest.approx(prompt_per_token, rel=0.03)
    assert (policy.budget(StepLoad(16, 0)) == DraftBudget(2, 2)) is drafts
    assert policy.budget(StepLoad(16, prefill_tokens=200)) == policy.budget(StepLoad(16, 0))


def test_load_aware_charges_an_undrafted_requests_prefill_over_what_it_may_still_emit() -> None:
    policy = LoadAwareDraft(cost=_steep_cost(), candidates=((0, 0), (2, 2)), explore_every=0)
    policy._prompt_tokens, policy._emitted_tokens = 250.0, 100.0  # as observe_step sums them
    r = policy.prompt_per_token  # 2.5 prompt tokens per emitted token
    drafted, tau = StepLoad(4, 0), 2.0
    assert policy._prefill_behind(drafted, tau, lump=False) == pytest.approx(4 * tau * r)
    newcomers = StepLoad(4, 0, undrafted=((120, 48),) * 4)  # 120 / 48 = R: as a drafted request
    assert policy._prefill_behind(newcomers, tau, lump=False) == pytest.approx(4 * tau * r)
    half_way = StepLoad(4, 0, undrafted=((144, 24),) * 4)  # 6 prompt tokens per token still to come
    assert policy._prefill_behind(half_way, tau, lump=False) == pytest.approx(4 * tau * 6)
    ending = StepLoad(4, 0, undrafted=((150, 1),) * 4)  # never more than the whole prompt
    assert policy._prefill_behind(ending, tau, lump=False) == pytest.approx(4 * 150)
    assert policy._prefill_behind(half_way, tau, lump=True) == pytest.approx(4 * 144)


def test_load_aware_does_not_switch_to_trees_for_answers_nearly_done() -> None:
    # trees win for requests the drafter holds; the same requests undrafted, two tokens from
    # their end, would pay their whole prompt's drafter prefill for one step of trees
    policy = LoadAwareDraft(cost=_steep_cost(), candidates=((0, 0), (2, 2)), explore_every=0)
    policy.prefill_fit.weights[0] = 0.05
    assert policy.budget(StepLoad(4, 0)) == DraftBudget(2, 2)
    assert policy.budget(StepLoad(4, 0, undrafted=((200, 2),) * 4)) == NO_DRAFT


def test_load_aware_decides_a_prompt_step_for_the_requests_about_to_decode() -> None:
    # one request samples while 31 newcomers are prefilled: the steps to come decode 32 of them
    policy = LoadAwareDraft(cost=_steep_cost(), explore_every=0)
    assert policy.budget(StepLoad(1, 0)) != NO_DRAFT
    assert policy.budget(StepLoad(32, 0)) == NO_DRAFT
    assert policy.budget(StepLoad(1, prefill_tokens=500, num_joining=31)) == NO_DRAFT
    assert policy.budget(StepLoad(1, prefill_tokens=500)) == policy.budget(StepLoad(1, 0))


def test_load_aware_learns_the_drafters_prefill_per_token_apart_from_its_levels() -> None:
    policy = LoadAwareDraft(cost=_steep_cost(), explore_every=0)
    verify = _as_predicted(policy, 4)[1]
    for i in range(60):  # a level costs 1 ms; a new request's prompt 0.05 ms per token
        load, budget, prefill = StepLoad(4, 0), DraftBudget(2, 2), 120 * (i % 3 == 0)
        ms = 2 * 1.0 + 0.05 * prefill
        policy.observe_step(StepRecord(load, budget, 12, 8, ms, verify(budget), drafter_prefill=prefill))
    assert policy.prefill_ms(100) == pytest.approx(5.0, rel=0.05)
    assert policy.step_ms(4, 2, 2) == pytest.approx(verify(DraftBudget(2, 2)) + 2.0, rel=0.05)
