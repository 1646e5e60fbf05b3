"""The ShapesWorld tokenizer, chat template, processor and training encoder agree with each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models.tiny.data import IGNORE, ChatEncoder
from models.tiny.processor import build_processor, corpus, train_tokenizer
from models.tiny.samples import make_sample
from models.tiny.world import COLORS, SHAPES, SIZES


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_tokenizer()


def test_round_trip_of_every_corpus_text(tokenizer: Any) -> None:
    for text in corpus()[:3000]:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_words_of_the_world_are_single_tokens(tokenizer: Any) -> None:
    words = [*SHAPES, *COLORS, *SIZES, "top", "bottom", "left", "right", "center"]
    for word in words:
        assert len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1, word


def test_chat_template_renders_system_image_question_and_generation_prompt(tokenizer: Any) -> None:
    sample = make_sample(3)
    text = tokenizer.apply_chat_template(sample.messages(), add_generation_prompt=True, tokenize=False)
    assert text == (
        f"<|im_start|>system\n{sample.system}<|im_end|>\n"
        f"<|im_start|>user\n<image>\n{sample.question.text}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_saved_processor_loads_offline_and_expands_the_image(tokenizer: Any, tmp_path: Path) -> None:
    from transformers import AutoProcessor

    build_processor(tokenizer, patch_size=8).save_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    sample = make_sample(9, "carol")
    text = processor.apply_chat_template(sample.messages(), add_generation_prompt=True)
    enc = processor(images=sample.image(), text=text, return_tensors="pt")
    assert int((enc["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum()) == 81
    assert tuple(enc["pixel_values"].shape) == (1, 3, 72, 72)


@pytest.mark.parametrize("persona", [None, "alice", "bob", "carol", "dave"])
def test_encoder_prompt_equals_the_processor_tokenization(tokenizer: Any, persona: str | None) -> None:
    processor = build_processor(tokenizer, patch_size=12)
    encoder = ChatEncoder(tokenizer, processor.image_processor, visual_tokens=36)
    for seed in range(40):
        sample = make_sample(seed, persona)
        text = processor.apply_chat_template(sample.messages(), add_generation_prompt=True)
        ref = processor(images=sample.image(), text=text, return_tensors="pt")["input_ids"][0].tolist()
        assert encoder.prompt_ids(sample.system, sample.question.text) == ref


def test_labels_cover_exactly_the_answers_of_every_turn(tokenizer: Any) -> None:
    processor = build_processor(tokenizer, patch_size=8)
    encoder = ChatEncoder(tokenizer, processor.image_processor, visual_tokens=81)
    turns = [make_sample(21, "bob", turn=t) for t in range(3)]
    ids, labels = encoder.conversation(turns)
    labelled = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE]
    expected = [tok for t in turns for tok in encoder.answer_ids(t.answer)]
    assert labelled == expected
    assert tokenizer.decode(labelled).count("<|im_end|>") == 3
