"""The real Ray Serve application (Gateway + Engine deployments, local Ray, shipped tiny models),
called over HTTP with the official openai client: exactly the target's answers, errors in shape."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from models.tiny.samples import EVAL_SEED_START, make_sample
from tests.serve.conftest import RayApp
from tests.serve.engine_helpers import Oracle
from tests.serve.http_helpers import TEXT, chat_messages, data_url, expected_text, user_message

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


@pytest.fixture(scope="module")
def shipped_oracle() -> Oracle:
    return Oracle(CHECKPOINTS / "tiny-target")


def openai_client(base: str, key: str) -> object:
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.mark.parametrize("layout", ["drafter in the engine", "DrafterPool deployment"])
def test_ray_app_answers_like_the_target_streaming_and_not(
    ray_app: RayApp, shipped_oracle: Oracle, layout: str
) -> None:
    sample = make_sample(EVAL_SEED_START + 51, "bob", kind="describe")
    messages = chat_messages(sample, data_url(sample.image()))
    base = ray_app.url if layout == "drafter in the engine" else ray_app.pool_url
    client = openai_client(base, ray_app.keys["bob"])
    whole = client.chat.completions.create(
        model="tiny-target", messages=messages, temperature=0, max_tokens=48
    )  # type: ignore[attr-defined]
    stream = client.chat.completions.create(  # type: ignore[attr-defined]
        model="bob", messages=messages, temperature=0, max_tokens=48, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = expected_text(shipped_oracle, sample, 48)
    assert whole.choices[0].message.content == streamed == expected
    assert whole.model_extra["covspec"]["adapter"] == "bob"
    assert whole.model_extra["covspec"]["accepted_tokens"] > 0  # the (remote) drafter really drafted
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    stats = whole.model_extra["covspec"]
    crossed = stats["link_bytes_up"] > 0 and stats["link_bytes_down"] > 0
    assert crossed == (layout == "DrafterPool deployment")


def test_pooled_app_shows_gateway_engine_and_drafter_pool_healthy(ray_app: RayApp) -> None:
    from ray import serve

    app = serve.status().applications["covspec-pool"]
    assert {name: d.status for name, d in app.deployments.items()} == {
        "Gateway": "HEALTHY",
        "Engine": "HEALTHY",
        "DrafterPool": "HEALTHY",
    }


def test_a_killed_drafter_pool_replica_costs_no_request_and_drafting_resumes(
    ray_app: RayApp, shipped_oracle: Oracle
) -> None:
    """The pool's replica dies while requests stream: their answers are still the target's (plain
    decoding meanwhile); Serve starts a new replica, and later requests are drafted again."""
    import threading
    import time

    import ray
    from ray import serve

    samples = [make_sample(EVAL_SEED_START + 52 + i, "alice", kind="describe") for i in range(6)]
    client = openai_client(ray_app.pool_url, ray_app.keys["alice"])
    streaming = threading.Event()
    answers: dict[int, tuple[str, float]] = {}  # sample -> (text, when its last chunk came)

    def stream(i: int) -> None:
        messages = chat_messages(samples[i], data_url(samples[i].image()))
        chunks = client.chat.completions.create(  # type: ignore[attr-defined]
            model="tiny-target", messages=messages, temperature=0, max_tokens=200, stream=True
        )
        text, last = "", 0.0
        for chunk in chunks:
            streaming.set()
            delta = chunk.choices[0].delta.content if chunk.choices else None
            text, last = text + (delta or ""), time.monotonic()
        answers[i] = (text, last)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(samples))]
    for t in threads:
        t.start()
    assert streaming.wait(timeout=120)
    (replica,) = [
        a for a in ray.util.list_named_actors(all_namespaces=True) if "covspec-pool#DrafterPool" in a["name"]
    ]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    killed = time.monotonic()
    for t in threads:
        t.join(timeout=300)
    expected = [expected_text(shipped_oracle, s, 200) for s in samples]
    assert [answers[i][0] for i in range(len(samples))] == expected
    assert max(last for _, last in answers.values()) > killed, "all were answered before the pool died"
    for _ in range(120):  # Serve replaces the replica
        if serve.status().applications["covspec-pool"].deployments["DrafterPool"].status == "HEALTHY":
            break
        time.sleep(1)
    later = make_sample(EVAL_SEED_START + 60, "alice", kind="describe")
    for _ in range(10):  # the engine asks again once its backoff has passed
        again = client.chat.completions.create(  # type: ignore[attr-defined]
            model="tiny-target",
            messages=chat_messages(later, data_url(later.image())),
            temperature=0,
            max_tokens=48,
        )
        assert again.choices[0].message.content == expected_text(shipped_oracle, later, 48)
        if again.model_extra["covspec"]["accepted_tokens"] > 0:
            return
        time.sleep(1)
    raise AssertionError("the engine never drafted again after the pool came back")


def test_ray_app_refuses_bad_requests_and_stays_healthy(ray_app: RayApp) -> None:
    def post(body: object, key: str) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"}
        return httpx.post(f"{ray_app.url}/v1/chat/completions", json=body, headers=headers, timeout=60)

    assert post(user_message(TEXT), "sk-wrong").status_code == 401
    assert post({**user_message(TEXT), "n": 2}, ray_app.keys["bob"]).status_code == 400
    assert post({**user_message(TEXT), "model": "alice"}, ray_app.keys["bob"]).status_code == 404
    assert post({**user_message(TEXT), "max_tokens": 100_000}, ray_app.keys["bob"]).status_code == 400
    assert httpx.get(f"{ray_app.url}/health", timeout=30).status_code == 200
    models = httpx.get(
        f"{ray_app.url}/v1/models", headers={"authorization": f"Bearer {ray_app.keys['alice']}"}
    )
    assert [m["id"] for m in models.json()["data"]] == ["tiny-target", "alice"]


def test_short_headless_locust_run_has_no_failures(ray_app: RayApp, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from loadtest.summary import failures, stats_rows

    prefix = tmp_path / "run"
    env = {**os.environ, "COVSPEC_API_KEYS": ",".join(ray_app.keys.values()), "COVSPEC_MAX_TOKENS": "16"}
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "-H", ray_app.url,
         "-u", "2", "-r", "2", "-t", "8s", "--csv", str(prefix), "--only-summary"],
        capture_output=True, text=True, timeout=120, check=False, env=env, cwd=CHECKPOINTS.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["Name"]: row for row in stats_rows(str(prefix))}
    assert (
        int(rows["chat:stream"]["Request Count"])
        + int(rows.get("chat:stream:shared-prefix", {}).get("Request Count", 0))
        > 0
    )
    assert {"ttft_ms", "e2e_ms", "tokens_per_s"} <= rows.keys()
    assert failures(str(prefix)) == 0


def ask(ray_app: RayApp, user: str, sample: object) -> tuple[int, int, str]:
    """(HTTP status, cached prompt tokens, answer) of one greedy request."""
    body = {"messages": chat_messages(sample, data_url(sample.image())), "max_tokens": 32, "temperature": 0}  # type: ignore[attr-defined]
    headers = {"authorization": f"Bearer {ray_app.keys[user]}"}
    r = httpx.post(f"{ray_app.url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    if r.status_code != 200:
        return r.status_code, 0, r.text
    out = r.json()
    return (
        200,
        out["usage"]["prompt_tokens_details"]["cached_tokens"],
        out["choices"][0]["message"]["content"],
    )


def test_prefix_kv_survives_a_restart_through_redis_and_stays_in_its_tenant(
    ray_app: RayApp, shipped_oracle: Oracle
) -> None:
    """Last in this file: it redeploys the application and stops Redis."""
    from ray import serve

    from serve.deployments import build_app

    turns = [make_sample(EVAL_SEED_START + 70, "carol", turn=t) for t in range(4)]  # one scene, one persona

    def expected(t: int) -> str:
        return expected_text(shipped_oracle, turns[t], 32)

    assert ask(ray_app, "bob", turns[0]) == (200, 0, expected(0))
    status, cached, text = ask(ray_app, "bob", turns[1])
    assert (status, text) == (200, expected(1)) and cached > 81  # system prompt and image came cached
    assert ask(ray_app, "alice", turns[1]) == (200, 0, expected(1))  # another tenant: nothing shared

    serve.delete("covspec")  # a restart: new engine replicas with empty KV pools
    serve.run(build_app(ray_app.settings.model_dump(mode="json")), name="covspec", route_prefix="/")
    status, after_restart, text = ask(ray_app, "bob", turns[2])
    assert (status, text) == (200, expected(2)) and after_restart > 81  # loaded from Redis

    ray_app.redis.stop()  # Redis gone: still answered, just computed
    assert ask(ray_app, "alice", turns[3]) == (200, 0, expected(3))


def test_a_flooding_tenant_waits_for_its_share_while_a_quiet_tenant_is_served(ray_app: RayApp) -> None:
    """The fairness scenario's loads, briefly, through Ray Serve: 40 concurrent requests of one
    tenant against its share of 32 (half of ``max_in_flight``), 2 of another tenant's. The 8 beyond
    the share wait for the tenant's own slots (``tenant_wait_s``) instead of bouncing."""
    import asyncio

    from loadtest.clients import Load, run_tenants

    keys = ray_app.keys
    loads = {"quiet": Load(keys["alice"], "alice", 2), "flooder": Load(keys["bob"], "bob", 40)}
    tallies = asyncio.run(run_tenants(f"{ray_app.url}/v1/chat/completions", loads, seconds=4))
    quiet, flooder = tallies["quiet"], tallies["flooder"]
    assert set(quiet.statuses) == {200} and quiet.latencies_s  # never refused
    assert set(flooder.statuses) == {200} and flooder.statuses[200] > 40  # waited, then answered
    assert not flooder.errors and not quiet.errors
