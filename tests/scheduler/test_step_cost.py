"""Forward-cost curves, the online fit, and the step-cost model learned from step reports."""

from __future__ import annotations

from typing import Any

import pytest

from core.draft import NO_DRAFT, DraftBudget
from core.plan import StepLoad, StepReport, StepTiming
from scheduler.cost import CostCurve, CostModel, OnlineLinearFit
from scheduler.policy.step_cost import StepCostModel, load_bucket
from tests.scheduler.scripted_world import World

CANDIDATES = ((0, 0), (2, 2), (4, 4), (8, 8))


def _steep() -> CostModel:
    """The verifier costs 10 ms up to 40 tokens, then ~1 ms per token more; a draft level 1 ms."""
    return CostModel(
        verifier=CostCurve(tokens=(1, 40, 1000), ms=(10.0, 10.0, 1000.0)),
        drafter=CostCurve(tokens=(1, 1000), ms=(1.0, 1.0)),
    )


def _as_curves_say(extra_verify: Any = lambda b: 0.0, level: Any = lambda b: 1.0) -> World:
    """Steps that cost what the curves say, plus ``extra_verify(b)`` ms; a level ``level(b)`` ms."""
    curve = _steep().verifier
    return World(verify_ms=lambda b, t: curve(t) + extra_verify(b), level_ms=level)


def _learn(model: StepCostModel, world: World, b: int, budget: DraftBudget, steps: int) -> None:
    for _ in range(steps):
        model.learn(*world.step(b, budget))


def test_cost_curve_interpolates_between_points() -> None:
    curve = CostCurve(tokens=(1, 10, 100), ms=(2.0, 5.0, 50.0))
    assert [curve(1), curve(10), curve(100)] == [2.0, 5.0, 50.0]
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


@pytest.mark.parametrize(("b", "bucket"), [(0, 1), (1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4), (32, 6)])
def test_load_buckets_double(b: int, bucket: int) -> None:
    assert load_bucket(b) == bucket


def test_an_untaught_model_predicts_from_the_calibrated_curves() -> None:
    model = StepCostModel(_steep(), CANDIDATES)
    assert model.step_ms(1, (0, 0)) == pytest.approx(10.0)
    assert model.step_ms(4, (4, 4)) == pytest.approx(10.0 + 4 * 1.0)  # 20 tokens: flat; 4 levels
    assert model.step_ms(16, (4, 4)) == pytest.approx(_steep().verifier(80) + 4.0)


def test_steps_that_cost_what_the_curves_say_change_no_prediction() -> None:
    model = StepCostModel(_steep(), CANDIDATES)
    before = {(b, key): model.step_ms(b, key) for b in (1, 8) for key in CANDIDATES}
    for b in (1, 8):
        for key in CANDIDATES:
            _learn(model, _as_curves_say(), b, DraftBudget(*key) if key[0] else NO_DRAFT, 10)
    assert {k: model.step_ms(*k) for k in before} == pytest.approx(before, rel=0.02)


def test_the_model_learns_what_each_verified_request_adds() -> None:
    model = StepCostModel(_steep(), CANDIDATES)
    world = _as_curves_say(extra_verify=lambda b: 0.5 * b)
    for b in (1, 16, 4, 32) * 4:
        for key in CANDIDATES:
            _learn(model, world, b, DraftBudget(*key) if key[0] else NO_DRAFT, 2)
    assert model.predicted_ms(24, (0, 0)) == pytest.approx(_steep().verifier(24) + 12.0, rel=0.05)


def test_the_model_learns_each_requests_share_of_a_draft_level() -> None:
    # a level costs 1 ms plus 1.5 ms per request: the drafter's one-sequence curve says 1 ms
    model = StepCostModel(_steep(), CANDIDATES)
    world = _as_curves_say(level=lambda b: 1.0 + 1.5 * b)
    for b in (1, 8) * 10:
        _learn(model, world, b, DraftBudget(2, 2), 3)
    draft = model.predicted_ms(8, (2, 2)) - model.predicted_ms(8, (0, 0))
    assert draft == pytest.approx(2 * (1 + 1.5 * 8) + _steep().verifier(24) - 10.0, rel=0.1)


def test_a_lone_first_step_with_the_drafters_prefill_leaves_the_level_cost_alone() -> None:
    # a single user's first step: 2 levels (1 ms each) and a 120-token prompt (6 ms) in one time
    model = StepCostModel(_steep(), CANDIDATES)
    levels = model.predicted_ms(1, (2, 2)) - model.predicted_ms(1, (0, 0))
    report = StepReport((), StepLoad(1, 120), DraftBudget(2, 2), (), 123, 2, drafter_prefill=120)
    model.learn(report, StepTiming(draft_ms=8.0, verify_ms=10.0))
    assert model.predicted_ms(1, (2, 2)) - model.predicted_ms(1, (0, 0)) == pytest.approx(levels)
    assert model.prefill_ms(120) > 2 * 120 * _steep().drafter(128) / 128  # toward the 6 ms seen


def test_the_drafters_prefill_per_token_is_learned_apart_from_its_levels() -> None:
    model = StepCostModel(_steep(), CANDIDATES)
    world = World(
        verify_ms=lambda b, t: _steep().verifier(t), level_ms=lambda b: 1.0, prefill_ms_per_token=0.05
    )
    for i in range(60):  # a new request's prompt every third step
        model.learn(*world.step(4, DraftBudget(2, 2), prefill_tokens=120 * (i % 3 == 0)))
    assert model.prefill_ms(100) == pytest.approx(5.0, rel=0.05)
    assert model.step_ms(4, (2, 2)) == pytest.approx(_steep().verifier(12) + 2.0, rel=0.05)


def test_measured_steps_correct_a_budgets_prediction_at_their_load_only() -> None:
    # trees for 4 requests cost 30 ms more than anything predicts (padding, masks); elsewhere as said
    model = StepCostModel(_steep(), CANDIDATES, min_steps=4)
    curve = _steep().verifier
    world = World(
        verify_ms=lambda b, t: curve(t) + (30.0 if b == 4 and t > b else 0.0), level_ms=lambda b: 1.0
    )
    _learn(model, world, 2, DraftBudget(2, 2), 20)
    _learn(model, world, 4, DraftBudget(2, 2), 3)
    assert model.correction(4, (2, 2)) is None  # fewer steps than min_steps: not trusted yet
    _learn(model, world, 4, DraftBudget(2, 2), 37)
    correction = model.correction(4, (2, 2))
    assert correction is not None and correction > 1.1  # the fits alone, pulled by load 2, fall short
    assert model.step_ms(4, (2, 2)) == pytest.approx(curve(12) + 30.0 + 2.0, rel=0.1)
    assert model.measured_steps(4, (2, 2)) == 40 and model.measured_steps(2, (2, 2)) == 20
    assert model.step_ms(2, (2, 2)) == pytest.approx(curve(6) + 2.0, rel=0.1)  # another load: its own


def test_an_untried_tree_borrows_the_nearest_measured_trees_correction_at_that_load() -> None:
    model = StepCostModel(_steep(), CANDIDATES, min_steps=4)
    curve = _steep().verifier
    world = World(verify_ms=lambda b, t: curve(t) + (20.0 if t > b else 0.0), level_ms=lambda b: 1.0)
    for _ in range(20):
        _learn(model, world, 1, DraftBudget(4, 4), 1)
        _learn(model, world, 1, NO_DRAFT, 1)
    tree = model.correction(1, (4, 4))
    assert tree is not None
    assert model.correction(1, (2, 2)) == model.correction(1, (8, 8)) == tree  # untried: err alike
    assert model.correction(1, (0, 0)) != tree  # plain decoding keeps its own
    assert model.step_ms(1, (4, 4)) == pytest.approx(curve(5) + 20.0 + 4.0, rel=0.05)
    assert model.step_ms(1, (0, 0)) == pytest.approx(curve(1), rel=0.05)
    assert model.correction(2, (8, 8)) is None  # another load: untouched


def test_prompt_steps_teach_the_decode_predictions_nothing() -> None:
    model = StepCostModel(_steep(), CANDIDATES)
    before = model.predicted_ms(8, (0, 0))
    for _ in range(20):  # 500 prompt tokens beside 8 sampling requests, far off the curve
        report = StepReport((), StepLoad(8, 500), NO_DRAFT, (), 508, 0)
        model.learn(report, StepTiming(draft_ms=0.0, verify_ms=5000.0))
    assert model.predicted_ms(8, (0, 0)) == before
    assert model.measured_steps(8, (0, 0)) == 0
