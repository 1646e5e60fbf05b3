"""The shape-dependent linear kernel: same results as ``F.linear``, oneDNN only where it pays."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from models.linear import ONEDNN_MIN_WEIGHT, Linear, uses_onednn

BIG = (2048, 384)  # a target's gate/up projection: oneDNN
SMALL = (192, 64)  # a tiny drafter's: F.linear


def linear_module(shape: tuple[int, int], seed: int) -> Linear:
    module = Linear(shape[1], shape[0], bias=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(torch.randn(*shape, generator=gen))
        module.bias.copy_(torch.randn(shape[0], generator=gen))
    return module


@pytest.mark.parametrize(("shape", "rows"), [(BIG, 1), (BIG, 9), (BIG, 120), (SMALL, 9)])
def test_linear_matches_f_linear(shape: tuple[int, int], rows: int) -> None:
    module = linear_module(shape, rows)
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows))
    with torch.inference_mode():
        expected = F.linear(x, module.weight, module.bias)
        assert torch.allclose(module(x), expected, atol=1e-4)
        assert torch.allclose(module(x.t().contiguous().t()), expected, atol=1e-4)


def test_packed_weight_follows_in_place_updates_and_is_not_pickled() -> None:
    module = linear_module(BIG, 0)
    x = torch.randn(9, BIG[1])
    with torch.inference_mode():
        module(x)
    with torch.no_grad():
        module.weight.mul_(-2.0)  # an optimizer step or load_state_dict: same storage, new version
    with torch.inference_mode():
        assert torch.allclose(module(x), F.linear(x, module.weight, module.bias), atol=1e-4)
    copy = pickle.loads(pickle.dumps(module))
    assert copy._packed is None and torch.equal(copy.weight, module.weight)
    with torch.inference_mode():
        assert torch.allclose(copy(x), module(x), atol=1e-5)


def test_onednn_runs_only_big_fp32_weights_without_grad() -> None:
    big, small = torch.zeros(*BIG), torch.zeros(*SMALL)
    assert big.numel() >= ONEDNN_MIN_WEIGHT > small.numel()
    with torch.inference_mode():
        expected = torch.backends.mkldnn.is_available()
        assert uses_onednn(torch.zeros(9, 384), big) is expected
        assert uses_onednn(torch.zeros(1, 384), big) is expected  # one row too: weights from memory
        assert not uses_onednn(torch.zeros(9, 64), small)  # a small weight: its overhead dominates
        assert not uses_onednn(torch.zeros(9, 384, dtype=torch.bfloat16), big.bfloat16())
    assert not uses_onednn(torch.zeros(9, 384), big)  # grad mode: training keeps F.linear


def test_linear_module_keeps_nn_linear_parameter_names() -> None:
    ours, theirs = Linear(4, 3, bias=True), torch.nn.Linear(4, 3, bias=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4)
    assert torch.equal(ours(x), theirs(x))


def test_weights_made_in_inference_mode_run_unpacked() -> None:
    with torch.inference_mode():
        module = linear_module(BIG, 1)  # inference tensors: no version counter to watch
        x = torch.randn(9, BIG[1])
        assert torch.allclose(module(x), F.linear(x, module.weight, module.bias), atol=1e-4)
    assert module._packed is None
