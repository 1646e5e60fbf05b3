"""Measured forward cost as a function of batch size, for policies that weigh speed against τ."""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class CostCurve:
    """Milliseconds of one forward at ``tokens[i]`` packed tokens; linear in between and beyond."""

    tokens: tuple[int, ...]  # increasing
    ms: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.tokens) < 2 or len(self.tokens) != len(self.ms):
            raise ValueError("a cost curve needs at least two (tokens, ms) points of equal count")
        if any(b <= a for a, b in zip(self.tokens, self.tokens[1:], strict=False)):
            raise ValueError(f"cost curve tokens must increase, got {self.tokens}")

    def __call__(self, tokens: float) -> float:
        i = min(max(bisect.bisect_left(self.tokens, tokens), 1), len(self.tokens) - 1)
        t0, t1, m0, m1 = self.tokens[i - 1], self.tokens[i], self.ms[i - 1], self.ms[i]
        return max(m0 + (m1 - m0) * (tokens - t0) / (t1 - t0), 0.0)


@dataclass(frozen=True)
class CostModel:
    verifier: CostCurve  # one target forward
    drafter: CostCurve  # one drafter forward (a depth level)
