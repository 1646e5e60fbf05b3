"""Draft budget per step, from a registry of policies (``none``, ``fixed``, ``load_aware``).

A policy sees the step's load (how many requests sample a token, how many prompt tokens ride
along, how full the drafter's KV pool is) and returns the tree budget every sampling request gets
and the visual-token ratio r for requests whose drafter KV is built this step; it also hears back
how many tree nodes were accepted, so adaptive policies can learn the acceptance rate.
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
    drafter_kv_used: float = 0.0  # fraction of the drafter's KV pool in use (0 without a drafter)


class DraftPolicy(Protocol):
    def budget(self, load: StepLoad) -> DraftBudget:
        """The tree budget of each sampling request this step (``NO_DRAFT`` = plain decoding)."""
        ...

    def compression(self, load: StepLoad) -> float:
        """r in (0, 1] for requests whose drafter KV is built this step (their first tree, or
        the first after the drafter let their KV go); a request keeps the r its KV was built with."""
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

    def compression(self, load: StepLoad) -> float:
        return 1.0

    def observe(self, budget: DraftBudget, accepted_depth: int) -> None:
        pass

    def observe_step(self, load: StepLoad, budget: DraftBudget, step_ms: float) -> None:
        pass


@dataclass
class FixedDraft:
    nodes: int = 8
    depth: int = 0  # 0 = as deep as the nodes allow (a chain when there is no branching)
    ratio: float = 1.0  # r for every request

    def budget(self, load: StepLoad) -> DraftBudget:
        return DraftBudget(max_nodes=self.nodes, max_depth=self.depth or self.nodes)

    def compression(self, load: StepLoad) -> float:
        return self.ratio

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
    the predictions (shared by all tree sizes, so one slow tree makes every tree look slower).

    r follows the drafter's KV use: a request the drafter has no room for drafts nothing, so as
    its pool fills, new requests keep fewer visual tokens (fewer KV entries each, a lower tau:
    see the spec-decode ablation). The drafter's forward cost barely depends on its context on a
    CPU, so with room to spare every visual token is kept."""

    cost: CostModel
    # (nodes, depth); deep chains pay off once the drafter agrees often (single user, shipped
    # models: depth <= 7 gave 1.54x plain decoding, these 1.71x, measured side by side)
    candidates: tuple[tuple[int, int], ...] = ((0, 0), (2, 2), (4, 3), (6, 6), (8, 8), (12, 10), (16, 12))
    smoothing: float = 0.3  # weight of the newest step in the measured/predicted ratios
    # (drafter KV use below which, r): the first row that applies wins; above all rows, the last r
    ratio_by_kv_use: tuple[tuple[float, float], ...] = ((0.5, 1.0), (0.8, 0.5), (1.0, 0.25))

    def __post_init__(self) -> None:
        self.acceptance = AcceptanceModel(max(d for _, d in self.candidates))
        self.overhead = {False: 1.0, True: 1.0}  # drafting? -> measured / predicted step time

    def budget(self, load: StepLoad) -> DraftBudget:
        b = max(load.num_sampling, 1)
        best = max(self.candidates, key=lambda c: self._rate(b, load.prefill_tokens, *c))
        return DraftBudget(max_nodes=best[0], max_depth=best[1]) if best[0] else NO_DRAFT

    def compression(self, load: StepLoad) -> float:
        for below, ratio in self.ratio_by_kv_use:
            if load.drafter_kv_used < below:
                return ratio
        return self.ratio_by_kv_use[-1][1]

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
