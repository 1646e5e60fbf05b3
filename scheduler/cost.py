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


class OnlineLinearFit:
    """``y ~ w . x`` learned from observations, pulled toward ``prior`` (worth ``prior_weight``
    observations per coefficient) and fading old observations by ``decay`` each time, so the fit
    follows a machine whose speed drifts. Ridge regression toward the prior, solved exactly."""

    def __init__(self, prior: tuple[float, ...], prior_weight: float = 1.0, decay: float = 0.98) -> None:
        if not prior or prior_weight <= 0 or not 0 < decay <= 1:
            raise ValueError("a fit needs a non-empty prior, prior_weight > 0 and decay in (0, 1]")
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay
        n = len(prior)
        self._xx = [[0.0] * n for _ in range(n)]  # decayed sum of x x^T
        self._xy = [0.0] * n  # decayed sum of x y
        self.weights = list(prior)
        self._count = 0.0  # decayed number of observations

    def add(self, x: tuple[float, ...], y: float, weight: float = 1.0) -> None:
        """One observation; ``weight = 1 / y**2`` fits relative rather than absolute errors."""
        n = len(self.prior)
        if len(x) != n:
            raise ValueError(f"expected {n} features, got {len(x)}")
        for i in range(n):
            self._xy[i] = self.decay * self._xy[i] + weight * x[i] * y
            for j in range(n):
                self._xx[i][j] = self.decay * self._xx[i][j] + weight * x[i] * x[j]
        self._count = self.decay * self._count + 1
        self.weights = self._solve()

    def predict(self, x: tuple[float, ...]) -> float:
        return max(sum(w * v for w, v in zip(self.weights, x, strict=True)), 0.0)

    def _solve(self) -> list[float]:
        """(XX + lambda * D) w = Xy + lambda * D w0 with D = diag(mean x_i^2 per observation), by
        Gaussian elimination; scaling the prior by each feature's own magnitude keeps it fair
        across units (milliseconds of curve, requests, tree nodes)."""
        n, lam = len(self.prior), self.prior_weight
        scale = [self._xx[i][i] / max(self._count, 1e-9) + 1e-9 for i in range(n)]
        a = [[self._xx[i][j] + (lam * scale[i] if i == j else 0.0) for j in range(n)] for i in range(n)]
        b = [self._xy[i] + lam * scale[i] * self.prior[i] for i in range(n)]
        for col in range(n):
            pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
            a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
            for r in range(col + 1, n):
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
                b[r] -= f * b[col]
        w = [0.0] * n
        for r in reversed(range(n)):
            w[r] = (b[r] - sum(a[r][c] * w[c] for c in range(r + 1, n))) / a[r][r]
        return w
