"""The loader refuses what it cannot load with a message that says what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.loader import CheckpointError, load_model
from models.synthetic import RandomLlavaSpec, build_random_llava


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_llava(tmp_path_factory.mktemp("good"), RandomLlavaSpec())


def _copy(good: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(good, dst)
    return dst


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_model(tmp_path / "nope")


def test_folder_without_config_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_model(tmp_path)


def test_unsupported_architecture(good: Path, tmp_path: Path) -> None:
    ckpt = _copy(good, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["WhisperForConditionalGeneration"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"WhisperForConditionalGeneration.*not supported"):
        load_model(ckpt)


def test_gemma3_is_refused_with_the_reason_and_the_supported_families(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"]}))
    with pytest.raises(
        CheckpointError, match=r"Gemma 3 is not supported: .*sliding window.*Qwen2VLForConditional"
    ):
        load_model(tmp_path)


def test_missing_weights_file(good: Path, tmp_path: Path) -> None:
    ckpt = _copy(good, tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weights"):
        load_model(ckpt)


def test_weights_missing_a_layer_tensor(good: Path, tmp_path: Path) -> None:
    ckpt = _copy(good, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['layers.1.mlp.up_proj.weight'\]"):
        load_model(ckpt)


def test_unknown_dtype(good: Path) -> None:
    with pytest.raises(CheckpointError, match="dtype must be one of"):
        load_model(good, dtype="int3")


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_loads_in_that_dtype(good: Path, name: str, dtype: torch.dtype) -> None:
    model = load_model(good, dtype=name)
    assert model.decoder.embed_tokens.weight.dtype == dtype
    assert model.vision is not None
    assert next(model.vision.parameters()).dtype == dtype


def test_legacy_and_current_key_layouts_load_the_same(good: Path, tmp_path: Path) -> None:
    """Checkpoints saved as model.language_model.* (transformers 5 in memory) load like the legacy layout."""
    ckpt = _copy(good, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    renamed = {}
    for key, value in tensors.items():
        for old, new in [
            ("language_model.lm_head.", "lm_head."),
            ("language_model.model.", "model.language_model."),
            ("vision_tower.", "model.vision_tower.vision_model."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ]:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        renamed[key] = value
    save_file(renamed, ckpt / "model.safetensors")
    a, b = load_model(good), load_model(ckpt)
    for (name, pa), (_, pb) in zip(
        a.decoder.state_dict().items(), b.decoder.state_dict().items(), strict=True
    ):
        assert torch.equal(pa, pb), name
    assert b.vision is not None and a.vision is not None
    for (name, pa), (_, pb) in zip(a.vision.state_dict().items(), b.vision.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
