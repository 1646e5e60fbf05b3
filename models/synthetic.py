"""Random-weight LLaVA checkpoints in Hugging Face format, built offline.

Tests and ``covspec make-random-checkpoint`` use these to check our model layer against
transformers on every supported family (Llama / Qwen2 text, CLIP / SigLIP vision, GQA, tied
embeddings, RoPE scaling) without downloading anything. Each folder is a complete checkpoint:
``config.json``, safetensors weights, a fast tokenizer with a chat template and an image processor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]

# system / user (images then text) / assistant turns; images render as the <image> placeholder,
# which the processor expands to one token per visual feature.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_DEFAULT_CORPUS = (
    "a red circle is left of a blue square . the green triangle is small . how many shapes are "
    "there ? there are three shapes . what color is the star ? the star is yellow . describe the "
    "scene . you are a helpful assistant that answers questions about images ."
)


@dataclass(frozen=True)
class RandomLlavaSpec:
    """What to build. Sizes are tiny on purpose: the point is coverage, not quality."""

    text_family: str = "llama"  # "llama" | "qwen2"
    vision_family: str = "clip"  # "clip" | "siglip"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    tie_embeddings: bool = False
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    image_size: int = 32
    patch_size: int = 8
    vision_hidden_size: int = 32
    vocab_size: int = 320
    seed: int = 0

    @property
    def select_strategy(self) -> str:
        # CLIP has a CLS token that LLaVA drops ("default"); SigLIP has none ("full").
        return "default" if self.vision_family == "clip" else "full"


# the tokenizer's special-token roles for SPECIAL_TOKENS
LLAVA_ROLES: dict[str, Any] = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "<|im_end|>",
    "extra_special_tokens": {"image_token": IMAGE_TOKEN},
    "chat_template": CHAT_TEMPLATE,
}


def build_tokenizer(
    corpus: list[str],
    vocab_size: int,
    special_tokens: list[str] = SPECIAL_TOKENS,
    roles: dict[str, Any] = LLAVA_ROLES,
) -> Any:
    """Byte-level BPE trained on ``corpus`` with ``special_tokens`` (ids from 0, in order),
    wrapped as a transformers fast tokenizer with ``roles`` (pad/bos/eos tokens, chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


def text_config_args(spec: RandomLlavaSpec, vocab_size: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    """The spec's language-model config fields, as every family's text config names them."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=spec.tie_embeddings,
        rope_parameters={"rope_theta": 10000.0, **spec.rope_parameters},
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def _text_config(spec: RandomLlavaSpec, vocab_size: int, eos_id: int, pad_id: int) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common = text_config_args(spec, vocab_size, eos_id, pad_id)
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if spec.text_family not in configs:
        raise ValueError(f"text_family must be one of {sorted(configs)}, got {spec.text_family!r}")
    return configs[spec.text_family](**common)


def vision_tower_config(spec: RandomLlavaSpec) -> Any:
    """The spec's CLIP or SigLIP tower (SigLIP without the attention-pooling head no LLaVA uses)."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    common: dict[str, Any] = dict(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=2 * spec.vision_hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    if spec.vision_family == "clip":
        return CLIPVisionConfig(projection_dim=spec.vision_hidden_size, **common)
    if spec.vision_family == "siglip":
        return SiglipVisionConfig(vision_use_head=False, **common)
    raise ValueError(f"vision_family must be 'clip' or 'siglip', got {spec.vision_family!r}")


def _vision_parts(spec: RandomLlavaSpec) -> tuple[Any, Any]:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    size = spec.image_size
    if spec.vision_family == "clip":
        crop = {"height": size, "width": size}
        return vision_tower_config(spec), CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=crop)
    return vision_tower_config(spec), SiglipImageProcessorPil(size={"height": size, "width": size})


def build_random_llava(out_dir: str | Path, spec: RandomLlavaSpec = RandomLlavaSpec()) -> Path:
    """Write a random-weight ``LlavaForConditionalGeneration`` checkpoint to ``out_dir``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    out = Path(out_dir)
    tokenizer = build_tokenizer([_DEFAULT_CORPUS] * 4, spec.vocab_size)
    vocab_size = max(spec.vocab_size, len(tokenizer))
    text_config = _text_config(spec, vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id)
    vision_config, image_processor = _vision_parts(spec)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy=spec.select_strategy,
        vision_feature_layer=-2,
        tie_word_embeddings=spec.tie_embeddings,
    )
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).eval()
    _spread_weights(model, spec.seed)
    model.save_pretrained(out)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy=spec.select_strategy,
        num_additional_image_tokens=1 if spec.vision_family == "clip" else 0,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw weights with a larger spread than HF's init, so logits are far from uniform and
    a wrong mask or position shows up as a large difference rather than hiding in the noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * (1.0 / param.shape[-1] ** 0.5))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def build_random_causal_lm(out_dir: str | Path, spec: RandomLlavaSpec = RandomLlavaSpec()) -> Path:
    """Write a text-only ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` checkpoint (the spec's text part)."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer([_DEFAULT_CORPUS] * 4, spec.vocab_size)
    vocab_size = max(spec.vocab_size, len(tokenizer))
    config = _text_config(spec, vocab_size, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    _spread_weights(model, spec.seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
