"""LoRA adapters in PEFT's format, read for our decoder.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with one
``lora_A`` [r, in] and ``lora_B`` [out, r] per adapted projection. We read them into a
:class:`LoraAdapter` keyed by (layer, transformers module name), with the scale (alpha / r, or
alpha / sqrt(r) for rsLoRA) folded into B, after checking everything a user can get wrong: a
missing file, another adapter type, modules we cannot adapt, a rank over the limit, shapes that
belong to another base model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.config import DecoderConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# the projections a LoRA may adapt, by their transformers names
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(
    r"(?:^|\.)layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<module>\w+)\.lora_(?P<ab>[AB])\.weight$"
)
# config options that change what the weights mean; we refuse them rather than misread them
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out",
    "alpha_pattern": "alpha_pattern",
    "modules_to_save": "modules_to_save",
    "layer_replication": "layer_replication",
}


class AdapterError(ValueError):
    """An adapter folder that cannot be used with this drafter; the message says why."""


@dataclass(frozen=True)
class LoraWeights:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r], scale folded in

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    weights: dict[tuple[int, str], LoraWeights]  # (layer, module in LORA_MODULES) -> A, B

    def __post_init__(self) -> None:
        if not self.weights:
            raise AdapterError(f"adapter {self.name!r} adapts no projection")

    @property
    def rank(self) -> int:
        return max(w.rank for w in self.weights.values())


def module_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """Transformers module name -> (in, out) features in a decoder with config ``cfg``."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, m = cfg.hidden_size, cfg.intermediate_size
    return {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h),
    }  # fmt: skip


def read_adapter_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise AdapterError(f"{folder} is not a PEFT LoRA adapter: it has no {name}")
    try:
        config: dict[str, Any] = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{folder / CONFIG_FILE} is not valid JSON: {e}") from e
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{folder} holds a {config.get('peft_type')!r} adapter; only LORA is supported")
    used = [label for key, label in _UNSUPPORTED.items() if config.get(key)]
    if used:
        raise AdapterError(f"{folder}: unsupported LoRA options {used}; retrain without them")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterError(f"{folder}: LoRA biases are not supported (bias must be 'none')")
    return config


def _pairs(tensors: dict[str, torch.Tensor], folder: Path) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None or "vision" in key or match["module"] not in LORA_MODULES:
            raise AdapterError(
                f"{folder}: unsupported target module in {key!r}; a drafter LoRA may adapt the "
                f"language model's {', '.join(LORA_MODULES)} only"
            )
        pairs.setdefault((int(match["layer"]), match["module"]), {})[match["ab"]] = tensor
    broken = [f"layer {layer} {module}" for (layer, module), ab in pairs.items() if len(ab) != 2]
    if broken:
        raise AdapterError(f"{folder}: lora_A and lora_B must come in pairs; unpaired: {broken[:3]}")
    return pairs


def load_adapter(
    folder: str | Path, cfg: DecoderConfig, max_rank: int, name: str | None = None
) -> LoraAdapter:
    """Read the PEFT LoRA in ``folder`` for a decoder with config ``cfg``."""
    from safetensors.torch import load_file

    path = Path(folder)
    config = read_adapter_config(path)
    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
    shapes, weights = module_shapes(cfg), {}
    for (layer, module), ab in sorted(_pairs(load_file(path / WEIGHTS_FILE), path).items()):
        a, b = ab["A"], ab["B"]
        rank, (n_in, n_out) = a.shape[0], shapes[module]
        if rank > max_rank:
            raise AdapterError(f"{path}: rank {rank} of {module} exceeds the configured maximum {max_rank}")
        if layer >= cfg.num_layers or a.shape != (rank, n_in) or b.shape != (n_out, rank):
            raise AdapterError(
                f"{path} was made for another base model: layer {layer} {module} has A {tuple(a.shape)}, "
                f"B {tuple(b.shape)}; this drafter has {cfg.num_layers} layers and needs A [r, {n_in}], "
                f"B [{n_out}, r]"
            )
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        weights[(layer, module)] = LoraWeights(a.float(), b.float() * scale)
    return LoraAdapter(name or path.name, weights)
