"""The shape-dependent linear kernel: same results as ``F.linear``, oneDNN only where it pays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.linear import ONEDNN_MIN_WEIGHT, Linear, linear, uses_onednn

BIG = (2048, 384)  # a target's gate/up projection: oneDNN with two rows or more
SMALL = (192, 64)  # a tiny drafter's


@pytest.mark.parametrize(("shape", "rows"), [(BIG, 1), (BIG, 9), (BIG, 120), (SMALL, 9)])
def test_linear_matches_f_linear(shape: tuple[int, int], rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(*shape, generator=gen), torch.randn(shape[0], generator=gen)
    x = torch.randn(rows, shape[1], generator=gen)
    with torch.inference_mode():
        assert torch.allclose(linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-4)
        assert torch.allclose(linear(x.t().contiguous().t(), weight), F.linear(x, weight), atol=1e-4)


def test_onednn_runs_only_several_rows_against_a_big_weight_without_grad() -> None:
    big, small = torch.zeros(*BIG), torch.zeros(*SMALL)
    assert big.numel() >= ONEDNN_MIN_WEIGHT > small.numel()
    with torch.inference_mode():
        expected = torch.backends.mkldnn.is_available()
        assert uses_onednn(torch.zeros(9, 384), big) is expected
        assert not uses_onednn(torch.zeros(1, 384), big)  # one row: MKL's matrix-vector path
        assert not uses_onednn(torch.zeros(9, 64), small)  # a small weight: its overhead dominates
        assert not uses_onednn(torch.zeros(9, 384, dtype=torch.bfloat16), big.bfloat16())
    assert not uses_onednn(torch.zeros(9, 384), big)  # grad mode: training keeps F.linear


def test_linear_module_keeps_nn_linear_parameter_names() -> None:
    ours, theirs = Linear(4, 3, bias=True), torch.nn.Linear(4, 3, bias=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4)
    assert torch.equal(ours(x), theirs(x))
