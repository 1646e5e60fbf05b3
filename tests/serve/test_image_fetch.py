"""http(s) images: fetched only from allow-listed hosts, redirects only to them, capped in bytes
and time; everything else a 400 that says why (against a real local HTTP server)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from serve.openai.errors import APIError
from serve.openai.images import ImageLimits, load_image

PNG = io.BytesIO()
Image.new("RGB", (40, 30), (200, 30, 40)).save(PNG, format="PNG")
PNG_BYTES = PNG.getvalue()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        port = self.server.server_address[1]
        routes = {
            "/img.png": (200, {}, PNG_BYTES),
            "/moved": (302, {"Location": "/img.png"}, b""),
            "/away": (302, {"Location": f"http://localhost:{port}/img.png"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/missing": (404, {}, b"no"),
            "/big": (200, {}, b"x" * 5000),
        }
        if self.path == "/slow":
            time.sleep(1.5)
        status, headers, body = routes.get(self.path, (200, {}, PNG_BYTES))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError):  # the client gave up first (the timeout case)
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


LIMITS = ImageLimits(max_bytes=4000, allowed_hosts=frozenset({"127.0.0.1"}), fetch_timeout_s=0.5)


def load(url: str, limits: ImageLimits = LIMITS) -> Image.Image:
    return asyncio.run(load_image(url, limits, "messages[0].content[0]"))


def test_image_from_an_allowed_host_is_fetched(base: str) -> None:
    assert load(f"{base}/img.png").size == (40, 30)


def test_redirect_within_allowed_hosts_is_followed(base: str) -> None:
    assert load(f"{base}/moved").size == (40, 30)


@pytest.mark.parametrize(
    "path,message",
    [
        ("/away", "host 'localhost' is not on this server's allow-list"),  # redirect elsewhere
        ("/loop", "more than 3 redirects"),
        ("/missing", "HTTP 404"),
        ("/big", "larger than the 4000-byte limit"),
        ("/slow", "longer than 0.5 s"),
    ],
)
def test_unusable_urls_are_400_with_the_reason(base: str, path: str, message: str) -> None:
    with pytest.raises(APIError, match=message) as err:
        load(f"{base}{path}")
    assert err.value.status == 400 and err.value.param == "messages[0].content[0]"


def test_hosts_off_the_allow_list_are_never_contacted(base: str) -> None:
    with pytest.raises(APIError, match="not on this server's allow-list"):
        load(f"{base}/img.png", ImageLimits())  # empty allow-list: no http(s) image at all
