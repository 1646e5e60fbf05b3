"""Reliability scenarios against a live ``covspec serve``, each printing what held, with numbers.

    .venv/bin/python -m loadtest.scenarios fairness [--flood 200] [--seconds 60]

``fairness``: one tenant floods the server with ``--flood`` concurrent requests for
``--seconds`` while a quiet tenant sends 2 at a time; before that, the quiet tenant runs alone
for a third as long. Held when no quiet request is refused and its median latency under the
flood stays within 3x its median alone. Every flood response must be a 200, or a 429 / 503 with
``Retry-After``. Results go to ``loadtest/results/<scenario>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.service import ROOT, start_service, stop_service
from models.tiny.personas import get_persona
from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.local_redis import free_port

RESULTS = ROOT / "loadtest" / "results"
QUIET, FLOODER = "sk-demo-alice", "sk-demo-bob"  # two tenants (deploy/demo-keys.yaml)
MAX_TOKENS = 32
LATENCY_RATIO = 3.0  # the quiet tenant's median under the flood, against its median alone


def chat_body(seed: int, user: str) -> dict[str, Any]:
    """A ShapesWorld question about its scene, in ``user``'s persona (a PNG inline)."""
    sample = make_sample(EVAL_SEED_START + 50_000 + seed, user)
    png = io.BytesIO()
    sample.image().save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    image = {"type": "image_url", "image_url": {"url": url}}
    content = [{"type": "text", "text": sample.question.text}, image]
    messages = [{"role": "system", "content": get_persona(user).system}, {"role": "user", "content": content}]
    return {"model": "tiny-target", "messages": messages, "max_tokens": MAX_TOKENS}


@dataclass
class Tally:
    """What one tenant's requests got."""

    statuses: Counter[int] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)  # of the 200s
    missing_retry_after: int = 0  # 429 / 503 answers without the header
    errors: Counter[str] = field(default_factory=Counter)  # no HTTP answer at all

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {
            "requests": sum(self.statuses.values()) + sum(self.errors.values()),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "median_s": statistics.median(lat) if lat else None,
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "missing_retry_after": self.missing_retry_after,
            "errors": dict(self.errors),
        }


async def closed_loop(
    client: httpx.AsyncClient, url: str, key: str, user: str, until: float, tally: Tally, worker: int
) -> None:
    """Send one request after another until ``until``; a refused one waits its Retry-After."""
    seed = worker * 10_000
    while time.monotonic() < until:
        seed += 1
        start = time.monotonic()
        try:
            r = await client.post(url, json=chat_body(seed, user), headers={"authorization": f"Bearer {key}"})
        except httpx.HTTPError as e:
            tally.errors[type(e).__name__] += 1
            await asyncio.sleep(0.5)
            continue
        tally.statuses[r.status_code] += 1
        if r.status_code == 200:
            tally.latencies_s.append(time.monotonic() - start)
        elif r.status_code in (429, 503):
            retry = r.headers.get("retry-after")
            tally.missing_retry_after += retry is None
            await asyncio.sleep(float(retry or 1))


async def run_tenants(url: str, loads: dict[str, tuple[str, str, int]], seconds: float) -> dict[str, Tally]:
    """``loads``: tenant label -> (API key, persona user, concurrent requests), run together."""
    tallies = {label: Tally() for label in loads}
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(
            *(
                closed_loop(client, url, key, user, until, tallies[label], worker)
                for label, (key, user, count) in loads.items()
                for worker in range(count)
            )
        )
    return tallies


def fairness(url: str, args: argparse.Namespace) -> dict[str, Any]:
    quiet = (QUIET, "alice", 2)
    alone = asyncio.run(run_tenants(url, {"quiet": quiet}, args.seconds / 3))["quiet"]
    loads = {"quiet": quiet, "flooder": (FLOODER, "bob", args.flood)}
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


SCENARIOS: dict[str, Callable[[str, argparse.Namespace], dict[str, Any]]] = {"fairness": fairness}


def print_table(name: str, result: dict[str, Any]) -> None:
    print(f"\n{name}")
    print("| check | measured | held |\n| --- | --- | --- |")
    for check, row in result["checks"].items():
        print(f"| {check} | {row['measured']} | {'yes' if row['held'] else 'no'} |")
    for label in ("alone", "quiet", "flooder"):
        if label in result:
            print(f"{label}: {json.dumps(result[label])}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    p.add_argument("--flood", type=int, default=200, help="the flooding tenant's concurrent requests")
    p.add_argument("--seconds", type=float, default=60, help="how long the flood lasts")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    port = free_port()
    proc = start_service({}, port)
    try:
        result = SCENARIOS[args.scenario](f"http://127.0.0.1:{port}/v1/chat/completions", args)
    finally:
        stop_service(proc)
    result["config"] = "deploy/local.yaml"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.scenario}.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(args.scenario, result)


if __name__ == "__main__":
    main()
