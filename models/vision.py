"""Images into visual tokens: the contract every VLM family's image path keeps, and LLaVA-1.5's.

An :class:`ImageEncoder` takes what the checkpoint's own image processor returned for some
images and gives, per image, its :class:`ImageLayout` (how many placeholder rows it expands to and
which positions they take, known without running the tower) and its :class:`VisualTokens`
(one embedding per row). ``VisualTokens`` keeps a subset of an image's tokens (the drafter's
compression) together with their original indices, and :func:`splice_images` lays the kept
tokens into a prompt at their *original* positions, so a compressed prompt is the full prompt
with some image tokens left out, not a shifted one.

``VisionEncoder`` here is the LLaVA-1.5 path (one fixed-size tile, CLS dropped or kept); the
other families live beside it (``models.vision_qwen2``, ``models.vision_llava_next``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class ImageLayout:
    """Where one image's visual tokens sit in a prompt, known before its vision tower runs.

    Most families give an image's rows consecutive positions (``span == num_tokens``). Under
    M-RoPE (Qwen2-VL) each row has a (temporal, height, width) position ``start + grid[i]`` and
    the text after the image continues at ``start + span`` (the larger grid side), not after
    ``num_tokens`` rows.
    """

    num_tokens: int  # placeholder rows the image expands to
    span: int  # text positions the image takes
    grid: torch.Tensor | None = None  # [num_tokens, 3] int64 (t, h, w) offsets; M-RoPE families only

    def __post_init__(self) -> None:
        if self.num_tokens <= 0 or self.span <= 0:
            raise ValueError(f"an image needs rows and positions, got {self.num_tokens} and {self.span}")
        if self.grid is not None and tuple(self.grid.shape) != (self.num_tokens, 3):
            raise ValueError(f"grid must be [{self.num_tokens}, 3], got {tuple(self.grid.shape)}")

    @classmethod
    def consecutive(cls, num_tokens: int) -> ImageLayout:
        return cls(num_tokens, num_tokens)


class ImageEncoder(Protocol):
    """A VLM family's image path. ``inputs`` is what the checkpoint's image processor returns
    for ``images=[...]`` with ``return_tensors="pt"`` (pixel values plus whatever the family
    needs: ``image_sizes``, ``image_grid_thw``); both methods give one entry per image, in order,
    and agree on each image's token count."""

    def layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        """Each image's layout, from the processor's output alone (no tower)."""
        ...

    def __call__(self, inputs: Mapping[str, Any]) -> list[VisualTokens]:
        """Each image's visual tokens, all of them (``VisualTokens.full``), on the host."""
        ...

    def to(self, device: torch.device) -> Any:
        """Move the encoder's weights (an ``nn.Module``'s ``to``)."""
        ...


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
        # the processor resizes every image to the tower's size: as many tokens as the tower has
        # positions (CLIP's include its CLS token, SigLIP's do not), less the first for "default"
        positions = int(self.vision_tower.embeddings.num_positions)
        self.tokens_per_image = positions - (1 if self.select_strategy == "default" else 0)
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {self.select_strategy!r}")

    def layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        return [ImageLayout.consecutive(self.tokens_per_image)] * int(inputs["pixel_values"].shape[0])

    @torch.inference_mode()
    def forward(self, inputs: Mapping[str, Any]) -> list[VisualTokens]:
        """``inputs["pixel_values"]`` [N, 3, H, W] -> one :class:`VisualTokens` (all tokens) per
        image, on the host (prompts are assembled there; the decoder moves them to its device)."""
        param = next(self.parameters())
        pixels = inputs["pixel_values"].to(device=param.device, dtype=param.dtype)
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
    embed_positions: torch.Tensor | None  # [m, 3] int64 M-RoPE (t, h, w) of those rows, or None


def prompt_positions(
    input_ids: torch.Tensor, image_token_id: int, layouts: list[ImageLayout]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions of an expanded prompt ``input_ids`` [n] whose runs of ``image_token_id`` are the
    images of ``layouts``, in order: ``[n]`` int64 one per row, and ``[v, 3]`` int64 (t, h, w) per
    visual row under M-RoPE (None otherwise). Text continues one position after the last one
    taken; an M-RoPE image takes ``span`` positions and its rows' one position is their ``t``."""
    is_image = input_ids == image_token_id
    needed = sum(lay.num_tokens for lay in layouts)
    if int(is_image.sum()) != needed:
        raise ValueError(
            f"prompt has {int(is_image.sum())} image placeholder tokens but the images need {needed}"
        )
    n = int(input_ids.shape[0])
    positions = torch.empty(n, dtype=torch.long)
    grids, row, pos = [], 0, 0
    image_rows = torch.nonzero(is_image).flatten().tolist()
    offset = 0
    for lay in layouts:
        start = image_rows[offset]
        offset += lay.num_tokens
        positions[row:start] = torch.arange(pos, pos + start - row)
        pos += start - row
        if lay.grid is None:
            positions[start : start + lay.num_tokens] = torch.arange(pos, pos + lay.num_tokens)
        else:
            grid = lay.grid + pos
            grids.append(grid)
            positions[start : start + lay.num_tokens] = grid[:, 0]
        pos, row = pos + lay.span, start + lay.num_tokens
    positions[row:] = torch.arange(pos, pos + n - row)
    if grids and len(grids) != len(layouts):
        raise ValueError("either every image of a prompt has an M-RoPE grid or none has")
    return positions, (torch.cat(grids) if grids else None)


def splice_images(
    input_ids: torch.Tensor,
    image_token_id: int,
    images: list[VisualTokens],
    layouts: list[ImageLayout] | None = None,
) -> SplicedPrompt:
    """Match each run of image placeholder tokens in ``input_ids`` [n] with one image, in order,
    and drop the placeholders of visual tokens the image does not keep. ``layouts`` (default:
    consecutive positions) place the rows; kept rows keep the positions they have in the full
    prompt."""
    layouts = layouts or [ImageLayout.consecutive(img.num_total) for img in images]
    if [lay.num_tokens for lay in layouts] != [img.num_total for img in images]:
        raise ValueError("each image's layout must have as many tokens as the image")
    full_positions, grid_positions = prompt_positions(input_ids, image_token_id, layouts)
    is_image = input_ids == image_token_id
    keep = ~is_image
    placeholder_rows = torch.nonzero(is_image).flatten()
    kept_visual, offset = [], 0  # indices into the prompt's visual rows, in order
    for img in images:
        kept_visual.append(offset + img.index)
        offset += img.num_total
    visual = torch.cat(kept_visual) if kept_visual else torch.empty(0, dtype=torch.long)
    rows = placeholder_rows[visual]
    keep[rows] = True
    kept = torch.nonzero(keep).flatten()
    is_visual_row = torch.zeros_like(keep)
    is_visual_row[rows] = True
    embeds = [img.embeds for img in images]
    hidden = images[0].embeds.shape[-1] if images else 0
    return SplicedPrompt(
        token_ids=input_ids[kept],
        positions=full_positions[kept],
        embed_index=torch.nonzero(is_visual_row[kept]).flatten(),
        embeds=torch.cat(embeds) if embeds else torch.empty(0, hidden),
        embed_positions=None if grid_positions is None else grid_positions[visual],
    )
