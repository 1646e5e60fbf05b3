"""A scripted world for policy tests: step costs and acceptance set by the test, not measured.

``World`` says what a decode step of ``b`` requests costs under a tree budget and how deep each
request's tree is accepted; :func:`drive` runs a policy in it for a number of decode steps,
feeding it the reports and timings an engine would, and returns the budgets it chose.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from core.draft import NO_DRAFT, DraftBudget
from core.plan import Accepted, StepLoad, StepReport, StepTiming
from scheduler.policy import DraftPolicy


@dataclass
class World:
    verify_ms: Callable[[int, int], float]  # (requests, tokens verified) -> ms
    level_ms: Callable[[int], float]  # requests -> ms of one drafter level
    acceptance: float = 0.8  # P(a tree node is accepted | its parent was)
    prefill_ms_per_token: float = 0.0  # the drafter's prefill
    link_ms: float = 0.0  # a draft call's time on the link to the drafter, both ways
    overlap_tokens: int = 0  # pipelined: tokens verified for the other group while a call is out
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def accepted(self, depth: int) -> int:
        n = 0
        while n < depth and self.rng.random() < self.acceptance:
            n += 1
        return n

    def step(self, b: int, budget: DraftBudget, prefill_tokens: int = 0) -> tuple[StepReport, StepTiming]:
        """One decode step of ``b`` requests under ``budget``: its report and what it cost."""
        accepted = tuple(
            Accepted(budget, budget.max_nodes, self.accepted(budget.max_depth)) for _ in range(b)
        )
        nodes = b * budget.max_nodes
        report = StepReport(
            outputs=(),
            load=self.load(b),
            budget=budget,
            accepted=accepted,
            verify_tokens=b + nodes,
            tree_nodes=nodes,
            drafter_prefill=prefill_tokens if budget.max_nodes else 0,
        )
        call = budget.max_depth * self.level_ms(b) + self.prefill_ms_per_token * report.drafter_prefill
        call += self.link_ms if budget.max_nodes else 0.0
        hidden = min(call, self.verify_ms(0, self.overlap_tokens) if self.overlap_tokens else 0.0)
        link = self.link_ms if budget.max_nodes else 0.0
        return report, StepTiming(call - hidden, self.verify_ms(b, b + nodes), hidden, link)

    def load(self, b: int) -> StepLoad:
        """The load of a decode step of ``b`` requests in this world."""
        return StepLoad(b, 0, overlap_tokens=self.overlap_tokens)


def drive(policy: DraftPolicy, world: World, b: int, steps: int) -> list[DraftBudget]:
    """``steps`` decode steps of ``b`` requests: the budget the policy chose for each."""
    chosen = []
    for _ in range(steps):
        budget = policy.choose(world.load(b))
        chosen.append(budget)
        policy.learn(*world.step(b, budget))
    return chosen


def settled(chosen: list[DraftBudget]) -> DraftBudget:
    """The budget chosen most often (exploring steps are the few others)."""
    counts: dict[DraftBudget, int] = {}
    for budget in chosen:
        counts[budget] = counts.get(budget, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else NO_DRAFT
