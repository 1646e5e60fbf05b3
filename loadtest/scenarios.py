"""Reliability scenarios against a live ``covspec serve``, each printing what held, with numbers.

    .venv/bin/python -m loadtest.scenarios fairness [--flood 200] [--seconds 60]
    .venv/bin/python -m loadtest.scenarios overload [--seconds 60]

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

Results go to ``loadtest/results/<scenario>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
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

from loadtest.service import ROOT, shipped_args, start_service, stop_service
from models.tiny.personas import get_persona
from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.local_redis import free_port

RESULTS = ROOT / "loadtest" / "results"
DEMO_KEYS = {user: f"sk-demo-{user}" for user in ("alice", "bob", "carol", "dave")}  # a tenant each
QUIET, FLOODER = DEMO_KEYS["alice"], DEMO_KEYS["bob"]

MAX_TOKENS = 32
SCENES = 32  # distinct scenes per user
LATENCY_RATIO = 3.0  # the quiet tenant's median under the flood, against its median alone


@functools.lru_cache(maxsize=256)
def chat_body(seed: int, user: str) -> dict[str, Any]:
    """A ShapesWorld question about its scene, in ``user``'s persona (a PNG inline); one of
    ``SCENES`` per user, made once: the client shares the server's cores, and encoding a PNG per
    request (hundreds a second when refused ones retry) would slow the server it measures."""
    sample = make_sample(EVAL_SEED_START + 50_000 + seed % SCENES, user)
    png = io.BytesIO()
    sample.image().save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    image = {"type": "image_url", "image_url": {"url": url}}
    content = [{"type": "text", "text": sample.question.text}, image]
    messages = [{"role": "system", "content": get_persona(user).system}, {"role": "user", "content": content}]
    return {"model": "tiny-target", "messages": messages, "max_tokens": MAX_TOKENS}


def quantile(ordered: list[float], q: float) -> float | None:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


@dataclass
class Tally:
    """What one tenant's requests got."""

    statuses: Counter[int] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)  # of the 200s
    ttfts_s: list[float] = field(default_factory=list)  # of the 200s, streamed: to the first event
    missing_retry_after: int = 0  # 429 / 503 answers without the header
    errors: Counter[str] = field(default_factory=Counter)  # no HTTP answer at all

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        ttft = sorted(self.ttfts_s)
        return {
            "requests": sum(self.statuses.values()) + sum(self.errors.values()),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "median_s": statistics.median(lat) if lat else None,
            "p99_s": quantile(lat, 0.99),
            "ttft_p50_s": quantile(ttft, 0.5),
            "ttft_p99_s": quantile(ttft, 0.99),
            "missing_retry_after": self.missing_retry_after,
            "errors": dict(self.errors),
        }


async def closed_loop(
    client: httpx.AsyncClient,
    url: str,
    load: Load,
    until: float,
    tally: Tally,
    worker: int,
) -> None:
    """Send one request after another until ``until``; a refused one waits its Retry-After."""
    seed = worker * 10_000
    headers = {"authorization": f"Bearer {load.key}"}
    while time.monotonic() < until:
        seed += 1
        body = {**chat_body(seed, load.user), "stream": load.stream}
        start = time.monotonic()
        try:
            async with client.stream("POST", url, json=body, headers=headers) as r:
                first = None
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: "):
                        first = time.monotonic() - start
        except httpx.HTTPError as e:
            tally.errors[type(e).__name__] += 1
            await asyncio.sleep(0.5)
            continue
        tally.statuses[r.status_code] += 1
        if r.status_code == 200:
            tally.latencies_s.append(time.monotonic() - start)
            if first is not None:
                tally.ttfts_s.append(first)
        elif r.status_code in (429, 503):
            retry = r.headers.get("retry-after")
            tally.missing_retry_after += retry is None
            await asyncio.sleep(float(retry or 1))


@dataclass(frozen=True)
class Load:
    """One tenant's share of a scenario: its key, its persona, its concurrent requests."""

    key: str
    user: str
    count: int
    stream: bool = False


async def run_tenants(url: str, loads: dict[str, Load], seconds: float) -> dict[str, Tally]:
    """``loads`` (by label) run together for ``seconds``; what each label's requests got."""
    tallies = {label: Tally() for label in loads}
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(
            *(
                closed_loop(client, url, load, until, tallies[label], worker)
                for label, load in loads.items()
                for worker in range(load.count)
            )
        )
    return tallies


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
            everyone.statuses.update(t.statuses)
            everyone.errors.update(t.errors)
            everyone.latencies_s += t.latencies_s
            everyone.ttfts_s += t.ttfts_s
            everyone.missing_retry_after += t.missing_retry_after
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
class Service:
    """A running ``covspec serve``: where to send requests, and its process."""

    url: str
    pid: int

    def rss_mb(self) -> float:
        """Resident memory of the service and every process under it (Ray's, Redis)."""
        import psutil

        root = psutil.Process(self.pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total / 2**20


SCENARIOS: dict[str, Callable[[Service, argparse.Namespace], dict[str, Any]]] = {
    "fairness": fairness,
    "overload": overload,
}


def print_table(name: str, result: dict[str, Any]) -> None:
    print(f"\n{name}")
    print("| check | measured | held |\n| --- | --- | --- |")
    for check, row in result["checks"].items():
        print(f"| {check} | {row['measured']} | {'yes' if row['held'] else 'no'} |")
    for label in ("alone", "quiet", "flooder"):
        if label in result:
            print(f"{label}: {json.dumps(result[label])}")
    for level, row in result.get("levels", {}).items():
        print(f"{level}: {json.dumps(row)}")


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
        service = Service(f"http://127.0.0.1:{port}/v1/chat/completions", proc.pid)
        result = SCENARIOS[args.scenario](service, args)
    finally:
        stop_service(proc)
    result["config"] = "deploy/local.yaml"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.scenario}.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(args.scenario, result)


if __name__ == "__main__":
    main()
