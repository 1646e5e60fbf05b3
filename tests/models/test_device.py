"""Choosing where a model runs: devices this process cannot use are refused up front, clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.device import DeviceError, resolve_device
from models.loader import load_model

ROOT = Path(__file__).resolve().parents[2]
TINY_TARGET = ROOT / "checkpoints" / "tiny-target"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


def test_cpu_resolves_to_the_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu0", ""])
def test_a_device_name_torch_does_not_know_is_refused_with_the_names_to_use(name: str) -> None:
    with pytest.raises(DeviceError, match="use cpu, cuda or cuda:N"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["meta", "mps"])
def test_a_device_kind_we_do_not_run_on_is_refused(name: str) -> None:
    with pytest.raises(DeviceError, match="not supported"):
        resolve_device(name)


@no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_says_so_and_what_to_do(name: str) -> None:
    with pytest.raises(DeviceError, match="sees no CUDA GPU; use --device cpu"):
        resolve_device(name)


@no_gpu
def test_loading_onto_an_absent_gpu_fails_before_reading_weights(tmp_path: Path) -> None:
    # the folder is not even a checkpoint: the device is checked first
    with pytest.raises(DeviceError):
        load_model(tmp_path, device="cuda")


@no_gpu
def test_generate_on_an_absent_gpu_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    from models.tiny.samples import make_sample

    image = tmp_path / "scene.png"
    make_sample(0).image().save(image)
    command = ["generate", "--image", str(image), "--prompt", "hi", "--device", "cuda"]
    proc = subprocess.run(
        [sys.executable, "-m", "serve.cli", *command], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "device 'cuda' is not available" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.gpu
def test_a_gpu_index_past_the_machines_gpus_is_refused() -> None:
    with pytest.raises(DeviceError, match="does not exist"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.gpu
def test_a_model_loaded_onto_the_gpu_has_every_weight_there_and_logits_on_the_host() -> None:
    from core.forward_batch import SequenceInput, pack
    from kvcache.block_pool import BlockPool

    model = load_model(TINY_TARGET, device="cuda")
    assert all(p.is_cuda for p in model.decoder.parameters())
    assert model.vision is not None and all(p.is_cuda for p in model.vision.parameters())
    pool = BlockPool(model.decoder.kv_layout(8, 16))
    assert pool.kv.keys.is_cuda
    blocks = pool.allocate(1)
    seq = SequenceInput(torch.tensor([1, 2, 3]), torch.arange(3), tuple(blocks), 0)
    batch = pack([seq], 16)  # on the host
    hidden = model.decoder(batch, pool.kv)
    assert hidden.is_cuda
    logits = model.decoder.logits(hidden[batch.last_token_rows()])
    assert logits.device.type == "cpu" and logits.dtype == torch.float32
