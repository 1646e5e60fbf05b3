"""The tau estimator: acceptance per depth, and each budget's own record shrunk toward it."""

from __future__ import annotations

import itertools

import pytest

from core.draft import NO_DRAFT, DraftBudget
from core.plan import Accepted
from scheduler.policy.tau import ChainAcceptance, TauEstimator


def _steps(estimator: TauEstimator, budget: DraftBudget, accepted: list[int], steps: int) -> None:
    """``steps`` steps in which requests accepted ``accepted`` nodes each."""
    for _ in range(steps):
        estimator.learn([Accepted(budget, budget.max_nodes, a) for a in accepted])


def test_expected_tokens_with_the_prior_only() -> None:
    model = ChainAcceptance(max_depth=3, prior=0.5)
    assert model.expected_tokens(0) == 1.0  # the target's own token
    assert model.expected_tokens(1) == pytest.approx(1.5)
    assert model.expected_tokens(3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_expected_tokens_rises_with_depth() -> None:
    model = ChainAcceptance(max_depth=7)
    values = [model.expected_tokens(d) for d in range(8)]
    assert all(b > a for a, b in itertools.pairwise(values))


def test_full_acceptance_pushes_expected_tokens_toward_depth_plus_one() -> None:
    model = ChainAcceptance(max_depth=4, prior=0.7, weight=4.0)
    before = model.expected_tokens(4)
    for _ in range(2000):
        model.observe(depth=4, accepted=4)
    assert before < 3.0
    assert model.expected_tokens(4) == pytest.approx(5.0, abs=0.05)


def test_acceptance_counts_only_depths_that_were_reached() -> None:
    model = ChainAcceptance(max_depth=4, prior=0.9, weight=2.0)
    model.observe(depth=4, accepted=1)  # depth 1 accepted, depth 2 tried and rejected, 3 and 4 unseen
    # pooled: one hit in two tries beside the prior worth two: (1 + 1.8) / 4 = 0.7
    assert model.pooled() == pytest.approx(0.7)
    # P(1) = (1 + 1.4) / 3, P(2 | 1) = (0 + 1.4) / 3, deeper: the pooled 0.7
    assert [model.rate(d) for d in (1, 2, 3)] == pytest.approx([0.8, 1.4 / 3, 0.7])
    assert model.expected_tokens(3) == pytest.approx(1 + 0.8 + 0.8 * 1.4 / 3 + 0.8 * 1.4 / 3 * 0.7)


def test_an_unreached_depth_accepts_like_the_depths_seen() -> None:
    model = ChainAcceptance(max_depth=8, prior=0.5)
    for _ in range(100):
        model.observe(depth=3, accepted=3)  # every node of 3-deep chains accepted
    assert model.rate(6) == pytest.approx(1.0, abs=0.01)  # not the prior 0.5
    assert model.expected_tokens(6) > 6.5


def test_zero_acceptance_pulls_expected_tokens_toward_one() -> None:
    model = ChainAcceptance(max_depth=5)
    for _ in range(1000):
        model.observe(depth=5, accepted=0)
    assert model.expected_tokens(5) == pytest.approx(1.0, abs=0.01)


def test_plain_decoding_emits_one_token_a_step() -> None:
    estimator = TauEstimator(max_depth=4)
    _steps(estimator, NO_DRAFT, [0, 0], 10)
    assert estimator.tau((0, 0)) == 1.0
    assert estimator.measured_requests((0, 0)) == 0  # plain steps teach nothing about trees


def test_an_untried_budget_is_judged_by_the_chain_estimate_of_its_depth() -> None:
    estimator = TauEstimator(max_depth=4)
    assert estimator.tau((4, 4)) == pytest.approx(estimator.chain.expected_tokens(4))
    _steps(estimator, DraftBudget(2, 2), [2], 50)  # chains of 2 always accepted
    assert estimator.tau((4, 4)) == pytest.approx(estimator.chain.expected_tokens(4))
    assert estimator.tau((4, 4)) > 4.5


def test_trees_of_one_depth_keep_their_own_records() -> None:
    # two trees of one depth: the chain estimate cannot tell them apart, their requests can
    estimator = TauEstimator(max_depth=2)
    assert estimator.tau((2, 2)) == estimator.tau((8, 2))
    for _ in range(200):  # eight requests a step, as under load
        _steps(estimator, DraftBudget(2, 2), [0] * 8, 1)
        _steps(estimator, DraftBudget(8, 2), [2] * 8, 1)
    assert estimator.tau((2, 2)) == pytest.approx(1.0, abs=0.1)
    assert estimator.tau((8, 2)) == pytest.approx(3.0, abs=0.1)
    assert estimator.measured_requests((8, 2)) == 1600


def test_a_few_unlucky_trees_move_a_budget_only_part_way() -> None:
    estimator = TauEstimator(max_depth=4, prior_weight=16)
    _steps(estimator, DraftBudget(4, 4), [4] * 4, 50)  # a long record of full acceptance
    _steps(estimator, DraftBudget(6, 4), [0] * 4, 1)  # four unlucky requests of a wider tree
    chain = estimator.chain.expected_tokens(4)
    assert chain > 4.5
    assert estimator.tau((6, 4)) == pytest.approx((4 * 1 + 16 * chain) / (4 + 16))  # not 1


def test_a_budgets_record_follows_what_users_ask_now() -> None:
    estimator = TauEstimator(max_depth=4, decay=0.9)
    _steps(estimator, DraftBudget(4, 4), [4], 200)
    _steps(estimator, DraftBudget(4, 4), [0], 600)
    assert estimator.tau((4, 4)) < 1.5


@pytest.mark.parametrize(("decay", "weight"), [(0.0, 1.0), (1.5, 1.0), (0.9, 0.0)])
def test_tau_estimator_validation(decay: float, weight: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        TauEstimator(max_depth=2, decay=decay, prior_weight=weight)
