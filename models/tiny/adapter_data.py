"""One demo user's traffic for a drafter adapter: their persona's prompts, the target's answers."""

from __future__ import annotations

import random
from typing import Any

from models.lora_training import LoraSample
from models.tiny.data import ChatEncoder
from models.tiny.samples import EVAL_SEED_START, Sample, make_sample
from models.tiny.train import greedy_answers


def user_samples(persona: str, n: int, seed: int, evaluation: bool = False) -> list[Sample]:
    """``n`` of ``persona``'s questions: training seeds, or with ``evaluation`` fresh ones."""
    rng = random.Random(f"adapter/{persona}/{seed}")
    if evaluation:
        return [make_sample(EVAL_SEED_START + 20_000 + i, persona) for i in range(n)]
    return [make_sample(s, persona) for s in rng.sample(range(EVAL_SEED_START), n)]


def target_labelled(
    target: Any, target_encoder: ChatEncoder, drafter_encoder: ChatEncoder, samples: list[Sample]
) -> list[LoraSample]:
    """The samples with the target's own greedy answers as labels, tokenized for the drafter."""
    answers = greedy_answers(target, target_encoder, samples)
    return [
        LoraSample(tuple(drafter_encoder.prompt_ids(s.system, s.question.text)), tuple(a), s.image())
        for s, a in zip(samples, answers, strict=True)
    ]
