"""Random-weight Qwen2-VL / Qwen2.5-VL checkpoints in Hugging Face format, built offline.

The same tiny sizes as ``models.synthetic``'s LLaVA checkpoints, with Qwen's own pieces: the
``<|vision_start|><|image_pad|><|vision_end|>`` chat template, the dynamic-resolution image
processor (patch 4, 2x2 merge, at most 64 x 64 pixels, so images of different shapes give
different grids) and M-RoPE sections that split the 8 rotary frequencies of a 16-wide head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.processor import images_only
from models.synthetic import (
    _DEFAULT_CORPUS,
    RandomLlavaSpec,
    _spread_weights,
    build_tokenizer,
    text_config_args,
)

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PATCH, MERGE, TEMPORAL = 4, 2, 2
MAX_PIXELS = 64 * 64

# family -> (config model_type, model class name)
QWEN_FAMILIES = {
    "qwen2-vl": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "qwen2.5-vl": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
}


def _vision_config(family: str, spec: RandomLlavaSpec) -> dict[str, Any]:
    common: dict[str, Any] = dict(
        depth=2, num_heads=2, in_channels=3, patch_size=PATCH,
        spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
    )  # fmt: skip
    if family == "qwen2-vl":
        return {
            **common,
            "embed_dim": spec.vision_hidden_size,
            "hidden_size": spec.hidden_size,
            "mlp_ratio": 2,
        }
    # 2.5: a windowed block then a full-attention one; 16-pixel windows = 2x2 merged tokens
    return {
        **common,
        "hidden_size": spec.vision_hidden_size,
        "out_hidden_size": spec.hidden_size,
        "intermediate_size": 2 * spec.vision_hidden_size,
        "window_size": 16,
        "fullatt_block_indexes": [1],
    }


def build_random_qwen2_vl(
    out_dir: str | Path, spec: RandomLlavaSpec | None = None, family: str = "qwen2-vl"
) -> Path:
    """Write a random-weight Qwen2-VL (``family="qwen2-vl"``) or Qwen2.5-VL checkpoint."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if family not in QWEN_FAMILIES:
        raise ValueError(f"family must be one of {sorted(QWEN_FAMILIES)}, got {family!r}")
    model_type, class_name = QWEN_FAMILIES[family]
    spec = spec or RandomLlavaSpec()
    out = Path(out_dir)
    roles = {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": QWEN_CHAT_TEMPLATE}
    tokenizer = build_tokenizer([_DEFAULT_CORPUS] * 4, spec.vocab_size, QWEN_SPECIAL_TOKENS, roles)
    ids = tokenizer.convert_tokens_to_ids
    half = spec.hidden_size // spec.num_heads // 2
    text = {
        **text_config_args(
            spec, max(spec.vocab_size, len(tokenizer)), ids("<|im_end|>"), ids("<|endoftext|>")
        ),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _sections(half)},
        "bos_token_id": None,
    }
    config = AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=_vision_config(family, spec),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=spec.tie_embeddings,
    )
    torch.manual_seed(spec.seed)
    model = getattr(transformers, class_name)(config).eval()
    _spread_weights(model, spec.seed)
    model.save_pretrained(out)
    pixels = {"shortest_edge": (PATCH * MERGE) ** 2, "longest_edge": MAX_PIXELS}
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL, size=pixels
    )
    processor = images_only(class_name.replace("ForConditionalGeneration", "Processor"))
    processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE
    ).save_pretrained(out)
    return out


def _sections(half: int) -> list[int]:
    """Split ``half`` rotary frequencies into (t, h, w) sections the way Qwen does: t the
    smallest, h and w equal (16, 24, 24 of 64 in the released models)."""
    hw = (half * 3) // 8
    return [half - 2 * hw, hw, hw]
