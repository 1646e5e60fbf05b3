"""Training batches for the tiny VLMs: chat token ids with answer-only labels, and pixels.

Token ids are built segment by segment, exactly as the chat template renders a conversation
(a test checks equality with ``processor.apply_chat_template`` + the processor's tokenization),
so the loss can cover the assistant's answers and nothing else. One training sequence may hold
several question/answer turns about the same image, which amortises the visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from models.synthetic import IMAGE_TOKEN
from models.tiny.samples import Sample
from models.training import IGNORE, pad_rows


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, L] int64, right-padded
    attention_mask: torch.Tensor  # [B, L] int64
    labels: torch.Tensor  # [B, L] int64, IGNORE outside answers
    pixel_values: torch.Tensor  # [B, 3, H, W] float32


class ChatEncoder:
    """Encodes conversations for one model (its visual token count) with the shared tokenizer."""

    def __init__(self, tokenizer: Any, image_processor: Any, visual_tokens: int) -> None:
        self.tokenizer, self.image_processor, self.visual_tokens = tokenizer, image_processor, visual_tokens

    def _ids(self, text: str) -> list[int]:
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def prompt_ids(self, system: str, question: str) -> list[int]:
        """The first user turn up to the assistant's generation prompt, image expanded."""
        text = (
            f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{IMAGE_TOKEN}\n{question}<|im_end|>\n"
        )
        text += "<|im_start|>assistant\n"
        return self._ids(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.visual_tokens))

    def answer_ids(self, answer: str) -> list[int]:
        """The assistant's answer and its end-of-turn token (what generation must produce)."""
        return self._ids(f"{answer}<|im_end|>")

    def conversation(self, turns: list[Sample]) -> tuple[list[int], list[int]]:
        """Ids and labels of a conversation about ``turns[0]``'s image, one turn per sample."""
        ids = self.prompt_ids(turns[0].system, turns[0].question.text)
        labels = [IGNORE] * len(ids)
        for i, turn in enumerate(turns):
            if i:
                follow = self._ids(
                    f"\n<|im_start|>user\n{turn.question.text}<|im_end|>\n<|im_start|>assistant\n"
                )
                ids += follow
                labels += [IGNORE] * len(follow)
            answer = self.answer_ids(turn.answer)
            ids += answer
            labels += answer
        return ids, labels

    def pixels(self, images: list[Any]) -> torch.Tensor:
        out: torch.Tensor = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return out

    def batch(self, conversations: list[list[Sample]], images: list[Any] | None = None) -> Batch:
        pictures = images if images is not None else [c[0].image() for c in conversations]
        return self.pad([self.conversation(c) for c in conversations], pictures)

    def pad(self, rows: list[tuple[list[int], list[int]]], images: list[Any]) -> Batch:
        """Right-pad ``(ids, labels)`` rows into a batch with the images' pixels."""
        input_ids, mask, labels = pad_rows(rows, self.tokenizer.pad_token_id)
        return Batch(input_ids, mask, labels, self.pixels(images))
