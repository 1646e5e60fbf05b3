"""What decode steps really deliver, against what a policy predicted, per draft budget.

Cost fits learn from every step, so where a budget rarely runs (a tree for many requests) they
are pulled by the loads where it runs often: per (load bucket, budget), decayed sums of measured
and predicted step milliseconds give the ratio that corrects later predictions there. Tokens are
counted apart, per budget and per request (a step's tokens swing with what its few requests
accepted, its time hardly): trees of one depth but different widths accept differently, which a
per-depth chain estimate of acceptance cannot tell apart.
"""

from __future__ import annotations

from dataclasses import dataclass

BudgetKey = tuple[int, int]  # (max_nodes, max_depth)


def load_bucket(num_sampling: int) -> int:
    """Requests that sample this step -> bucket: 1, 2-3, 4-7, 8-15, ... share one."""
    return max(num_sampling, 1).bit_length()


def _check_decay(decay: float) -> None:
    if not 0 < decay <= 1:
        raise ValueError(f"decay must lie in (0, 1], got {decay}")


@dataclass
class _Sums:
    measured: float = 0.0
    predicted: float = 0.0
    steps: int = 0


class MeasuredStepTimes:
    """Measured / predicted decode-step milliseconds, per (load bucket, budget); each new step
    weighs 1 and older ones fade by ``decay`` per step, so corrections follow a drifting machine."""

    def __init__(self, decay: float = 0.9) -> None:
        _check_decay(decay)
        self.decay = decay
        self._sums: dict[tuple[int, BudgetKey], _Sums] = {}

    def add(self, bucket: int, budget: BudgetKey, measured_ms: float, predicted_ms: float) -> None:
        """One decode step: what it took, what was predicted."""
        sums = self._sums.setdefault((bucket, budget), _Sums())
        sums.measured = self.decay * sums.measured + measured_ms
        sums.predicted = self.decay * sums.predicted + predicted_ms
        sums.steps += 1

    def correction(self, bucket: int, budget: BudgetKey, min_steps: int) -> float | None:
        """Measured / predicted time (above 1: slower than predicted), or None with fewer than
        ``min_steps`` steps measured."""
        sums = self._sums.get((bucket, budget))
        if sums is None or sums.steps < min_steps or sums.predicted <= 0:
            return None
        return sums.measured / sums.predicted

    def steps(self, bucket: int, budget: BudgetKey) -> int:
        sums = self._sums.get((bucket, budget))
        return 0 if sums is None else sums.steps


@dataclass
class _TokenSums:
    tokens: float = 0.0  # decayed
    weight: float = 0.0  # decayed request steps
    requests: int = 0


class MeasuredTokens:
    """Tokens a request emits per step (accepted nodes and the target's own) under each budget:
    a decayed mean over request steps (older ones fade by ``decay`` per request step of that
    budget), so it follows what the users currently ask."""

    def __init__(self, decay: float = 0.98) -> None:
        _check_decay(decay)
        self.decay = decay
        self._sums: dict[BudgetKey, _TokenSums] = {}

    def add(self, budget: BudgetKey, tokens: int) -> None:
        sums = self._sums.setdefault(budget, _TokenSums())
        sums.tokens = self.decay * sums.tokens + tokens
        sums.weight = self.decay * sums.weight + 1
        sums.requests += 1

    def mean(self, budget: BudgetKey, min_requests: int) -> float | None:
        """Mean tokens per request step, or None with fewer than ``min_requests`` seen."""
        sums = self._sums.get(budget)
        if sums is None or sums.requests < min_requests:
            return None
        return sums.tokens / sums.weight

    def requests(self, budget: BudgetKey) -> int:
        sums = self._sums.get(budget)
        return 0 if sums is None else sums.requests
