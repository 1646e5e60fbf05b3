"""LLaVA-NeXT / OneVision image path against transformers: per image, our rows must be the rows the
reference model's forward scatters into that image's placeholders, and our layouts must count the
placeholders the checkpoint's processor expanded that image into.

The reference rows are taken where the model uses them: the ``inputs_embeds`` its forward hands to
the language model. Image shapes are chosen against the 1x1 / 1x2 / 2x1 / 2x2 pinpoints of a 32 px
tile with 4x4 features: a very wide and a very tall image get 1x2 / 2x1 tiles and unpadding, a
square one 2x2 tiles (OneVision's ``anyres_max_2`` shrinks it), a mildly wide one 2x2 tiles,
unpadding and a non-square shrink.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from models.processor import load_processor
from models.synthetic import RandomLlavaSpec
from models.synthetic_llava_next import build_random_llava_next
from models.vision_llava_next import LlavaNextVisionEncoder, load_llava_next_vision

# name: (family, spec, vision_feature_layer)
CASES: dict[str, tuple[str, RandomLlavaSpec, int | list[int]]] = {
    "next-llama-clip-default": ("llava-next", RandomLlavaSpec(text_family="llama", vision_family="clip"), -2),
    "next-qwen2-siglip-full-two-layers": (
        "llava-next",
        RandomLlavaSpec(text_family="qwen2", vision_family="siglip", num_kv_heads=4, tie_embeddings=True),
        [-2, -1],
    ),
    "onevision-qwen2-siglip-full": (
        "llava-onevision",
        RandomLlavaSpec(text_family="qwen2", vision_family="siglip", num_kv_heads=1, seed=1),
        -1,
    ),
    "onevision-llama-clip-default-two-layers": (
        "llava-onevision",
        RandomLlavaSpec(text_family="llama", vision_family="clip", tie_embeddings=True, seed=2),
        [-3, -2],
    ),
}
SHAPES = {
    "wide": (20, 100),
    "tall": (100, 20),
    "square": (48, 48),
    "mildly-wide": (45, 56),
    "large": (300, 200),
}


@dataclass(frozen=True)
class Checkpoint:
    family: str
    path: Path
    processor: Any
    reference: Any  # transformers' *ForConditionalGeneration
    encoder: LlavaNextVisionEncoder


@dataclass(frozen=True)
class Reference:
    image_inputs: Any  # what the image processor alone returns for the images
    rows: torch.Tensor  # [placeholders, hidden] rows the model's forward put at the image placeholders
    runs: list[int]  # placeholder count of each image, in order


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    from transformers import AutoConfig, AutoModelForImageTextToText

    family, spec, layer = CASES[request.param]
    path = build_random_llava_next(
        tmp_path_factory.mktemp(request.param), spec, family, vision_feature_layer=layer
    )
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    processor = load_processor(path, config.architectures[0], multimodal=True)  # no torchvision: images only
    reference = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    encoder = load_llava_next_vision(config, load_file(path / "model.safetensors"), torch.float32)
    return Checkpoint(family, path, processor, reference, encoder)


def _images(*shapes: str) -> list[Image.Image]:
    gen = np.random.default_rng(7)
    return [Image.fromarray(gen.integers(0, 256, (*SHAPES[s], 3), dtype=np.uint8)) for s in shapes]


def _placeholder_runs(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    runs: list[int] = []
    previous = False
    for is_image in (input_ids == image_token_id).tolist():
        if is_image and previous:
            runs[-1] += 1
        elif is_image:
            runs.append(1)
        previous = is_image
    return runs


def _reference(ckpt: Checkpoint, images: list[Image.Image], *, share_prompt: bool = False) -> Reference:
    """Run the reference model on one prompt holding ``images``. ``share_prompt`` nests them as one
    prompt's images for OneVision's processor (which otherwise treats each as alone)."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "describe the scene ."}]
    text = ckpt.processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )
    batch = [images] if share_prompt else images
    inputs = ckpt.processor(images=batch, text=text, return_tensors="pt")
    captured: dict[str, torch.Tensor] = {}

    def grab(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        captured["embeds"] = kwargs["inputs_embeds"]

    hook = ckpt.reference.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            ckpt.reference(**inputs)
    finally:
        hook.remove()
    ids = inputs["input_ids"][0]
    image_id = ckpt.reference.config.image_token_id
    image_inputs = ckpt.processor.image_processor(images=batch, return_tensors="pt")
    assert torch.equal(image_inputs["pixel_values"], inputs["pixel_values"])
    return Reference(image_inputs, captured["embeds"][0][ids == image_id], _placeholder_runs(ids, image_id))


def _assert_matches(ckpt: Checkpoint, ref: Reference) -> None:
    layouts = ckpt.encoder.layouts(ref.image_inputs)
    assert [layout.num_tokens for layout in layouts] == ref.runs
    assert all(layout.span == layout.num_tokens for layout in layouts)
    ours = ckpt.encoder(ref.image_inputs)
    assert [t.num_total for t in ours] == ref.runs
    assert all(t.embeds.device.type == "cpu" for t in ours)
    rows = torch.cat([t.embeds for t in ours])
    assert rows.shape == ref.rows.shape
    assert torch.allclose(rows, ref.rows, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_lone_image_rows_and_placeholder_count_match_transformers(checkpoint: Checkpoint, shape: str) -> None:
    _assert_matches(checkpoint, _reference(checkpoint, _images(shape)))


def test_each_image_of_a_flat_list_is_tiled_and_matches_transformers(checkpoint: Checkpoint) -> None:
    ref = _reference(checkpoint, _images("wide", "tall", "square", "mildly-wide"))
    assert len(ref.runs) == 4 and all(run > 4 * 4 + 1 for run in ref.runs)  # more than a base tile each
    _assert_matches(checkpoint, ref)


def test_images_sharing_a_prompt_match_transformers(checkpoint: Checkpoint) -> None:
    ref = _reference(checkpoint, _images("wide", "square", "tall"), share_prompt=True)
    if checkpoint.family == "llava-onevision":  # one base tile and one newline each, no grid tiles
        assert ref.runs == [4 * 4 + 1] * 3
    _assert_matches(checkpoint, ref)


def test_shapes_reach_unpadding_and_onevision_shrinking(checkpoint: Checkpoint) -> None:
    """The cases above only prove something if the images take the interesting branches."""
    ref = _reference(checkpoint, _images("wide", "tall", "square", "mildly-wide"))
    wide, tall, square, mildly_wide = checkpoint.encoder.plans(ref.image_inputs)
    assert (wide.tile_grid, wide.feature_map) == ((1, 2), (2, 8))  # 4 padded feature rows cut to 2
    assert (tall.tile_grid, tall.feature_map) == ((2, 1), (8, 2))
    assert square.tile_grid == mildly_wide.tile_grid == (2, 2)
    if checkpoint.family == "llava-next":
        assert (square.feature_map, mildly_wide.feature_map) == ((8, 8), (6, 8))
    else:  # anyres_max_2: maps over ~2 tiles of features shrink (bilinear), the 1x2 ones do not
        assert (square.feature_map, mildly_wide.feature_map) == ((5, 5), (4, 6))


def test_bfloat16_encoder_takes_float_pixels_and_stays_close(checkpoint: Checkpoint) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint.path, local_files_only=True)
    bf16 = load_llava_next_vision(config, load_file(checkpoint.path / "model.safetensors"), torch.bfloat16)
    inputs = checkpoint.processor.image_processor(images=_images("mildly-wide"), return_tensors="pt")
    (ours,), (full,) = bf16(inputs), checkpoint.encoder(inputs)
    assert ours.embeds.dtype == torch.bfloat16 and ours.embeds.device.type == "cpu"
    assert (ours.embeds.float() - full.embeds).abs().max() <= 0.1 * full.embeds.abs().max()


@pytest.mark.parametrize("naming", ["live-state-dict", "hub-vision-model-level"])
def test_other_tensor_namings_load_the_same_encoder(checkpoint: Checkpoint, naming: str) -> None:
    """``save_pretrained`` writes ``vision_tower.*`` (what the fixture loads); a live model's state
    dict says ``model.vision_tower.*`` and Hub checkpoints ``vision_tower.vision_model.*``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint.path, local_files_only=True)
    if naming == "live-state-dict":
        tensors = dict(checkpoint.reference.state_dict())
        assert "model.image_newline" in tensors
    else:
        saved = load_file(checkpoint.path / "model.safetensors")
        tensors = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in saved.items()}
    loaded = load_llava_next_vision(config, tensors, torch.float32)
    inputs = checkpoint.processor.image_processor(images=_images("tall"), return_tensors="pt")
    assert torch.equal(loaded(inputs)[0].embeds, checkpoint.encoder(inputs)[0].embeds)


def test_loader_names_missing_and_unexpected_tensors(checkpoint: Checkpoint) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint.path, local_files_only=True)
    tensors = load_file(checkpoint.path / "model.safetensors")
    assert "image_newline" in tensors  # save_pretrained writes the Hub names, without "model."
    tensors["vision_tower.stray.weight"] = tensors.pop("image_newline")
    with pytest.raises(
        ValueError, match=r"missing \['image_newline'\].*unexpected \['vision_tower.stray.weight'\]"
    ):
        load_llava_next_vision(config, tensors, torch.float32)


def test_clip_tower_with_full_strategy_is_rejected_with_the_fix(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoProcessor

    path = build_random_llava_next(tmp_path, RandomLlavaSpec(vision_family="clip"), "llava-next")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    config.vision_feature_select_strategy = "full"  # keeps CLIP's CLS: 17 tokens per 4x4 tile
    inputs = AutoProcessor.from_pretrained(path, local_files_only=True).image_processor(
        images=_images("square"), return_tensors="pt"
    )
    with pytest.raises(ValueError, match=r"gives 17 tokens per tile.*needs 'default'"):
        LlavaNextVisionEncoder(config)(inputs)


def test_pixel_values_with_too_few_tiles_are_rejected(checkpoint: Checkpoint) -> None:
    inputs = dict(checkpoint.processor.image_processor(images=_images("square"), return_tensors="pt"))
    inputs["pixel_values"] = inputs["pixel_values"][:, :2]  # a 2x2-tiled image needs 5 tiles
    with pytest.raises(ValueError, match="hold 2 tiles per image but an image needs 5"):
        checkpoint.encoder(inputs)


def test_unknown_family_is_rejected() -> None:
    from transformers import LlavaConfig

    with pytest.raises(ValueError, match="model_type 'llava'"):
        LlavaNextVisionEncoder(LlavaConfig())
