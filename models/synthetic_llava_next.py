"""Random-weight LLaVA-NeXT and LLaVA-OneVision checkpoints in Hugging Face format, built offline.

The same tiny text and vision parts as :mod:`models.synthetic`, plus what the any-resolution
families add: grid pinpoints (tile layouts) in both the model config and the image processor, the
``image_newline`` embedding, and for OneVision the ``anyres_max_N`` limit. The pinpoints are
1x1, 1x2, 2x1 and 2x2 tiles, so wide, tall and square images tile differently, and very wide or
tall ones leave padding that the model unpads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from models.processor import images_only
from models.synthetic import (
    _DEFAULT_CORPUS,
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    RandomLlavaSpec,
    _spread_weights,
    _text_config,
    build_tokenizer,
    vision_tower_config,
)

FAMILIES = ("llava-next", "llava-onevision")
VIDEO_TOKEN = "<video>"  # OneVision's processor looks it up; no test sends videos

# With 2x2 tiles of a 4x4 feature grid, "anyres_max_2" (at most ~2 tiles' worth of features)
# downsamples a 2x2-tiled image but leaves a 1x2-tiled one alone, so both branches are reached.
DEFAULT_ONEVISION_ASPECT_RATIO = "anyres_max_2"


def grid_pinpoints(tile: int) -> list[list[int]]:
    """(height, width) resolutions an image may be tiled at: 1x1, 1x2, 2x1 and 2x2 tiles."""
    return [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]


def build_random_llava_next(
    out_dir: str | Path,
    spec: RandomLlavaSpec,
    family: str,
    *,
    vision_feature_layer: int | list[int] = -2,
    vision_aspect_ratio: str = DEFAULT_ONEVISION_ASPECT_RATIO,
) -> Path:
    """Write a random-weight ``LlavaNextForConditionalGeneration`` (``family="llava-next"``) or
    ``LlavaOnevisionForConditionalGeneration`` (``"llava-onevision"``) checkpoint to ``out_dir``.
    ``vision_aspect_ratio`` applies to OneVision only."""
    from transformers import AutoModelForImageTextToText

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    out = Path(out_dir)
    tokenizer = build_tokenizer([_DEFAULT_CORPUS] * 4, spec.vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": [VIDEO_TOKEN]})
    vocab_size = max(spec.vocab_size, len(tokenizer))
    text_config = _text_config(spec, vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config = _model_config(spec, family, text_config, tokenizer, vision_feature_layer, vision_aspect_ratio)
    torch.manual_seed(spec.seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    _spread_weights(model, spec.seed)
    model.save_pretrained(out)
    _processor(spec, family, tokenizer, vision_aspect_ratio).save_pretrained(out)
    if family == "llava-onevision":
        _declare_full_onevision_processor(out / "processor_config.json", spec.image_size)
    return out


def _model_config(
    spec: RandomLlavaSpec,
    family: str,
    text_config: Any,
    tokenizer: Any,
    vision_feature_layer: int | list[int],
    vision_aspect_ratio: str,
) -> Any:
    from transformers import LlavaNextConfig, LlavaOnevisionConfig

    common: dict[str, Any] = dict(
        vision_config=vision_tower_config(spec),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy=spec.select_strategy,
        vision_feature_layer=vision_feature_layer,
        image_grid_pinpoints=grid_pinpoints(spec.image_size),
        tie_word_embeddings=spec.tie_embeddings,
    )
    if family == "llava-next":
        return LlavaNextConfig(**common)
    return LlavaOnevisionConfig(
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_aspect_ratio=vision_aspect_ratio,
        **common,
    )


def _processor(spec: RandomLlavaSpec, family: str, tokenizer: Any, vision_aspect_ratio: str) -> Any:
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tile, pinpoints = spec.image_size, grid_pinpoints(spec.image_size)
    has_cls = spec.vision_family == "clip"
    if family == "llava-next":
        return LlavaNextProcessor(
            image_processor=LlavaNextImageProcessorPil(
                size={"shortest_edge": tile},
                crop_size={"height": tile, "width": tile},
                image_grid_pinpoints=pinpoints,
            ),
            tokenizer=tokenizer,
            patch_size=spec.patch_size,
            vision_feature_select_strategy=spec.select_strategy,
            num_additional_image_tokens=1 if has_cls else 0,
            chat_template=CHAT_TEMPLATE,
        )
    grid = spec.image_size // spec.patch_size
    return images_only("LlavaOnevisionProcessor")(
        image_processor=LlavaOnevisionImageProcessorPil(
            size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints
        ),
        tokenizer=tokenizer,
        # tokens the tower gives per tile, CLS included: the processor drops one under "default"
        num_image_tokens=grid * grid + (1 if has_cls else 0),
        vision_feature_select_strategy=spec.select_strategy,
        vision_aspect_ratio=vision_aspect_ratio,
        chat_template=CHAT_TEMPLATE,
    )


def _declare_full_onevision_processor(processor_config: Path, tile: int) -> None:
    """Make the saved processor config the one a real OneVision checkpoint has: the full
    ``LlavaOnevisionProcessor`` with its video processor (which only loads with torchvision)."""
    saved = json.loads(processor_config.read_text())
    saved["processor_class"] = "LlavaOnevisionProcessor"
    saved["video_processor"] = {
        "video_processor_type": "LlavaOnevisionVideoProcessor",
        "size": {"height": tile, "width": tile},
        "image_mean": saved["image_processor"]["image_mean"],
        "image_std": saved["image_processor"]["image_std"],
        "resample": saved["image_processor"]["resample"],
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "do_sample_frames": False,
    }
    processor_config.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
