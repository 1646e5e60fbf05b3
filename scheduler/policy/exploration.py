"""Which neighbouring budget a decode step tries instead of the best one, now and then.

A policy that only ever runs its best budget stops measuring the others, and its estimates of
them (tau at depths next to the chosen one, their step times at this load) go stale. So every
``every``-th decode step tries a neighbour of the best candidate (one smaller and one larger,
in turn) if it is predicted within ``margin`` of the best (a clearly worse one teaches nothing
worth its cost), or if its prediction was never checked at this load: a guess must not rule a
budget out for good. A neighbour already well measured at this load is tried on ever fewer of
its turns (every 2nd, 4th, ... up to every ``backoff``-th): each try is a step away from the
best.

The choice is a function of the decode step's index and what has been measured, so it is the
same whether a server reached this load from a cold start or through lighter loads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from scheduler.policy.base import BudgetKey

EXPLORE_EVERY = 8  # decode steps between tries: one step in eight off the best costs little
EXPLORE_MARGIN = 0.3  # a neighbour predicted more than 30 % worse is not worth a try
EXPLORE_BACKOFF = 8  # a well-measured neighbour is still tried on every 8th of its turns
MEASURED_STEPS = 4  # steps at a load after which each further as many halve a neighbour's tries


@dataclass(frozen=True)
class Exploration:
    every: int = EXPLORE_EVERY  # 0: never explore
    margin: float = EXPLORE_MARGIN
    backoff: int = EXPLORE_BACKOFF
    measured_steps: int = MEASURED_STEPS

    def __post_init__(self) -> None:
        if self.every < 0 or not 0 <= self.margin <= 1 or self.backoff < 1 or self.measured_steps < 1:
            raise ValueError(f"invalid exploration settings {self}")

    def pick(
        self,
        step: int,
        best: BudgetKey,
        rates: Mapping[BudgetKey, float],
        measured: Callable[[BudgetKey], int],
    ) -> BudgetKey:
        """The budget decode step number ``step`` (from 1) runs: ``best`` or, on an exploring
        step, the neighbour whose turn it is. ``rates`` orders the candidates; ``measured`` says
        how many steps a budget has run at this load."""
        if not self.every or step % self.every:
            return best
        candidates = list(rates)
        i = candidates.index(best)
        neighbours = [candidates[j] for j in (i - 1, i + 1) if 0 <= j < len(candidates)]
        turn = step // self.every
        pick = neighbours[turn % len(neighbours)]
        steps = measured(pick)
        if (turn // len(neighbours)) % self.spacing(steps):
            return best
        unchecked = steps < self.measured_steps  # its prediction was never checked at this load
        return pick if unchecked or rates[pick] >= (1 - self.margin) * rates[best] else best

    def spacing(self, steps: int) -> int:
        """A neighbour measured for ``steps`` steps at this load is tried on every k-th turn."""
        doublings = max(steps - self.measured_steps, 0) // self.measured_steps
        return min(2 ** min(doublings, 30), self.backoff)
