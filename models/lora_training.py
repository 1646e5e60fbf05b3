"""Train a LoRA adapter for a drafter on (prompt, answer) samples; save it in PEFT's format.

The answers are whatever the target said to one user's prompts, so the adapter learns to predict
the target on that user's traffic. The function knows nothing about where the samples come from
(the tiny world today, verifier feedback collected online later): it is a function of the base
drafter and the samples only.
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.lora import LORA_MODULES
from models.training import IGNORE, lr_at, pad_rows


@dataclass(frozen=True)
class LoraSample:
    prompt_ids: tuple[int, ...]  # the prompt as the drafter sees it, image tokens expanded
    answer_ids: tuple[int, ...]  # the target's answer (the loss covers these tokens only)
    image: Any  # PIL image of the prompt's image tokens


@dataclass(frozen=True)
class LoraTrainConfig:
    rank: int = 8
    alpha: int = 16
    modules: tuple[str, ...] = LORA_MODULES
    steps: int = 800
    batch: int = 32
    lr: float = 2e-3  # peak; linear warm-up over 5 % of the steps, cosine decay to 10 %
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.modules) - set(LORA_MODULES))
        if unknown:
            raise ValueError(f"unknown LoRA modules {unknown}; choose from {list(LORA_MODULES)}")
        if self.rank < 1 or self.steps < 1 or self.batch < 1:
            raise ValueError("rank, steps and batch must be positive")


@dataclass(frozen=True)
class LoraTrainResult:
    losses: tuple[float, ...]  # per step
    seconds: float
    trainable_params: int


def _batch(samples: Sequence[LoraSample], image_processor: Any, pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt + answer rows, the loss on the answer only, with the prompts' pixels."""
    rows = [(s.prompt_ids + s.answer_ids, (IGNORE,) * len(s.prompt_ids) + s.answer_ids) for s in samples]
    input_ids, mask, labels = pad_rows(rows, pad_id)
    pixels = image_processor(images=[s.image for s in samples], return_tensors="pt")["pixel_values"]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


def train_lora(
    base_dir: str | Path, samples: Sequence[LoraSample], config: LoraTrainConfig, out_dir: str | Path
) -> LoraTrainResult:
    """Fit a LoRA on the language model of the drafter in ``base_dir``; write it to ``out_dir``
    (``adapter_config.json`` + ``adapter_model.safetensors``, loadable by ``PeftModel``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if len(samples) < config.batch:
        raise ValueError(f"{len(samples)} samples is fewer than one batch of {config.batch}")
    torch.manual_seed(config.seed)
    base = AutoModelForImageTextToText.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(base_dir, local_files_only=True)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules=rf".*language_model.*\.({'|'.join(config.modules)})",
    )
    model = get_peft_model(base, lora).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    pool, rng, losses, started = list(samples), random.Random(config.seed), [], time.time()
    bar = tqdm(range(config.steps), desc="adapter", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config.steps, config.lr)
        picks = rng.sample(pool, config.batch)
        batch = _batch(picks, processor.image_processor, processor.tokenizer.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(round(float(loss), 5))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.peft_config["default"].base_model_name_or_path = Path(base_dir).name  # no local paths shipped
    with warnings.catch_warnings():  # PEFT looks that name up to check the vocabulary: unchanged here
        warnings.simplefilter("ignore", UserWarning)
        model.eval().save_pretrained(out_dir)
    return LoraTrainResult(tuple(losses), round(time.time() - started, 1), sum(p.numel() for p in params))
