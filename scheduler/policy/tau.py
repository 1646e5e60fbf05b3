"""How many tokens a request emits per step under a tree budget (tau), from verify results.

A budget's own record: the decayed mean of what requests emitted per step under exactly this
budget (trees of one depth but different widths accept differently, which only their own record
tells), shrunk toward the chain estimate as if that were worth ``prior_weight`` request steps:
a budget tried a few times is judged mostly by what every tree taught, a budget that runs all
the time by itself. The chain estimate is ``1 + p1 + p1 p2 + ...`` from the acceptance rate at
each depth over every tree, each depth's rate shrunk toward the rate pooled over all depths
(itself shrunk toward a prior), so a depth no tree has reached yet is taken to accept like the
others do, not at a fixed guess.

Neither depends on the load a step ran at: a budget's tau learned at one load is its tau at any.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.plan import Accepted
from scheduler.policy.base import BudgetKey, key_of

PRIOR_ACCEPTANCE = 0.7  # a distilled drafter agrees with its target most of the time
PRIOR_WEIGHT = (
    4.0  # observations a prior is worth (pooled rate, or acceptance prior): a few trees overrule it
)
CHAIN_DECAY = 0.995  # per tree: acceptance per depth remembers the last few hundred trees
TAU_DECAY = 0.98  # per step of a budget: its mean follows what users ask now
# request steps the chain estimate is worth against a budget's own record: a handful of lucky or
# unlucky trees must not move a rarely tried budget far from what every tree taught
TAU_PRIOR_WEIGHT = 16.0


class ChainAcceptance:
    """P(the node at depth d is accepted | depth d - 1 was), counted from verify results, older
    trees fading by ``decay`` per tree."""

    def __init__(
        self,
        max_depth: int,
        prior: float = PRIOR_ACCEPTANCE,
        weight: float = PRIOR_WEIGHT,
        decay: float = CHAIN_DECAY,
    ) -> None:
        self.prior, self.weight, self.decay = prior, weight, decay
        self._hits = [0.0] * (max_depth + 1)
        self._tries = [0.0] * (max_depth + 1)

    def observe(self, depth: int, accepted: int) -> None:
        """A tree ``depth`` deep had its first ``accepted`` levels accepted."""
        self._hits = [self.decay * h for h in self._hits]
        self._tries = [self.decay * t for t in self._tries]
        for d in range(1, min(accepted + 1, depth) + 1):
            self._tries[d] += 1
            self._hits[d] += d <= accepted

    def rate(self, depth: int) -> float:
        """P(accepted at ``depth`` | its parent was)."""
        return (self._hits[depth] + self.pooled() * self.weight) / (self._tries[depth] + self.weight)

    def pooled(self) -> float:
        """The acceptance rate over every depth seen, shrunk toward the prior."""
        return (sum(self._hits) + self.prior * self.weight) / (sum(self._tries) + self.weight)

    def expected_tokens(self, depth: int) -> float:
        """Tokens per step with a chain this deep, the target's own token included."""
        total, reach = 1.0, 1.0
        for d in range(1, depth + 1):
            reach *= self.rate(d)
            total += reach
        return total


@dataclass
class _Record:
    tokens: float = 0.0  # decayed
    weight: float = 0.0  # decayed request steps
    requests: int = 0


class TauEstimator:
    def __init__(
        self, max_depth: int, decay: float = TAU_DECAY, prior_weight: float = TAU_PRIOR_WEIGHT
    ) -> None:
        if not 0 < decay <= 1 or prior_weight <= 0:
            raise ValueError(f"need decay in (0, 1] and prior_weight > 0, got {decay}, {prior_weight}")
        self.chain = ChainAcceptance(max_depth)
        self.decay, self.prior_weight = decay, prior_weight
        self._records: dict[BudgetKey, _Record] = {}

    def learn(self, accepted: Sequence[Accepted]) -> None:
        """One step's emitting requests (plain ones teach nothing about trees)."""
        steps: dict[BudgetKey, list[int]] = {}
        for a in accepted:
            if a.budget.max_depth:
                self.chain.observe(a.budget.max_depth, a.accepted)
                steps.setdefault(key_of(a.budget), []).append(a.accepted + 1)
        for key, tokens in steps.items():
            record = self._records.setdefault(key, _Record())
            record.tokens = self.decay * record.tokens + sum(tokens)
            record.weight = self.decay * record.weight + len(tokens)
            record.requests += len(tokens)

    def tau(self, key: BudgetKey) -> float:
        """Expected tokens per request step under ``key`` (1 for plain decoding)."""
        if not key[0]:
            return 1.0
        record = self._records.get(key, _Record())
        prior = self.chain.expected_tokens(key[1]) * self.prior_weight
        return (record.tokens + prior) / (record.weight + self.prior_weight)

    def measured_requests(self, key: BudgetKey) -> int:
        """Request steps that ran under ``key``."""
        record = self._records.get(key)
        return 0 if record is None else record.requests
