"""API keys: created once and stored as hashes, checked per request, bad files named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from serve.auth import Caller, KeyStore, add_key, key_digest
from serve.openai.errors import APIError


def test_added_key_is_printed_once_and_stored_only_as_its_hash(tmp_path: Path) -> None:
    file = tmp_path / "keys.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "serve.cli", "keys", "add", "--user", "erin", "--tenant", "acme",
         "--adapter", "bob", "--file", str(file)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    key = result.stdout.strip()
    assert key.startswith("sk-covspec-") and key not in file.read_text()
    assert key_digest(key) in file.read_text()
    assert KeyStore.load(file).authenticate(f"Bearer {key}") == Caller("erin", "acme", "bob")


def test_each_key_maps_to_its_own_caller(tmp_path: Path) -> None:
    file = tmp_path / "keys.yaml"
    k1, k2 = add_key(file, "ann", "t1"), add_key(file, "ben", "t2", "bob")
    store = KeyStore.load(file)
    assert store.authenticate(f"Bearer {k1}") == Caller("ann", "t1", None)
    assert store.authenticate(f"bearer {k2}") == Caller("ben", "t2", "bob")


@pytest.mark.parametrize(
    "header,message",
    [(None, "missing API key"), ("Basic abc", "missing API key"), ("Bearer ", "missing API key"),
     ("Bearer sk-covspec-nope", "invalid API key")],
)  # fmt: skip
def test_missing_or_wrong_keys_are_401(tmp_path: Path, header: str | None, message: str) -> None:
    file = tmp_path / "keys.yaml"
    add_key(file, "ann", "t1")
    with pytest.raises(APIError, match=message) as err:
        KeyStore.load(file).authenticate(header)
    assert err.value.status == 401


@pytest.mark.parametrize(
    "text,message",
    [("{a: [", "not valid YAML"), ("a: 1", "YAML list"), ("- {user: x}", "needs key_sha256"),
     ("- {key_sha256: abc, user: x, tenant: y}", "64 lowercase hex")],
)  # fmt: skip
def test_malformed_keys_files_are_named(tmp_path: Path, text: str, message: str) -> None:
    file = tmp_path / "keys.yaml"
    file.write_text(text)
    with pytest.raises(ValueError, match=message):
        KeyStore.load(file)


def test_names_with_odd_characters_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="user 'a b'"):
        add_key(tmp_path / "keys.yaml", "a b", "t")


def test_serve_with_a_missing_config_fails_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "serve.cli", "serve", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_learning_key_says_so_and_names_the_adapter_learned_for_the_user(tmp_path: Path) -> None:
    file = tmp_path / "keys.yaml"
    erin, carol = add_key(file, "erin", "t1", learn=True), add_key(file, "carol", "t2", "carol", learn=True)
    plain = add_key(file, "bob", "t3", "bob")
    store = KeyStore.load(file)
    assert store.authenticate(f"Bearer {erin}").learned_adapter == "erin"  # no adapter: named after her
    assert store.authenticate(f"Bearer {carol}").learned_adapter == "carol"  # her own, trained on
    assert not store.authenticate(f"Bearer {plain}").learn  # off unless the key says so
    file.write_text(file.read_text().replace("learn: true", "learn: yes please", 1))
    with pytest.raises(ValueError, match="learn must be true or false"):
        KeyStore.load(file)
