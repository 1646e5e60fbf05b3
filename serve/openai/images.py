"""Images of a chat request: ``data:`` URLs decoded and checked against the server's limits.

http(s) URLs are refused unless the deployment allow-lists hosts (fetching arbitrary URLs from
the server is how SSRF happens); that allow-list arrives with the fetcher.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

from serve.openai.errors import bad_request


@dataclass(frozen=True)
class ImageLimits:
    max_images: int = 4  # per request
    max_bytes: int = 8 * 1024 * 1024  # encoded size of one image
    max_pixels: int = 4096 * 4096  # width x height of one image


def decode_image(url: str, limits: ImageLimits, param: str) -> Any:
    """A ``data:image/...;base64,...`` URL -> an RGB PIL image; ``APIError`` 400 otherwise."""
    from PIL import Image, UnidentifiedImageError

    if url.startswith(("http://", "https://")):
        raise bad_request("image URLs are not fetched by this server; send the image as a data: URL", param)
    head, sep, data = url.partition(",")
    if not url.startswith("data:") or not sep or not head.endswith(";base64"):
        raise bad_request("image_url.url must be a data URL: data:image/png;base64,<data>", param)
    if len(data) * 3 // 4 > limits.max_bytes:
        raise bad_request(f"image is larger than the {limits.max_bytes}-byte limit", param)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"image data is not valid base64: {e}", param) from e
    try:
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size
            if w * h > limits.max_pixels:
                raise bad_request(f"image is {w}x{h}, more than the {limits.max_pixels}-pixel limit", param)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise bad_request(f"image data is not an image this server can read ({e})", param) from e
    except Image.DecompressionBombError as e:
        raise bad_request(f"image is too large to decode: {e}", param) from e
