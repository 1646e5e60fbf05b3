"""Throughput and per-token latency at 1..32 concurrent users, per draft policy.

For each concurrency C, a closed loop keeps C ShapesWorld requests in flight in one engine
(continuous batching: a new request joins as soon as one finishes) until ``--waves`` x C requests,
and at least ``--min-requests`` (so that a pass at one user lasts seconds, not one), are answered;
every policy (``none``, ``fixed`` with k = 2, 4, 8 nodes in a chain, ``load_aware``) gets the
same requests, in rotating order, on engines built once. Before the timed runs of a level, each
engine serves ``--warmup`` untimed passes of it (a server that has been under this load a while:
warm caches, and ``load_aware`` has measured its steps there).
Per-token latency: the time between a request's consecutive outputs divided by the tokens in the
later one (the first token, i.e. time to first token, is left out).

    .venv/bin/python -m benchmarks.concurrency [--levels 1 2 4 8 16 32] [--max-tokens 48] [--repeats 3]
        [--waves 4] [--min-requests 16] [--warmup 1]

With ``--repeats`` > 1 every (level, policy) runs that many times, interleaved, and each number
reported is the median over the runs (single runs at one level vary by tens of percent here).
``load_aware / best other`` is the ratio of those medians; beside it, ``paired`` is the median
over rounds of load_aware's run against the best other policy's run of the same round (seconds
apart), which the machine's slow drifts in speed move less.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info
from core.sampling import SamplingParams
from models.device import resolve_device
from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.chat import chat_prompt
from serve.engine_builder import BuiltEngine, EngineOptions, build_engine

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
# prefix cache off: the same prompts come back every level and repeat; each run computes them,
# so the policies are compared on decoding, not on what an earlier run left cached
POLICIES: dict[str, EngineOptions] = {
    "none": EngineOptions(policy="none", prefix_cache=False),
    "fixed_2": EngineOptions(policy="fixed", fixed_nodes=2, prefix_cache=False),
    "fixed_4": EngineOptions(policy="fixed", fixed_nodes=4, prefix_cache=False),
    "fixed_8": EngineOptions(policy="fixed", fixed_nodes=8, prefix_cache=False),
    "load_aware": EngineOptions(policy="load_aware", prefix_cache=False),
}


def run_level(
    built: BuiltEngine, samples: list[Any], params: SamplingParams, concurrency: int
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` requests in flight, a new one as soon as one finishes, until
    every sample is answered."""
    engine = built.engine
    start = time.perf_counter()
    last: dict[int, float] = {}
    latencies: list[float] = []
    tokens = 0
    queue = list(samples)

    def submit() -> None:
        s = queue.pop(0)
        prompt = chat_prompt(built.processor, s.question.text, [s.image()], s.system)
        last[engine.add_request(prompt, params)] = -1.0

    for _ in range(min(concurrency, len(queue))):
        submit()
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.new_token_ids and last[out.request_id] >= 0:
                latencies += [(now - last[out.request_id]) / len(out.new_token_ids)] * len(out.new_token_ids)
            if out.new_token_ids:
                last[out.request_id] = now
                tokens += len(out.new_token_ids)
            if out.finished:
                engine.completion(out)
                if queue:
                    submit()
    wall = time.perf_counter() - start
    ordered = sorted(latencies) or [0.0]
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p50_token_ms": 1000 * statistics.median(ordered),
        "p99_token_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--waves", type=int, default=4, help="requests per level = waves x concurrency")
    parser.add_argument("--min-requests", type=int, default=16, help="at least this many requests per level")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes per policy and level")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--device", default="cpu", help="where the engines' models run: cpu, cuda or cuda:N")
    args = parser.parse_args()
    device = resolve_device(args.device)
    engines = {
        name: build_engine(
            CHECKPOINTS / "tiny-target",
            None if name == "none" else CHECKPOINTS / "tiny-drafter",
            replace(o, device=str(device)),
        )
        for name, o in POLICIES.items()
    }
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    results: dict[str, dict[str, Any]] = {name: {} for name in engines}
    names = list(engines)
    for i, level in enumerate(args.levels):
        num_requests = max(args.waves * level, args.min_requests)
        samples = [make_sample(EVAL_SEED_START + 2000 + j) for j in range(num_requests)]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for name in names:  # one untimed pass: caches warm, load_aware has seen this load
            for _ in range(args.warmup):
                run_level(engines[name], samples, params, level)
        for r in range(args.repeats):
            shift = (i + r) % len(names)  # rotate the order between levels and repeats
            for name in names[shift:] + names[:shift]:
                runs[name].append(run_level(engines[name], samples, params, level))
        for name in names:
            results[name][str(level)] = median_run(runs[name])
        row = {n: round(results[n][str(level)]["tokens_per_s"], 1) for n in names}
        print(f"concurrency {level}: tokens/s {row} (median of {args.repeats})")
    report = {
        "benchmark": "concurrency",
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "waves": args.waves,
        "min_requests": args.min_requests,
        "warmup": args.warmup,
        "machine": machine_info(device),
        "policies": results,
    }
    report["load_aware_over_best_other"] = {
        str(c): results["load_aware"][str(c)]["tokens_per_s"]
        / max(results[n][str(c)]["tokens_per_s"] for n in results if n != "load_aware")
        for c in args.levels
    }
    report["load_aware_over_best_other_paired"] = {str(c): paired_ratio(results, str(c)) for c in args.levels}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "concurrency.json").write_text(json.dumps(report, indent=1))
    write_markdown_and_plot(report, args.out / "concurrency")
    print(json.dumps(report["load_aware_over_best_other"], indent=1))


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each measure's median over ``runs``, with the per-run tokens/s kept for the record."""
    keys = ("tokens_per_s", "p50_token_ms", "p99_token_ms", "wall_s")
    out: dict[str, Any] = {k: statistics.median(run[k] for run in runs) for k in keys}
    out["tokens"] = runs[0]["tokens"]
    out["tokens_per_s_runs"] = [round(run["tokens_per_s"], 1) for run in runs]
    return out


def paired_ratio(results: dict[str, dict[str, Any]], level: str) -> float:
    """Median over rounds of load_aware's tokens/s over the best other policy's (best by median)
    in the same round; runs are stored in round order."""
    others = [n for n in results if n != "load_aware"]
    best = max(others, key=lambda n: results[n][level]["tokens_per_s"])
    mine = results["load_aware"][level]["tokens_per_s_runs"]
    theirs = results[best][level]["tokens_per_s_runs"]
    return statistics.median(a / b for a, b in zip(mine, theirs, strict=True))


def _cell(row: dict[str, Any]) -> str:
    return f"{row['tokens_per_s']:.1f} ({row['p50_token_ms']:.0f}/{row['p99_token_ms']:.0f})"


def write_markdown_and_plot(report: dict[str, Any], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = report["policies"]
    levels = list(next(iter(policies.values())))
    head = (
        "| concurrency | "
        + " | ".join(f"{p} tok/s (p50/p99 ms)" for p in policies)
        + " | load_aware / best other | paired |"
    )
    lines = [head, "| ---: |" + " ---: |" * (len(policies) + 2)]
    for c in levels:
        cells = [_cell(policies[p][c]) for p in policies]
        ratio = report["load_aware_over_best_other"][c]
        paired = report["load_aware_over_best_other_paired"][c]
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {ratio:.2f}x | {paired:.2f}x |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [int(c) for c in levels]
    for p, rows in policies.items():
        a.plot(xs, [rows[c]["tokens_per_s"] for c in levels], "o-", label=p)
        b.plot(xs, [rows[c]["p50_token_ms"] for c in levels], "o-", label=p)
    for ax, label in ((a, "tokens/s (all users)"), (b, "p50 per-token latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent users")
        ax.set_ylabel(label)
    a.legend()
    fig.suptitle("Draft policies under load, tiny models")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
