"""The one registry of step policies, the policies that learn nothing, and compression policies."""

from __future__ import annotations

import pytest

from core.draft import NO_DRAFT, DraftBudget
from core.plan import StepLoad
from scheduler.cost import CostCurve, CostModel
from scheduler.policy import FixedRatio, PolicyOptions, make_policy
from scheduler.policy.compression import KVPressureRatio
from scheduler.policy.fixed import FixedDraft
from tests.scheduler.scripted_world import World

FLAT = CostModel(CostCurve((1, 1000), (10.0, 10.0)), CostCurve((1, 1000), (1.0, 1.0)))


def test_unknown_policy_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown draft policy 'eagle'.*\['fixed', 'load_aware', 'none'\]"):
        make_policy("eagle")


def test_load_aware_needs_forward_cost_curves() -> None:
    with pytest.raises(ValueError, match="needs forward-cost curves"):
        make_policy("load_aware")


def test_load_aware_measures_its_curves_only_when_built() -> None:
    measured: list[int] = []

    def cost() -> CostModel:
        measured.append(1)
        return FLAT

    options = PolicyOptions(cost=cost)
    make_policy("fixed", options)
    assert measured == []
    make_policy("load_aware", options)
    assert measured == [1]


@pytest.mark.parametrize("load", [StepLoad(1, 0), StepLoad(64, 4096)])
def test_none_never_drafts_and_keeps_every_visual_token(load: StepLoad) -> None:
    assert make_policy("none").decide(load) == NO_DRAFT


@pytest.mark.parametrize(
    ("options", "nodes", "depth"),
    [(PolicyOptions(), 8, 8), (PolicyOptions(fixed_nodes=5), 5, 5), (PolicyOptions(12, 4), 12, 4)],
)
def test_fixed_gives_its_nodes_and_depth_or_a_chain(options: PolicyOptions, nodes: int, depth: int) -> None:
    policy = make_policy("fixed", options)
    for load in (StepLoad(1, 0), StepLoad(100, 5000)):
        assert policy.decide(load) == DraftBudget(max_nodes=nodes, max_depth=depth)


def test_fixed_learns_nothing_from_what_its_steps_cost() -> None:
    policy = make_policy("fixed", PolicyOptions(fixed_nodes=4, fixed_ratio=0.5))
    world = World(verify_ms=lambda b, t: 1000.0 * t, level_ms=lambda b: 1000.0, acceptance=0.0)
    for _ in range(20):
        policy.learn(*world.step(8, policy.decide(StepLoad(8, 0))))
    assert policy.decide(StepLoad(8, 0)) == DraftBudget(4, 4, compression=0.5)


@pytest.mark.parametrize(("nodes", "depth"), [(0, 0), (3, 4), (2, -1)])
def test_a_fixed_tree_needs_nodes_and_a_depth_within_them(nodes: int, depth: int) -> None:
    with pytest.raises(ValueError, match="a fixed tree needs"):
        FixedDraft(nodes, depth)


@pytest.mark.parametrize("used", [0.0, 0.99])
def test_a_fixed_ratio_ignores_the_drafters_kv_use(used: float) -> None:
    assert FixedRatio(0.5).ratio(StepLoad(4, 0, drafter_kv_used=used)) == 0.5


@pytest.mark.parametrize("r", [0.0, 1.5])
def test_a_ratio_outside_0_1_is_refused(r: float) -> None:
    with pytest.raises(ValueError, match="compression ratio"):
        FixedRatio(r)


@pytest.mark.parametrize(
    ("used", "ratio"), [(0.0, 1.0), (0.49, 1.0), (0.5, 0.5), (0.79, 0.5), (0.8, 0.25), (1.0, 0.25)]
)
def test_kv_pressure_keeps_fewer_visual_tokens_as_the_drafters_kv_fills(used: float, ratio: float) -> None:
    assert KVPressureRatio().ratio(StepLoad(4, 0, drafter_kv_used=used)) == ratio
    policy = make_policy("load_aware", PolicyOptions(cost=lambda: FLAT))
    assert policy.decide(StepLoad(4, 0, drafter_kv_used=used)).compression == ratio
