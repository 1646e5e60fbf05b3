"""Load a local Hugging Face checkpoint folder into our decoder (+ vision encoder for VLMs).

The language model is built once, on the meta device, and its parameters are *assigned* from
the safetensors tensors, so no second copy of the LM exists at any time. Architectures are
looked up in a registry; anything else is refused with the list of what is supported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from models.config import DecoderConfig
from models.decoder import Decoder, fuse_hf_weights, hf_names
from models.device import resolve_device
from models.host_allocator import keep_freed_memory
from models.processor import load_processor
from models.vision import ImageEncoder, VisionEncoder
from models.vision_llava_next import load_llava_next_vision
from models.vision_qwen2 import load_qwen_vision

# files whose settings change how images become visual tokens (and so the KV after them)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class LoadedModel:
    path: Path
    architecture: str
    hf_config: Any
    decoder: Decoder
    vision: ImageEncoder | None  # None for text-only checkpoints
    image_token_id: int | None

    def processor(self) -> Any:
        """The checkpoint's own processor (VLM) or tokenizer (text-only), loaded offline."""
        return load_processor(self.path, self.architecture, self.vision is not None)


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; pass the folder that holds config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a Hugging Face checkpoint folder: it has no config.json")
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
    return config


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint (single file or sharded with an index)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in path.glob("*.bin"))) or "none"
        raise CheckpointError(
            f"no *.safetensors weights in {path} (found .bin files: {found}); "
            "save the model with save_pretrained(..., safe_serialization=True)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def take_prefix(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors under the first of ``prefixes`` present, with that prefix stripped."""
    for prefix in prefixes:
        found = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if found:
            return found
    return {}


def build_decoder(
    cfg: DecoderConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, attention_backend: str
) -> Decoder:
    """A decoder whose parameters are the given tensors (no random init, no second copy)."""
    with torch.device("meta"):
        decoder = Decoder(cfg, attention_backend)
    if cfg.tie_embeddings:
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    elif "lm_head.weight" not in weights:
        raise CheckpointError("the checkpoint has no lm_head weights and its config does not tie embeddings")
    ours = [k for k in decoder.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")]
    expected = set(hf_names(ours))
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"language model weights do not match a {cfg.family} decoder: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    fused = fuse_hf_weights({k: v.to(dtype) for k, v in weights.items()})
    decoder.load_state_dict(fused, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        decoder.lm_head.weight = decoder.embed_tokens.weight
    return decoder.eval()


def _load_vision(hf_config: Any, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> VisionEncoder:
    vision = VisionEncoder(hf_config)
    tower = take_prefix(tensors, ("model.vision_tower.", "vision_tower."))
    own_keys = set(vision.vision_tower.state_dict())
    # Older LLaVA checkpoints nest the tower under "vision_model."; newer ones do not.
    tower = {(k if k in own_keys else k.removeprefix("vision_model.")): v for k, v in tower.items()}
    projector = take_prefix(tensors, ("model.multi_modal_projector.", "multi_modal_projector."))
    state = {f"vision_tower.{k}": v for k, v in tower.items()}
    state.update({f"multi_modal_projector.{k}": v for k, v in projector.items()})
    result = vision.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"vision weights do not match the config: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return vision.to(dtype).eval()


@dataclass(frozen=True)
class VlmLayout:
    """Where a VLM family's checkpoint keeps its language model, and how its image path loads
    (each a list of prefixes, the first one present used: transformers 5 saves
    ``model.language_model.*``, released checkpoints use older names)."""

    lm: tuple[str, ...]
    lm_head: tuple[str, ...]
    load_vision: Callable[[Any, dict[str, torch.Tensor], torch.dtype], ImageEncoder]


LLAVA_LAYOUT = VlmLayout(
    ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."), _load_vision
)
LLAVA_NEXT_LAYOUT = dataclasses.replace(LLAVA_LAYOUT, load_vision=load_llava_next_vision)  # + OneVision
# released Qwen2-VL checkpoints keep the language model at "model.*" and the tower at "visual.*"
QWEN_VL_LAYOUT = VlmLayout(("model.language_model.", "model."), ("lm_head.",), load_qwen_vision)


def _load_vlm(path: Path, dtype: torch.dtype, attention_backend: str, layout: VlmLayout) -> LoadedModel:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    tensors = read_safetensors(path)
    tie = bool(getattr(hf_config, "tie_word_embeddings", False))
    cfg = DecoderConfig.from_hf(hf_config.text_config, tie_embeddings=tie)
    lm = {k: v for k, v in take_prefix(tensors, layout.lm).items() if not k.startswith("visual.")}
    lm.update({f"lm_head.{k}": v for k, v in take_prefix(tensors, layout.lm_head).items()})
    try:
        vision = layout.load_vision(hf_config, tensors, dtype)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    return LoadedModel(
        path=path,
        architecture=hf_config.architectures[0],
        hf_config=hf_config,
        decoder=build_decoder(cfg, lm, dtype, attention_backend),
        vision=vision,
        image_token_id=int(hf_config.image_token_id),
    )


def _load_causal_lm(path: Path, dtype: torch.dtype, attention_backend: str) -> LoadedModel:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    tensors = read_safetensors(path)
    cfg = DecoderConfig.from_hf(hf_config)
    lm = take_prefix(tensors, ("model.",))
    lm.update({f"lm_head.{k}": v for k, v in take_prefix(tensors, ("lm_head.",)).items()})
    return LoadedModel(
        path=path,
        architecture=hf_config.architectures[0],
        hf_config=hf_config,
        decoder=build_decoder(cfg, lm, dtype, attention_backend),
        vision=None,
        image_token_id=None,
    )


ARCHITECTURES: dict[str, Callable[[Path, torch.dtype, str], LoadedModel]] = {
    "LlavaForConditionalGeneration": partial(_load_vlm, layout=LLAVA_LAYOUT),
    "LlavaNextForConditionalGeneration": partial(_load_vlm, layout=LLAVA_NEXT_LAYOUT),
    "LlavaOnevisionForConditionalGeneration": partial(_load_vlm, layout=LLAVA_NEXT_LAYOUT),
    "Qwen2VLForConditionalGeneration": partial(_load_vlm, layout=QWEN_VL_LAYOUT),
    "Qwen2_5_VLForConditionalGeneration": partial(_load_vlm, layout=QWEN_VL_LAYOUT),
    "LlamaForCausalLM": _load_causal_lm,
    "Qwen2ForCausalLM": _load_causal_lm,
}


# architectures users bring that are refused on purpose, with why
REFUSED = {
    "Gemma3ForConditionalGeneration": (
        "Gemma 3 is not supported: five of every six layers attend through a sliding window and an "
        "image's tokens attend to each other both ways, while the paged KV pool and its attention "
        "backends apply one causal (or tree) mask per sequence to every layer"
    ),
}


def load_model(
    path: str | Path, dtype: str = "fp32", attention_backend: str = "sdpa", device: str = "cpu"
) -> LoadedModel:
    """Load the checkpoint folder ``path``; ``dtype`` is one of fp32, bf16, fp16; ``device``
    where its weights (and so its KV pool and forwards) live: cpu, cuda or cuda:N
    (``models.device``). A process that loads a model runs its forwards: from then on it keeps
    freed memory for the next forward's activations (``models.host_allocator``)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    where = resolve_device(device)  # before reading any weights: a bad device fails fast
    folder = Path(path)
    config = read_config(folder)
    architectures = config.get("architectures") or []
    supported = [a for a in architectures if a in ARCHITECTURES]
    refused = [REFUSED[a] for a in architectures if a in REFUSED]
    if not supported and refused:
        raise CheckpointError(f"{refused[0]}; supported: {sorted(ARCHITECTURES)}")
    if not supported:
        raise CheckpointError(
            f"architecture {architectures or config.get('model_type')} in {folder / 'config.json'} is not "
            f"supported; supported: {sorted(ARCHITECTURES)}"
        )
    keep_freed_memory()
    model = ARCHITECTURES[supported[0]](folder, DTYPES[dtype], attention_backend)
    if where.type != "cpu":
        model.decoder.to(where)  # tied embeddings stay tied: one parameter, moved once
        if model.vision is not None:
            model.vision.to(where)
    return model


def fingerprint(model: LoadedModel, kv_dtype: torch.dtype) -> bytes:
    """SHA-256 of the checkpoint's config, image processor and weight files and the KV dtype:
    the identity of the KV this model computes (two replicas of the same files agree; retrained
    weights do not). The image processor's settings are in it because they decide an image's
    tiles or grid, hence the positions of everything after it. Reads every weight file once
    (about a second per GB)."""
    h = hashlib.sha256(b"covspec-model-v1\0" + str(kv_dtype).encode() + b"\0")
    processing = [model.path / name for name in PROCESSOR_FILES if (model.path / name).is_file()]
    for file in [model.path / "config.json", *processing, *sorted(model.path.glob("*.safetensors"))]:
        h.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.digest()
