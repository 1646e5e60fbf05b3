"""The policies that learn nothing: plain decoding, and one fixed tree for every request."""

from __future__ import annotations

from dataclasses import dataclass

from core.draft import NO_DRAFT, DraftBudget
from core.plan import StepLoad, StepReport, StepTiming


class NoDraft:
    """Plain decoding: the target alone."""

    def choose(self, load: StepLoad) -> DraftBudget:
        return NO_DRAFT

    def learn(self, report: StepReport, timing: StepTiming) -> None:
        pass


@dataclass(frozen=True)
class FixedDraft:
    """``nodes`` tree nodes for every sampling request, ``depth`` deep (0: a chain of ``nodes``)."""

    nodes: int = 8
    depth: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 1 or not 0 <= self.depth <= self.nodes:
            raise ValueError(f"a fixed tree needs nodes >= 1 and 0 <= depth <= nodes, got {self}")

    def choose(self, load: StepLoad) -> DraftBudget:
        return DraftBudget(max_nodes=self.nodes, max_depth=self.depth or self.nodes)

    def learn(self, report: StepReport, timing: StepTiming) -> None:
        pass
