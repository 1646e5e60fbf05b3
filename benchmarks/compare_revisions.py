"""This working tree against another git revision, side by side in one run.

A detached ``git worktree`` of ``--baseline`` is made in a temporary folder (removed at the end).
Every (tree, contender) pair gets its own long-lived worker process: this tree's
``benchmarks/engine_loops.py`` run with ``python -P``, its working directory and ``PYTHONPATH``
set to its tree, so that it imports that tree's code (and only the public API both trees have).
Workers answer JSON lines; one runs at a time. Both trees load the same checkpoint files (this
tree's) and get the same prompts (built here, images sent as PNG), so only the code differs.

- ``concurrency``: per level C, a closed loop keeps C requests in flight (``benchmarks.concurrency``'s
  loop and prompts), contenders ``--policies``. Each level starts from a fresh engine in every
  worker, built when the level starts, then ``--warmup`` untimed passes at that level.
- ``single_user``: ``--prompts`` prompts answered one after another (``benchmarks.spec_decode``'s
  prompts), contenders ``ours_spec`` (load_aware with the drafter; bob's adapter in ``--mode long``)
  and ``ours_no_spec``; engines built once, then ``--warmup`` untimed passes.

Timed passes are interleaved: each of ``--repeats`` rounds runs every worker once, in an order that
rotates between rounds. Reported per (tree, contender, level): median tokens/s; working / baseline
as the ratio of medians and as the median of per-round paired ratios. Greedy tokens must be the
same in both trees for each contender and request: a difference is printed loudly, recorded in
the JSON (``token_mismatches``), and the exit status is 1.

    .venv/bin/python -m benchmarks.compare_revisions --baseline 8fa6e1e --workload concurrency \\
        --levels 1 2 4 8 16 32 --repeats 5
    .venv/bin/python -m benchmarks.compare_revisions --baseline 8fa6e1e --workload single_user \\
        --mode long --prompts 20 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from benchmarks import harness
from benchmarks.engine_loops import POLICIES, image_to_text
from models.device import resolve_device

WORKER = Path(__file__).with_name("engine_loops.py")
TREES = ("baseline", "working")
MAX_MISMATCHES_KEPT = 20  # token mismatches listed in the JSON; all are counted
SETTINGS = {  # the arguments a result records, by workload
    "all": ("device", "repeats", "warmup", "max_tokens"),
    "concurrency": ("levels", "policies", "waves", "min_requests"),
    "single_user": ("mode", "prompts"),
}


@dataclass(frozen=True)
class Tree:
    label: str  # baseline | working
    root: Path
    commit: str  # short hash; the working tree's is its HEAD
    uncommitted_changes: bool


@dataclass(frozen=True)
class Contender:
    name: str
    options: dict[str, Any]  # EngineOptions fields (adapters as [name, folder] pairs)
    drafter: bool
    adapter: str | None = None  # drafter LoRA each request is drafted with


class Worker:
    """One (tree, contender) process running :data:`WORKER` on that tree's code."""

    def __init__(self, tree: Tree, contender: Contender) -> None:
        self.name, self.root = f"{tree.label}/{contender.name}", tree.root.resolve()
        path = os.pathsep.join([str(tree.root), *filter(None, [os.environ.get("PYTHONPATH")])])
        env = {"TRANSFORMERS_VERBOSITY": "error", **os.environ, "PYTHONPATH": path}
        self.proc = subprocess.Popen(
            [sys.executable, "-P", str(WORKER)], cwd=tree.root, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        stdin, stdout = self._pipes()
        stdin.write(json.dumps({"op": op, **fields}) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(
                f"worker {self.name} exited ({self.proc.wait()}) during {op}; its traceback is above"
            )
        return json.loads(line)

    def close(self) -> None:
        stdin, _ = self._pipes()
        try:
            stdin.write(json.dumps({"op": "quit"}) + "\n")
            stdin.close()
        except BrokenPipeError:  # it has exited already (a failed request)
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        return self.proc.stdin, self.proc.stdout


Pool = dict[str, tuple[Worker, Contender]]  # by "tree/contender"
Runs = dict[str, list[dict[str, Any]]]  # each worker's timed runs, in round order


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=harness.ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


@contextmanager
def baseline_tree(revision: str) -> Iterator[Tree]:
    """A detached worktree of ``revision`` in a temporary folder, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="compare_revisions_"))
    path = folder / "baseline"
    git("worktree", "add", "--detach", str(path), revision)
    try:
        yield Tree("baseline", path, git("rev-parse", "--short", revision), False)
    finally:
        git("worktree", "remove", "--force", str(path))
        shutil.rmtree(folder, ignore_errors=True)


def working_tree() -> Tree:
    return Tree(
        "working", harness.ROOT, git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain"))
    )


@contextmanager
def workers(trees: list[Tree], contenders: list[Contender]) -> Iterator[Pool]:
    """Workers by "tree/contender" name, closed afterwards."""
    started = {}
    try:
        for tree in trees:
            for c in contenders:
                w = Worker(tree, c)
                started[w.name] = (w, c)
        yield started
    finally:
        for w, _ in started.values():
            w.close()


def contenders(args: argparse.Namespace) -> list[Contender]:
    base = {"prefix_cache": False, "device": args.device}  # each pass computes its prompts
    if args.workload == "concurrency":
        return [Contender(p, {**POLICIES[p], **base}, drafter=p != "none") for p in args.policies]
    adapter = harness.LONG_USER if args.mode == "long" else None
    adapters = [[adapter, str(harness.ADAPTERS / adapter)]] if adapter else []
    return [
        Contender("ours_spec", {"policy": "load_aware", "adapters": adapters, **base}, True, adapter),
        Contender("ours_no_spec", {"policy": "none", **base}, drafter=False),
    ]


def build(w: Worker, c: Contender, samples: list[Any]) -> None:
    """A fresh engine in ``w`` for ``c``, with ``samples`` as its prompts."""
    drafter = str(harness.DRAFTER) if c.drafter else None
    code_root = Path(
        w.call("build", target=str(harness.TARGET), drafter=drafter, options=c.options)["code_root"]
    )
    if code_root != w.root:
        raise RuntimeError(
            f"worker {w.name} runs the code in {code_root}, not {w.root}: PYTHONPATH did not win"
        )
    payload = [
        {"text": s.question.text, "system": s.system, "image": image_to_text(s.image())} for s in samples
    ]
    w.call("load", samples=payload)


def measure(pool: Pool, requests: dict[str, dict[str, Any]], warmup: int, repeats: int, shift: int) -> Runs:
    """``warmup`` untimed passes of every worker, then ``repeats`` rounds that run every worker
    once, in an order rotated by ``shift`` + the round; ``requests`` by contender name."""
    for w, c in pool.values():
        for _ in range(warmup):
            w.call(**requests[c.name])
    runs: Runs = {name: [] for name in pool}
    for r in range(repeats):
        for name in harness.rotated(list(pool), shift + r):
            w, c = pool[name]
            runs[name].append(w.call(**requests[c.name]))
    return runs


def run_concurrency(args: argparse.Namespace, pool: Pool) -> dict[str, Runs]:
    """Runs by level; every level on fresh engines, so nothing a lighter level taught carries over."""
    groups = {}
    for i, level in enumerate(args.levels):
        n = max(args.waves * level, args.min_requests)
        samples = harness.eval_samples(harness.CONCURRENCY_SEED_OFFSET, n)
        for w, c in pool.values():
            build(w, c, samples)
        request = {
            "op": "closed_loop",
            "concurrency": level,
            "max_tokens": args.max_tokens,
            "ignore_eos": True,
        }
        runs = measure(pool, {c.name: request for _, c in pool.values()}, args.warmup, args.repeats, i)
        speeds = {
            name: round(statistics.median(r["tokens_per_s"] for r in rs), 1) for name, rs in runs.items()
        }
        print(f"level {level}: tokens/s {speeds}", flush=True)
        groups[str(level)] = runs
    return groups


def run_single_user(args: argparse.Namespace, pool: Pool) -> dict[str, Runs]:
    """One group, ``single_user``: engines built once, every prompt answered alone."""
    samples = harness.single_user_samples(args.mode, args.prompts)
    for w, c in pool.values():
        build(w, c, samples)
    request = {"op": "answer_each", "max_tokens": args.max_tokens, "ignore_eos": args.mode == "forced"}
    requests = {c.name: {**request, "adapter": c.adapter} for _, c in pool.values()}
    return {"single_user": measure(pool, requests, args.warmup, args.repeats, 0)}


WORKLOADS: dict[str, Callable[[argparse.Namespace, Pool], dict[str, Runs]]] = {
    "concurrency": run_concurrency,
    "single_user": run_single_user,
}


def token_mismatches(
    group: str, contender: str, base: list[dict[str, Any]], work: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every (round, request) whose tokens differ between the trees."""
    found = []
    for r, (b, w) in enumerate(zip(base, work, strict=True)):
        for i, (x, y) in enumerate(zip(b["outputs"], w["outputs"], strict=True)):
            if x != y:
                first = next(
                    (j for j, (s, t) in enumerate(zip(x, y, strict=False)) if s != t), min(len(x), len(y))
                )
                found.append(
                    {
                        "group": group,
                        "contender": contender,
                        "round": r,
                        "request": i,
                        "baseline_tokens": len(x),
                        "working_tokens": len(y),
                        "first_difference_at": first,
                    }
                )
    return found


def summarize(groups: dict[str, Runs], names: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per group and contender: each tree's medians, working / baseline, same tokens; and all mismatches."""
    results: dict[str, Any] = {}
    mismatches: list[dict[str, Any]] = []
    for group, runs in groups.items():
        results[group] = {}
        for c in names:
            base, work = runs[f"baseline/{c}"], runs[f"working/{c}"]
            found = token_mismatches(group, c, base, work)
            mismatches += found
            row: dict[str, Any] = {"baseline": harness.medians(base), "working": harness.medians(work)}
            row["working_over_baseline"] = row["working"]["tokens_per_s"] / row["baseline"]["tokens_per_s"]
            row["working_over_baseline_paired"] = harness.paired_median(
                [r["tokens_per_s"] for r in work], [r["tokens_per_s"] for r in base]
            )
            row["same_tokens"] = not found
            results[group][c] = row
    return results, mismatches


def parse_args() -> argparse.Namespace:
    p = harness.parser(__doc__, repeats=3, device=True)
    p.add_argument(
        "--baseline", required=True, help="the git revision to compare against (commit, tag, branch)"
    )
    p.add_argument("--workload", choices=list(WORKLOADS), required=True)
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed passes per worker (per level for concurrency)"
    )
    p.add_argument(
        "--max-tokens", type=int, help="default: 48 (concurrency), 128 (single_user long), else 64"
    )
    p.add_argument("--levels", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32], help="concurrency levels")
    p.add_argument("--policies", nargs="*", choices=list(POLICIES), default=["load_aware", "none"])
    p.add_argument("--waves", type=int, default=4, help="concurrency: requests per level = waves x level")
    p.add_argument("--min-requests", type=int, default=16, help="concurrency: at least this many per level")
    p.add_argument(
        "--mode", choices=("natural", "forced", "long"), default="long", help="single_user prompts"
    )
    p.add_argument("--prompts", type=int, default=20, help="single_user prompts")
    args = p.parse_args()
    if args.max_tokens is None:
        args.max_tokens = 48 if args.workload == "concurrency" else 128 if args.mode == "long" else 64
    args.device = str(resolve_device(args.device))
    return args


def main() -> None:
    args = parse_args()
    cs, working = contenders(args), working_tree()
    with baseline_tree(args.baseline) as baseline, workers([baseline, working], cs) as pool:
        groups = WORKLOADS[args.workload](args, pool)
    results, mismatches = summarize(groups, [c.name for c in cs])
    settings = {k: getattr(args, k) for k in (*SETTINGS["all"], *SETTINGS[args.workload])}
    result = {
        "benchmark": "compare_revisions",
        "workload": args.workload,
        "baseline": {"revision": args.baseline, "commit": baseline.commit},
        "working": {"commit": working.commit, "uncommitted_changes": working.uncommitted_changes},
        "settings": settings,
        "machine": harness.machine_info(args.device),
        "results": results,
        "tokens_identical": not mismatches,
        "token_mismatch_count": len(mismatches),
        "token_mismatches": mismatches[:MAX_MISMATCHES_KEPT],
    }
    stem = args.out / f"compare_{args.workload}"
    rendered = report(result)
    harness.write_report(stem, result, rendered)
    print(rendered.markdown())
    if mismatches:
        print(
            f"\n!!! ERROR: {len(mismatches)} outputs differ between baseline {baseline.commit} and the "
            f"working tree (greedy decoding must give the same tokens); see token_mismatches in "
            f"{stem}.json !!!\n",
            file=sys.stderr,
        )
        sys.exit(1)


def report(result: dict[str, Any]) -> harness.Report:
    base, work, settings = result["baseline"], result["working"], result["settings"]
    changes = " + uncommitted changes" if work["uncommitted_changes"] else ""
    machine = result["machine"]
    where = machine.get("gpu") or f"{machine['cpu_model']} ({machine['cpu_count']} cores)"
    single = result["workload"] == "single_user"
    what = (
        f"{settings['prompts']} prompts answered one after another, mode `{settings['mode']}`"
        if single
        else "a closed loop at each concurrency level on fresh engines, policies "
        + ", ".join(settings["policies"])
    )
    intro = (
        f"Working tree ({work['commit']}{changes}) against baseline `{base['revision']}` ({base['commit']}): "
        f"{what}; max {settings['max_tokens']} new tokens, {settings['warmup']} untimed pass(es), then "
        f"medians of {settings['repeats']} interleaved rounds; on {where}."
    )
    rows = [
        ((group, c), row)
        for group, by_contender in result["results"].items()
        for c, row in by_contender.items()
    ]
    columns: dict[str, harness.Cell] = {} if single else {"level": lambda key, _: key[0]}
    columns |= {
        "contender": lambda key, _: key[1],
        f"baseline {base['commit']} tok/s": "{baseline[tokens_per_s]:.1f}",
        f"working {work['commit']} tok/s": "{working[tokens_per_s]:.1f}",
        "working / baseline": "{working_over_baseline:.3f}x",
        "paired": "{working_over_baseline_paired:.3f}x",
    }
    if single:
        columns["tau baseline / working"] = "{baseline[tau]:.2f} / {working[tau]:.2f}"
    columns["same tokens"] = lambda _, row: "yes" if row["same_tokens"] else "**NO**"
    align = ("l" if single else "rl") + "r" * 4 + ("r" if single else "") + "c"
    blocks: list[str | harness.Table] = [intro, harness.Table.of(rows, columns, align)]
    if not result["tokens_identical"]:
        blocks.append(f"**ERROR: {result['token_mismatch_count']} outputs differ between the trees.**")
    return harness.Report(blocks, single_user_plot(result) if single else concurrency_plot(result))


def concurrency_plot(result: dict[str, Any]) -> harness.Plot:
    levels = list(result["results"])
    xs = [int(c) for c in levels]
    names = list(result["results"][levels[0]])
    speed, ratio = [], []
    for i, c in enumerate(names):
        for tree, style in (("baseline", "s--"), ("working", "o-")):
            ys = [result["results"][g][c][tree]["tokens_per_s"] for g in levels]
            speed.append(harness.Series(f"{c}, {tree} {result[tree]['commit']}", xs, ys, style, f"C{i}"))
        ys = [result["results"][g][c]["working_over_baseline_paired"] for g in levels]
        ratio.append(harness.Series(f"{c} (paired)", xs, ys, "o-", f"C{i}"))
    ratio.append(harness.Series("equal", xs, [1.0] * len(xs), ":", "grey"))
    return harness.Plot(
        [
            harness.Panel("Throughput", "concurrent users", "tokens/s (all users)", speed, xscale="log2"),
            harness.Panel(
                "Working tree / baseline", "concurrent users", "tokens/s ratio", ratio, xscale="log2"
            ),
        ],
        title="Working tree against the baseline revision, tiny models",
    )


def single_user_plot(result: dict[str, Any]) -> harness.Plot:
    rows = result["results"]["single_user"]
    names = list(rows)
    bars = [
        harness.Series(
            f"{tree} {result[tree]['commit']}",
            names,
            [rows[c][tree]["tokens_per_s"] for c in names],
            texts=[f"tau {rows[c][tree]['tau']:.2f}" for c in names],
        )
        for tree in TREES
    ]
    panel = harness.Panel("Single user, working tree against the baseline", "", "tokens/s", bars, kind="bar")
    return harness.Plot([panel], panel_size=(7, 4))


if __name__ == "__main__":
    main()
