"""``covspec train-tiny``: rebuild the whole tiny family from scratch with a fixed seed."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from models.tiny.build import new_model, save_checkpoint
from models.tiny.cards import drafter_card, plot_losses, target_card
from models.tiny.data import ChatEncoder
from models.tiny.evaluate import evaluate_loaded
from models.tiny.processor import build_processor, train_tokenizer
from models.tiny.recipe import Recipe
from models.tiny.samples import EVAL_SEED_START, make_sample
from models.tiny.train import TrainLog, distill_drafter, greedy_answers, pretrain_vision, train_target


def encoder_for(tokenizer: Any, size: Any) -> ChatEncoder:
    return ChatEncoder(
        tokenizer, build_processor(tokenizer, size.patch_size).image_processor, size.visual_tokens
    )


def resumed_target(folder: Path, phases_done: int) -> tuple[Any, int]:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    model.model.vision_tower.requires_grad_(False)  # frozen after its pretraining, as in a full run
    return model, phases_done


def params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(target: Any, drafter: Any, t_enc: ChatEncoder, d_enc: ChatEncoder, n: int) -> dict[str, Any]:
    report = evaluate_loaded(target, t_enc, EVAL_SEED_START, n, drafter=(drafter, d_enc)).as_dict()
    return {**report, "eval_seeds": f"{EVAL_SEED_START}..{EVAL_SEED_START + n - 1}"}


def train_tiny(
    out_root: Path, recipe: Recipe | None = None, eval_n: int = 300, resume: tuple[Path, int] | None = None
) -> dict[str, Any]:
    """Train target and drafter; write ``tiny-target/``, ``tiny-drafter/`` and the logs under ``out_root``.

    ``resume=(folder, phases_done)`` starts from a target checkpoint saved after that many target
    phases (the pipeline saves one after each), skipping the target's earlier stages.
    """
    recipe = recipe or Recipe()
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    started, log, sched = time.time(), TrainLog(), recipe.schedule
    tokenizer = train_tokenizer()
    t_enc, d_enc = encoder_for(tokenizer, recipe.target), encoder_for(tokenizer, recipe.drafter)
    drafter = new_model(recipe.drafter, tokenizer, recipe.seed + 1)
    if resume is None:
        target, done = new_model(recipe.target, tokenizer, recipe.seed), 0
        pretrain_vision(
            "target-vision", target.model.vision_tower, recipe.target, t_enc, sched, recipe.seed, log
        )
    else:
        target, done = resumed_target(*resume)
    pretrain_vision(
        "drafter-vision", drafter.model.vision_tower, recipe.drafter, d_enc, sched, recipe.seed + 1, log
    )
    phases = len(sched.target_phases)
    for phase in range(done, phases):

        def snapshot(step: int, phase: int = phase) -> None:
            note = f"# tiny-target (in training: phase {phase + 1} of {phases}, step {step})\n"
            save_checkpoint(target, tokenizer, recipe.target, out_root / "tiny-target-snapshot", note)

        train_target(target.train(), t_enc, sched, phase, recipe.seed, log, snapshot)
        target.eval()
        note = f"# tiny-target (in training: {phase + 1} of {phases} phases done)\n"
        save_checkpoint(target, tokenizer, recipe.target, out_root / "tiny-target", note)

    # self-distillation: the drafter learns the target's own greedy answers to default-style prompts
    distill = [
        make_sample(seed)
        for seed in random.Random(recipe.seed + 3).sample(range(EVAL_SEED_START), sched.distill_samples)
    ]
    t0 = time.time()
    answers = greedy_answers(target, t_enc, distill)
    log.seconds["target-answers"] = round(time.time() - t0, 1)
    distill_drafter(drafter.train(), d_enc, distill, answers, sched, sched.drafter_steps, recipe.seed, log)
    drafter.eval()

    metrics = measure(target, drafter, t_enc, d_enc, eval_n)
    summary = {
        "recipe": asdict(recipe),
        "target_params": params(target),
        "drafter_params": params(drafter),
        "train_seconds": round(time.time() - started, 1),
        "total_train_seconds": round(time.time() - started, 1),  # a resumed run adds its earlier part
        "resumed_from": None if resume is None else {"folder": str(resume[0]), "phases_done": resume[1]},
        "stage_seconds": log.seconds,
        "metrics": metrics,
    }
    save_checkpoint(target, tokenizer, recipe.target, out_root / "tiny-target", target_card(summary))
    save_checkpoint(drafter, tokenizer, recipe.drafter, out_root / "tiny-drafter", drafter_card(summary))
    (out_root / "tiny-train-log.json").write_text(json.dumps({**summary, "losses": log.stages}, indent=1))
    plot_losses(log.stages, out_root / "tiny-train-loss.png")
    return summary
