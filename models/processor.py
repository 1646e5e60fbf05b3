"""The checkpoint's own processor (chat template, tokenizer, image processor), loaded offline.

``AutoProcessor`` is the first choice. Qwen2-VL's and LLaVA-OneVision's processors also own a
video processor, and transformers builds those only with torchvision, whose PyPI wheels are CUDA
builds that do not load beside a CPU torch. Without torchvision the family's own processor class
is loaded without its video processor (:func:`images_only`): the checkpoint's image processor
(its PIL implementation), tokenizer, chat template and settings, and images go through exactly
the code ``AutoProcessor`` would run.
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


@cache
def _images_only_classes() -> dict[str, type]:
    """Each family's processor class with ``video_processor`` left out of ``__init__``: its
    sub-processors and the settings ``from_pretrained`` passes on are read off ``__init__``'s
    parameters, so the class loads and expands image tokens as the full one does."""
    from transformers import LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor

    def qwen(base: type) -> type:  # Qwen2-VL's and Qwen2.5-VL's take the same arguments
        def __init__(
            self: Any,
            image_processor: Any = None,
            tokenizer: Any = None,
            chat_template: Any = None,
            **kwargs: Any,
        ) -> None:
            base.__init__(self, image_processor, tokenizer, None, chat_template, **kwargs)

        return type(f"{base.__name__}ImagesOnly", (base,), {"__init__": __init__})

    class LlavaOnevisionImagesOnly(LlavaOnevisionProcessor):  # type: ignore[misc]
        def __init__(
            self,
            image_processor: Any = None,
            tokenizer: Any = None,
            num_image_tokens: int | None = None,
            vision_feature_select_strategy: str | None = None,
            chat_template: Any = None,
            image_token: str = "<image>",
            video_token: str = "<video>",
            vision_aspect_ratio: str = "anyres_max_9",
            **kwargs: Any,
        ):
            super().__init__(
                image_processor, tokenizer, None, num_image_tokens, vision_feature_select_strategy,
                chat_template, image_token, video_token, vision_aspect_ratio, **kwargs,
            )  # fmt: skip

    return {
        "Qwen2VLProcessor": qwen(Qwen2VLProcessor),
        "Qwen2_5_VLProcessor": qwen(Qwen2_5_VLProcessor),
        "LlavaOnevisionProcessor": LlavaOnevisionImagesOnly,
    }


def images_only(processor_name: str) -> type:
    """transformers' ``processor_name`` class without its video processor (which needs torchvision)."""
    return _images_only_classes()[processor_name]


# architecture -> its processor class, where that class needs torchvision for its video processor
WITH_VIDEO = {
    "Qwen2VLForConditionalGeneration": "Qwen2VLProcessor",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLProcessor",
    "LlavaOnevisionForConditionalGeneration": "LlavaOnevisionProcessor",
}


def load_processor(path: Path, architecture: str, multimodal: bool) -> Any:
    """The processor (VLM) or tokenizer (text-only) of the checkpoint at ``path``."""
    from transformers import AutoProcessor, AutoTokenizer

    if not multimodal:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if architecture in WITH_VIDEO and not has_torchvision():
        return images_only(WITH_VIDEO[architecture]).from_pretrained(path, local_files_only=True)
    return AutoProcessor.from_pretrained(path, local_files_only=True)


def folder_processor(path: str | Path) -> Any:
    """The processor of the checkpoint folder ``path`` without loading its weights: its
    ``config.json`` names the architecture, and a ``vision_config`` makes it a VLM."""
    folder = Path(path)
    config = json.loads((folder / "config.json").read_text())
    architecture = (config.get("architectures") or [""])[0]
    return load_processor(folder, architecture, multimodal="vision_config" in config)
