"""Shared benchmark helpers: machine description and interleaved, repeated timing.

The machines these run on are shared and noisy, so every comparison is measured side by side:
each repeat runs every contender once, in a rotating order, and results are medians.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return platform.processor() or "unknown"
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """The host, and the GPU where ``device`` is one (where the timed models ran)."""
    import transformers

    gpu = {}
    if device is not None and device.type == "cuda":
        gpu = {"gpu": torch.cuda.get_device_name(device), "cuda_version": torch.version.cuda}
    return {
        **gpu,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1_5_15min": os.getloadavg(),  # other jobs share these cores; see the spread
    }


@dataclass(frozen=True)
class Case:
    """One contender: ``run`` is timed; ``reset`` (untimed) undoes its side effects."""

    run: Callable[[], Any]
    reset: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Timing:
    samples_ms: tuple[float, ...]  # one wall-clock sample per repeat

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile_ms(self, q: float) -> float:
        ordered = sorted(self.samples_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def as_dict(self, tokens: int) -> dict[str, Any]:
        """Summary plus raw samples; ``tokens`` processed per call gives tokens/s."""
        return {
            "median_ms": self.median_ms,
            "p25_ms": self.quantile_ms(0.25),
            "p75_ms": self.quantile_ms(0.75),
            "min_ms": min(self.samples_ms),
            "tokens": tokens,
            "tokens_per_s": tokens / (self.median_ms / 1e3),
            "samples_ms": list(self.samples_ms),
        }


def time_once(case: Case) -> float:
    """Milliseconds of one ``case.run()``; ``case.reset()`` runs afterwards, untimed."""
    start = time.perf_counter_ns()
    case.run()
    elapsed = time.perf_counter_ns() - start
    case.reset()
    return elapsed / 1e6


def warm_up(cases: Mapping[str, Case], rounds: int) -> dict[str, Any]:
    """Run every case ``rounds`` times untimed; return each case's last result."""
    last: dict[str, Any] = {}
    for _ in range(rounds):
        for name, case in cases.items():
            last[name] = case.run()
            case.reset()
    return last


def time_interleaved(cases: Mapping[str, Case], repeats: int) -> dict[str, Timing]:
    """``repeats`` rounds; each round times every case once, rotating which goes first."""
    names = list(cases)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_once(cases[name]))
    return {name: Timing(tuple(s)) for name, s in samples.items()}
