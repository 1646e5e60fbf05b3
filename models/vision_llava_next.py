"""LLaVA-NeXT and LLaVA-OneVision images: any-resolution tiles into one row per visual token.

The image processor cuts each image into a *base tile* (the whole image, resized) and a grid of
tiles at the best-fitting "grid pinpoint" resolution. The tower sees every tile. An image's rows are
the base tile's features, then the grid tiles' features stitched into one feature map, cut back to
the image's aspect ratio (the processor padded it to the pinpoint), for OneVision shrunk to at
most ``anyres_max_N`` tiles' worth, with the ``image_newline`` embedding closing every map row.
OneVision tiles only an image that is alone in its prompt (``batch_num_images``); an image among
several gets its base tile and one newline. The row counts follow from the image size and the
config alone, which is what lets :meth:`LlavaNextVisionEncoder.layouts` skip the tower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextMultiModalProjector,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector

from models.vision import ImageLayout, VisualTokens


@dataclass(frozen=True)
class _Family:
    """What one any-resolution family does differently."""

    projector: type[nn.Module]
    shrinks_to_max_tiles: bool  # OneVision's anyres_max_N
    tiles_only_lone_images: bool  # OneVision: an image among several in a prompt gets its base tile only


_FAMILIES = {  # keyed by the checkpoint config's model_type
    "llava_next": _Family(
        LlavaNextMultiModalProjector, shrinks_to_max_tiles=False, tiles_only_lone_images=False
    ),
    "llava_onevision": _Family(
        LlavaOnevisionMultiModalProjector, shrinks_to_max_tiles=True, tiles_only_lone_images=True
    ),
}
_OWN_MODULES = ("vision_tower", "multi_modal_projector", "image_newline")  # top-level names we load


@dataclass(frozen=True)
class TilePlan:
    """How one image's tiles become rows; computed from the processor output, not the tower."""

    image_size: tuple[int, int]  # (height, width) of the original image
    num_tiles: int  # tiles the tower sees, base tile first
    tile_grid: tuple[int, int] | None  # (rows, cols) of grid tiles; None when only the base tile
    feature_map: tuple[int, int] | None  # (height, width) after unpadding and shrinking
    base_tokens: int  # rows of the base tile

    @property
    def num_tokens(self) -> int:
        if self.feature_map is None:
            return self.base_tokens + 1  # the base tile and one newline
        height, width = self.feature_map
        return self.base_tokens + height * (width + 1)


class LlavaNextVisionEncoder(nn.Module):
    """Vision tower, projector and ``image_newline`` of a LLaVA-NeXT / OneVision checkpoint."""

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        from transformers import AutoModel

        family = _FAMILIES.get(hf_config.model_type)
        if family is None:
            raise ValueError(f"model_type {hf_config.model_type!r} is not one of {sorted(_FAMILIES)}")
        if hf_config.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"unsupported vision_feature_select_strategy {hf_config.vision_feature_select_strategy!r}"
            )
        vision = hf_config.vision_config
        self.vision_tower = AutoModel.from_config(vision)
        self.multi_modal_projector = family.projector(hf_config)
        self.image_newline = nn.Parameter(torch.zeros(hf_config.text_config.hidden_size))
        self.feature_layers = _as_list(hf_config.vision_feature_layer)
        self.drop_cls = hf_config.vision_feature_select_strategy == "default"
        self.tile_px = vision.image_size
        self.grid = vision.image_size // vision.patch_size  # features per tile side
        self.pinpoints = [list(p) for p in hf_config.image_grid_pinpoints]
        self.max_tiles = _max_tiles(hf_config.vision_aspect_ratio) if family.shrinks_to_max_tiles else None
        self.tiles_only_lone_images = family.tiles_only_lone_images

    def plans(self, inputs: Mapping[str, Any]) -> list[TilePlan]:
        """One :class:`TilePlan` per image, from ``image_sizes`` (and OneVision's ``batch_num_images``)."""
        sizes = [(int(h), int(w)) for h, w in torch.as_tensor(inputs["image_sizes"]).tolist()]
        tiled = [True] * len(sizes)
        if self.tiles_only_lone_images and inputs.get("batch_num_images") is not None:
            tiled = [int(n) == 1 for n in inputs["batch_num_images"] for _ in range(int(n))]
        if len(tiled) != len(sizes):
            raise ValueError(f"batch_num_images counts {len(tiled)} images, image_sizes {len(sizes)}")
        return [
            self._plan(size) if t else self._base_only(size) for size, t in zip(sizes, tiled, strict=True)
        ]

    def layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        return [ImageLayout.consecutive(plan.num_tokens) for plan in self.plans(inputs)]

    @torch.inference_mode()
    def forward(self, inputs: Mapping[str, Any]) -> list[VisualTokens]:
        """Every tile of every image through the tower at once, then each image's rows
        [num_tokens, text_hidden] as a :class:`VisualTokens` on the host."""
        plans = self.plans(inputs)
        param = next(self.parameters())
        tiles = _tiles(inputs["pixel_values"], plans).to(device=param.device, dtype=param.dtype)
        features = self._tile_features(tiles).split([p.num_tiles for p in plans])
        return [VisualTokens.full(self._rows(f, plan).cpu()) for f, plan in zip(features, plans, strict=True)]

    def _base_only(self, size: tuple[int, int]) -> TilePlan:
        return TilePlan(size, num_tiles=1, tile_grid=None, feature_map=None, base_tokens=self.grid**2)

    def _plan(self, size: tuple[int, int]) -> TilePlan:
        rows, cols = get_anyres_image_grid_shape(size, self.pinpoints, self.tile_px)
        num_tiles = image_size_to_num_patches(size, self.pinpoints, self.tile_px)
        # unpadding depends on shapes only: cut an empty map of the stitched size
        height, width = unpad_image(torch.empty(0, rows * self.grid, cols * self.grid), size).shape[1:]
        return TilePlan(size, num_tiles, (rows, cols), self._shrunk(height, width), self.grid**2)

    def _shrunk(self, height: int, width: int) -> tuple[int, int]:
        """OneVision's anyres_max_N: a map over ~N tiles' worth of features shrinks to that size."""
        if self.max_tiles is None:
            return height, width
        ratio = math.sqrt(height * width / (self.max_tiles * self.grid**2))
        if ratio > 1.1:  # transformers' threshold
            return int(height // ratio), int(width // ratio)
        return height, width

    def _tile_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, px, px] -> [tiles, grid * grid, text_hidden] projected features."""
        out = self.vision_tower(tiles, output_hidden_states=True, return_dict=True)
        selected = torch.cat([out.hidden_states[i] for i in self.feature_layers], dim=-1)
        if self.drop_cls:
            selected = selected[:, 1:]
        if selected.shape[1] != self.grid**2:
            raise ValueError(
                f"the tower gives {selected.shape[1]} tokens per tile after vision_feature_select_strategy, "
                f"but any-resolution packing needs {self.grid}x{self.grid}: a tower with a CLS token needs "
                "'default', one without (SigLIP) needs 'full'"
            )
        features: torch.Tensor = self.multi_modal_projector(selected)
        return features

    def _rows(self, features: torch.Tensor, plan: TilePlan) -> torch.Tensor:
        """One image's tile features [num_tiles, grid * grid, hidden] -> its rows [num_tokens, hidden]."""
        newline = self.image_newline.to(features)
        if plan.tile_grid is None or plan.feature_map is None:
            return torch.cat([features[0], newline[None]])
        (rows, cols), g = plan.tile_grid, self.grid
        stitched = features[1:].view(rows, cols, g, g, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        fmap = unpad_image(stitched, plan.image_size)  # [hidden, height, width]
        if tuple(fmap.shape[1:]) != plan.feature_map:
            fmap = nn.functional.interpolate(fmap[None], list(plan.feature_map), mode="bilinear")[0]
        fmap = torch.cat([fmap, newline[:, None, None].expand(*fmap.shape[:-1], 1)], dim=-1)
        return torch.cat([features[0], fmap.flatten(1, 2).transpose(0, 1)])


def _tiles(pixel_values: torch.Tensor, plans: list[TilePlan]) -> torch.Tensor:
    """The tiles the tower sees, all images' in order: [sum(num_tiles), 3, px, px]. The processor
    pads every image to the same tile count ([images, max_tiles, 3, px, px]); the padding is dropped."""
    if pixel_values.dim() == 5:
        most = max(plan.num_tiles for plan in plans)
        if pixel_values.shape[1] < most:
            raise ValueError(
                f"pixel_values hold {pixel_values.shape[1]} tiles per image but an image needs {most}: "
                "make them with this checkpoint's own image processor (same grid pinpoints)"
            )
        return torch.cat([pv[: plan.num_tiles] for pv, plan in zip(pixel_values, plans, strict=True)])
    wanted = sum(plan.num_tiles for plan in plans)
    if pixel_values.dim() != 4 or pixel_values.shape[0] != wanted:
        shape = tuple(pixel_values.shape)
        raise ValueError(f"pixel_values must be [images, tiles, 3, H, W] or [{wanted}, 3, H, W], got {shape}")
    return pixel_values


def _as_list(layer: int | list[int]) -> list[int]:
    return [layer] if isinstance(layer, int) else list(layer)


def _max_tiles(vision_aspect_ratio: str) -> int:
    number = vision_aspect_ratio.removeprefix("anyres_max_")
    if not number.isdigit():
        raise ValueError(f"vision_aspect_ratio must look like 'anyres_max_9', got {vision_aspect_ratio!r}")
    return int(number)


def load_llava_next_vision(
    hf_config: Any, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> LlavaNextVisionEncoder:
    """The image path of a LLaVA-NeXT / OneVision checkpoint from all its tensors, in ``dtype`` and
    eval mode. Takes the names ``save_pretrained`` writes (``vision_tower.*``, ``multi_modal_projector.*``,
    ``image_newline``: the Hub layout), the Hub's ``vision_tower.vision_model.*`` and a live model's
    ``model.``-prefixed ``state_dict()`` names."""
    encoder = LlavaNextVisionEncoder(hf_config)
    expected = {k for k in encoder.state_dict() if not k.endswith("position_ids")}
    state = _encoder_tensors(tensors, expected)
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint's vision weights do not match its {hf_config.model_type} config: "
            f"missing {missing[:5]} ({len(missing)} in all), "
            f"unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    try:
        encoder.load_state_dict(state, strict=False)  # names checked above; position_ids may differ
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"the checkpoint's vision weights do not fit its config: {err}") from err
    return encoder.to(dtype).eval()


def _encoder_tensors(tensors: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """The encoder's tensors under our names: ``model.`` dropped, and the Hub's ``vision_model.``
    level dropped where our tower has none (transformers 5 flattened it)."""
    prefix = "model." if any(k.startswith("model.vision_tower.") for k in tensors) else ""
    state = {}
    for name, tensor in tensors.items():
        key = name.removeprefix(prefix)
        ours = name.startswith(prefix) and key.split(".")[0] in _OWN_MODULES
        if not ours or key.endswith("position_ids"):
            continue
        if key not in own and key.startswith("vision_tower.vision_model."):
            key = "vision_tower." + key.removeprefix("vision_tower.vision_model.")
        state[key] = tensor
    return state
