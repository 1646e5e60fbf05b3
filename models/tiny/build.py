"""Fresh (untrained) tiny LLaVA models and saving them as complete HF checkpoint folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.synthetic import IMAGE_TOKEN
from models.tiny.processor import build_processor
from models.tiny.recipe import ModelSize
from models.tiny.world import IMAGE_SIZE


def llava_config(size: ModelSize, tokenizer: Any) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=4 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=size.patch_size,
        projection_dim=size.vision_hidden,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=size.visual_tokens,
        tie_word_embeddings=True,
    )


def new_model(size: ModelSize, tokenizer: Any, seed: int) -> Any:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(llava_config(size, tokenizer))


def save_checkpoint(model: Any, tokenizer: Any, size: ModelSize, out: Path, card: str) -> None:
    """Weights, config, generation config, processor (tokenizer + image processor) and card."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    build_processor(tokenizer, size.patch_size).save_pretrained(out)
    (out / "README.md").write_text(card)
