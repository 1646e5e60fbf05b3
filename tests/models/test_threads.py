"""Thread counts for a model's forwards: small models on one thread, restored afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.threads import SMALL_WEIGHT, intra_op_threads, threads_for


def test_intra_op_threads_sets_and_restores_the_process_setting() -> None:
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="inside"), intra_op_threads(1):
        raise RuntimeError("inside")  # restored on errors too
    assert torch.get_num_threads() == before
    with intra_op_threads(None):
        assert torch.get_num_threads() == before


def test_small_models_run_on_one_thread_big_ones_on_the_processs() -> None:
    side = int(SMALL_WEIGHT**0.5)
    assert threads_for(nn.Sequential(nn.Linear(64, 192), nn.Linear(192, 64))) == 1  # the tiny drafter's
    assert threads_for(nn.Linear(side, side + 1)) is None
    assert threads_for(nn.LayerNorm(8)) is None  # no weight matrix: nothing to decide on
