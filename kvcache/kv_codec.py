"""One KV block as a self-describing byte string (the Redis value), and back.

Layout: ``MAGIC`` | version (u16) | header length (u32) | header (JSON) | keys | values |
SHA-256 of everything before it. The header names the model fingerprint, KV dtype, block layout
``[layers, block_size, kv_heads, head_dim]``, the block's content hash and the token range it
holds. ``decode`` checks all of them against what the reader expects and returns the reason when
anything differs: such a value is a miss, never KV in the pool.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import torch

from core.kv import KVLayout

MAGIC = b"CVKV"
VERSION = 1
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_DIGEST = 32
_AS_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> raw view


@dataclass(frozen=True)
class BlockMeta:
    """What a reader expects of a block value (and what a writer records)."""

    model: bytes  # fingerprint of the model that computed the KV
    layout: KVLayout
    content: bytes  # the block's chained hash (``kvcache.block_hash``)
    tokens: tuple[int, int]  # [start, end) prompt rows the block holds

    def header(self) -> bytes:
        lay = self.layout
        fields = {
            "model": self.model.hex(),
            "dtype": str(lay.dtype).removeprefix("torch."),
            "layout": [lay.num_layers, lay.block_size, lay.num_kv_heads, lay.head_dim],
            "hash": self.content.hex(),
            "tokens": list(self.tokens),
        }
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class BlockKV:
    keys: torch.Tensor  # [layers, block_size, kv_heads, head_dim]
    values: torch.Tensor  # [layers, block_size, kv_heads, head_dim]


def _raw(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().cpu().reshape(-1)
    return bytes(flat.view(_AS_INT[flat.element_size()]).numpy().tobytes())


def encode(meta: BlockMeta, kv: BlockKV) -> bytes:
    header = meta.header()
    body = _PREFIX.pack(MAGIC, VERSION, len(header)) + header + _raw(kv.keys) + _raw(kv.values)
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, meta: BlockMeta) -> BlockKV | str:
    """The block's KV, or why ``data`` is not the block ``meta`` describes."""
    if len(data) < _PREFIX.size + _DIGEST:
        return "truncated"
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        return "checksum mismatch"
    magic, version, header_len = _PREFIX.unpack_from(body)
    if magic != MAGIC or version != VERSION:
        return f"format {magic!r} v{version}, expected {MAGIC!r} v{VERSION}"
    header = body[_PREFIX.size : _PREFIX.size + header_len]
    if header != meta.header():
        try:
            theirs = json.loads(header)
        except ValueError:
            return "unreadable header"
        ours = json.loads(meta.header())
        differs = sorted(k for k in ours if theirs.get(k) != ours[k])
        return "header differs in " + ", ".join(differs or ["layout"])
    lay = meta.layout
    shape = (lay.num_layers, lay.block_size, lay.num_kv_heads, lay.head_dim)
    elem = torch.empty((), dtype=lay.dtype).element_size()
    size = elem * lay.num_layers * lay.block_size * lay.num_kv_heads * lay.head_dim
    payload = body[_PREFIX.size + header_len :]
    if len(payload) != 2 * size:
        return f"payload of {len(payload)} bytes, expected {2 * size}"
    raw = torch.frombuffer(bytearray(payload), dtype=_AS_INT[elem]).view(lay.dtype)
    return BlockKV(raw[: size // elem].view(shape), raw[size // elem :].view(shape))
