"""The ShapesWorld tokenizer (BPE trained on the corpus) and the LLaVA processors built on it."""

from __future__ import annotations

from typing import Any

from models.synthetic import CHAT_TEMPLATE, build_tokenizer
from models.tiny.personas import PERSONAS
from models.tiny.samples import make_sample
from models.tiny.world import IMAGE_SIZE

VOCAB_SIZE = 512
CORPUS_SEEDS = range(0, 4000)


def corpus() -> list[str]:
    """Every text the models will read or write: system prompts, questions, styled answers."""
    texts = [p.system for p in PERSONAS.values()]
    for seed in CORPUS_SEEDS:
        persona = list(PERSONAS)[seed % len(PERSONAS)]
        s = make_sample(seed, persona)
        texts += [s.system, s.question.text, s.answer]
    return texts


def train_tokenizer() -> Any:
    return build_tokenizer(corpus(), VOCAB_SIZE)


def build_processor(tokenizer: Any, patch_size: int) -> Any:
    """A LLaVA processor over CLIP-style pixels: ``(IMAGE_SIZE / patch_size) ** 2`` visual tokens."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
