"""Linear projections on the CPU kernel that is fastest for their shape.

PyTorch's ``F.linear`` on a CPU calls MKL's sgemm, which for a few rows against a large weight
reads the weight far slower than its one-row (matrix-vector) path: on this machine's two cores a
384 x 2048 projection takes 73 us for one row and 218 us for nine. oneDNN's fused linear (what
Inductor emits for CPUs) runs two or more rows against such weights 1.2-1.9x faster (131 us for
nine); for a single row, or a small weight (a tiny drafter's 64-wide projections), its fixed
overhead makes it slower, so those stay on ``F.linear``. A target verifying draft trees
forwards a few rows per request: that is the shape this is for. Results differ from
``F.linear``'s in the last bits (|diff| <= 1e-4 on these shapes), as any other kernel's would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_MIN_WEIGHT = 2**17  # weights at least this big (elements) go to oneDNN when rows >= 2
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _ONEDNN
        and x.dim() == 2
        and x.shape[0] > 1
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and weight.numel() >= ONEDNN_MIN_WEIGHT
        and not torch.is_grad_enabled()  # inference only: the op has no backward here
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN where that is faster (see the module docstring)."""
    if uses_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict names) that runs :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
