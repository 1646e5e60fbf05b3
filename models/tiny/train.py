"""Train the tiny family on this CPU: vision towers, then the target, then the drafter.

1. Each vision tower is pretrained alone: every patch token learns to name its grid cell and
   the shape, colour and size of the object there (a minute or two). The tower is then frozen,
   so the language models start from visual tokens that already say what is where.
2. The target (LLaVA: tower + projector + Llama LM) learns to answer in every persona's style.
3. The drafter is distilled on the target's own greedy answers to default-style prompts
   (self-distillation, as in MASSV), so it predicts what the target will say, not the data.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.tiny.data import Batch, ChatEncoder
from models.tiny.lookup import LookupLoss, patch_cells
from models.tiny.personas import DEMO_USERS
from models.tiny.recipe import LOOKUP_KINDS, ModelSize, Schedule
from models.tiny.samples import EVAL_SEED_START, Sample, make_sample
from models.tiny.world import COLORS, SHAPES, SIZES, render, sample_scene
from models.training import IGNORE, lr_at


@dataclass
class TrainLog:
    """Loss per step of each stage, with wall-clock time; written as JSON next to the models."""

    stages: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, step: int, loss: float, started: float) -> None:
        self.stages.setdefault(stage, []).append(
            {"step": step, "loss": round(loss, 5), "elapsed_s": round(time.time() - started, 2)}
        )


def run_steps(
    name: str,
    params: list[dict[str, Any]],
    steps: int,
    loss_fn: Callable[[int], torch.Tensor],
    log: TrainLog,
    after_step: Callable[[int], None] | None = None,
) -> None:
    """AdamW over ``params`` (groups with their own peak ``lr``) for ``steps`` steps;
    ``after_step(step)`` runs after each optimizer step (e.g. to save a snapshot)."""
    opt = torch.optim.AdamW(params, weight_decay=0.01, betas=(0.9, 0.98))
    peaks = [g["lr"] for g in params]
    started = time.time()
    bar = tqdm(range(steps), desc=name, unit="step")
    for step in bar:
        for group, peak in zip(opt.param_groups, peaks, strict=True):
            group["lr"] = lr_at(step, steps, peak)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        opt.step()
        value = loss.item()
        log.add(name, step, value, started)
        bar.set_postfix(loss=f"{value:.3f}")
        if after_step is not None:
            after_step(step)
    log.seconds[name] = round(time.time() - started, 1)


def cell_labels(seed: int) -> torch.Tensor:
    """``[9, 3]`` int64 per grid cell: shape, colour, size (0 = empty cell)."""
    labels = torch.zeros(9, 3, dtype=torch.long)
    for o in sample_scene(seed).objects:
        labels[o.cell] = torch.tensor(
            [SHAPES.index(o.shape) + 1, list(COLORS).index(o.color) + 1, list(SIZES).index(o.size) + 1]
        )
    return labels


def pretrain_vision(
    name: str, tower: Any, size: ModelSize, encoder: ChatEncoder, sched: Schedule, seed: int, log: TrainLog
) -> None:
    """Teach every patch token of ``tower`` to name its grid cell and that cell's shape, colour
    and size, so each visual token states what is where before any language model sees it."""
    splits = [len(SHAPES) + 1, len(COLORS) + 1, len(SIZES) + 1, 9]
    heads = torch.nn.Linear(size.vision_hidden, sum(splits))
    cell_of_patch = patch_cells(size.visual_tokens)
    rng = random.Random(seed)

    def loss_fn(step: int) -> torch.Tensor:
        seeds = [rng.randrange(EVAL_SEED_START) for _ in range(sched.vision_batch)]
        pixels = encoder.pixels([render(sample_scene(s)) for s in seeds])
        logits = heads(tower(pixels).last_hidden_state[:, 1:]).split(splits, dim=-1)  # per patch
        cells = torch.stack([cell_labels(s) for s in seeds])[:, cell_of_patch]  # [B, patches, 3]
        labels = [cells[..., 0], cells[..., 1], cells[..., 2], cell_of_patch.expand(len(seeds), -1)]
        pairs = zip(logits, labels, strict=True)
        return torch.stack([F.cross_entropy(lg.flatten(0, 1), lab.flatten()) for lg, lab in pairs]).sum()

    params = [{"params": [*tower.parameters(), *heads.parameters()], "lr": sched.vision_lr}]
    run_steps(name, params, sched.vision_steps, loss_fn, log)
    tower.requires_grad_(False)  # later stages keep these features as they are


def lm_loss(model: Any, batch: Batch) -> torch.Tensor:
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        labels=batch.labels,
    )
    loss: torch.Tensor = out.loss
    return loss


def conversation(
    seed: int, persona: str | None, turns: int, rng: random.Random | None = None, focus: float = 0.0
) -> list[Sample]:
    """``turns`` questions about seed's scene; with ``focus``, each turn asks one of
    ``LOOKUP_KINDS`` with that probability (drawn from ``rng``), when the scene supports it."""
    if not focus or rng is None:
        return [make_sample(seed, persona, turn=t) for t in range(turns)]
    out = []
    for t in range(turns):
        kind = rng.choice(LOOKUP_KINDS) if rng.random() < focus else None
        try:
            out.append(make_sample(seed, persona, kind, turn=t))
        except ValueError:  # e.g. no shape occurs once, so no "what color is the X?"
            out.append(make_sample(seed, persona, turn=t))
    return out


def train_target(
    model: Any,
    encoder: ChatEncoder,
    sched: Schedule,
    phase: int,
    seed: int,
    log: TrainLog,
    snapshot: Callable[[int], None] | None = None,
) -> None:
    """Phase ``phase`` of ``sched.target_phases``: its own optimizer, schedule and data stream.
    ``snapshot(step)`` is called every ``sched.snapshot_every`` steps and not after the last."""
    spec = sched.target_phases[phase]
    rng = random.Random(seed + 1 + 1000 * phase)
    lookup = LookupLoss(model, encoder, spec.lookup) if spec.lookup is not None else None

    def loss_fn(step: int) -> torch.Tensor:
        convs = []
        for _ in range(sched.target_batch):
            persona = rng.choice(DEMO_USERS) if rng.random() < sched.persona_share else None
            convs.append(conversation(rng.randrange(EVAL_SEED_START), persona, sched.turns, rng, spec.focus))
        batch = encoder.batch(convs)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16):
            if lookup is None:
                return lm_loss(model, batch)
            with lookup.capturing():
                loss = lm_loss(model, batch)
            extra = lookup(batch, convs)
            return loss if extra is None else loss + extra

    def after_step(step: int) -> None:
        if snapshot is not None and (step + 1) % sched.snapshot_every == 0 and step + 1 < spec.steps:
            snapshot(step + 1)

    trained = [p for p in model.parameters() if p.requires_grad] + (lookup.parameters() if lookup else [])
    params = [{"params": trained, "lr": spec.lr}]
    name = "target" if phase == 0 else f"target-phase{phase + 1}"
    run_steps(name, params, spec.steps, loss_fn, log, after_step)


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, length - len(p) :] = torch.tensor(p)
        mask[row, length - len(p) :] = 1
    return ids, mask


@torch.inference_mode()
def greedy_answers(
    model: Any, encoder: ChatEncoder, samples: list[Sample], images: list[Any] | None = None, batch: int = 64
) -> list[list[int]]:
    """Transformers' greedy answer token ids (ending with the end-of-turn token when produced)."""
    eos, answers = encoder.tokenizer.eos_token_id, []
    pictures = images if images is not None else [s.image() for s in samples]
    for start in tqdm(range(0, len(samples), batch), desc="greedy answers", unit="batch", leave=False):
        chunk = samples[start : start + batch]
        ids, mask = left_padded(
            [encoder.prompt_ids(s.system, s.question.text) for s in chunk], encoder.tokenizer.pad_token_id
        )
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=encoder.pixels(pictures[start : start + batch]),
            max_new_tokens=96,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=encoder.tokenizer.pad_token_id,
        )
        for row in out[:, ids.shape[1] :].tolist():
            answers.append(row[: row.index(eos) + 1] if eos in row else row)
    return answers


def distill_batches(
    encoder: ChatEncoder, samples: list[Sample], answers: list[list[int]], rng: random.Random, size: int
) -> Iterator[Batch]:
    """Batches of (drafter prompt, target answer) with the loss on the target's answer tokens."""
    while True:
        picks = rng.sample(range(len(samples)), size)
        rows = []
        for i in picks:
            prompt = encoder.prompt_ids(samples[i].system, samples[i].question.text)
            rows.append((prompt + answers[i], [IGNORE] * len(prompt) + answers[i]))
        yield encoder.pad(rows, [samples[i].image() for i in picks])


def distill_drafter(
    model: Any,
    encoder: ChatEncoder,
    samples: list[Sample],
    answers: list[list[int]],
    sched: Schedule,
    steps: int,
    seed: int,
    log: TrainLog,
) -> None:
    batches = distill_batches(encoder, samples, answers, random.Random(seed + 2), sched.drafter_batch)
    params = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": sched.drafter_lr}]
    run_steps("drafter", params, steps, lambda step: lm_loss(model, next(batches)), log)
