"""Accuracy of a tiny VLM on fresh ShapesWorld samples, and drafter-target agreement.

The answers are produced by transformers' own ``generate`` (greedy) on the checkpoint folder,
so the numbers do not depend on our engine. An answer counts as correct only when it equals the
reference sentence exactly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from models.tiny.data import ChatEncoder
from models.tiny.samples import EVAL_SEED_START, Sample, blank_image, make_sample
from models.tiny.train import greedy_answers


@dataclass(frozen=True)
class EvalReport:
    n: int
    seed: int
    persona: str
    accuracy: float
    blank_image_accuracy: float
    per_kind: dict[str, float]
    agreement: float | None = None  # drafter greedy token == target token, teacher-forced

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def load_hf(folder: str | Path) -> tuple[Any, ChatEncoder]:
    """Transformers model + our chat encoder for a LLaVA checkpoint folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from models.loader import read_config

    read_config(Path(folder))  # a clear error for a folder that is not a checkpoint
    model = AutoModelForImageTextToText.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32
    ).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    vision = model.config.vision_config
    visual_tokens = (vision.image_size // vision.patch_size) ** 2
    return model, ChatEncoder(processor.tokenizer, processor.image_processor, visual_tokens)


def decode(encoder: ChatEncoder, ids: list[int]) -> str:
    text: str = encoder.tokenizer.decode(ids, skip_special_tokens=True)
    return text.strip()


def accuracy(
    model: Any, encoder: ChatEncoder, samples: list[Sample], images: list[Any] | None = None
) -> tuple[float, dict[str, float], list[list[int]]]:
    answers = greedy_answers(model, encoder, samples, images)
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for sample, ids in zip(samples, answers, strict=True):
        by_kind[sample.question.kind].append(decode(encoder, ids) == sample.answer)
    hits = [h for v in by_kind.values() for h in v]
    per_kind = {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())}
    return sum(hits) / len(hits), per_kind, answers


@torch.inference_mode()
def agreement(drafter: Any, encoder: ChatEncoder, samples: list[Sample], answers: list[list[int]]) -> float:
    """Fraction of the target's answer tokens that the drafter predicts greedily (teacher-forced)."""
    hits = total = 0
    for sample, answer in zip(samples, answers, strict=True):
        prompt = encoder.prompt_ids(sample.system, sample.question.text)
        ids = torch.tensor([prompt + answer])
        logits = drafter(input_ids=ids, pixel_values=encoder.pixels([sample.image()])).logits[0]
        predicted = logits[len(prompt) - 1 : -1].argmax(-1)
        hits += int((predicted == torch.tensor(answer)).sum())
        total += len(answer)
    return hits / max(1, total)


def evaluate_loaded(
    model: Any,
    encoder: ChatEncoder,
    seed: int = EVAL_SEED_START,
    n: int = 200,
    drafter: tuple[Any, ChatEncoder] | None = None,
    persona: str | None = None,
) -> EvalReport:
    """Accuracy (with real and blank images) of an in-memory model, and the drafter's agreement."""
    samples = [make_sample(seed + i, persona) for i in range(n)]
    acc, per_kind, answers = accuracy(model, encoder, samples)
    blank, _, _ = accuracy(model, encoder, samples, [blank_image(s.scene.background) for s in samples])
    agree = None if drafter is None else round(agreement(*drafter, samples, answers), 4)
    return EvalReport(
        n=n, seed=seed, persona=persona or "default", accuracy=round(acc, 4),
        blank_image_accuracy=round(blank, 4), per_kind=per_kind, agreement=agree,
    )  # fmt: skip


def evaluate(
    model_dir: str | Path,
    seed: int = EVAL_SEED_START,
    n: int = 200,
    drafter_dir: str | Path | None = None,
    persona: str | None = None,
) -> EvalReport:
    model, encoder = load_hf(model_dir)
    drafter = None if drafter_dir is None else load_hf(drafter_dir)
    return evaluate_loaded(model, encoder, seed, n, drafter, persona)
