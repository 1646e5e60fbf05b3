"""Results of ``benchmarks.forward_cost`` and their JSON, markdown and PNG forms."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Timing

DECODE_GOAL = 1.1  # ours / transformers time of a single-sequence decode step, at most
PACKING_GOAL = 4.0  # packed 16x1 throughput over 16 separate forwards, at least


@dataclass(frozen=True)
class SingleResult:
    k: int
    ours: Timing
    hf: Timing
    max_abs_logit_diff: float  # ours vs transformers, last token

    @property
    def ours_over_hf(self) -> float:
        return self.ours.median_ms / self.hf.median_ms


@dataclass(frozen=True)
class BatchResult:
    batch_size: int
    k: int
    packed: Timing
    separate: Timing
    hf: Timing
    max_abs_logit_diff: float  # ours packed vs transformers batched, last tokens

    @property
    def tokens(self) -> int:
        return self.batch_size * self.k

    @property
    def packed_vs_separate(self) -> float:
        """Throughput of one packed forward over that of B separate forwards."""
        return self.separate.median_ms / self.packed.median_ms

    @property
    def packed_over_hf(self) -> float:
        return self.packed.median_ms / self.hf.median_ms


@dataclass(frozen=True)
class RunInfo:
    machine: dict[str, Any]  # taken before the measurements
    model: dict[str, Any]
    setup: dict[str, Any]  # prefix_len, block_size, repeats, ...


@dataclass(frozen=True)
class Report:
    single: tuple[SingleResult, ...]
    batch: tuple[BatchResult, ...]
    run: RunInfo

    def headlines(self) -> dict[str, float]:
        step = next(r for r in self.single if r.k == 1)
        widest = max(r.batch_size for r in self.batch)
        wide = next(r for r in self.batch if r.batch_size == widest and r.k == 1)
        return {
            "decode_step_ours_over_hf": step.ours_over_hf,
            f"packed_{widest}x1_vs_{widest}_separate_throughput": wide.packed_vs_separate,
        }


def to_json(report: Report) -> dict[str, Any]:
    return {
        "machine": {**report.run.machine, "load_average_at_end": os.getloadavg()},
        "model": report.run.model,
        "setup": report.run.setup,
        "headlines": report.headlines(),
        "goals": {
            "decode_step_ours_over_hf_at_most": DECODE_GOAL,
            "packed_vs_separate_at_least": PACKING_GOAL,
        },
        "single": [_single_json(r) for r in report.single],
        "batch": [_batch_json(r) for r in report.batch],
    }


def _single_json(r: SingleResult) -> dict[str, Any]:
    return {
        "k": r.k,
        "ours": r.ours.as_dict(r.k),
        "hf": r.hf.as_dict(r.k),
        "ours_over_hf": r.ours_over_hf,
        "max_abs_logit_diff": r.max_abs_logit_diff,
    }


def _batch_json(r: BatchResult) -> dict[str, Any]:
    return {
        "batch_size": r.batch_size,
        "k": r.k,
        "ours_packed": r.packed.as_dict(r.tokens),
        "ours_separate": r.separate.as_dict(r.tokens),
        "hf": r.hf.as_dict(r.tokens),
        "packed_vs_separate_throughput": r.packed_vs_separate,
        "packed_over_hf": r.packed_over_hf,
        "max_abs_logit_diff": r.max_abs_logit_diff,
    }


def markdown(report: Report) -> str:
    setup, (decode, packing) = report.run.setup, report.headlines().values()
    lines = [
        f"Medians of {setup['repeats']} interleaved repeats; {setup['prefix_len']}-token cached prefix "
        f"per sequence; fp32, {setup['threads']} threads, {report.run.machine['cpu_model']}.",
        "",
        f"- single-sequence decode step (k=1), ours / transformers: **{decode:.2f}x** the time "
        f"(goal <= {DECODE_GOAL}x)",
        f"- 16 sequences x 1 token, one packed forward vs 16 separate forwards: **{packing:.2f}x** "
        f"the throughput (goal >= {PACKING_GOAL:.0f}x)",
        "",
        "| k | ours ms | HF ms | ours/HF |",
        "| ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r.k} | {r.ours.median_ms:.2f} | {r.hf.median_ms:.2f} | {r.ours_over_hf:.2f} |"
        for r in report.single
    ]
    lines += [
        "",
        "| B | k | ours packed ms | ours separate ms | HF ms | packed vs separate (throughput) "
        "| packed/HF time |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r.batch_size} | {r.k} | {r.packed.median_ms:.2f} | {r.separate.median_ms:.2f} | "
        f"{r.hf.median_ms:.2f} | {r.packed_vs_separate:.2f}x | {r.packed_over_hf:.2f} |"
        for r in report.batch
    ]
    return "\n".join(lines) + "\n"


def _plot_single(ax: Any, single: Sequence[SingleResult]) -> None:
    ks = [r.k for r in single]
    for label, timings in (
        ("ours (paged pool, SDPA)", [r.ours for r in single]),
        ("transformers", [r.hf for r in single]),
    ):
        medians = [t.median_ms for t in timings]
        low = [m - t.quantile_ms(0.25) for m, t in zip(medians, timings, strict=True)]
        high = [t.quantile_ms(0.75) - m for m, t in zip(medians, timings, strict=True)]
        ax.errorbar(ks, medians, yerr=[low, high], marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="new tokens k (after a 256-token cached prefix)", ylabel="ms per forward (median, p25-p75)")
    ax.set_title("One sequence: time of one forward")


def _plot_batch(ax: Any, batch: Sequence[BatchResult]) -> None:
    decode = [r for r in batch if r.k == 1]
    sizes = [r.batch_size for r in decode]
    contenders = (
        ("ours, one packed forward", "packed"),
        ("ours, B separate forwards", "separate"),
        ("transformers, batched", "hf"),
    )
    for label, attr in contenders:
        ax.plot(sizes, [r.tokens * 1e3 / getattr(r, attr).median_ms for r in decode], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set(xlabel="sequences B (1 new token each, 256 cached)", ylabel="tokens / s (median)")
    ax.set_title("Batched decode step: throughput")


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    _plot_single(left, report.single)
    _plot_batch(right, report.batch)
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    model, setup = report.run.model, report.run.setup
    fig.suptitle(
        f"Forward cost: random {model['num_layers']}-layer, hidden {model['hidden_size']} Llama, "
        f"fp32, CPU, {setup['threads']} threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(report: Report, out: Path) -> str:
    """Write forward_cost.{json,md,png} under ``out``; return the markdown tables."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "forward_cost.json").write_text(json.dumps(to_json(report), indent=2) + "\n")
    tables = markdown(report)
    (out / "forward_cost.md").write_text("# Forward cost\n\n" + tables)
    plot(report, out / "forward_cost.png")
    return tables
