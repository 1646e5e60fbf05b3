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
    """Tokens a request emits per step (accepted nodes and the target's own) under each budget,
    per load bucket and over all loads: decayed means over steps (older steps fade by ``decay``
    per step of that budget), so they follow what the users currently ask. The load can matter:
    a crowded drafter pool keeps fewer visual tokens per request (a lower tau, see the
    compression ablation) or has no room to draft for some."""

    def __init__(self, decay: float = 0.98) -> None:
        _check_decay(decay)
        self.decay = decay
        self._sums: dict[tuple[int, BudgetKey] | BudgetKey, _TokenSums] = {}

    def add(self, bucket: int, budget: BudgetKey, tokens: int, requests: int) -> None:
        """One step: its ``requests`` requests emitted ``tokens`` tokens in all."""
        for key in ((bucket, budget), budget):
            sums = self._sums.setdefault(key, _TokenSums())
            sums.tokens = self.decay * sums.tokens + tokens
            sums.weight = self.decay * sums.weight + requests
            sums.requests += requests

    def mean(self, bucket: int | None, budget: BudgetKey, min_requests: int) -> float | None:
        """Mean tokens per request step at this load bucket (None: over all loads), or None
        with fewer than ``min_requests`` seen there."""
        sums = self._sums.get(budget if bucket is None else (bucket, budget))
        if sums is None or sums.requests < min_requests or sums.weight <= 0:
            return None
        return sums.tokens / sums.weight

    def requests(self, bucket: int | None, budget: BudgetKey) -> int:
        sums = self._sums.get(budget if bucket is None else (bucket, budget))
        return 0 if sums is None else sums.requests
