"""Results of ``benchmarks.forward_cost``: what one configuration measured, the JSON of a run, and
the report drawn from that JSON."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks import harness

DECODE_GOAL = 1.1  # ours / transformers time of a single-sequence decode step, at most
PACKING_GOAL = 4.0  # packed 16x1 throughput over 16 separate forwards, at least


@dataclass(frozen=True)
class SingleResult:
    k: int
    ours: harness.Timing
    hf: harness.Timing
    max_abs_logit_diff: float  # ours vs transformers, last token

    def as_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "ours": self.ours.as_dict(self.k),
            "hf": self.hf.as_dict(self.k),
            "ours_over_hf": self.ours.median_ms / self.hf.median_ms,
            "max_abs_logit_diff": self.max_abs_logit_diff,
        }


@dataclass(frozen=True)
class BatchResult:
    batch_size: int
    k: int
    packed: harness.Timing
    separate: harness.Timing
    hf: harness.Timing
    max_abs_logit_diff: float  # ours packed vs transformers batched, last tokens

    def as_json(self) -> dict[str, Any]:
        tokens = self.batch_size * self.k
        return {
            "batch_size": self.batch_size,
            "k": self.k,
            "ours_packed": self.packed.as_dict(tokens),
            "ours_separate": self.separate.as_dict(tokens),
            "hf": self.hf.as_dict(tokens),
            # throughput of one packed forward over that of B separate forwards
            "packed_vs_separate_throughput": self.separate.median_ms / self.packed.median_ms,
            "packed_over_hf": self.packed.median_ms / self.hf.median_ms,
            "max_abs_logit_diff": self.max_abs_logit_diff,
        }


def to_json(
    single: Sequence[SingleResult],
    batch: Sequence[BatchResult],
    machine: dict[str, Any],  # taken before the measurements
    model: dict[str, Any],
    setup: dict[str, Any],  # prefix_len, block_size, repeats, ...
) -> dict[str, Any]:
    singles, batches = [r.as_json() for r in single], [r.as_json() for r in batch]
    step = next(r for r in singles if r["k"] == 1)
    widest = max(r["batch_size"] for r in batches)
    wide = next(r for r in batches if r["batch_size"] == widest and r["k"] == 1)
    return {
        "machine": {**machine, "load_average_at_end": os.getloadavg()},
        "model": model,
        "setup": setup,
        "headlines": {
            "decode_step_ours_over_hf": step["ours_over_hf"],
            f"packed_{widest}x1_vs_{widest}_separate_throughput": wide["packed_vs_separate_throughput"],
        },
        "goals": {
            "decode_step_ours_over_hf_at_most": DECODE_GOAL,
            "packed_vs_separate_at_least": PACKING_GOAL,
        },
        "single": singles,
        "batch": batches,
    }


def report(result: dict[str, Any]) -> harness.Report:
    setup, (decode, packing) = result["setup"], result["headlines"].values()
    intro = (
        f"Medians of {setup['repeats']} interleaved repeats; {setup['prefix_len']}-token cached prefix "
        f"per sequence; fp32, {setup['threads']} threads, {result['machine']['cpu_model']}."
    )
    headlines = (
        f"- single-sequence decode step (k=1), ours / transformers: **{decode:.2f}x** the time "
        f"(goal <= {DECODE_GOAL}x)\n"
        f"- 16 sequences x 1 token, one packed forward vs 16 separate forwards: **{packing:.2f}x** "
        f"the throughput (goal >= {PACKING_GOAL:.0f}x)"
    )
    single = harness.Table.of(
        ((r["k"], r) for r in result["single"]),
        {
            "k": "{k}",
            "ours ms": "{ours[median_ms]:.2f}",
            "HF ms": "{hf[median_ms]:.2f}",
            "ours/HF": "{ours_over_hf:.2f}",
        },
        align="rrrr",
    )
    batch_columns = {
        "B": "{batch_size}",
        "k": "{k}",
        "ours packed ms": "{ours_packed[median_ms]:.2f}",
        "ours separate ms": "{ours_separate[median_ms]:.2f}",
        "HF ms": "{hf[median_ms]:.2f}",
        "packed vs separate (throughput)": "{packed_vs_separate_throughput:.2f}x",
        "packed/HF time": "{packed_over_hf:.2f}",
    }
    batch = harness.Table.of(((r["k"], r) for r in result["batch"]), batch_columns, align="r" * 7)
    model = result["model"]
    plot = harness.Plot(
        [single_panel(result["single"]), batch_panel(result["batch"])],
        title=f"Forward cost: random {model['num_layers']}-layer, hidden {model['hidden_size']} Llama, "
        f"fp32, CPU, {setup['threads']} threads",
        panel_size=(6, 4.8),
    )
    return harness.Report(["# Forward cost", intro, headlines, single, batch], plot)


def single_panel(single: list[dict[str, Any]]) -> harness.Panel:
    ks = [r["k"] for r in single]

    def curve(label: str, key: str) -> harness.Series:
        t = [r[key] for r in single]
        below = [x["median_ms"] - x["p25_ms"] for x in t]
        above = [x["p75_ms"] - x["median_ms"] for x in t]
        return harness.Series(label, ks, [x["median_ms"] for x in t], yerr=(below, above))

    return harness.Panel(
        "One sequence: time of one forward",
        "new tokens k (after a 256-token cached prefix)",
        "ms per forward (median, p25-p75)",
        [curve("ours (paged pool, SDPA)", "ours"), curve("transformers", "hf")],
        xscale="log2",
    )


def batch_panel(batch: list[dict[str, Any]]) -> harness.Panel:
    decode = [r for r in batch if r["k"] == 1]
    sizes = [r["batch_size"] for r in decode]
    contenders = (
        ("ours, one packed forward", "ours_packed"),
        ("ours, B separate forwards", "ours_separate"),
        ("transformers, batched", "hf"),
    )
    return harness.Panel(
        "Batched decode step: throughput",
        "sequences B (1 new token each, 256 cached)",
        "tokens / s (median)",
        [harness.Series(label, sizes, [r[key]["tokens_per_s"] for r in decode]) for label, key in contenders],
        xscale="log2",
    )
