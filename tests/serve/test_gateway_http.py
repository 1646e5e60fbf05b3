"""The OpenAI-compatible gateway over HTTP (uvicorn, in-process engine on the shipped tiny models):
the official openai client gets the target's exact answers; every client mistake gets its 4xx."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from PIL import Image
from starlette.requests import Request

from core.plan import RequestOutput, RequestStats
from models.tiny.personas import get_persona
from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.gateway import Gateway, GatewayConfig, make_app
from tests.serve.conftest import CHECKPOINTS, Server
from tests.serve.engine_helpers import Oracle
from tests.serve.http_helpers import TEXT, chat_messages, data_url, expected_text, serving, user_message


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle(CHECKPOINTS / "tiny-target")


def client(server: Server, user: str = "bob") -> object:
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=server.keys[user], max_retries=0)


def wait_idle(server: Server, timeout_s: float = 30) -> None:
    deadline = time.time() + timeout_s
    while server.built.engine.has_unfinished() or server.gateway.in_flight:
        assert time.time() < deadline, "requests still running"
        time.sleep(0.05)


def test_openai_client_gets_the_targets_answer_with_an_image(server: Server, oracle: Oracle) -> None:
    sample = make_sample(EVAL_SEED_START + 41, "bob")
    out = client(server).chat.completions.create(  # type: ignore[attr-defined]
        model="tiny-target",
        messages=chat_messages(sample, data_url(sample.image())),
        temperature=0,
        max_tokens=48,
    )
    assert out.choices[0].message.content == expected_text(oracle, sample, 48)
    assert out.usage.completion_tokens > 0 and out.usage.prompt_tokens > 81  # the image's tokens count
    extra = out.model_extra["covspec"]
    assert extra["adapter"] == "bob" and extra["tau"] >= 1.0
    assert out.usage.prompt_tokens_details.cached_tokens == 0


def test_openai_client_streams_the_same_text_with_usage(server: Server, oracle: Oracle) -> None:
    sample = make_sample(EVAL_SEED_START + 42, "alice", kind="describe")
    stream = client(server, "alice").chat.completions.create(  # type: ignore[attr-defined]
        model="alice", messages=chat_messages(sample, data_url(sample.image())), temperature=0,
        max_completion_tokens=48, stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(oracle, sample, 48)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def _answer(server: Server, sample: object, stop: list[str] | None, stream: bool) -> tuple[str, list[str]]:
    """The answer's text, and the content of each streamed chunk (one per engine step)."""
    out = client(server).chat.completions.create(  # type: ignore[attr-defined]
        model="bob", messages=chat_messages(sample, data_url(sample.image())),  # type: ignore[attr-defined]
        temperature=0, max_tokens=48, stop=stop, stream=stream,
    )  # fmt: skip
    if not stream:
        return out.choices[0].message.content, []
    pieces = [c.choices[0].delta.content or "" for c in out if c.choices]
    return "".join(pieces), pieces


def test_a_stop_string_spanning_steps_streams_exactly_the_text_that_is_returned(server: Server) -> None:
    sample = make_sample(EVAL_SEED_START + 43, "bob", kind="describe")
    full, pieces = _answer(server, sample, None, stream=True)
    # stop strings across the boundary between two steps' text: their starts arrive a step early
    edges = list(itertools.accumulate(len(p) for p in pieces))[:-1]
    spanning = [full[e - 2 : e + 3] for e in edges if 2 <= e <= len(full) - 3][:4]
    assert len(spanning) >= 2, pieces
    for stop in spanning:
        want = full[: full.find(stop)]
        streamed, chunks = _answer(server, sample, [stop], stream=True)
        returned, _ = _answer(server, sample, [stop], stream=False)
        assert streamed == returned == want, (stop, chunks)


def test_models_lists_the_base_model_and_the_callers_adapter_only(server: Server) -> None:
    ids = [m.id for m in client(server, "alice").models.list().data]  # type: ignore[attr-defined]
    assert ids == ["tiny-target", "alice"]


def post(server: Server, body: object, key: str | None = "bob", raw: bytes | None = None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {server.keys.get(key, key)}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers, timeout=120)


def image_part(url: str) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": url}}


BIG = Image.new("RGB", (300, 300), (10, 20, 30))
SMALL = Image.new("RGB", (72, 72), (200, 20, 30))
BAD_REQUESTS = {
    "malformed JSON": (None, b"{not json", "bob", 400, "not valid JSON"),
    "bad base64": (user_message(image_part("data:image/png;base64,@@@"), TEXT), None, "bob", 400, "base64"),
    "not an image": (
        user_message(image_part("data:image/png;base64," + base64.b64encode(b"hello").decode()), TEXT),
        None, "bob", 400, "not an image",
    ),
    "too many pixels": (user_message(image_part(data_url(BIG)), TEXT), None, "bob", 400, "pixel limit"),
    "too many images": (
        user_message(*[image_part(data_url(SMALL))] * 3, TEXT), None, "bob", 400, "more than 2 images",
    ),
    "http image URL": (
        user_message(image_part("http://169.254.169.254/x.png"), TEXT), None, "bob", 400, "allow-list",
    ),
    "prompt too long": ({**user_message(TEXT), "max_tokens": 100_000}, None, "bob", 400, "context window"),
    "another user's adapter": ({**user_message(TEXT), "model": "alice"}, None, "bob", 404, "does not exist"),
    "bad key": (user_message(TEXT), None, "sk-nope", 401, "invalid API key"),
    "no key": (user_message(TEXT), None, None, 401, "missing API key"),
    "n = 2": ({**user_message(TEXT), "n": 2}, None, "bob", 400, "n = 1"),
    "unknown field": ({**user_message(TEXT), "temprature": 0}, None, "bob", 400, "temprature"),
    "no messages": ({"messages": []}, None, "bob", 400, "messages"),
    "last message not the user's": (
        {"messages": [{"role": "assistant", "content": "hi"}]}, None, "bob", 400, "last message",
    ),
    "body too large": (None, b"x" * 500_000, "bob", 413, "larger than"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_its_status_in_openai_shape(server: Server, case: str) -> None:
    body, raw, key, status, message = BAD_REQUESTS[case]
    response = post(server, body, key, raw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["code"] == status and error["type"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_client_disconnect_mid_stream_frees_the_requests_blocks(server: Server) -> None:
    wait_idle(server)
    sched = server.built.engine.scheduler
    free_before = sched.pool.num_free_blocks
    sample = make_sample(EVAL_SEED_START + 43, "bob", kind="describe")
    body = {"messages": chat_messages(sample, data_url(sample.image())), "max_tokens": 200, "stream": True}
    headers = {"authorization": f"Bearer {server.keys['bob']}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the stream has started; now hang up
    wait_idle(server)
    assert sched.pool.num_free_blocks == free_before
    sched.check_integrity()
    assert server.built.engine.drafter is not None
    server.built.engine.drafter.check_integrity()


class HeldEngine:
    """An engine whose requests wait until ``release`` is set (to hold the gateway full)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = 0

    async def stream(
        self, prompt: object, sampling: object, adapter: object, whole: bool = False, learn: bool = False
    ) -> AsyncIterator[object]:
        self.started += 1
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        raise ValueError("released")  # ends every held request with a 400
        yield  # an async generator

    async def alive(self) -> bool:
        return True


@contextmanager
def held_gateway(server: Server, config: GatewayConfig) -> Iterator[tuple[HeldEngine, Gateway, Server]]:
    """A gateway with ``config`` over a :class:`HeldEngine`, served over HTTP: the engine, the
    gateway, and the test server pointing at it."""
    engine = HeldEngine()
    gateway = Gateway(engine, server.built.processor, server.gateway.keys, config)
    with serving(make_app(gateway)) as url:
        yield engine, gateway, replace(server, url=url)


def test_overload_gets_503_with_retry_after_not_a_hang(server: Server, tmp_path: Path) -> None:
    config = GatewayConfig(max_in_flight=2, tenant_share=1.0, retry_after_s=3)
    with held_gateway(server, config) as (engine, gateway, here), ThreadPoolExecutor(2) as pool:
        held = [pool.submit(post, here, user_message(TEXT)) for _ in range(2)]
        until(lambda: engine.started >= 2)
        refused = post(here, user_message(TEXT))
        engine.release.set()
        assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
        assert refused.json()["error"]["type"] == "service_unavailable"
        assert [f.result().status_code for f in held] == [400, 400]
        assert gateway.in_flight == 0  # every admitted request gave its place back
        assert engine.started == 2  # the refused one never reached the engine


def test_health_is_200_while_the_engine_runs(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert get_persona("bob").system  # the persona prompts used above exist


def test_every_chat_response_is_recorded_with_status_and_tenant(server: Server) -> None:
    server.responses.clear()
    assert post(server, user_message(TEXT), key="sk-nope").status_code == 401
    assert post(server, user_message(TEXT)).status_code == 200
    assert server.responses == [(401, None), (200, "t-bob")]


class DyingEngine:
    """Emits one token, then its step loop dies; afterwards it reports itself dead."""

    def __init__(self) -> None:
        self.dead = False

    async def stream(
        self, prompt: object, sampling: object, adapter: object, whole: bool = False, learn: bool = False
    ) -> AsyncIterator[object]:
        stats = RequestStats(
            prompt_tokens=5, output_tokens=1, verify_steps=1, draft_tokens=0, accepted_tokens=0
        )
        yield RequestOutput(0, (7,), False, None, stats, text="hel")
        self.dead = True
        raise RuntimeError("engine loop failed: boom")

    async def alive(self) -> bool:
        return not self.dead


def test_engine_death_mid_stream_is_an_error_event_then_health_503(server: Server) -> None:
    engine = DyingEngine()
    gateway = Gateway(engine, server.built.processor, server.gateway.keys, GatewayConfig())
    with serving(make_app(gateway)) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        body = {**user_message(TEXT), "stream": True}
        headers = {"authorization": f"Bearer {server.keys['bob']}"}
        lines = httpx.post(
            f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30
        ).text.splitlines()
        events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert json.loads(events[1])["choices"][0]["delta"]["content"] == "hel"
        assert (
            json.loads(events[2])["error"]["code"] == 503
            and "boom" in json.loads(events[2])["error"]["message"]
        )
        assert events[-1] == "[DONE]"
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["error"]["type"] == "service_unavailable"
        assert gateway.in_flight == 0


def test_engine_death_under_a_whole_answer_is_a_503_with_retry_after_not_a_500(server: Server) -> None:
    gateway = Gateway(DyingEngine(), server.built.processor, server.gateway.keys, GatewayConfig())
    with serving(make_app(gateway)) as url:
        headers = {"authorization": f"Bearer {server.keys['bob']}"}
        r = httpx.post(f"{url}/v1/chat/completions", json=user_message(TEXT), headers=headers, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "boom" in r.json()["error"]["message"]
        assert gateway.in_flight == 0


def test_a_request_cancelled_before_its_first_token_gives_its_place_back(server: Server) -> None:
    closed: list[bool] = []

    async def never_starts() -> AsyncIterator[object]:
        try:
            await asyncio.sleep(3600)
            yield None
        finally:
            closed.append(True)

    class NeverStarts(HeldEngine):
        def stream(self, *args: object, **kwargs: object) -> AsyncIterator[object]:
            return never_starts()

    async def cancel_while_waiting() -> None:
        """What Ray Serve does when the caller hangs up: the request's task is cancelled."""
        task = asyncio.create_task(gateway.chat(chat_request(user_message(TEXT), server.keys["bob"])))
        await asyncio.sleep(0.2)
        assert gateway.in_flight == 1 and gateway.tenant_in_flight["t-bob"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    gateway = Gateway(NeverStarts(), server.built.processor, server.gateway.keys, GatewayConfig())
    asyncio.run(cancel_while_waiting())
    assert gateway.in_flight == 0 and not gateway.tenant_in_flight and closed == [True]  # place given back


def until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def chat_request(body: object, key: str) -> Request:
    """A chat completions request as Starlette hands it to a route."""
    raw = json.dumps(body).encode()

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": raw, "more_body": False}

    headers = [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": headers,
        "query_string": b"",
    }
    return Request(scope, receive)


def cached_and_text(server: Server, user: str, sample: object) -> tuple[int, str]:
    out = client(server, user).chat.completions.create(  # type: ignore[attr-defined]
        model="tiny-target", messages=chat_messages(sample, data_url(sample.image())),  # type: ignore[attr-defined]
        temperature=0, max_tokens=32,
    )  # fmt: skip
    return out.usage.prompt_tokens_details.cached_tokens, out.choices[0].message.content


def test_same_tenant_reuses_an_image_and_system_prompt_another_tenant_does_not(
    server: Server, oracle: Oracle
) -> None:
    first = make_sample(EVAL_SEED_START + 60, "dave", turn=0)  # a persona no test here used before
    second = make_sample(EVAL_SEED_START + 60, "dave", turn=1)  # same scene and persona, another question
    assert first.question.text != second.question.text
    cached, text = cached_and_text(server, "bob", first)
    assert cached == 0 and text == expected_text(oracle, first, 32)
    cached, text = cached_and_text(server, "bob", second)
    assert cached > 81 and text == expected_text(oracle, second, 32)  # the image's rows came cached
    cached, text = cached_and_text(server, "alice", second)
    assert cached == 0 and text == expected_text(oracle, second, 32)


def test_a_public_system_prompt_is_shared_across_tenants_up_to_its_end(
    server: Server, oracle: Oracle
) -> None:
    sample = make_sample(EVAL_SEED_START + 61, None)  # the default persona: declared public here
    assert cached_and_text(server, "bob", sample)[0] == 0
    cached, text = cached_and_text(server, "alice", sample)
    system_turn = oracle.processor.apply_chat_template(
        [{"role": "system", "content": [{"type": "text", "text": sample.system}]}],
        add_generation_prompt=False,
    )
    public = len(oracle.processor.tokenizer(system_turn)["input_ids"])
    block = server.built.engine.scheduler.pool.block_size
    assert cached == public // block * block > 0
    assert text == expected_text(oracle, sample, 32)


def test_a_tenant_over_its_share_gets_429_while_another_tenant_is_admitted(server: Server) -> None:
    config = GatewayConfig(max_in_flight=4, tenant_share=0.5, retry_after_s=2)  # two per tenant
    with held_gateway(server, config) as (engine, gateway, here), ThreadPoolExecutor(3) as pool:
        held = [pool.submit(post, here, user_message(TEXT), "bob") for _ in range(2)]
        until(lambda: engine.started >= 2)
        refused = post(here, user_message(TEXT), "bob")
        quiet = pool.submit(post, here, user_message(TEXT), "alice")
        until(lambda: engine.started >= 3)  # the other tenant's request reached the engine
        assert dict(gateway.tenant_in_flight) == {"t-bob": 2, "t-alice": 1}
        engine.release.set()
        assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert [f.result().status_code for f in [*held, quiet]] == [400, 400, 400]  # the engine's answer
    assert gateway.in_flight == 0 and not gateway.tenant_in_flight  # every place given back


def test_a_tenant_over_its_share_waits_for_its_own_slot_while_another_tenant_goes_first(
    server: Server,
) -> None:
    """With ``tenant_wait_s``, the request beyond the share is not bounced: it is answered once
    one of its tenant's requests finishes; the other tenant's request never waits for it."""
    config = GatewayConfig(max_in_flight=4, tenant_share=0.5, tenant_wait_s=10)  # two per tenant
    with held_gateway(server, config) as (engine, gateway, here), ThreadPoolExecutor(4) as pool:
        held = [pool.submit(post, here, user_message(TEXT), "bob") for _ in range(2)]
        until(lambda: engine.started >= 2)
        waiting = pool.submit(post, here, user_message(TEXT), "bob")
        until(lambda: gateway.slots.waiting() >= 1)
        quiet = pool.submit(post, here, user_message(TEXT), "alice")
        until(lambda: engine.started >= 3)  # the other tenant's request reached the engine at once
        assert not waiting.done() and dict(gateway.tenant_in_flight) == {"t-bob": 2, "t-alice": 1}
        engine.release.set()
        assert [f.result().status_code for f in [*held, quiet, waiting]] == [400] * 4  # the engine's answers
    assert engine.started == 4 and gateway.in_flight == 0 and gateway.slots.waiting() == 0


def test_a_draining_gateway_refuses_new_requests_and_lets_running_ones_finish(server: Server) -> None:
    """What ``covspec serve`` does on SIGTERM / SIGINT before taking the app down."""
    config = GatewayConfig(retry_after_s=4)
    with held_gateway(server, config) as (engine, gateway, here), ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, here, user_message(TEXT))
        until(lambda: engine.started >= 1)
        assert gateway.drain() == 1  # one request still running
        refused = post(here, user_message(TEXT))
        health = httpx.get(f"{here.url}/health")
        engine.release.set()
        assert refused.status_code == 503 and refused.headers["retry-after"] == "4"
        assert "stopping" in refused.json()["error"]["message"]
        assert health.status_code == 503
        assert running.result().status_code == 400  # answered by the engine, not cut off
        assert engine.started == 1 and gateway.in_flight == 0
