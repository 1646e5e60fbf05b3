"""The Qwen2-VL / Qwen2.5-VL image path: transformers' own vision transformer (dynamic resolution,
2.5's window attention, the 2x2 patch merger) and each image's M-RoPE grid.

The checkpoint's image processor resizes an image to a multiple of ``patch_size * merge_size``
on each side (as close to its own aspect as it can) and returns its patches with
``image_grid_thw`` = (temporal, height, width) in patches. After merging, the image is
``t * (h / m) * (w / m)`` visual tokens whose M-RoPE positions are their (t, row, column) in that
merged grid, offset by where the image starts; the text after it continues ``max(h, w) / m``
positions on (transformers' ``get_rope_index`` for still images).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from models.vision import ImageLayout, VisualTokens


def _tower_class(model_type: str) -> Any:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    towers = {
        "qwen2_vl": Qwen2VisionTransformerPretrainedModel,
        "qwen2_5_vl": Qwen2_5_VisionTransformerPretrainedModel,
    }
    if model_type not in towers:
        raise ValueError(f"no Qwen vision tower for model type {model_type!r}; known: {sorted(towers)}")
    return towers[model_type]


def image_grid(grid_thw: tuple[int, int, int], merge: int) -> torch.Tensor:
    """``[t * h/m * w/m, 3]`` int64 (t, row, column) of each merged token, in the tower's order."""
    t, h, w = grid_thw[0], grid_thw[1] // merge, grid_thw[2] // merge
    axes = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack(axes, dim=-1).reshape(-1, 3)


class QwenVisionEncoder(nn.Module):
    """``visual`` is the checkpoint's vision transformer, built from its config."""

    def __init__(self, qwen_config: Any) -> None:
        super().__init__()
        vision_config = qwen_config.vision_config
        self.visual = _tower_class(qwen_config.model_type)._from_config(vision_config)
        self.merge = int(vision_config.spatial_merge_size)

    def layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        out = []
        for thw in inputs["image_grid_thw"].tolist():
            grid = image_grid(tuple(thw), self.merge)
            out.append(ImageLayout(int(grid.shape[0]), max(thw[1], thw[2]) // self.merge, grid))
        return out

    @torch.inference_mode()
    def forward(self, inputs: Mapping[str, Any]) -> list[VisualTokens]:
        param = next(self.parameters())
        pixels = inputs["pixel_values"].to(device=param.device, dtype=param.dtype)
        grid_thw = inputs["image_grid_thw"].to(param.device)
        merged = self.visual(pixels, grid_thw=grid_thw).pooler_output.cpu()  # [sum tokens, hidden]
        sizes = (inputs["image_grid_thw"].prod(-1) // self.merge**2).tolist()
        return [VisualTokens.full(f) for f in torch.split(merged, sizes)]


def load_qwen_vision(
    hf_config: Any, tensors: dict[str, torch.Tensor], dtype: torch.dtype
) -> QwenVisionEncoder:
    """The encoder with the checkpoint's ``model.visual.*`` (or older ``visual.*``) tensors."""
    encoder = QwenVisionEncoder(hf_config)
    for prefix in ("model.visual.", "visual."):
        tower = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if tower:
            break
    result = encoder.visual.load_state_dict(tower, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"vision weights do not match the config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return encoder.to(dtype).eval()
