"""Images of a chat request: ``data:`` URLs, or http(s) URLs from allow-listed hosts, checked
against the server's limits.

Fetching arbitrary URLs from a server is how SSRF happens, so an http(s) image is fetched only
when its host is on the deployment's allow-list, redirects are followed only to allow-listed
hosts, and the download is capped in bytes and time. Anything else is a 400 that says why.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from serve.openai.errors import APIError, bad_request

MAX_REDIRECTS = 3
FORMATS = "PNG, JPEG, GIF, WebP, BMP or TIFF"


@dataclass(frozen=True)
class ImageLimits:
    max_images: int = 4  # per request
    max_bytes: int = 8 * 1024 * 1024  # encoded size of one image
    max_pixels: int = 4096 * 4096  # width x height of one image
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)  # http(s) image hosts; empty: none
    fetch_timeout_s: float = 5.0
    # longest side over shortest: a 60000 x 1 image resized to a 72-pixel shortest side would be
    # gigabytes (Qwen2-VL's processor refuses beyond 200 too)
    max_aspect_ratio: float = 200.0


async def load_image(url: str, limits: ImageLimits, param: str) -> Any:
    """An image part's URL -> an RGB PIL image; ``APIError`` 400 for anything unusable."""
    if url.startswith(("http://", "https://")):
        return decode_bytes(await fetch(url, limits, param), limits, param)
    head, sep, data = url.partition(",")
    if not url.startswith("data:") or not sep or not head.endswith(";base64"):
        raise bad_request(
            "image_url.url must be a data URL (data:image/png;base64,...) or an http(s) URL", param
        )
    if len(data) * 3 // 4 > limits.max_bytes:
        raise bad_request(f"image is larger than the {limits.max_bytes}-byte limit", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"image data is not valid base64: {e}", param) from e
    return decode_bytes(raw, limits, param)


def _check_host(url: str, limits: ImageLimits, param: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in limits.allowed_hosts:
        raise bad_request(
            f"image host {host!r} is not on this server's allow-list; send the image as a data: URL", param
        )


async def fetch(url: str, limits: ImageLimits, param: str) -> bytes:
    """The bytes at ``url``, following at most ``MAX_REDIRECTS`` redirects to allowed hosts."""
    import httpx

    async with httpx.AsyncClient(follow_redirects=False, timeout=limits.fetch_timeout_s) as client:
        for _ in range(MAX_REDIRECTS + 1):
            _check_host(url, limits, param)
            try:
                async with client.stream("GET", url) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise bad_request(f"could not fetch the image: HTTP {response.status_code}", param)
                    body = b""
                    async for part in response.aiter_bytes():
                        body += part
                        if len(body) > limits.max_bytes:
                            raise bad_request(
                                f"image is larger than the {limits.max_bytes}-byte limit", param
                            )
                    return body
            except httpx.TimeoutException as e:
                raise bad_request(
                    f"fetching the image took longer than {limits.fetch_timeout_s} s", param
                ) from e
            except httpx.HTTPError as e:
                raise bad_request(f"could not fetch the image: {e}", param) from e
    raise bad_request(f"more than {MAX_REDIRECTS} redirects fetching the image", param)


def decode_bytes(raw: bytes, limits: ImageLimits, param: str) -> Any:
    """Encoded image bytes -> an RGB PIL image (the first frame of an animation); ``APIError``
    400 for bytes that are no image, or one outside ``limits``. The size is checked from the
    header, before any pixel is decoded (a decompression bomb costs nothing)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            check_size(img.size, limits, param)
            return to_rgb(img)
    except APIError:
        raise
    except Image.DecompressionBombError as e:
        raise bad_request(f"image is too large to decode: {e}", param) from e
    except UnidentifiedImageError as e:
        raise bad_request(
            f"image data is not an image in a format this server reads ({FORMATS})", param
        ) from e
    except Exception as e:  # a parser of untrusted bytes: whatever it raises, the file is broken
        raise bad_request(f"image data could not be decoded ({type(e).__name__}: {e})", param) from e


def check_size(size: tuple[int, int], limits: ImageLimits, param: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise bad_request(f"image is {w}x{h}: it has no pixels", param)
    if w * h > limits.max_pixels:
        raise bad_request(f"image is {w}x{h}, more than the {limits.max_pixels}-pixel limit", param)
    if max(w, h) > limits.max_aspect_ratio * min(w, h):
        raise bad_request(
            f"image is {w}x{h}: one side is more than {limits.max_aspect_ratio:g} times the other", param
        )


def to_rgb(img: Any) -> Any:
    """RGB as the checkpoints' processors make it (transformers' ``convert_to_rgb``: transparency
    composited onto white). 16-bit images keep their high byte; PIL alone would clip them."""
    import numpy as np
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb

    if img.mode.startswith("I;16") or img.mode == "I":
        img = Image.fromarray((np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    return Image.fromarray(convert_to_rgb(img, return_numpy=True))
