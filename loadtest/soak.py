"""The soak scenario: the four demo tenants at about 70 % of the service's capacity for
``--seconds`` (20 minutes by default), streamed, with clients that hang up at random (before the
first token: queued or in prefill; or mid-stream).

Capacity is measured first: the answers per second of as many streaming clients as the gateway
admits (``max_in_flight``), in a closed loop. The soak then sends requests in an open loop
(Poisson arrivals) at 70 % of that rate. Every 30 s it samples the resident memory of the service's
processes and what its replicas hold for requests (:class:`serve.holdings.Holdings`, read through
Ray). Held when no request fails (each is answered whole, or its client left), the replicas hold
nothing once the load stops (request states, KV blocks and adapter pins back to their values
before it), and resident memory grows less than 5 % from the end of the warm-up (the first sixth)
to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from loadtest.clients import DEMO_KEYS, Answer, Load, Tally, ask, run_tenants
from loadtest.service import Service, shipped_args

LOAD_FRACTION = 0.7
LEAVE_FRACTION = 0.1  # requests whose client hangs up, at a random time in LEAVE_WINDOW_S
LEAVE_WINDOW_S = (0.02, 2.0)
SAMPLE_EVERY_S = 30.0
RSS_GROWTH = 0.05


def holdings() -> dict[str, Any]:
    """What the Engine and DrafterPool replicas hold now (through Ray: the service's cluster)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
    engine = serve.get_deployment_handle("Engine", app_name="covspec").holdings.remote().result(timeout_s=30)
    held = {name: asdict(h) for name, h in engine.items()}
    if "drafter" not in held:
        pool = serve.get_deployment_handle("DrafterPool", app_name="covspec")
        held["drafter"] = asdict(pool.holdings.remote().result(timeout_s=30))
    return held


def capacity(service: Service, seconds: float) -> float:
    """Whole answers per second with ``max_in_flight`` streaming clients in a closed loop."""
    clients = int(shipped_args()["max_in_flight"]) // len(DEMO_KEYS)
    loads = {user: Load(key, user, clients, stream=True) for user, key in DEMO_KEYS.items()}
    tallies = asyncio.run(run_tenants(service.url, loads, seconds))
    return sum(len(t.latencies_s) for t in tallies.values()) / seconds


async def open_loop(service: Service, rate: float, seconds: float, samples: list[dict[str, Any]]) -> Tally:
    """Poisson arrivals at ``rate`` per second for ``seconds``, tenants in turn; some clients
    leave early. Every ``SAMPLE_EVERY_S`` a sample of memory and holdings goes to ``samples``."""
    rng = random.Random(0)
    tally = Tally()
    start = time.monotonic()
    users = list(DEMO_KEYS.items())
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=30), limits=limits) as client:
        tasks: set[asyncio.Task[Answer]] = set()
        sampler = asyncio.create_task(_sample(service, start, seconds, tally, samples))
        sent = 0
        while time.monotonic() - start < seconds:
            await asyncio.sleep(rng.expovariate(rate))
            user, key = users[sent % len(users)]
            leave = rng.uniform(*LEAVE_WINDOW_S) if rng.random() < LEAVE_FRACTION else None
            task = asyncio.create_task(
                ask(client, service.url, Load(key, user, 1, stream=True), sent, tally, leave)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.gather(*tasks)
        await sampler
    return tally


async def _sample(
    service: Service, start: float, seconds: float, tally: Tally, samples: list[dict[str, Any]]
) -> None:
    while (elapsed := time.monotonic() - start) < seconds:
        held = await asyncio.to_thread(holdings)
        samples.append(
            {"t_s": elapsed, "rss_mb": service.rss_mb(), "answers": len(tally.answers), "holdings": held}
        )
        await asyncio.sleep(SAMPLE_EVERY_S)


def soak(service: Service, args: argparse.Namespace) -> dict[str, Any]:
    asyncio.run(run_tenants(service.url, {"warm": Load(DEMO_KEYS["alice"], "alice", 2, stream=True)}, 10))
    time.sleep(3)
    before = holdings()
    measured = capacity(service, 30)
    rate = LOAD_FRACTION * measured
    samples: list[dict[str, Any]] = []
    tally = asyncio.run(open_loop(service, rate, args.seconds, samples))
    time.sleep(5)  # the last releases reach the drafter pool
    outcomes = Counter(a.outcome for a in tally.answers)
    left_before = sum(a.outcome == "client left" and a.first_s is None for a in tally.answers)
    result = {
        "seconds": args.seconds,
        "capacity_per_s": measured,
        "rate_per_s": rate,
        "answers": len(tally.answers),
        "outcomes": dict(outcomes),
        "left_before_first_token": left_before,
        "refused_without_retry_after": tally.missing_retry_after,
        "holdings_before": before,
        "holdings_after": holdings(),
        "samples": samples,
    }
    result["checks"] = checks(result)
    plot(result, args.out / "soak.png")
    return result


def checks(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What held, from the soak's numbers alone (so a saved result can be checked again)."""
    outcomes, samples = Counter(result["outcomes"]), result["samples"]
    failed = {k: v for k, v in outcomes.items() if k not in ("whole", "client left", "refused")}
    warm = next(s for s in samples if s["t_s"] >= result["seconds"] / 6)
    growth = samples[-1]["rss_mb"] / warm["rss_mb"] - 1
    before, after = result["holdings_before"], result["holdings_after"]
    drafted = max(s["holdings"]["drafter"]["requests"] for s in samples)
    return {
        "no request fails (an error, cut off, no answer)": {
            "held": not failed,
            "measured": f"{outcomes['whole']} whole, {outcomes['client left']} left by their client "
            f"({result['left_before_first_token']} before the first token); failed: {failed or 'none'}",
        },
        "no request refused": {
            "held": not outcomes["refused"],
            "measured": f"{outcomes['refused']} of {result['answers']} answered 503 / 429, "
            f"{result['refused_without_retry_after']} without Retry-After",
        },
        "replicas hold what they held before the load": {
            "held": after == before,
            "measured": f"before {before}, after {after}; the drafter held at most {drafted} requests "
            "at a sample",
        },
        f"resident memory grows < {100 * RSS_GROWTH:.0f} % after warm-up": {
            "held": growth < RSS_GROWTH,
            "measured": f"{warm['rss_mb']:.0f} MB -> {samples[-1]['rss_mb']:.0f} MB ({100 * growth:+.1f} %)",
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t_s"] / 60 for s in samples]
    fig, (mem, held) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    mem.plot(t, [s["rss_mb"] for s in samples], marker="o")
    mem.set_ylabel("resident memory (MB)")
    mem.set_title(
        f"soak: {result['rate_per_s']:.1f} requests/s (70 % of capacity), {result['answers']} requests"
    )
    for replica in ("engine", "drafter"):
        held.plot(t, [s["holdings"][replica]["requests"] for s in samples], label=f"{replica}: requests held")
        held.plot(
            t, [s["holdings"][replica]["kv_blocks"] for s in samples], label=f"{replica}: KV blocks", ls="--"
        )
    held.plot(t, [s["holdings"]["drafter"]["adapter_pins"] for s in samples], label="adapter pins", ls=":")
    held.set_xlabel("minutes")
    held.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
