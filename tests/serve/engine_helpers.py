"""Shared pieces of the engine tests: random checkpoints, prompts, and the transformers oracle."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.prompt import Prompt
from core.sampling import SamplingParams
from models.processor import folder_processor
from scheduler.engine import Completion, Engine
from serve.chat import chat_prompt


def noisy_copy(source: Path, out: Path, scale: float, seed: int) -> Path:
    """``source`` with Gaussian noise on every language-model weight: a drafter that agrees with
    the target often but not always."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=True, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    model.save_pretrained(out)
    for file in source.iterdir():  # tokenizer, processor and chat template as they are
        if file.is_file() and file.suffix != ".safetensors" and not (out / file.name).exists():
            shutil.copy(file, out / file.name)
    return out


def random_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def messages(text: str, with_image: bool, system: str | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if system is not None:
        out.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    return [*out, {"role": "user", "content": content}]


class Oracle:
    """transformers ``generate`` (greedy) on the same checkpoint: what the engine must equal."""

    def __init__(self, folder: Path, device: str = "cpu") -> None:
        from transformers import AutoModelForImageTextToText

        self.device = device
        self.processor = folder_processor(folder)
        self.model = (
            AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
            .eval()
            .to(device)
        )

    def inputs(self, text: str, image: Image.Image | None, system: str | None) -> dict[str, torch.Tensor]:
        chat = self.processor.apply_chat_template(
            messages(text, image is not None, system), add_generation_prompt=True
        )
        images = [image] if image is not None else None  # as given: the processor converts it
        return dict(self.processor(images=images, text=chat, return_tensors="pt").to(self.device))

    @torch.inference_mode()
    def greedy(self, text: str, image: Image.Image | None, system: str | None, max_new: int) -> list[int]:
        enc = self.inputs(text, image, system)
        out = self.model.generate(**enc, max_new_tokens=max_new, do_sample=False)
        return out[0, enc["input_ids"].shape[1] :].tolist()

    def prompt(self, text: str, image: Image.Image | None, system: str | None) -> Prompt:
        return chat_prompt(self.processor, text, [image] if image is not None else [], system)


def run_checked(
    engine: Engine,
    prompts: list[Prompt],
    sampling: list[SamplingParams],
    compression: list[float] | None = None,
    adapters: list[str | None] | None = None,
) -> list[Completion]:
    """``engine.generate`` step by step, checking every memory owner's integrity after each step."""
    ratios = compression or [1.0] * len(prompts)
    users = adapters or [None] * len(prompts)
    ids = [
        engine.add_request(p, s, r, a) for p, s, r, a in zip(prompts, sampling, ratios, users, strict=True)
    ]
    done: dict[int, Completion] = {}
    while len(done) < len(ids):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = engine.completion(out)
        engine.scheduler.check_integrity()
        if engine.drafter is not None:
            engine.drafter.check_integrity()
    return [done[i] for i in ids]
