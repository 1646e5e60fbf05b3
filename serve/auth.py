"""API keys: who is calling (user, tenant) and which drafter adapter is theirs.

The keys file is a YAML list of ``{key_sha256, user, tenant, adapter}``; keys themselves are never
stored, only their SHA-256, and a presented key is compared against every entry in constant time
(``hmac.compare_digest``), so neither timing nor the file gives a key away.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml

from serve.openai.errors import APIError

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Caller:
    user: str
    tenant: str
    adapter: str | None  # the drafter adapter of this user; None = the base drafter
    learn: bool = False  # the service may keep this user's requests to train their drafter adapter

    @property
    def learned_adapter(self) -> str:
        """The adapter online learning trains for this user: their own, else one named after them."""
        return self.adapter or self.user


@dataclass(frozen=True)
class KeyEntry:
    key_sha256: str
    caller: Caller


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _check_name(what: str, value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{what} {value!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return value


class KeyStore:
    def __init__(self, entries: list[KeyEntry]) -> None:
        self.entries = entries

    @classmethod
    def load(cls, path: str | Path) -> KeyStore:
        """The keys in ``path``; ``ValueError`` naming the entry that is malformed."""
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"keys file {file} does not exist; create one with `covspec keys add`")
        try:
            rows = yaml.safe_load(file.read_text()) or []
        except yaml.YAMLError as e:
            raise ValueError(f"keys file {file} is not valid YAML: {e}") from e
        if not isinstance(rows, list):
            raise ValueError(f"keys file {file} must hold a YAML list of entries")
        entries = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or not {"key_sha256", "user", "tenant"} <= row.keys():
                raise ValueError(
                    f"{file} entry {i} needs key_sha256, user and tenant (adapter and learn optional)"
                )
            digest = str(row["key_sha256"])
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{file} entry {i}: key_sha256 must be 64 lowercase hex digits")
            adapter, learn = row.get("adapter"), row.get("learn", False)
            if not isinstance(learn, bool):
                raise ValueError(f"{file} entry {i}: learn must be true or false, got {learn!r}")
            adapter = None if adapter is None else str(adapter)
            caller = Caller(str(row["user"]), str(row["tenant"]), adapter, learn)
            entries.append(KeyEntry(digest, caller))
        return cls(entries)

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller of an ``Authorization: Bearer <key>`` header; ``APIError`` 401 otherwise."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'")
        digest = key_digest(key.strip())
        found = None
        for entry in self.entries:  # every entry, no early exit: constant time in the match
            if hmac.compare_digest(entry.key_sha256, digest):
                found = entry.caller
        if found is None:
            raise APIError(401, "invalid API key")
        return found


def add_key(path: str | Path, user: str, tenant: str, adapter: str | None = None, learn: bool = False) -> str:
    """Create a key for ``user`` of ``tenant``, append its hash to ``path``; return the key.
    ``learn``: the service may keep the user's requests to train their drafter adapter."""
    file = Path(path)
    rows = (yaml.safe_load(file.read_text()) or []) if file.is_file() else []
    key = "sk-covspec-" + secrets.token_urlsafe(24)
    row = {
        "key_sha256": key_digest(key),
        "user": _check_name("user", user),
        "tenant": _check_name("tenant", tenant),
    }
    if adapter is not None:
        row["adapter"] = _check_name("adapter", adapter)
    if learn:
        row["learn"] = True
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(yaml.safe_dump([*rows, row], sort_keys=False))
    return key
