"""What a draft policy is: a budget chooser and a visual-token ratio, learning from step reports.

Each step the scheduler asks the policy for the tree budget every sampling request gets (and the
drafter's visual-token ratio r for requests whose drafter KV is built this step); after the
step, the engine hands the policy the step's :class:`core.plan.StepReport` and
:class:`core.plan.StepTiming`. That is all a policy ever sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from core.draft import DraftBudget
from core.plan import StepLoad, StepReport, StepTiming

BudgetKey = tuple[int, int]  # (max_nodes, max_depth); (0, 0) = plain decoding


def budget_of(key: BudgetKey) -> DraftBudget:
    return DraftBudget(max_nodes=key[0], max_depth=key[1])


def key_of(budget: DraftBudget) -> BudgetKey:
    return (budget.max_nodes, budget.max_depth)


class DraftPolicy(Protocol):
    def choose(self, load: StepLoad) -> DraftBudget:
        """The tree budget of each sampling request this step (``NO_DRAFT`` = plain decoding).
        Reads only ``load`` and what :meth:`learn` was told; changes nothing, so asking twice
        before the next ``learn`` gives the same answer."""
        ...

    def learn(self, report: StepReport, timing: StepTiming) -> None:
        """Take in one finished step: what it ran at and produced, and what it cost."""
        ...


class CompressionPolicy(Protocol):
    def ratio(self, load: StepLoad) -> float:
        """r in (0, 1] for requests whose drafter KV is built this step (their first tree, or
        the first after the drafter let their KV go); a request keeps the r its KV was built
        with."""
        ...


@dataclass(frozen=True)
class FixedRatio:
    """The same r for every request."""

    r: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.r <= 1:
            raise ValueError(f"compression ratio must be in (0, 1], got {self.r}")

    def ratio(self, load: StepLoad) -> float:
        return self.r


@dataclass(frozen=True)
class Policy:
    """A draft policy and a compression policy, decided together each step."""

    draft: DraftPolicy
    compression: CompressionPolicy = field(default_factory=FixedRatio)

    def decide(self, load: StepLoad) -> DraftBudget:
        return replace(self.draft.choose(load), compression=self.compression.ratio(load))

    def learn(self, report: StepReport, timing: StepTiming) -> None:
        self.draft.learn(report, timing)
