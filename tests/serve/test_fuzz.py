"""Fuzzing the chat endpoint over HTTP (in-process engine on the shipped tiny models): thousands of
generated bodies and every kind of image a client might send get a 200 or a 4xx with a message,
never a 5xx; an image that decodes gets the target's answer to it; the server stays healthy."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from PIL import Image

from loadtest.fuzz import QUESTION, chat_bodies, data_url, image_body, image_cases, raw_bodies
from tests.serve.conftest import CHECKPOINTS, Server
from tests.serve.engine_helpers import Oracle

CASES = image_cases()
GOOD_PNG = CASES["rgb png"].url()
URLS = [GOOD_PNG, data_url("png", b"not a png"), "data:image/png;base64,@@@", "http://example.com/a.png"]
FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle(CHECKPOINTS / "tiny-target")


def post(server: Server, content: bytes) -> httpx.Response:
    headers = {"authorization": f"Bearer {server.keys['bob']}", "content-type": "application/json"}
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers, timeout=60)


def check_answer(r: httpx.Response) -> None:
    """A 200 (a stream of events without an error, or a completion), or a 4xx with a message."""
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        assert r.json()["error"]["message"], r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and '{"error"' not in r.text, r.text[-500:]
    else:
        assert r.json()["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_image_gets_the_answer_to_what_it_shows_or_a_400_that_says_why(
    server: Server, oracle: Oracle, case: str
) -> None:
    image = CASES[case]
    r = post(server, json.dumps(image_body(image.url())).encode())
    if image.seen is None:
        assert r.status_code == 400, r.text[:300]
        error = r.json()["error"]
        assert error["param"] == "messages[0].content[0]" and "image" in error["message"]
        assert "<_io" not in error["message"]  # says why in words, not with an object's repr
        return
    assert r.status_code == 200, r.text[:300]
    seen: Image.Image = image.seen()
    ids = oracle.greedy(QUESTION, seen, None, 4)
    assert r.json()["choices"][0]["message"]["content"] == oracle.processor.tokenizer.decode(
        ids, skip_special_tokens=True
    )


def test_transparency_is_composited_onto_white_not_dropped(server: Server, oracle: Oracle) -> None:
    """Dropping alpha shows the pixels under a transparent area; the checkpoints' processors show
    white there. The two pictures get different answers, so the answer tells which one was seen."""
    image = CASES["rgba png, half transparent"]
    assert image.seen is not None
    seen = image.seen()
    dropped = seen.convert("RGB")  # what Image.convert does: alpha dropped
    on_white = oracle.greedy(QUESTION, seen, None, 4)
    assert on_white != oracle.greedy(QUESTION, dropped, None, 4), "the case cannot tell the two apart"
    r = post(server, json.dumps(image_body(image.url())).encode())
    assert r.json()["choices"][0]["message"]["content"] == oracle.processor.tokenizer.decode(
        on_white, skip_special_tokens=True
    )


@FUZZ
@given(body=chat_bodies(URLS))
def test_generated_bodies_get_a_200_or_a_4xx_never_a_5xx(server: Server, body: object) -> None:
    check_answer(post(server, json.dumps(body).encode()))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(raw=raw_bodies())
def test_raw_bytes_and_broken_json_get_a_4xx_never_a_5xx(server: Server, raw: bytes) -> None:
    check_answer(post(server, raw))


def test_after_the_fuzzing_the_server_is_healthy_and_answers_exactly(server: Server, oracle: Oracle) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.gateway.in_flight == 0 and not server.built.engine.has_unfinished()
    server.built.engine.scheduler.check_integrity()
    r = post(server, json.dumps(image_body(GOOD_PNG)).encode())
    seen = CASES["rgb png"].seen
    assert seen is not None
    expected = oracle.processor.tokenizer.decode(
        oracle.greedy(QUESTION, seen(), None, 4), skip_special_tokens=True
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected
