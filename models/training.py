"""Pieces every training loop here shares: the learning-rate schedule and right-padded batches
whose labels cover only what the model must learn to say."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

IGNORE = -100  # label of a token the loss skips (prompt, padding)


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 % of the peak."""
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pad_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, labels)`` rows right-padded -> ``input_ids``, ``attention_mask``, ``labels``, each
    ``[B, L]`` int64 (labels ``IGNORE`` past each row's own labels)."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (ids, lab) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(list(ids))
        labels[row, : len(lab)] = torch.tensor(list(lab))
        mask[row, : len(ids)] = 1
    return input_ids, mask, labels
