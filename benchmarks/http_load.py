"""The served system under load, through HTTP with Locust: concurrency 1..32, speculation on/off.

For each setting (speculation with the drafter in the engine, with the drafter as its own
DrafterPool deployment, and no speculation) the service is started with ``covspec serve`` (Ray
Serve, shipped tiny models, the demo keys: the four users' adapters in the mix), then for each
concurrency C a headless Locust run with C users (no think time beyond Locust's 0.1-0.5 s)
streams ShapesWorld answers for ``--seconds``. Requests/s, TTFT / TPOT / end-to-end P50 and P99,
tokens/s and τ come from Locust's CSV. Locust shares this machine's cores with the server: on 2
cores the client's own work is part of what is measured, so read the settings against each other.

    .venv/bin/python -m benchmarks.http_load [--seconds 30] [--levels 1 2 4 8 16 32]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import machine_info
from loadtest.summary import stats_rows
from serve.local_redis import free_port

ROOT = Path(__file__).resolve().parents[1]
KEYS = "sk-demo-alice,sk-demo-bob,sk-demo-carol,sk-demo-dave"
SETTINGS = {
    "spec": {},  # the drafter inside the engine replica
    "spec_drafter_pool": {"drafter_pool": {"num_cpus": 0.5}},  # the drafter as its own deployment
    "no_spec": {"drafter": None, "policy": "none"},
}


def start_service(overrides: dict[str, Any], port: int) -> subprocess.Popen[str]:
    config = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    config["applications"][0]["args"].update(overrides)
    path = Path(tempfile.mkdtemp()) / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "serve.cli", "serve", "--config", str(path), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "is up" in line:
            return proc
    raise RuntimeError("covspec serve exited before coming up")


def run_level(url: str, users: int, seconds: int, out: Path) -> dict[str, Any]:
    prefix = out / f"c{users}"
    env = {**os.environ, "COVSPEC_API_KEYS": KEYS}
    cmd = [
        sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "-H", url,
        "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--csv", str(prefix), "--only-summary",
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, check=True, timeout=seconds + 120)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--levels", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    report: dict[str, Any] = {"benchmark": "http_load", "seconds": args.seconds, "machine": machine_info()}
    for name, overrides in SETTINGS.items():
        port = free_port()
        proc = start_service(overrides, port)
        try:
            time.sleep(2)
            report[name] = []
            for users in args.levels:
                row = run_level(f"http://127.0.0.1:{port}", users, args.seconds, work)
                print(name, json.dumps(row))
                report[name].append(row)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http_load.json").write_text(json.dumps(report, indent=1))
    write_markdown_and_plot(report, args.out / "http_load")


def write_markdown_and_plot(report: dict[str, Any], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "Through HTTP (Ray Serve, tiny models, the 4 demo users' keys), Locust, "
        f"{report['seconds']} s per level.",
        "",
        "| setting | users | req/s | output tok/s | TTFT p50/p99 ms | TPOT p50/p99 ms | e2e p50/p99 ms "
        "| τ | failures |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in SETTINGS:
        for r in report[name]:
            tau = f"{r['tau_mean']:.2f}" if r["tau_mean"] else "-"
            lines.append(
                f"| {name} | {r['users']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.0f} | "
                f"{r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f} | "
                f"{r['tpot_p50_ms']:.0f}/{r['tpot_p99_ms']:.0f} | "
                f"{r['e2e_p50_ms']:.0f}/{r['e2e_p99_ms']:.0f} | {tau} | {r['failures']} |"
            )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in SETTINGS:
        users = [r["users"] for r in report[name]]
        axes[0].plot(users, [r["output_tokens_per_s"] for r in report[name]], "o-", label=name)
        axes[1].plot(users, [r["ttft_p50_ms"] for r in report[name]], "o-", label=f"{name} p50")
        axes[1].plot(users, [r["ttft_p99_ms"] for r in report[name]], "x--", label=f"{name} p99")
        axes[2].plot(users, [r["tpot_p50_ms"] for r in report[name]], "o-", label=f"{name} p50")
    for ax, title in zip(axes, ("output tokens/s", "TTFT ms", "TPOT ms"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent users")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
