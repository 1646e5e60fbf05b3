"""HTTP test helpers: a real server on a free local port running an ASGI app in a thread, and
chat requests with images."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image

from serve.local_redis import free_port
from tests.serve.engine_helpers import Oracle


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn until the block ends; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


TEXT = {"type": "text", "text": "what do you see?"}


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def chat_messages(sample: object, image_url: str) -> list[dict[str, object]]:
    return [
        {"role": "system", "content": sample.system},  # type: ignore[attr-defined]
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": sample.question.text},  # type: ignore[attr-defined]
            ],
        },
    ]


def expected_text(oracle: Oracle, sample: object, max_tokens: int) -> str:
    s = sample
    ids = oracle.greedy(s.question.text, s.image(), s.system, max_tokens)  # type: ignore[attr-defined]
    return oracle.processor.tokenizer.decode(ids, skip_special_tokens=True)


def user_message(*parts: dict[str, object]) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4}
