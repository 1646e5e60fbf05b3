"""The checkpoint's own processor (chat template, tokenizer, image processor), loaded offline.

``AutoProcessor`` is the first choice. Qwen2-VL's processor also owns a video processor, and
transformers builds those only with torchvision, whose PyPI wheels are CUDA builds that do not
load beside a CPU torch. Without torchvision the same processor class is built around the
checkpoint's PIL image processor and tokenizer, with no video processor: images go through
exactly the code ``AutoProcessor`` would run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _qwen_processor(path: Path, processor_name: str) -> Any:
    import transformers
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    base = getattr(transformers, processor_name)

    class ImagesOnly(base):  # type: ignore[misc, valid-type]
        """The family's processor without its video processor."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
    template = path / "chat_template.jinja"
    chat_template = template.read_text() if template.is_file() else tokenizer.chat_template
    return ImagesOnly(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=chat_template,
    )


# architecture -> how to build its processor when AutoProcessor cannot (no torchvision)
WITHOUT_TORCHVISION = {
    "Qwen2VLForConditionalGeneration": lambda path: _qwen_processor(path, "Qwen2VLProcessor"),
    "Qwen2_5_VLForConditionalGeneration": lambda path: _qwen_processor(path, "Qwen2_5_VLProcessor"),
}


def load_processor(path: Path, architecture: str, multimodal: bool) -> Any:
    """The processor (VLM) or tokenizer (text-only) of the checkpoint at ``path``."""
    from transformers import AutoProcessor, AutoTokenizer

    if not multimodal:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if architecture in WITHOUT_TORCHVISION and not has_torchvision():
        return WITHOUT_TORCHVISION[architecture](path)
    return AutoProcessor.from_pretrained(path, local_files_only=True)
