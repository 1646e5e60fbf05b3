from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models.check import ModelChecker, load_reference
from models.loader import load_model
from models.random_checkpoints import build_random_vlm
from models.synthetic import RandomLlavaSpec

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}

# Every supported axis appears at least once: text family, vision tower, GQA ratio 1 and > 1,
# tied and untied embeddings, and the RoPE scaling variants; then the other VLM families
# (their own vision paths; M-RoPE for the Qwen ones).
SPECS = {
    "llama-clip-gqa2-untied": RandomLlavaSpec(text_family="llama", vision_family="clip", num_kv_heads=2),
    "qwen2-siglip-mha-tied": RandomLlavaSpec(
        text_family="qwen2", vision_family="siglip", num_kv_heads=4, tie_embeddings=True
    ),
    "llama-siglip-mqa-llama3rope": RandomLlavaSpec(
        text_family="llama", vision_family="siglip", num_kv_heads=1, rope_parameters=LLAMA3_ROPE
    ),
    "qwen2-clip-gqa2-yarn-tied": RandomLlavaSpec(
        text_family="qwen2",
        vision_family="clip",
        num_kv_heads=2,
        tie_embeddings=True,
        rope_parameters=YARN_ROPE,
    ),
}
FAMILY_SPECS = {
    "qwen2vl-gqa2-untied": ("qwen2-vl", RandomLlavaSpec(num_kv_heads=2)),
    "qwen2.5vl-mha-tied": ("qwen2.5-vl", RandomLlavaSpec(num_kv_heads=4, tie_embeddings=True)),
    "next-llama-clip-gqa2": ("llava-next", RandomLlavaSpec(text_family="llama", vision_family="clip")),
    "next-qwen2-siglip-mqa-tied": (
        "llava-next",
        RandomLlavaSpec(text_family="qwen2", vision_family="siglip", num_kv_heads=1, tie_embeddings=True),
    ),
    "onevision-qwen2-siglip-gqa2": (
        "llava-onevision",
        RandomLlavaSpec(text_family="qwen2", vision_family="siglip"),
    ),
}
CHECKPOINTS = {**{name: ("llava", spec) for name, spec in SPECS.items()}, **FAMILY_SPECS}


@pytest.fixture(scope="session", params=sorted(CHECKPOINTS))
def checker(request: pytest.FixtureRequest, checkpoint_root: Path) -> Any:
    family, spec = CHECKPOINTS[request.param]
    path = build_random_vlm(checkpoint_root / request.param, family, spec)
    model = load_model(path, dtype="fp32")
    return ModelChecker(model, load_reference(path, model.architecture), seed=0)
