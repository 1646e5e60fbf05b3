"""Which of an image's visual tokens the drafter keeps at compression ratio r (registry).

``salient`` (default): keep the tokens whose projected embedding lies farthest from the image's
mean embedding. In LLaVA-style towers, background patches project to nearly the same vector,
while patches that show an object stand out from it; the drafter needs the objects, not the
background. The kept tokens keep their original positions (``models.vision.splice_images``).
``uniform``: every k-th token, a content-blind baseline for the ablation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.vision import VisualTokens

Compressor = Callable[[VisualTokens, float], VisualTokens]


def kept_count(total: int, ratio: float) -> int:
    return max(1, min(total, round(ratio * total)))


def keep_salient(visual: VisualTokens, ratio: float) -> VisualTokens:
    k = kept_count(len(visual.index), ratio)
    distance = (visual.embeds - visual.embeds.mean(0, keepdim=True)).norm(dim=-1)
    return visual.keep(torch.topk(distance, k).indices)


def keep_uniform(visual: VisualTokens, ratio: float) -> VisualTokens:
    n = len(visual.index)
    k = kept_count(n, ratio)
    return visual.keep(torch.linspace(0, n - 1, k).round().long().unique())


COMPRESSORS: dict[str, Compressor] = {"salient": keep_salient, "uniform": keep_uniform}


def get_compressor(name: str) -> Compressor:
    if name not in COMPRESSORS:
        raise ValueError(f"unknown compression method {name!r}; choose one of {sorted(COMPRESSORS)}")
    return COMPRESSORS[name]
