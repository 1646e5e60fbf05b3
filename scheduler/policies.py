"""Draft budget per step, from a registry of policies (``none``, ``fixed``, ``load_aware``).

A policy sees the step's load (how many requests sample a token, how many prompt tokens ride
along) and returns the tree budget every sampling request gets; it also hears back how many tree
nodes were accepted, so adaptive policies can learn the acceptance rate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from core.draft import NO_DRAFT, DraftBudget
from scheduler.cost import CostModel


@dataclass(frozen=True)
class StepLoad:
    num_sampling: int  # requests that emit a token this step
    prefill_tokens: int  # prompt (or recompute) tokens of the step


class DraftPolicy(Protocol):
    def budget(self, load: StepLoad) -> DraftBudget:
        """The tree budget of each sampling request this step (``NO_DRAFT`` = plain decoding)."""
        ...

    def observe(self, budget: DraftBudget, accepted_depth: int) -> None:
        """One request's result: the tree had ``budget``; ``accepted_depth`` nodes were accepted."""
        ...

    def observe_step(self, load: StepLoad, budget: DraftBudget, step_ms: float) -> None:
        """A whole step took ``step_ms`` (draft + verify) under ``load`` with ``budget`` given."""
        ...


class NoDraft:
    def budget(self, load: StepLoad) -> DraftBudget:
        return NO_DRAFT

    def observe(self, budget: DraftBudget, accepted_depth: int) -> None:
        pass

    def observe_step(self, load: StepLoad, budget: DraftBudget, step_ms: float) -> None:
        pass


@dataclass
class FixedDraft:
    nodes: int = 8
    depth: int = 0  # 0 = as deep as the nodes allow (a chain when there is no branching)

    def budget(self, load: StepLoad) -> DraftBudget:
        return DraftBudget(max_nodes=self.nodes, max_depth=self.depth or self.nodes)

    def observe(self, budget: DraftBudget, accepted_depth: int) -> None:
        pass

    def observe_step(self, load: StepLoad, budget: DraftBudget, step_ms: float) -> None:
        pass


class AcceptanceModel:
    """P(the node at depth d is accepted | depth d - 1 was), counted from verify results, with a
    prior of ``prior`` worth ``weight`` observations per depth."""

    def __init__(self, max_depth: int, prior: float = 0.7, weight: float = 4.0) -> None:
        self.hits = [prior * weight] * (max_depth + 1)
        self.tries = [weight] * (max_depth + 1)

    def observe(self, depth: int, accepted: int) -> None:
        for d in range(1, min(accepted + 1, depth) + 1):
            self.tries[d] += 1
            self.hits[d] += d <= accepted

    def expected_tokens(self, depth: int) -> float:
        """Expected tokens per verify step with a tree this deep (chain estimate, bonus included)."""
        total, reach = 1.0, 1.0
        for d in range(1, depth + 1):
            reach *= self.hits[d] / self.tries[d]
            total += reach
        return total


@dataclass
class LoadAwareDraft:
    """Pick the candidate budget with the most expected tokens per millisecond for this step:
    ``B * tau(depth) / (verifier(prefill + B * (1 + nodes)) + depth * drafter(B * rows))``, where
    the costs come from the measured forward-cost curves and tau from the acceptance seen so far.
    Trees shrink as the batch grows because the verifier's cost rises with its tokens.

    The curves only time the forwards; what a step really costs beyond them (the drafter's tree
    bookkeeping per request, packing) is learned from measured step times: a running ratio of
    measured to predicted milliseconds, one for drafting steps and one for plain steps, scales
    the predictions (shared by all tree sizes, so one slow tree makes every tree look slower)."""

    cost: CostModel
    candidates: tuple[tuple[int, int], ...] = ((0, 0), (2, 2), (4, 3), (8, 5), (12, 6), (16, 7))
    smoothing: float = 0.3  # weight of the newest step in the measured/predicted ratios

    def __post_init__(self) -> None:
        self.acceptance = AcceptanceModel(max(d for _, d in self.candidates))
        self.overhead = {False: 1.0, True: 1.0}  # drafting? -> measured / predicted step time

    def budget(self, load: StepLoad) -> DraftBudget:
        b = max(load.num_sampling, 1)
        best = max(self.candidates, key=lambda c: self._rate(b, load.prefill_tokens, *c))
        return DraftBudget(max_nodes=best[0], max_depth=best[1]) if best[0] else NO_DRAFT

    def observe(self, budget: DraftBudget, accepted_depth: int) -> None:
        if budget.max_depth:
            self.acceptance.observe(budget.max_depth, accepted_depth)

    def observe_step(self, load: StepLoad, budget: DraftBudget, step_ms: float) -> None:
        if load.num_sampling:
            predicted = self._step_ms(
                load.num_sampling, load.prefill_tokens, budget.max_nodes, budget.max_depth
            )
            drafting = budget.max_nodes > 0
            ratio = step_ms / max(predicted, 1e-6)
            self.overhead[drafting] += self.smoothing * (ratio - self.overhead[drafting])

    def _rate(self, b: int, prefill: int, nodes: int, depth: int) -> float:
        step_ms = self._step_ms(b, prefill, nodes, depth) * self.overhead[nodes > 0]
        return b * self.acceptance.expected_tokens(depth) / step_ms

    def _step_ms(self, b: int, prefill: int, nodes: int, depth: int) -> float:
        verify_ms = self.cost.verifier(prefill + b * (1 + nodes))
        draft_ms = depth * self.cost.drafter(b * max(1, nodes // max(depth, 1))) if nodes else 0.0
        return verify_ms + draft_ms


POLICIES: dict[str, Callable[..., Any]] = {"none": NoDraft, "fixed": FixedDraft, "load_aware": LoadAwareDraft}


def make_policy(name: str, **options: Any) -> DraftPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown draft policy {name!r}; choose one of {sorted(POLICIES)}")
    policy: DraftPolicy = POLICIES[name](**options)
    return policy
