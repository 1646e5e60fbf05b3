"""How far a policy's throughput predictions are from what decode steps really deliver, per load.

Cost fits learn from every step, so where a budget rarely runs (a tree for many requests) they
are pulled by the loads where it runs often. Per (load bucket, budget), decayed sums of measured
and predicted tokens per millisecond give the ratio that corrects later predictions there.
"""

from __future__ import annotations

from dataclasses import dataclass

BudgetKey = tuple[int, int]  # (max_nodes, max_depth)


def load_bucket(num_sampling: int) -> int:
    """Requests that sample this step -> bucket: 1, 2-3, 4-7, 8-15, ... share one."""
    return max(num_sampling, 1).bit_length()


@dataclass
class _Sums:
    measured: float = 0.0
    predicted: float = 0.0
    steps: int = 0


class MeasuredRates:
    """Measured / predicted tokens per millisecond, per (load bucket, budget); each new step
    weighs 1 and older ones fade by ``decay`` per step, so corrections follow a drifting machine."""

    def __init__(self, decay: float = 0.9) -> None:
        if not 0 < decay <= 1:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        self.decay = decay
        self._sums: dict[tuple[int, BudgetKey], _Sums] = {}

    def add(self, bucket: int, budget: BudgetKey, measured: float, predicted: float) -> None:
        """One step's rates (tokens per millisecond): what it delivered, what was predicted."""
        sums = self._sums.setdefault((bucket, budget), _Sums())
        sums.measured = self.decay * sums.measured + measured
        sums.predicted = self.decay * sums.predicted + predicted
        sums.steps += 1

    def correction(self, bucket: int, budget: BudgetKey, min_steps: int) -> float | None:
        """Measured / predicted rate, or None with fewer than ``min_steps`` steps measured."""
        sums = self._sums.get((bucket, budget))
        if sums is None or sums.steps < min_steps or sums.predicted <= 0:
            return None
        return sums.measured / sums.predicted

    def steps(self, bucket: int, budget: BudgetKey) -> int:
        sums = self._sums.get((bucket, budget))
        return 0 if sums is None else sums.steps
