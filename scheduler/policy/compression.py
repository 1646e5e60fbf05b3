"""``kv_pressure``: the drafter keeps fewer visual tokens as its KV pool fills.

A request the drafter has no room for drafts nothing, so as its pool fills, requests whose
drafter KV is built now keep fewer visual tokens (fewer KV entries each, at some cost in tau:
see the compression ablation in benchmarks/README.md). The drafter's forward cost barely depends
on its context on a CPU, so with room to spare every visual token is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.plan import StepLoad

# (drafter KV use below which, r): the first row that applies wins; above every row, the last r
RATIO_BY_KV_USE: tuple[tuple[float, float], ...] = ((0.5, 1.0), (0.8, 0.5), (1.0, 0.25))


@dataclass(frozen=True)
class KVPressureRatio:
    table: tuple[tuple[float, float], ...] = RATIO_BY_KV_USE

    def __post_init__(self) -> None:
        if not self.table or any(not 0 < r <= 1 for _, r in self.table):
            raise ValueError(f"a ratio table needs rows with r in (0, 1], got {self.table}")

    def ratio(self, load: StepLoad) -> float:
        for below, r in self.table:
            if load.drafter_kv_used < below:
                return r
        return self.table[-1][1]
