"""The LLaVA image path: transformers' own vision tower and projector, and visual-token selection.

``VisionEncoder`` turns pixel values into one embedding per visual token. ``VisualTokens`` keeps a
subset of an image's tokens (the drafter's compression) together with their original indices, and
:func:`splice_images` lays the kept tokens into a prompt at their *original* positions, so a
compressed prompt is the full prompt with some image tokens left out, not a shifted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class VisualTokens:
    """The visual tokens of one image that a model will see."""

    embeds: torch.Tensor  # [n_kept, hidden] projected features
    index: torch.Tensor  # [n_kept] int64, increasing indices into the image's full token list
    num_total: int  # tokens of the full image (= placeholder tokens in the prompt)

    def __post_init__(self) -> None:
        if self.embeds.shape[0] != self.index.shape[0]:
            raise ValueError(f"{self.embeds.shape[0]} embeds but {self.index.shape[0]} indices")
        if self.index.numel() and (int(self.index.max()) >= self.num_total or int(self.index.min()) < 0):
            raise ValueError(f"visual token indices must lie in [0, {self.num_total})")

    @classmethod
    def full(cls, embeds: torch.Tensor) -> VisualTokens:
        return cls(embeds=embeds, index=torch.arange(embeds.shape[0]), num_total=embeds.shape[0])

    def keep(self, index: torch.Tensor) -> VisualTokens:
        """The subset at positions ``index`` (into this object's tokens), in increasing order."""
        order = torch.sort(index).values
        return VisualTokens(embeds=self.embeds[order], index=self.index[order], num_total=self.num_total)


class VisionEncoder(nn.Module):
    """Vision tower + multimodal projector of a LLaVA checkpoint, built from its config."""

    def __init__(self, llava_config: Any) -> None:
        super().__init__()
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.vision_tower = AutoModel.from_config(llava_config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(llava_config)
        self.feature_layer = llava_config.vision_feature_layer
        self.select_strategy = llava_config.vision_feature_select_strategy
        vision = llava_config.vision_config
        grid = vision.image_size // vision.patch_size  # the processor resizes every image to image_size
        self.tokens_per_image = grid * grid + (1 if self.select_strategy == "full" else 0)
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {self.select_strategy!r}")

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> list[VisualTokens]:
        """``pixel_values`` [N, 3, H, W] -> one :class:`VisualTokens` (all tokens) per image, on
        the host (prompts are assembled there; the decoder moves them to its device)."""
        param = next(self.parameters())
        pixels = pixel_values.to(device=param.device, dtype=param.dtype)
        out = self.vision_tower(pixels, output_hidden_states=True, return_dict=True)
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        selected = [out.hidden_states[i] for i in layers]
        if self.select_strategy == "default":  # drop the CLS token
            selected = [h[:, 1:] for h in selected]
        features = self.multi_modal_projector(torch.cat(selected, dim=-1)).cpu()
        return [VisualTokens.full(f) for f in features]


@dataclass(frozen=True)
class SplicedPrompt:
    """A tokenized prompt with its images laid in, ready for a ``SequenceInput``."""

    token_ids: torch.Tensor  # [n] int64 (placeholder ids where visual tokens go)
    positions: torch.Tensor  # [n] int64 original positions (gaps where visual tokens were dropped)
    embed_index: torch.Tensor  # [m] int64 rows of token_ids that carry a visual embedding
    embeds: torch.Tensor  # [m, hidden]


def splice_images(input_ids: torch.Tensor, image_token_id: int, images: list[VisualTokens]) -> SplicedPrompt:
    """Match each run of image placeholder tokens in ``input_ids`` [n] with one image, in order,
    and drop the placeholders of visual tokens the image does not keep."""
    is_image = input_ids == image_token_id
    needed = sum(img.num_total for img in images)
    if int(is_image.sum()) != needed:
        raise ValueError(
            f"prompt has {int(is_image.sum())} image placeholder tokens but the images need {needed}"
        )
    keep = ~is_image
    placeholder_rows = torch.nonzero(is_image).flatten()
    kept_rows, offset = [], 0
    for img in images:
        kept_rows.append(placeholder_rows[offset + img.index])
        offset += img.num_total
    rows = torch.cat(kept_rows) if kept_rows else torch.empty(0, dtype=torch.long)
    keep[rows] = True
    kept = torch.nonzero(keep).flatten()
    is_visual_row = torch.zeros_like(keep)
    is_visual_row[rows] = True
    embeds = [img.embeds for img in images]
    hidden = images[0].embeds.shape[-1] if images else 0
    return SplicedPrompt(
        token_ids=input_ids[kept],
        positions=kept,
        embed_index=torch.nonzero(is_visual_row[kept]).flatten(),
        embeds=torch.cat(embeds) if embeds else torch.empty(0, hidden),
    )
