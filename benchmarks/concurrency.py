"""Throughput and per-token latency at 1..32 concurrent users, per draft policy.

For each concurrency C, a closed loop keeps C ShapesWorld requests in flight in one engine
(continuous batching: a new request joins as soon as one finishes) until ``--waves`` x C requests,
and at least ``--min-requests`` (so that a pass at one user lasts seconds, not one), are answered;
every policy (``none``, ``fixed`` with k = 2, 4, 8 nodes in a chain, ``load_aware``) gets the
same requests, in rotating order.

Every level starts from fresh engines: they are built when the level starts, so an adaptive
policy's choices at a level cannot depend on the lighter levels measured before it. Each engine
then serves ``--warmup`` untimed passes of that level (a server that has been under this load a
while: warm caches, and ``load_aware`` has measured its steps there) before the timed passes.
Per-token latency: the time between a request's consecutive outputs divided by the tokens in the
later one (the first token, i.e. time to first token, is left out).

    .venv/bin/python -m benchmarks.concurrency [--levels 1 2 4 8 16 32] [--max-tokens 48] [--repeats 3]
        [--waves 4] [--min-requests 16] [--warmup 1] [--device cpu]

With ``--repeats`` > 1 every (level, policy) runs that many times, interleaved, and each number
reported is the median over the runs (single runs at one level vary by tens of percent here).
``load_aware / best other`` is the ratio of those medians; beside it, ``paired`` is the median
over rounds of load_aware's run against the best other policy's run of the same round (seconds
apart), which the machine's slow drifts in speed move less.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks import harness
from benchmarks.engine_loops import POLICIES, closed_loop
from core.sampling import SamplingParams
from models.device import resolve_device
from serve.engine_builder import BuiltEngine, EngineOptions, build_engine


def build_engines(device: str) -> dict[str, BuiltEngine]:
    """One engine per policy; ``none`` runs without the drafter."""
    return {
        name: build_engine(
            harness.TARGET,
            None if name == "none" else harness.DRAFTER,
            EngineOptions(**fields, prefix_cache=False, device=device),
        )
        for name, fields in POLICIES.items()
    }


def measure_level(args: argparse.Namespace, index: int, level: int, device: str) -> dict[str, dict[str, Any]]:
    """Every policy at ``level`` users on fresh engines: warm-up passes, then interleaved timed
    passes (the order rotates with the level's ``index`` and the round); medians per policy."""
    engines = build_engines(device)
    samples = harness.eval_samples(
        harness.CONCURRENCY_SEED_OFFSET, max(args.waves * level, args.min_requests)
    )
    prompts = [harness.prompt_of(engines["none"].processor, s) for s in samples]
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    for built in engines.values():
        for _ in range(args.warmup):
            closed_loop(built.engine, prompts, params, level)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in engines}
    for r in range(args.repeats):
        for name in harness.rotated(list(engines), index + r):
            runs[name].append(closed_loop(engines[name].engine, prompts, params, level).summary())
    return {name: harness.medians(rs) for name, rs in runs.items()}


def best_other(results: dict[str, dict[str, Any]], level: str) -> str:
    """The policy other than load_aware with the highest median tokens/s at ``level``."""
    return max((n for n in results if n != "load_aware"), key=lambda n: results[n][level]["tokens_per_s"])


def main() -> None:
    p = harness.parser(__doc__, repeats=3, device=True)
    p.add_argument("--levels", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--waves", type=int, default=4, help="requests per level = waves x concurrency")
    p.add_argument("--min-requests", type=int, default=16, help="at least this many requests per level")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed passes per policy and level, on fresh engines"
    )
    args = p.parse_args()
    device = str(resolve_device(args.device))
    results: dict[str, dict[str, Any]] = {name: {} for name in POLICIES}
    for i, level in enumerate(args.levels):
        for name, row in measure_level(args, i, level, device).items():
            results[name][str(level)] = row
        speeds = {n: round(results[n][str(level)]["tokens_per_s"], 1) for n in results}
        print(f"concurrency {level}: tokens/s {speeds} (median of {args.repeats})")
    levels = [str(c) for c in args.levels]
    result = {
        "benchmark": "concurrency",
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "waves": args.waves,
        "min_requests": args.min_requests,
        "warmup": args.warmup,
        "fresh_engines_per_level": True,
        "machine": harness.machine_info(device),
        "policies": results,
        "load_aware_over_best_other": {
            c: results["load_aware"][c]["tokens_per_s"] / results[best_other(results, c)][c]["tokens_per_s"]
            for c in levels
        },
        "load_aware_over_best_other_paired": {
            c: harness.paired_median(
                results["load_aware"][c]["tokens_per_s_runs"],
                results[best_other(results, c)][c]["tokens_per_s_runs"],
            )
            for c in levels
        },
    }
    harness.write_report(args.out / "concurrency", result, report(result))
    print(result["load_aware_over_best_other"])


def report(result: dict[str, Any]) -> harness.Report:
    policies = result["policies"]
    levels = list(next(iter(policies.values())))

    def cell(row: dict[str, Any]) -> str:
        return f"{row['tokens_per_s']:.1f} ({row['p50_token_ms']:.0f}/{row['p99_token_ms']:.0f})"

    header = [
        "concurrency",
        *(f"{p} tok/s (p50/p99 ms)" for p in policies),
        "load_aware / best other",
        "paired",
    ]
    rows = [
        [
            c,
            *(cell(policies[p][c]) for p in policies),
            f"{result['load_aware_over_best_other'][c]:.2f}x",
            f"{result['load_aware_over_best_other_paired'][c]:.2f}x",
        ]
        for c in levels
    ]
    xs = [int(c) for c in levels]

    def panel(key: str, ylabel: str) -> harness.Panel:
        series = [harness.Series(p, xs, [rows[c][key] for c in levels]) for p, rows in policies.items()]
        return harness.Panel("", "concurrent users", ylabel, series, xscale="log2")

    plot = harness.Plot(
        [panel("tokens_per_s", "tokens/s (all users)"), panel("p50_token_ms", "p50 per-token latency, ms")],
        title="Draft policies under load, tiny models",
    )
    return harness.Report([harness.Table(header, rows, align="r" * len(header))], plot)


if __name__ == "__main__":
    main()
