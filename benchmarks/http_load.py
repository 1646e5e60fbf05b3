"""The served system under load, through HTTP with Locust: concurrency 1..32, speculation on/off.

For each setting (``deploy/local.yaml`` as shipped: the DrafterPool deployment, pipelined; the
same in lockstep; the drafter inside the engine; no speculation) the service is started with
``covspec serve`` (Ray
Serve, shipped tiny models, the demo keys: the four users' adapters in the mix), then for each
concurrency C a headless Locust run with C users (no think time beyond Locust's 0.1-0.5 s)
streams ShapesWorld answers for ``--seconds``. Requests/s, TTFT / TPOT / end-to-end P50 and P99,
tokens/s and τ come from Locust's CSV. Locust shares this machine's cores with the server: on 2
cores the client's own work is part of what is measured, so read the settings against each other.

    .venv/bin/python -m benchmarks.http_load [--seconds 30] [--levels 1 2 4 8 16 32] [--stem http_load]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness
from loadtest.service import start_service, stop_service
from loadtest.summary import stats_rows
from serve.local_redis import free_port

KEYS = "sk-demo-alice,sk-demo-bob,sk-demo-carol,sk-demo-dave"
SETTINGS: dict[str, dict[str, Any]] = {
    "pool_pipelined": {},  # deploy/local.yaml as shipped: the DrafterPool deployment, pipelined
    "pool_lockstep": {"pipeline": False},
    "in_engine": {"drafter_pool": None},  # the drafter inside the engine replica
    "no_spec": {"drafter": None, "policy": "none", "drafter_pool": None},
}


def run_level(url: str, users: int, seconds: int, out: Path) -> dict[str, Any]:
    prefix = out / f"c{users}"
    env = {**os.environ, "COVSPEC_API_KEYS": KEYS}
    cmd = [
        sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "-H", url,
        "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--csv", str(prefix), "--only-summary",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=harness.ROOT, env=env, capture_output=True, check=True, timeout=seconds + 120)
    rows = {r["Name"]: r for r in stats_rows(str(prefix))}
    requests = sum(int(rows[n]["Request Count"]) for n in rows if n.startswith("chat:"))
    failures = sum(int(rows[n]["Failure Count"]) for n in rows if n.startswith("chat:"))

    def pct(name: str, col: str) -> float | None:
        return float(rows[name][col]) if name in rows else None

    return {
        "users": users,
        "requests": requests,
        "failures": failures,
        "requests_per_s": requests / seconds,
        "ttft_p50_ms": pct("ttft_ms", "50%"), "ttft_p99_ms": pct("ttft_ms", "99%"),
        "tpot_p50_ms": pct("tpot_ms", "50%"), "tpot_p99_ms": pct("tpot_ms", "99%"),
        "e2e_p50_ms": pct("e2e_ms", "50%"), "e2e_p99_ms": pct("e2e_ms", "99%"),
        "tokens_per_s_per_request_mean": pct("tokens_per_s", "Average Response Time"),
        "output_tokens_per_s": float(rows["e2e_ms"]["Average Content Size"]) * requests / seconds
        if "e2e_ms" in rows else None,
        "tau_mean": pct("tau", "Average Response Time"),
    }  # fmt: skip


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--levels", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--stem", default="http_load", help="file name of the results in --out")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    result: dict[str, Any] = {
        "benchmark": "http_load",
        "seconds": args.seconds,
        "machine": harness.machine_info(),
    }
    for name, overrides in SETTINGS.items():
        port = free_port()
        proc = start_service(overrides, port)
        try:
            time.sleep(2)
            result[name] = []
            for users in args.levels:
                row = run_level(f"http://127.0.0.1:{port}", users, args.seconds, work)
                print(name, json.dumps(row))
                result[name].append(row)
        finally:
            stop_service(proc)
    harness.write_report(args.out / args.stem, result, report(result))


def report(result: dict[str, Any]) -> harness.Report:
    intro = (
        "Through HTTP (Ray Serve, tiny models, the 4 demo users' keys), Locust, "
        f"{result['seconds']} s per level."
    )
    columns: dict[str, harness.Cell] = {
        "setting": "{name}",
        "users": "{users}",
        "req/s": "{requests_per_s:.2f}",
        "output tok/s": "{output_tokens_per_s:.0f}",
        "TTFT p50/p99 ms": "{ttft_p50_ms:.0f}/{ttft_p99_ms:.0f}",
        "TPOT p50/p99 ms": "{tpot_p50_ms:.0f}/{tpot_p99_ms:.0f}",
        "e2e p50/p99 ms": "{e2e_p50_ms:.0f}/{e2e_p99_ms:.0f}",
        "τ": lambda _, r: f"{r['tau_mean']:.2f}" if r["tau_mean"] else "-",
        "failures": "{failures}",
    }
    table = harness.Table.of(((name, r) for name in SETTINGS for r in result[name]), columns)

    def series(key: str, label: str = "{}", style: str = "o-") -> list[harness.Series]:
        return [
            harness.Series(
                label.format(name), [r["users"] for r in result[name]], [r[key] for r in result[name]], style
            )
            for name in SETTINGS
        ]

    ttft = series("ttft_p50_ms", "{} p50") + series("ttft_p99_ms", "{} p99", "x--")
    panels = [
        harness.Panel(
            "output tokens/s", "concurrent users", "", series("output_tokens_per_s"), xscale="log2"
        ),
        harness.Panel("TTFT ms", "concurrent users", "", ttft, xscale="log2"),
        harness.Panel("TPOT ms", "concurrent users", "", series("tpot_p50_ms", "{} p50"), xscale="log2"),
    ]
    return harness.Report([intro, table], harness.Plot(panels, panel_size=(4.3, 3.6)))


if __name__ == "__main__":
    main()
