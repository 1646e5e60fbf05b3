"""Fault scenarios: a process of the running service is killed or paused while four tenants
stream answers, and each answer is kept with when it started and ended.

``kill-engine``: the Engine replica's process is killed (SIGKILL). Held when the requests in
flight on it end with an error event in their stream or a 503 with ``Retry-After`` (never a hang:
nothing for ``READ_TIMEOUT_S`` counts as one), answers come whole again within 60 s, and every
request sent after that is answered whole.

``kill-drafter``: the DrafterPool replica's process is killed. Held when every request is
answered whole (the engine decodes without speculation meanwhile) and answers are drafted again
within 60 s.

``redis``: a quarter of ``--seconds`` each: Redis up, paused (SIGSTOP), resumed, killed. Held
when every request is answered whole (the prefix cache falls back to computing); each phase's
latency is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from loadtest.clients import DEMO_KEYS, Answer, Load, Tally, run_tenants
from loadtest.service import Service

READ_TIMEOUT_S = 30  # an answer silent this long is a hang
RECOVERY_S = 60  # whole answers again within this long of a replica's kill
CLIENTS_PER_TENANT = 2
ENGINE, DRAFTER_POOL = "ServeReplica:covspec:Engine", "ServeReplica:covspec:DrafterPool"


def stream_loads() -> dict[str, Load]:
    return {user: Load(key, user, CLIENTS_PER_TENANT, stream=True) for user, key in DEMO_KEYS.items()}


async def _with_faults(
    service: Service, seconds: float, faults: list[tuple[float, Callable[[], None]]]
) -> tuple[list[Answer], list[float]]:
    """The four tenants stream for ``seconds`` while each fault runs at its offset; every answer
    (by start time) and when each fault happened."""
    start = time.monotonic()
    load = asyncio.create_task(run_tenants(service.url, stream_loads(), seconds, READ_TIMEOUT_S))
    happened = []
    for offset, fault in faults:
        await asyncio.sleep(max(0.0, start + offset - time.monotonic()))
        await asyncio.to_thread(fault)
        happened.append(time.monotonic())
    everyone = Tally()
    for tally in (await load).values():
        everyone.merge(tally)
    return sorted(everyone.answers, key=lambda a: a.start_s), happened


def _kill(service: Service, title: str) -> Callable[[], None]:
    return lambda: service.find(title).send_signal(signal.SIGKILL)


def _outcomes(answers: list[Answer]) -> dict[str, int]:
    return dict(Counter(a.outcome for a in answers))


def _latency(answers: list[Answer]) -> dict[str, Any]:
    whole = sorted(a.end_s - a.start_s for a in answers if a.outcome == "whole")
    return {
        "answers": len(answers),
        "outcomes": _outcomes(answers),
        "median_s": statistics.median(whole) if whole else None,
        "max_s": whole[-1] if whole else None,
    }


def _checks(rows: dict[str, tuple[bool, str]]) -> dict[str, dict[str, Any]]:
    return {name: {"held": held, "measured": text} for name, (held, text) in rows.items()}


def kill_engine(service: Service, args: argparse.Namespace) -> dict[str, Any]:
    before = args.seconds / 6
    answers, (killed,) = asyncio.run(_with_faults(service, args.seconds, [(before, _kill(service, ENGINE))]))
    in_flight = [a for a in answers if a.start_s < killed < a.end_s]
    after = [a for a in answers if a.start_s >= killed]
    first_whole = next((a for a in after if a.outcome == "whole"), None)
    back_s = None if first_whole is None else first_whole.end_s - killed
    recovered = [a for a in after if first_whole is not None and a.start_s >= first_whole.end_s]
    clean = {"error event", "refused", "whole"}
    unclean = [
        a for a in in_flight if a.outcome not in clean or (a.outcome == "refused" and not a.retry_after)
    ]
    hung = [a for a in answers if a.outcome in ("no answer", "cut")]
    return {
        "seconds": args.seconds,
        "killed_at_s": before,
        "before": _latency([a for a in answers if a.end_s <= killed]),
        "in_flight": _latency(in_flight),
        "after": _latency(after),
        "back_after_s": back_s,
        "checks": _checks(
            {
                "requests in flight end with an error event or a 503 with Retry-After": (
                    bool(in_flight) and not unclean,
                    f"{len(in_flight)} in flight: {_outcomes(in_flight)}",
                ),
                "no request hangs or is cut off without an error": (
                    not hung,
                    f"{len(hung)} of {len(answers)} ({_outcomes(hung) or 'none'})",
                ),
                f"answered whole again within {RECOVERY_S} s": (
                    back_s is not None and back_s <= RECOVERY_S,
                    "never" if back_s is None else f"after {back_s:.1f} s",
                ),
                "every request sent after that answered whole": (
                    bool(recovered) and all(a.outcome == "whole" for a in recovered),
                    f"{sum(a.outcome == 'whole' for a in recovered)} of {len(recovered)}",
                ),
            }
        ),
    }


def kill_drafter(service: Service, args: argparse.Namespace) -> dict[str, Any]:
    before = args.seconds / 6
    answers, (killed,) = asyncio.run(
        _with_faults(service, args.seconds, [(before, _kill(service, DRAFTER_POOL))])
    )
    drafted_before = [a for a in answers if a.end_s <= killed and a.accepted_tokens > 0]
    after = [a for a in answers if a.start_s >= killed]
    drafted = next((a for a in after if a.accepted_tokens > 0), None)
    back_s = None if drafted is None else drafted.end_s - killed
    failed = [a for a in answers if a.outcome != "whole"]
    return {
        "seconds": args.seconds,
        "killed_at_s": before,
        "before": _latency([a for a in answers if a.end_s <= killed]),
        "in_flight": _latency([a for a in answers if a.start_s < killed < a.end_s]),
        "after": _latency(after),
        "drafted_before": len(drafted_before),
        "drafted_again_after_s": back_s,
        "checks": _checks(
            {
                "every request answered whole": (
                    not failed,
                    f"{len(answers) - len(failed)} of {len(answers)} ({_outcomes(failed) or 'no failure'})",
                ),
                f"drafted again within {RECOVERY_S} s": (
                    bool(drafted_before) and back_s is not None and back_s <= RECOVERY_S,
                    f"{len(drafted_before)} drafted answers before the kill; "
                    + ("none after" if back_s is None else f"drafted again after {back_s:.1f} s"),
                ),
            }
        ),
    }


def redis(service: Service, args: argparse.Namespace) -> dict[str, Any]:
    quarter = args.seconds / 4
    process = service.find("redis-server")
    faults = [
        (quarter, lambda: process.send_signal(signal.SIGSTOP)),
        (2 * quarter, lambda: process.send_signal(signal.SIGCONT)),
        (3 * quarter, lambda: process.send_signal(signal.SIGKILL)),
    ]
    answers, (paused, resumed, killed) = asyncio.run(_with_faults(service, args.seconds, faults))
    phases = {
        "up": [a for a in answers if a.start_s < paused],
        "paused": [a for a in answers if paused <= a.start_s < resumed],
        "resumed": [a for a in answers if resumed <= a.start_s < killed],
        "killed": [a for a in answers if a.start_s >= killed],
    }
    failed = [a for a in answers if a.outcome != "whole"]
    return {
        "seconds": args.seconds,
        "phases": {name: _latency(rows) for name, rows in phases.items()},
        "checks": _checks(
            {
                "every request answered whole": (
                    not failed and all(phases.values()),
                    f"{len(answers) - len(failed)} of {len(answers)} ({_outcomes(failed) or 'no failure'})",
                ),
            }
        ),
    }
