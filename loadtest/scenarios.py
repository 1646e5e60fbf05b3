"""Reliability scenarios against a live ``covspec serve``, each printing what held, with numbers.

    .venv/bin/python -m loadtest.scenarios fairness|overload|kill-engine|kill-drafter|redis|fuzz|soak
    .venv/bin/python -m loadtest.scenarios chaos      # every short one in turn (``make chaos``)

Each starts its own ``covspec serve`` from ``deploy/local.yaml`` and stops it after. The fault
scenarios are described in ``loadtest/faults.py``, fuzzing in ``loadtest/fuzz.py``, the soak in
``loadtest/soak.py``; the exit code is 1 when a check did not hold.

``fairness``: one tenant floods the server with ``--flood`` concurrent requests for
``--seconds`` while a quiet tenant sends 2 at a time; before that, the quiet tenant runs alone
for a third as long. Held when no quiet request is refused and its median latency under the
flood stays within 3x its median alone. Every flood response must be a 200, or a 429 / 503 with
``Retry-After``.

``overload``: the four demo tenants stream answers with as many clients in all as the gateway
admits (``max_in_flight``: its capacity), then twice and five times that, a third of
``--seconds`` each. Held when every response is a 200 or a 429 / 503 with ``Retry-After``, the
server's memory (the resident size of ``covspec serve`` and every process under it) grows less
than 10 % from capacity to five times it, and the admitted requests' P99 time to first token at
five times capacity stays within 3x its value at capacity.

Results go to ``loadtest/results/<scenario>.json`` (the soak's plot to ``soak.png``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.clients import DEMO_KEYS, Load, Tally, run_tenants
from loadtest.faults import kill_drafter, kill_engine, redis
from loadtest.fuzz import fuzz
from loadtest.service import ROOT, Service, shipped_args, start_service, stop_service
from loadtest.soak import soak
from serve.local_redis import free_port

RESULTS = ROOT / "loadtest" / "results"
QUIET, FLOODER = DEMO_KEYS["alice"], DEMO_KEYS["bob"]
LATENCY_RATIO = 3.0  # the quiet tenant's median under the flood, against its median alone


def fairness(service: Service, args: argparse.Namespace) -> dict[str, Any]:
    url, quiet = service.url, Load(QUIET, "alice", 2)
    alone = asyncio.run(run_tenants(url, {"quiet": quiet}, args.seconds / 3))["quiet"]
    loads = {"quiet": quiet, "flooder": Load(FLOODER, "bob", args.flood)}
    flood = asyncio.run(run_tenants(url, loads, args.seconds))
    alone_s, under_s = alone.summary()["median_s"], flood["quiet"].summary()["median_s"]
    ratio = under_s / alone_s if alone_s and under_s else None
    refused = sum(v for k, v in flood["quiet"].statuses.items() if k != 200)
    odd = {k: v for k, v in flood["flooder"].statuses.items() if k not in (200, 429, 503)}
    checks = {
        "no quiet request refused": (refused == 0, f"{refused} refused"),
        f"quiet median within {LATENCY_RATIO:g}x alone": (
            ratio is not None and ratio <= LATENCY_RATIO,
            f"{1000 * (under_s or 0):.0f} ms vs {1000 * (alone_s or 0):.0f} ms alone ({ratio or 0:.1f}x)",
        ),
        "flood answered 200 / 429 / 503 only, with Retry-After": (
            not odd and not flood["flooder"].missing_retry_after and not flood["flooder"].errors,
            f"other statuses {odd or 'none'}, {flood['flooder'].missing_retry_after} without Retry-After, "
            f"{sum(flood['flooder'].errors.values())} without an answer",
        ),
    }
    return {
        "flood": args.flood,
        "seconds": args.seconds,
        "alone": alone.summary(),
        "quiet": flood["quiet"].summary(),
        "flooder": flood["flooder"].summary(),
        "checks": {name: {"held": held, "measured": text} for name, (held, text) in checks.items()},
    }


def overload(service: Service, args: argparse.Namespace) -> dict[str, Any]:
    levels: dict[str, Any] = {}
    for name, factor in (("capacity", 1), ("2x", 2), ("5x", 5)):
        capacity = int(shipped_args()["max_in_flight"])  # the gateway's
        per_tenant = factor * capacity // len(DEMO_KEYS)
        loads = {user: Load(key, user, per_tenant, stream=True) for user, key in DEMO_KEYS.items()}
        tallies = asyncio.run(run_tenants(service.url, loads, args.seconds / 3))
        everyone = Tally()
        for t in tallies.values():
            everyone.merge(t)
        levels[name] = {"clients": factor * capacity, **everyone.summary(), "rss_mb": service.rss_mb()}
    odd = {
        name: {k: v for k, v in lv["statuses"].items() if k not in ("200", "429", "503")}
        for name, lv in levels.items()
    }
    unanswered = sum(sum(lv["errors"].values()) + lv["missing_retry_after"] for lv in levels.values())
    growth = levels["5x"]["rss_mb"] / levels["capacity"]["rss_mb"] - 1
    ttft_cap, ttft_5x = levels["capacity"]["ttft_p99_s"], levels["5x"]["ttft_p99_s"]
    ttft_ratio = ttft_5x / ttft_cap if ttft_cap and ttft_5x else None
    checks = {
        "every answer a 200, or a 429 / 503 with Retry-After": (
            not any(odd.values()) and not unanswered,
            f"other statuses {({k: v for k, v in odd.items() if v}) or 'none'}; {unanswered} unanswered or "
            "without Retry-After",
        ),
        "memory grows < 10 % from capacity to 5x": (
            growth < 0.10,
            f"{levels['capacity']['rss_mb']:.0f} MB -> {levels['5x']['rss_mb']:.0f} MB "
            f"({100 * growth:+.1f} %)",
        ),
        "admitted requests' P99 TTFT at 5x within 3x capacity's": (
            ttft_ratio is not None and ttft_ratio <= 3,
            f"{1000 * (ttft_5x or 0):.0f} ms vs {1000 * (ttft_cap or 0):.0f} ms ({ttft_ratio or 0:.2f}x)",
        ),
    }
    return {
        "seconds_per_level": args.seconds / 3,
        "levels": levels,
        "checks": {name: {"held": held, "measured": text} for name, (held, text) in checks.items()},
    }


@dataclass(frozen=True)
class Scenario:
    run: Callable[[Service, argparse.Namespace], dict[str, Any]]
    seconds: float  # how long it runs unless --seconds says otherwise
    short: bool  # one of ``make chaos``'s


SCENARIOS: dict[str, Scenario] = {
    "fairness": Scenario(fairness, 60, short=True),
    "overload": Scenario(overload, 90, short=True),
    "kill-engine": Scenario(kill_engine, 90, short=True),
    "kill-drafter": Scenario(kill_drafter, 60, short=True),
    "redis": Scenario(redis, 60, short=True),
    "fuzz": Scenario(fuzz, 0, short=True),
    "soak": Scenario(soak, 1200, short=False),
}


def print_table(name: str, result: dict[str, Any]) -> None:
    print(f"\n{name}")
    print("| check | measured | held |\n| --- | --- | --- |")
    for check, row in result["checks"].items():
        print(f"| {check} | {row['measured']} | {'yes' if row['held'] else 'no'} |")
    for label in ("alone", "quiet", "flooder", "before", "in_flight", "after"):
        if label in result:
            print(f"{label}: {json.dumps(result[label])}")
    for group in ("levels", "phases"):
        for level, row in result.get(group, {}).items():
            print(f"{level}: {json.dumps(row)}")


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``name`` against a fresh ``covspec serve`` (a scenario may kill part of it); its result
    goes to ``<out>/<name>.json`` and its table to stdout."""
    scenario = SCENARIOS[name]
    args = argparse.Namespace(**{**vars(args), "seconds": args.seconds or scenario.seconds})
    port = free_port()
    proc = start_service({}, port)
    try:
        result = scenario.run(Service(f"http://127.0.0.1:{port}/v1/chat/completions", proc.pid), args)
    finally:
        stop_service(proc)
    result["config"] = "deploy/local.yaml"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(name, result)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=[*sorted(SCENARIOS), "chaos"], help="chaos: every short one in turn")
    p.add_argument(
        "--seconds", type=float, default=None, help="how long the load lasts (default: the scenario's)"
    )
    p.add_argument(
        "--flood", type=int, default=200, help="fairness: the flooding tenant's concurrent requests"
    )
    p.add_argument("--examples", type=int, default=3000, help="fuzz: generated bodies")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    names = [n for n, s in SCENARIOS.items() if s.short] if args.scenario == "chaos" else [args.scenario]
    results = {name: run(name, args) for name in names}
    if len(names) > 1:
        print("\n| scenario | check | held |\n| --- | --- | --- |")
        for name, result in results.items():
            for check, row in result["checks"].items():
                print(f"| {name} | {check} | {'yes' if row['held'] else 'no'} |")
    held = all(row["held"] for result in results.values() for row in result["checks"].values())
    raise SystemExit(0 if held else 1)


if __name__ == "__main__":
    main()
