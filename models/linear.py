"""Linear projections on the CPU kernel that is fastest for their shape.

PyTorch's ``F.linear`` on a CPU calls MKL's sgemm, which for a few rows against a large weight
reads the weight far slower than its one-row (matrix-vector) path: on this machine's two cores a
384 x 2048 projection takes 73 us for one row and 218 us for nine. oneDNN's fused linear (what
Inductor emits for CPUs), with the weight reordered once into oneDNN's blocked layout, takes 40 us
for one row and 88 us for nine. In a whole forward, where each layer's weights come from memory
rather than cache, the gap is wider: the tiny target's projections for a 9-token draft tree take
~5.3 ms with MKL and ~2.4 ms prepacked, and its whole one-token decode forward 5.7 ms vs 4.3-4.7.
For small weights (a tiny drafter's 64-wide projections) oneDNN's ~15 us fixed cost per call
makes it slower, so those stay on ``F.linear``. Results differ from ``F.linear``'s in the last
bits (|diff| <= 1e-4 on these shapes), as any other kernel's would.

Each :class:`Linear` keeps its prepacked copy beside the parameter (twice the weight memory on a
CPU, nothing on a GPU), made on first use and made again whenever the weight's storage or
version changes (an in-place update by an optimizer or ``load_state_dict``). Weights created
under ``torch.inference_mode`` have no version counter, so they are not prepacked: oneDNN then
reorders them on every call (correct, slower; the loaders build weights outside that mode).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_MIN_WEIGHT = 2**17  # weights at least this big (elements) go to oneDNN, for any rows
PACK_ROWS_HINT = 64  # the row count oneDNN picks the weight's blocked layout for (any count runs)
_ONEDNN = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
)


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` runs on oneDNN: fp32 on a CPU, inference, a big enough weight."""
    return (
        weight.numel() >= ONEDNN_MIN_WEIGHT  # first: a small model's every call stops here
        and _ONEDNN
        and x.dim() == 2
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_grad_enabled()  # inference only: the op has no backward here
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] reordered into oneDNN's blocked layout (an opaque oneDNN tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` on oneDNN; ``weight`` plain [out, in] (reordered on every call) or from
    :func:`pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict names) on the kernel fastest for the call's
    shape (see the module docstring)."""

    _packed: tuple[tuple[int, int], torch.Tensor] | None = None  # (weight's ptr, version), copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not uses_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        if self.weight.is_inference():  # no version counter: a copy could go stale unseen
            return onednn_linear(x, self.weight, self.bias)
        return onednn_linear(x, self.packed_weight(), self.bias)

    def packed_weight(self) -> torch.Tensor:
        """The weight in oneDNN's layout, packed again if the weight changed since last time."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, pack_weight(self.weight))
        return self._packed[1]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]
        state.pop("_packed", None)  # a cache, and oneDNN tensors do not pickle
        return state
