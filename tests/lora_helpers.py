"""LoRA adapter folders for tests: made by PEFT itself, or written by hand for the error cases."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.config import DecoderConfig
from models.lora import CONFIG_FILE, WEIGHTS_FILE, module_shapes

DRAFTER = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-drafter"
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(
    folder: Path,
    rank: int,
    alpha: int,
    modules: list[str],
    seed: int,
    rslora: bool = False,
    base: Path = DRAFTER,
) -> Path:
    """A PEFT LoRA on ``base``'s language model with random (non-zero) A and B, saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        use_rslora=rslora,
        target_modules=rf".*language_model.*\.({'|'.join(modules)})",
        init_lora_weights=False,  # random B as well: a zero delta would prove nothing
    )
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def write_adapter(
    folder: Path,
    cfg: DecoderConfig,
    rank: int = 4,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    extra_keys: dict[str, torch.Tensor] | None = None,
    **config: object,
) -> Path:
    """A LoRA folder in PEFT's layout written directly (fast, and able to hold broken cases)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen, shapes, tensors = torch.Generator().manual_seed(seed), module_shapes(cfg), {}
    for layer in range(cfg.num_layers):
        for module in modules:
            n_in, n_out = shapes[module]
            group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.language_model.layers.{layer}.{group}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.1
    tensors.update(extra_keys or {})
    save_file(tensors, folder / WEIGHTS_FILE)
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules)}
    (folder / CONFIG_FILE).write_text(json.dumps({**settings, **config}))
    return folder
