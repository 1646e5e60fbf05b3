"""How many CPU threads a model's forwards split each op across.

PyTorch runs every CPU op on ``torch.get_num_threads()`` threads. A tiny drafter's ops (64-wide
projections over a few rows, top-k over a 512-token vocabulary) are too small to split: on this
machine's two cores a single user's speculative decoding runs 5-7 % faster with the drafter on
one thread than on two (long answers with an adapter), though one isolated drafter forward
times the same either way: the gain is in the loop over depth levels. So a model whose biggest
weight is small runs on one thread (:func:`threads_for`); everything else keeps the process's
setting. The setting is process-wide: it is changed only around work that runs alone (the
engine's step loop runs the drafter and the target one after the other).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

SMALL_WEIGHT = 2**17  # elements; below this a projection is not worth splitting (cf. models.linear)


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (None: leave the setting alone)."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_for(model: nn.Module) -> int | None:
    """1 for a CPU model whose every weight matrix has fewer than ``SMALL_WEIGHT`` elements (its
    ops are too small to split), None (the process's threads) otherwise."""
    weights = [p for p in model.parameters() if p.dim() == 2]
    on_cpu = all(p.device.type == "cpu" for p in weights)
    return 1 if on_cpu and weights and max(p.numel() for p in weights) < SMALL_WEIGHT else None
