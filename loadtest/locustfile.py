"""Locust load test of the OpenAI-compatible API: ShapesWorld images, persona prompts, streaming.

Each simulated user takes an API key (``COVSPEC_API_KEY``, or one of the comma-separated
``COVSPEC_API_KEYS``, round robin: the keys' users pick the drafter adapters, so the key list is
the adapter mix) and asks about ShapesWorld scenes in that key's persona, streaming the answer.
A share ``COVSPEC_SHARED_PREFIX_SHARE`` (default 0.3) of requests reuse one common image and
system prompt (what a prefix cache can serve). TTFT, TPOT, end-to-end time, tokens/s and τ (from
the last chunk's ``covspec`` object) are reported as their own rows (request type ``METRIC``; the
last two put a rate in Locust's time columns, whose percentiles Locust rounds to integers: read
their averages), because Locust's own response time of a streamed request stops at the headers.
A 200 that ends without ``[DONE]`` or with an error event counts as a failure.

    COVSPEC_API_KEYS=sk-demo-alice,sk-demo-bob locust -f loadtest/locustfile.py --headless \\
        -H http://127.0.0.1:8000 -u 8 -r 2 -t 60s --csv loadtest/results/run
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import random
import time
from typing import Any

from locust import HttpUser, between, events, task

from models.tiny.personas import DEMO_USERS, get_persona
from models.tiny.samples import EVAL_SEED_START, make_sample

KEYS = [k for k in os.environ.get("COVSPEC_API_KEYS", os.environ.get("COVSPEC_API_KEY", "")).split(",") if k]
SHARED_SHARE = float(os.environ.get("COVSPEC_SHARED_PREFIX_SHARE", "0.3"))
MAX_TOKENS = int(os.environ.get("COVSPEC_MAX_TOKENS", "64"))
SHARED_SEED = EVAL_SEED_START + 77_777
_next_key = itertools.count()


def persona_of(key: str) -> str | None:
    """The demo persona of a demo key (``sk-demo-<user>``); other keys ask in the default style."""
    user = key.removeprefix("sk-demo-")
    return user if user in DEMO_USERS else None


def data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(seed: int, persona: str | None) -> dict[str, Any]:
    sample = make_sample(seed, persona)
    return {
        "messages": [
            {"role": "system", "content": get_persona(persona).system},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(sample.image())}},
                    {"type": "text", "text": sample.question.text},
                ],
            },
        ],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def metric(name: str, ms: float, length: int = 0) -> None:
    events.request.fire(
        request_type="METRIC", name=name, response_time=ms, response_length=length, exception=None, context={}
    )


class ChatUser(HttpUser):
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        if not KEYS:
            raise RuntimeError("set COVSPEC_API_KEY or COVSPEC_API_KEYS (e.g. sk-demo-alice,sk-demo-bob)")
        key = KEYS[next(_next_key) % len(KEYS)]
        self.headers = {"Authorization": f"Bearer {key}"}
        self.persona = persona_of(key)
        self.rng = random.Random(hash(key) ^ id(self))

    @task
    def chat_stream(self) -> None:
        shared = self.rng.random() < SHARED_SHARE
        seed = SHARED_SEED if shared else EVAL_SEED_START + self.rng.randrange(10**6)
        body = chat_body(seed, self.persona)
        started, first, tokens, done, error, tau = time.perf_counter(), None, 0, False, None, None
        name = "chat:stream:shared-prefix" if shared else "chat:stream"
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            headers=self.headers,
            stream=True,
            catch_response=True,
            name=name,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    error = event["error"]
                    break
                if event["choices"] and event["choices"][0]["delta"].get("content") and first is None:
                    first = time.perf_counter()
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if event.get("covspec"):
                    tau = event["covspec"]["tau"]
            total = time.perf_counter() - started
            if error is not None or not done:
                response.failure(f"stream ended without [DONE]: {error}")
                return
            response.success()
        ttft = (first or time.perf_counter()) - started
        metric("ttft_ms", 1000 * ttft)
        metric("e2e_ms", 1000 * total, tokens)
        if tokens > 1 and first is not None:
            metric("tpot_ms", 1000 * (total - ttft) / (tokens - 1), tokens)
        metric("tokens_per_s", tokens / total, tokens)  # a rate in the time columns: see summary.py
        if tau is not None:
            metric("tau", tau, tokens)  # tokens per verify step of this request, likewise
