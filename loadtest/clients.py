"""The scenarios' HTTP clients: tenants' closed loops of chat requests, and what each answer was.

Every request is a ShapesWorld question about one of ``SCENES`` scenes per user, its image inline.
A refused request (429 / 503) waits for its ``Retry-After`` before the next one. Each answer is
kept as an :class:`Answer` (when it started and ended, and how), so a scenario can ask what the
requests in flight at a fault got, or when answers came back after it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from benchmarks.harness import quantile
from models.tiny.personas import get_persona
from models.tiny.samples import EVAL_SEED_START, make_sample

DEMO_KEYS = {user: f"sk-demo-{user}" for user in ("alice", "bob", "carol", "dave")}  # a tenant each
MAX_TOKENS = 32
SCENES = 32  # distinct scenes per user


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


# How an answer ended: the whole answer; an error event in the stream (its 200 status line was
# sent already); a 429 / 503 refusal; any other error status; the server closed the stream with
# neither answer nor error; the client hung up on purpose; no answer at all (a connection error,
# or nothing within the read timeout: a hang).
OUTCOMES = ("whole", "error event", "refused", "error status", "cut", "client left", "no answer")


@dataclass(frozen=True)
class Answer:
    start_s: float  # time.monotonic() when it was sent
    end_s: float  # ... when it ended
    status: int | None  # None: no HTTP answer
    outcome: str  # one of OUTCOMES
    accepted_tokens: int = 0  # draft tokens the verifier accepted (whole answers)
    detail: str = ""  # the error's message or type
    retry_after: str | None = None  # the refusal's Retry-After header
    first_s: float | None = None  # seconds from sending to the first event (streamed 200s)


@dataclass
class Tally:
    """What one tenant's requests got: its answers, and what is read off them."""

    answers: list[Answer] = field(default_factory=list)

    def merge(self, other: Tally) -> None:
        self.answers += other.answers

    @property
    def statuses(self) -> Counter[int]:
        return Counter(a.status for a in self.answers if a.status is not None)

    @property
    def latencies_s(self) -> list[float]:
        """Of the whole answers."""
        return [a.end_s - a.start_s for a in self.answers if a.outcome == "whole"]

    @property
    def ttfts_s(self) -> list[float]:
        """Of the whole answers that were streamed: to the first event."""
        return [a.first_s for a in self.answers if a.outcome == "whole" and a.first_s is not None]

    @property
    def missing_retry_after(self) -> int:
        """Refusals (429 / 503) without the header."""
        return sum(a.outcome == "refused" and a.retry_after is None for a in self.answers)

    @property
    def errors(self) -> Counter[str]:
        """Requests without any HTTP answer, by the client's error."""
        return Counter(a.detail for a in self.answers if a.outcome == "no answer")

    def summary(self) -> dict[str, Any]:
        lat, ttft = self.latencies_s, self.ttfts_s
        return {
            "requests": sum(self.statuses.values()) + sum(self.errors.values()),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "outcomes": dict(Counter(a.outcome for a in self.answers)),
            "median_s": statistics.median(lat) if lat else None,
            "p99_s": quantile(lat, 0.99),
            "ttft_p50_s": quantile(ttft, 0.5),
            "ttft_p99_s": quantile(ttft, 0.99),
            "missing_retry_after": self.missing_retry_after,
            "errors": dict(self.errors),
        }


@dataclass(frozen=True)
class Load:
    """One tenant's share of a scenario: its key, its persona, its concurrent requests."""

    key: str
    user: str
    count: int
    stream: bool = False


async def ask(
    client: httpx.AsyncClient,
    url: str,
    load: Load,
    seed: int,
    tally: Tally,
    leave_after_s: float | None = None,
) -> Answer:
    """One request, recorded in ``tally``; ``leave_after_s``: the client hangs up that long after
    sending it (whatever it has got by then)."""
    body = {**chat_body(seed, load.user), "stream": load.stream}
    headers = {"authorization": f"Bearer {load.key}"}
    start = time.monotonic()
    state: dict[str, Any] = {"first": None, "status": None, "outcome": "cut", "accepted": 0, "detail": ""}
    try:
        if leave_after_s is None:
            await _read(client, url, body, headers, start, state)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_read(client, url, body, headers, start, state), leave_after_s)
            if state["outcome"] == "cut":
                state["outcome"] = "client left"
    except httpx.HTTPError as e:
        state["outcome"], state["detail"] = "no answer", type(e).__name__
    answer = Answer(
        start, time.monotonic(), state["status"], state["outcome"], state["accepted"], state["detail"],
        state.get("retry_after"), state["first"],
    )  # fmt: skip
    tally.answers.append(answer)
    return answer


async def _read(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    start: float,
    state: dict[str, Any],
) -> None:
    """Send ``body`` and read the answer into ``state`` (status, outcome, first event, stats)."""
    async with client.stream("POST", url, json=body, headers=headers) as r:
        state["status"] = r.status_code
        if r.status_code in (429, 503):
            state["outcome"] = "refused"
            state["retry_after"] = r.headers.get("retry-after")
        if not body["stream"] or r.status_code != 200:
            raw = await r.aread()
            if r.status_code == 200:
                state["outcome"] = "whole"
                state["accepted"] = json.loads(raw).get("covspec", {}).get("accepted_tokens", 0)
            elif state["outcome"] != "refused":
                state["outcome"], state["detail"] = "error status", raw.decode(errors="replace")[:200]
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if state["first"] is None:
                state["first"] = time.monotonic() - start
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                state["outcome"] = "whole" if state["outcome"] == "cut" else state["outcome"]
            elif '"error"' in data and data.startswith('{"error"'):
                state["outcome"], state["detail"] = "error event", json.loads(data)["error"]["message"]
            elif '"covspec"' in data:
                state["accepted"] = json.loads(data)["covspec"]["accepted_tokens"]


async def closed_loop(
    client: httpx.AsyncClient, url: str, load: Load, until: float, tally: Tally, worker: int
) -> None:
    """Send one request after another until ``until``; a refused one waits its Retry-After."""
    seed = worker * 10_000
    while time.monotonic() < until:
        seed += 1
        answer = await ask(client, url, load, seed, tally)
        if answer.outcome == "no answer":
            await asyncio.sleep(0.5)
        elif answer.outcome == "refused":
            await asyncio.sleep(float(answer.retry_after or 1))


async def run_tenants(
    url: str, loads: dict[str, Load], seconds: float, read_timeout_s: float = 120
) -> dict[str, Tally]:
    """``loads`` (by label) run together for ``seconds``; what each label's requests got. An
    answer that sends nothing for ``read_timeout_s`` counts as a hang (no answer)."""
    tallies = {label: Tally() for label in loads}
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(read_timeout_s, connect=30)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(
            *(
                closed_loop(client, url, load, until, tallies[label], worker)
                for label, load in loads.items()
                for worker in range(load.count)
            )
        )
    return tallies
