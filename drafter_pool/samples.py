"""What online learning keeps: each learning user's served samples and published adapter versions.

Everything lives on disk under one root, scoped by tenant, then by adapter name (the user's):

    <root>/<tenant>/<name>/samples/<seq>.json   prompt token ids (one placeholder per image),
                                                 the image placeholder id, the target's answer
    <root>/<tenant>/<name>/samples/<seq>.png    the prompt's image
    <root>/<tenant>/<name>/v<N>/                version N of the adapter, in PEFT's format,
                                                 with ``version.json`` (how it was made)

A user's samples are only ever read for that user's adapter; at most ``max_samples`` are kept
(oldest dropped first); ``forget`` removes a user's samples and versions. The engine replica
that served a request writes its sample; the trainer reads them; the drafter's owners watch the
version folders. Files are written under a temporary name and renamed, so a reader never sees
half a sample or half a version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.prompt import Prompt

_VERSION = re.compile(r"^v(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class ServedSample:
    """One finished request of a learning user: the prompt and what the target answered."""

    prompt: Prompt  # token ids with one placeholder per image, and the images
    answer_ids: tuple[int, ...]  # the target's output tokens
    seq: int  # order of arrival within the user's samples


@dataclass(frozen=True)
class Published:
    version: int
    folder: Path  # the PEFT adapter folder of that version


def _checked(what: str, value: str) -> str:
    if not _NAME.match(value) or value.startswith("."):
        raise ValueError(f"{what} {value!r} must be 1-64 letters, digits, '_', '-' or '.'")
    return value


class SampleStore:
    def __init__(self, root: str | Path, max_samples: int = 400) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.root, self.max_samples = Path(root), max_samples

    def user_dir(self, tenant: str, name: str) -> Path:
        return self.root / _checked("tenant", tenant) / _checked("adapter name", name)

    def add(self, tenant: str, name: str, prompt: Prompt, answer_ids: tuple[int, ...]) -> bool:
        """Keep one served sample; False (nothing kept) when it cannot train a drafter LoRA:
        no answer, or not exactly one image."""
        if not answer_ids or len(prompt.images) != 1:
            return False
        folder = self.user_dir(tenant, name) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        seq = max(self._seqs(folder), default=-1) + 1
        body = {
            "token_ids": list(prompt.token_ids),
            "image_token_id": prompt.image_token_id,
            "answer_ids": list(answer_ids),
        }
        image_tmp, body_tmp = folder / f".{seq:09d}.png.tmp", folder / f".{seq:09d}.json.tmp"
        prompt.images[0].save(image_tmp, format="PNG")
        os.replace(image_tmp, folder / f"{seq:09d}.png")
        body_tmp.write_text(json.dumps(body))
        os.replace(body_tmp, folder / f"{seq:09d}.json")  # the .json last: a sample is whole once it is there
        for old in self._seqs(folder)[: -self.max_samples]:
            for suffix in (".json", ".png"):
                (folder / f"{old:09d}{suffix}").unlink(missing_ok=True)
        return True

    def samples(self, tenant: str, name: str) -> list[ServedSample]:
        """The user's kept samples, oldest first."""
        from PIL import Image

        folder = self.user_dir(tenant, name) / "samples"
        out = []
        for seq in self._seqs(folder):
            try:
                body: dict[str, Any] = json.loads((folder / f"{seq:09d}.json").read_text())
                with Image.open(folder / f"{seq:09d}.png") as img:
                    image = img.convert("RGB")
            except FileNotFoundError:  # dropped or forgotten while we read
                continue
            prompt = Prompt(tuple(body["token_ids"]), (image,), int(body["image_token_id"]), tenant=tenant)
            out.append(ServedSample(prompt, tuple(body["answer_ids"]), seq))
        return out

    def count(self, tenant: str, name: str) -> tuple[int, int]:
        """(samples kept, the sequence number the next one gets)."""
        seqs = self._seqs(self.user_dir(tenant, name) / "samples")
        return len(seqs), (seqs[-1] + 1 if seqs else 0)

    def users(self) -> list[tuple[str, str]]:
        """(tenant, name) of every user with samples or versions."""
        if not self.root.is_dir():
            return []
        return sorted(
            (t.name, u.name)
            for t in self.root.iterdir()
            if t.is_dir() and _NAME.match(t.name)
            for u in t.iterdir()
            if u.is_dir() and _NAME.match(u.name)
        )

    def versions(self, tenant: str, name: str) -> list[Published]:
        folder = self.user_dir(tenant, name)
        if not folder.is_dir():
            return []
        found = [(int(m[1]), p) for p in folder.iterdir() if (m := _VERSION.match(p.name)) and p.is_dir()]
        return [Published(v, p) for v, p in sorted(found)]

    def latest(self, tenant: str, name: str) -> Published | None:
        versions = self.versions(tenant, name)
        return versions[-1] if versions else None

    def publish(self, tenant: str, name: str, adapter_dir: Path, record: dict[str, Any]) -> Published:
        """Move the trained adapter in ``adapter_dir`` in as the next version (with ``record``)."""
        latest = self.latest(tenant, name)
        version = 1 if latest is None else latest.version + 1
        (adapter_dir / "version.json").write_text(json.dumps({"version": version, **record}, indent=1))
        folder = self.user_dir(tenant, name) / f"v{version}"
        os.replace(adapter_dir, folder)  # same file system: the tmp dir lives under the root
        return Published(version, folder)

    def scratch(self, tenant: str, name: str) -> Path:
        """A fresh folder to train into, on the same file system as the versions."""
        folder = self.user_dir(tenant, name) / ".training"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def forget(self, name: str) -> list[str]:
        """Remove ``name``'s samples and versions in every tenant; the tenants it was found in."""
        _checked("adapter name", name)
        gone = []
        for tenant, user in self.users():
            if user == name:
                shutil.rmtree(self.root / tenant / user)
                gone.append(tenant)
        return gone

    @staticmethod
    def _seqs(folder: Path) -> list[int]:
        if not folder.is_dir():
            return []
        return sorted(int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit())
