"""Edge-cloud split: the serving layouts side by side, 4 to 100 users, over a modelled link.

Layouts, each with the Engine deployment's one CPU (``deploy/local.yaml``: one torch thread):

- ``none``: the target alone, no speculation;
- ``none_2cpu``: the same with both cores (two threads): what the second core is worth to the
  target when nothing else runs on it;
- ``in_engine``: the drafter inside the engine, lockstep;
- ``per_user``: the research line's per-user baseline: the drafter pool across the link, and each
  user's tree verified in a forward of its own (no batching across users);
- ``lockstep``: the drafter pool across the link, all trees verified in one forward, the engine
  waiting for the trees every step;
- ``pipelined``: the same, with two groups of requests: one group's trees are drafted while the
  other group's are verified;
- ``proactive``: pipelined, and while a step's trees are verified with the drafter otherwise idle,
  it drafts each request's next tree after the path it rates likeliest (``scheduler.foresight``)
  where the gate finds that it pays: the shipped layout;
- ``proactive_always``: the same with every chance taken (what the guesses alone do).

Across the link the drafter pool runs in a Ray actor (1 thread: the edge) and the engine in
this process (1 thread: the cloud), each call delayed by :class:`serve.link.Link` (half the round
trip each way, a 10 % jitter, the serialized bytes over the bandwidth). Users are closed loops:
each sends its next request (its own persona, drafted with its own LoRA) as soon as its previous
one is answered. At each level the engine first answers 32 requests (8 per user below 4 users;
untimed: the policy learns the level), then the next ``--requests-per-user`` x users (at least
32, or 16 per user below 2) are
measured; the requests still running then are aborted. Every (layout, link) starts from a fresh
engine (and a fresh pool), and its levels run in increasing order. Round trips are also given in
target decode steps: the ``none`` layout's mean step time at each level.

    .venv/bin/python -m benchmarks.edge_cloud [--users 1 4 10 16 25 50 100] [--rtt 0 10 20 50 100]
        [--bandwidth 10 100] [--slow-rtt 10 50] [--per-user-rtt 0 10]
        [--layouts none none_2cpu in_engine per_user lockstep pipelined proactive proactive_always]
        [--max-tokens 48] [--requests-per-user 1]
    .venv/bin/python -m benchmarks.edge_cloud --report   # tables and plot from the last results
    .venv/bin/python -m benchmarks.edge_cloud --policy fixed --stem edge_cloud_fixed ...  # trees always

Contenders are measured in groups, one per link: ``none``, ``lockstep`` and ``pipelined`` on
every link (the lower bandwidths at the ``--slow-rtt`` round trips only), ``per_user`` beside them
at the ``--per-user-rtt`` round trips on the fastest link (it shows what batching the users'
trees buys, which the link changes little), ``none_2cpu`` and ``in_engine`` at RTT 0 on it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import harness
from benchmarks.harness import quantile
from core.plan import Completion
from core.prompt import Prompt
from core.sampling import SamplingParams
from core.verify import VerifyItem, VerifyOutcome
from models.tiny.samples import EVAL_SEED_START, make_sample
from scheduler.foresight import ProactiveGate
from serve.engine_builder import BuiltEngine, EngineOptions, build_drafter, build_engine
from serve.link import Link
from serve.remote_drafter import DrafterPoolServer, RemoteDrafter

LAYOUTS = (
    "none", "none_2cpu", "in_engine", "per_user", "lockstep", "pipelined", "proactive", "proactive_always"
)  # fmt: skip
SPLIT = ("per_user", "lockstep", "pipelined", "proactive", "proactive_always")  # the pool across the link
USERS = ("alice", "bob", "carol", "dave")  # personas and their shipped drafter LoRAs, round robin
EDGE_SEED_OFFSET = 3000
JITTER = 0.1  # of the round trip
WARMUP = 32  # untimed completions at each level (the policy learns the level meanwhile); 8 per user below 4
MIN_MEASURED = 32  # timed completions at each level, at least (16 per user below 2)


# --- the edge: the drafter pool in a Ray actor -------------------------------------------------


def adapters() -> tuple[tuple[str, Path], ...]:
    return tuple((u, harness.ADAPTERS / u) for u in USERS)


class PoolActor:
    """The DrafterPool deployment's body in a plain Ray actor: one CPU, one thread."""

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        torch.set_num_threads(1)
        tokenizer = AutoTokenizer.from_pretrained(harness.TARGET, local_files_only=True)
        options = EngineOptions(adapters=adapters(), prefix_cache=False)
        self.server = DrafterPoolServer(build_drafter(harness.DRAFTER, tokenizer, options))

    def call(self, name: str, *args: Any) -> Any:
        return getattr(self.server, name)(*args)


class ActorHandle:
    """``handle.method.remote(...).result(timeout_s)`` (a Serve handle's shape) over the actor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __getattr__(self, name: str) -> Any:
        import ray

        actor = self.actor

        class Method:
            @staticmethod
            def remote(*args: Any) -> Any:
                ref = actor.call.remote(name, *args)

                class Response:
                    @staticmethod
                    def result(timeout_s: float | None = None) -> Any:
                        return ray.get(ref, timeout=timeout_s)

                return Response()

        return Method()


class PerRequestVerifier:
    """Each request's item in a target forward of its own: speculation without batching across
    users (what one server verifying each client separately does)."""

    def __init__(self, verifier: Any) -> None:
        self.verifier = verifier

    def verify(self, items: Sequence[VerifyItem]) -> list[VerifyOutcome]:
        return [self.verifier.verify([item])[0] for item in items]


@dataclass
class Contender:
    built: BuiltEngine
    actor: Any = None  # the pool's Ray actor, killed when done


def build(layout: str, link: Link, policy: str = "load_aware", fixed_nodes: int = 4) -> Contender:
    import ray

    plain = layout.startswith("none")
    options = EngineOptions(
        policy="none" if plain else policy,
        fixed_nodes=fixed_nodes,
        adapters=() if plain else adapters(),
        pipeline=layout.startswith(("pipelined", "proactive")),
        proactive=layout.startswith("proactive"),
    )
    torch.set_num_threads(2 if layout == "none_2cpu" else 1)
    if layout not in SPLIT:
        return Contender(build_engine(harness.TARGET, None if plain else harness.DRAFTER, options))
    # contenders of a group are alive together but run one at a time: the Ray CPUs asked for
    # only have to let every pool be placed (each runs with one torch thread when it drafts)
    # threaded as a Serve replica runs its calls: a proactive call sees another one waiting
    actor = ray.remote(num_cpus=0.1, max_concurrency=4)(PoolActor).remote()
    remote = RemoteDrafter(ActorHandle(actor), link, timeout_s=30.0)
    built = build_engine(harness.TARGET, None, options, remote_drafter=remote)
    if layout == "per_user":
        built.engine.verifier = PerRequestVerifier(built.engine.verifier)
    if layout == "proactive_always":
        built.engine.gate = ProactiveGate(probe_every=0)
    return Contender(built, actor)


# --- closed-loop users --------------------------------------------------------------------------


@dataclass
class Window:
    """What one level measured."""

    completions: list[Completion]
    tokens: int  # emitted in the window by every request
    wall_s: float
    steps: int  # engine steps in the window
    bytes_up: int
    bytes_down: int
    ahead_trees: int = 0  # trees drafted ahead (proactive) in the window
    ahead_hits: int = 0  # of which verified


def run_level(built: BuiltEngine, users: int, seeds: Any, args: argparse.Namespace) -> Window:
    """``users`` closed-loop users: untimed warm-up completions, then a timed window."""
    engine, processor = built.engine, built.processor
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    owner: dict[int, int] = {}  # request -> user

    def submit(user: int) -> None:
        persona = USERS[user % len(USERS)]
        sample = make_sample(next(seeds), persona)
        prompt: Prompt = harness.prompt_of(processor, sample)
        adapter = persona if engine.drafter is not None else None
        owner[engine.add_request(prompt, params, adapter=adapter)] = user

    warmup = min(WARMUP, 8 * users)
    measured = max(args.requests_per_user * users, min(MIN_MEASURED, 16 * users))
    done: list[Completion] = []
    tokens = steps = 0
    start = 0.0
    ahead = engine.proactive_stats
    for user in range(users):
        submit(user)
    while len(done) < warmup + measured:
        outputs = engine.step()
        steps += 1
        for out in outputs:
            tokens += len(out.new_token_ids)
            if out.completion is not None:
                done.append(out.completion)
                if len(done) == warmup:
                    start, tokens, steps = time.perf_counter(), 0, 0
                    ahead = engine.proactive_stats
                submit(owner.pop(out.request_id))
    wall = time.perf_counter() - start
    ahead_trees = engine.proactive_stats.trees - ahead.trees
    ahead_hits = engine.proactive_stats.hits - ahead.hits
    for rid in list(owner):  # the requests still running: not counted
        engine.abort(rid)
    while engine.has_unfinished() or engine._flights:
        engine.step()
    window = done[warmup:]
    return Window(
        window,
        tokens,
        wall,
        steps,
        sum(c.stats.link_bytes_up for c in window),
        sum(c.stats.link_bytes_down for c in window),
        ahead_trees,
        ahead_hits,
    )


def summary(window: Window) -> dict[str, Any]:
    cs = window.completions
    ttft = [1000 * c.ttft_s for c in cs]
    e2e = [1000 * c.time_s for c in cs]
    tpot = [
        1000 * (c.time_s - c.ttft_s) / (c.stats.output_tokens - 1) for c in cs if c.stats.output_tokens > 1
    ]
    verify_steps = sum(c.stats.verify_steps for c in cs)
    return {
        "requests": len(cs),
        "wall_s": window.wall_s,
        "requests_per_s": len(cs) / window.wall_s,
        "tokens_per_s": window.tokens / window.wall_s,
        "step_ms": 1000 * window.wall_s / max(window.steps, 1),
        "ttft_ms": statistics.mean(ttft),
        "ttft_p99_ms": quantile(ttft, 0.99),
        "tpot_ms": statistics.mean(tpot),
        "tpot_p99_ms": quantile(tpot, 0.99),
        "e2e_ms": statistics.mean(e2e),
        "e2e_p99_ms": quantile(e2e, 0.99),
        "bytes_up_per_request": window.bytes_up / len(cs),
        "bytes_down_per_request": window.bytes_down / len(cs),
        "tau": sum(c.stats.output_tokens for c in cs) / verify_steps if verify_steps else 0.0,
        "ahead_trees": window.ahead_trees,
        "ahead_hits": window.ahead_hits,
    }


def key(layout: str, rtt: float, bandwidth: float) -> str:
    """A contender's name: its layout and the link of the group it was measured in (the link
    is unused by the layouts in one process)."""
    return f"{layout}@{rtt:g}ms/{bandwidth:g}Mbps"


def groups(args: argparse.Namespace) -> list[tuple[float, float, list[str]]]:
    """(rtt, bandwidth, layouts) measured side by side: every link with ``none``, ``lockstep``
    and ``pipelined``; ``per_user`` at its round trips on the fastest link; the layouts in one
    process at RTT 0 on the fastest link."""
    fast = max(args.bandwidth)
    out = []
    for rtt in args.rtt:
        for bw in args.bandwidth:
            if bw != fast and rtt not in args.slow_rtt:
                continue
            names = ["none", "lockstep", "pipelined", "proactive", "proactive_always"]
            if bw == fast and rtt in args.per_user_rtt:
                names.append("per_user")
            if bw == fast and rtt == 0:
                names += ["none_2cpu", "in_engine"]
            out.append((rtt, bw, [n for n in names if n in args.layouts]))
    return out


def measure_group(
    rtt: float, bandwidth: float, layouts: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Fresh contenders for one link; at each level (increasing) they run one after another in
    a rotating order, on the same prompts, so each is compared with the others seconds apart."""
    import ray

    link = Link(rtt_ms=rtt, jitter_ms=JITTER * rtt, bandwidth_mbps=bandwidth)
    contenders = {name: build(name, link, args.policy, args.fixed_nodes) for name in layouts}
    start = EVAL_SEED_START + EDGE_SEED_OFFSET
    seeds = {name: iter(range(start, start + 10**6)) for name in layouts}
    levels: dict[str, dict[str, Any]] = {name: {} for name in layouts}
    try:
        for i, users in enumerate(args.users):
            for name in harness.rotated(layouts, i):
                levels[name][str(users)] = summary(
                    run_level(contenders[name].built, users, seeds[name], args)
                )
            line = ", ".join(f"{n} {levels[n][str(users)]['tokens_per_s']:.0f}" for n in layouts)
            print(f"  {rtt:g} ms {bandwidth:g} Mbps, {users} users, tok/s: {line}", flush=True)
    finally:
        for contender in contenders.values():
            if contender.actor is not None:
                ray.kill(contender.actor)
    return {
        key(name, rtt, bandwidth): {
            "layout": name,
            "rtt_ms": rtt,
            "bandwidth_mbps": bandwidth,
            "levels": levels[name],
        }
        for name in layouts
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs: dict[str, Any] = {}
    partial = args.out / f"{args.stem}.partial.json"
    try:
        for rtt, bandwidth, layouts in groups(args):
            runs.update(measure_group(rtt, bandwidth, layouts, args))
            partial.write_text(json.dumps(runs))
    finally:
        ray.shutdown()
    return {
        "machine": harness.machine_info(),
        "users": list(args.users),
        "rtt_ms": list(args.rtt),
        "bandwidth_mbps": list(args.bandwidth),
        "max_tokens": args.max_tokens,
        "requests_per_user": args.requests_per_user,
        "policy": args.policy,
        "runs": runs,
    }


# --- the report ---------------------------------------------------------------------------------


def level(result: dict[str, Any], name: str, users: int) -> dict[str, Any] | None:
    run = result["runs"].get(name)
    return None if run is None else run["levels"].get(str(users))


def ratio(result: dict[str, Any], mine: str, theirs: str, users: int) -> float | None:
    a, b = level(result, mine, users), level(result, theirs, users)
    return None if a is None or b is None else a["tokens_per_s"] / b["tokens_per_s"]


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def goals(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) per goal of the edge-cloud issue; None where not measured."""
    users, fast = result["users"], max(result["bandwidth_mbps"])
    out: list[tuple[str, str, bool | None]] = []
    pipe10, lock10 = key("pipelined", 10, fast), key("lockstep", 10, fast)
    a, b = ratio(result, pipe10, lock10, 4), ratio(result, pipe10, key("none", 10, fast), 4)
    met = None if a is None or b is None else a >= 1.3 and b >= 1.1
    out.append(("RTT 10 ms, 4 users: pipelined >= 1.3x lockstep and >= 1.1x none",
                f"{fmt(a)}x lockstep, {fmt(b)}x none", met))  # fmt: skip
    worst: tuple[float, str] | None = None
    for name, run in result["runs"].items():
        if run["layout"] != "pipelined":
            continue
        for u in users:
            r = ratio(result, name, key("none", run["rtt_ms"], run["bandwidth_mbps"]), u)
            if r is not None and (worst is None or r < worst[0]):
                worst = (r, f"{name}, {u} users")
    out.append(("any RTT, any load: pipelined >= 0.95x none",
                "-" if worst is None else f"lowest {worst[0]:.2f}x ({worst[1]})",
                None if worst is None else worst[0] >= 0.95))  # fmt: skip
    r16 = ratio(result, key("pipelined", 0, fast), key("in_engine", 0, fast), 16)
    out.append(
        (
            "RTT 0, 16 users: pipelined >= drafter in the engine",
            f"{fmt(r16)}x",
            None if r16 is None else r16 >= 1.0,
        )
    )
    batched = [
        (u, ratio(result, key("pipelined", 0, fast), key("per_user", 0, fast), u)) for u in users if u >= 25
    ]
    measured = [(u, r) for u, r in batched if r is not None]
    out.append(("batched verification >= 1.5x per-user speculation, 25 users and more",
                ", ".join(f"{u} users {r:.2f}x" for u, r in measured) or "-",
                None if not measured else all(r >= 1.5 for _, r in measured)))  # fmt: skip
    r1 = ratio(result, key("proactive", 0, fast), key("lockstep", 0, fast), 1)
    lv = level(result, key("proactive", 0, fast), 1)
    hits = ""
    if lv and lv.get("ahead_trees"):
        hits = f" ({lv['ahead_hits']} of {lv['ahead_trees']} guesses used)"
    out.append(("single user, RTT 0: proactive drafting >= 1.15x lockstep", f"{fmt(r1)}x{hits}",
                None if r1 is None else r1 >= 1.15))  # fmt: skip
    return out


def against(other: str, result: dict[str, Any], bandwidth: float) -> harness.Panel:
    """Pipelined tokens/s over ``other``'s beside it, by round trip, a line per load."""
    rtts = result["rtt_ms"]
    series = [
        harness.Series(
            f"{u} users",
            rtts,
            [ratio(result, key("pipelined", r, bandwidth), key(other, r, bandwidth), u) for r in rtts],
        )
        for u in result["users"]
    ]
    return harness.Panel(f"pipelined / {other}, {bandwidth:g} Mbps", "RTT ms", "tokens/s ratio", series)


def report(result: dict[str, Any]) -> harness.Report:
    users, fast, slow = result["users"], max(result["bandwidth_mbps"]), min(result["bandwidth_mbps"])
    rtts = result["rtt_ms"]
    none_step = {u: (level(result, key("none", 0, fast), u) or {}).get("step_ms") for u in users}
    at0 = [key(n, 0, fast) for n in LAYOUTS if key(n, 0, fast) in result["runs"]]
    rows = []
    for u in users:
        for name in at0:
            lv = level(result, name, u)
            if lv is None:
                continue
            rows.append(
                [
                    u,
                    result["runs"][name]["layout"],
                    f"{lv['requests_per_s']:.2f}",
                    f"{lv['tokens_per_s']:.0f}",
                ]
                + [f"{lv[m + '_ms']:.1f} / {lv[m + '_p99_ms']:.1f}" for m in ("ttft", "tpot", "e2e")]
                + [
                    f"{lv['tau']:.2f}",
                    f"{lv['bytes_up_per_request'] / 1e3:.1f} / {lv['bytes_down_per_request'] / 1e3:.1f}",
                ]
            )
    layouts = harness.Table(
        ["users", "layout", "req/s", "tok/s", "TTFT mean / p99 ms", "TPOT mean / p99 ms", "E2E mean / p99 ms",
         "tau", "kB up / down per request"], rows)  # fmt: skip

    def sweep(bandwidth: float) -> harness.Table:
        header = ["RTT ms (target steps at 4 / 16 users)"] + [f"{u} users" for u in users]
        body = []
        for rtt in rtts:
            steps = [fmt(rtt / none_step[u], ".1f") if none_step.get(u) else "-" for u in (4, 16)]
            cells = []
            for u in users:
                pipe, lock = key("pipelined", rtt, bandwidth), key("lockstep", rtt, bandwidth)
                lv = level(result, pipe, u)
                none = key("none", rtt, bandwidth)
                cells.append("-" if lv is None else f"{fmt(ratio(result, pipe, none, u))} / "
                             f"{fmt(ratio(result, pipe, lock, u))} (tau {lv['tau']:.2f})")  # fmt: skip
            if any(c != "-" for c in cells):
                body.append([f"{rtt:g} ({' / '.join(steps)})", *cells])
        return harness.Table(header, body)

    policy = result.get("policy", "load_aware")
    blocks: list[str | harness.Table] = [
        f"Closed-loop users, {result['max_tokens']} tokens per answer, policy {policy}, machine: "
        f"{result['machine']['cpu_model']} ({result['machine']['cpu_count']} cores).",
    ]
    if policy == "load_aware":  # the goals are the served policy's
        verdicts = [[g, m, {True: "yes", False: "no", None: "-"}[ok]] for g, m, ok in goals(result)]
        blocks += ["Goals:", harness.Table(["goal", "measured", "met"], verdicts)]
    blocks += [
        f"Every layout at RTT 0 ({fast:g} Mbps for the split ones):",
        layouts,
        f"Pipelined split over the link, {fast:g} Mbps: tokens/s against none / against lockstep (its tau):",
        sweep(fast),
    ]
    if slow != fast:
        blocks += [f"The same at {slow:g} Mbps:", sweep(slow)]
    panels = [
        harness.Panel(
            "RTT 0: throughput by layout",
            "users",
            "output tokens/s",
            [
                harness.Series(
                    result["runs"][n]["layout"],
                    users,
                    [(level(result, n, u) or {}).get("tokens_per_s") for u in users],
                )
                for n in at0
            ],
            xscale="log",
        ),
        against("none", result, fast),
        against("lockstep", result, fast),
    ]
    return harness.Report(blocks, harness.Plot(panels, "Edge-cloud split"))


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--users", type=int, nargs="+", default=[1, 4, 10, 16, 25, 50, 100])
    p.add_argument("--rtt", type=float, nargs="+", default=[0, 10, 20, 50, 100], help="round trips, ms")
    p.add_argument("--bandwidth", type=float, nargs="+", default=[10, 100], help="Mbps each way")
    p.add_argument("--per-user-rtt", type=float, nargs="+", default=[0, 10])
    p.add_argument(
        "--slow-rtt", type=float, nargs="+", default=[10, 50], help="round trips run at the lower bandwidths"
    )
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--report", action="store_true", help="only redraw the report from --out/<stem>.json")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--requests-per-user", type=int, default=1, help="timed requests per user and level")
    p.add_argument("--stem", default="edge_cloud", help="file name of the results in --out")
    p.add_argument("--policy", default="load_aware", help="draft policy of the layouts that draft")
    p.add_argument("--fixed-nodes", type=int, default=4, help="the fixed policy's chain length")
    args = p.parse_args()
    stem = args.out / args.stem
    if args.report:
        result = json.loads(stem.with_suffix(".json").read_text())
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        result = measure(args)
    harness.write_report(stem, result, report(result))


if __name__ == "__main__":
    main()
