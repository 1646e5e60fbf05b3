"""Random-weight checkpoints of every supported VLM family, by name (``covspec
make-random-checkpoint --family``, the model tests). Each builder writes a complete folder that
both transformers and :func:`models.loader.load_model` load offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from models.synthetic import RandomLlavaSpec, build_random_llava
from models.synthetic_llava_next import build_random_llava_next
from models.synthetic_qwen2_vl import build_random_qwen2_vl

Builder = Callable[[Path, RandomLlavaSpec], Path]

FAMILIES: dict[str, Builder] = {
    "llava": build_random_llava,
    "llava-next": lambda out, spec: build_random_llava_next(out, spec, "llava-next"),
    "llava-onevision": lambda out, spec: build_random_llava_next(out, spec, "llava-onevision"),
    "qwen2-vl": lambda out, spec: build_random_qwen2_vl(out, spec, "qwen2-vl"),
    "qwen2.5-vl": lambda out, spec: build_random_qwen2_vl(out, spec, "qwen2.5-vl"),
}


def build_random_vlm(out_dir: str | Path, family: str, spec: RandomLlavaSpec | None = None) -> Path:
    """Write a random ``family`` checkpoint to ``out_dir``; the spec's text and vision families
    apply where the family has a choice (the LLaVA ones)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[family](Path(out_dir), spec or RandomLlavaSpec())
