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
    base_dir: str | Path,
    samples: Sequence[LoraSample],
    config: LoraTrainConfig,
    out_dir: str | Path,
    init_from: str | Path | None = None,
    progress: bool = True,
) -> LoraTrainResult:
    """Fit a LoRA on the language model of the drafter in ``base_dir`` (from zero, or on from the
    adapter in ``init_from``, whose rank and modules it keeps); write it to ``out_dir``
    (``adapter_config.json`` + ``adapter_model.safetensors``, loadable by ``PeftModel``)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    from models.processor import folder_processor

    if len(samples) < config.batch:
        raise ValueError(f"{len(samples)} samples is fewer than one batch of {config.batch}")
    torch.manual_seed(config.seed)
    base = AutoModelForImageTextToText.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
    processor = folder_processor(base_dir)
    if init_from is not None:
        model = PeftModel.from_pretrained(base, init_from, is_trainable=True).train()
    else:
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
    bar = tqdm(range(config.steps), desc="adapter", unit="step", disable=not progress)
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
        losses.append(round(float(loss.detach()), 5))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.peft_config["default"].base_model_name_or_path = Path(base_dir).name  # no local paths shipped
    with warnings.catch_warnings():  # PEFT looks that name up to check the vocabulary: unchanged here
        warnings.simplefilter("ignore", UserWarning)
        model.eval().save_pretrained(out_dir)
    return LoraTrainResult(tuple(losses), round(time.time() - started, 1), sum(p.numel() for p in params))


@torch.inference_mode()
def teacher_forced_acceptance(
    base_dir: str | Path, adapter_dir: str | Path | None, samples: Sequence[LoraSample], batch: int = 16
) -> float:
    """The share of answer tokens the drafter in ``base_dir`` (with the adapter in
    ``adapter_dir``; None: without one) predicts as its top choice, fed the answer so far: how
    often a greedy one-token draft would be accepted."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from models.processor import folder_processor

    if not samples:
        raise ValueError("teacher-forced acceptance needs at least one sample")
    model = AutoModelForImageTextToText.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    processor = folder_processor(base_dir)
    hits = total = 0
    for i in range(0, len(samples), batch):
        inputs = _batch(samples[i : i + batch], processor.image_processor, processor.tokenizer.pad_token_id)
        labels = inputs.pop("labels")
        predicted = model(**inputs).logits[:, :-1].argmax(-1)  # row t predicts token t + 1
        target = labels[:, 1:]
        scored = target != IGNORE
        hits += int((predicted[scored] == target[scored]).sum())
        total += int(scored.sum())
    return hits / max(total, 1)
