"""bf16 / fp16 checks of every VLM family: our low-precision logits stay within twice the error
transformers' own forward makes in that dtype (both against transformers in fp32). On the CPU
for one family; on a GPU (tests marked ``gpu``) for all of them, fp32 as well, and through the
flash-attn backend where it is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from models.check import check_model
from models.random_checkpoints import build_random_vlm
from models.synthetic import RandomLlavaSpec

FAMILIES = ["llava", "llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build_random_vlm(root / family, family, RandomLlavaSpec(seed=5)) for family in FAMILIES}


def test_bf16_on_the_cpu_is_as_close_to_fp32_as_transformers_bf16(checkpoints: dict[str, Path]) -> None:
    report = check_model(checkpoints["qwen2-vl"], dtype="bf16")
    assert report.dtype == "bfloat16" and report.peer_max_abs_diff is not None
    assert set(report.peer_max_abs_diff) == {"prefill", "decode", "tree", "batch"}
    assert all(peer > 1e-3 for peer in report.peer_max_abs_diff.values())  # bf16 really rounds
    assert all(within for *_, within in report.verdicts(tolerance=1e-4).values())


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_on_the_gpu_matches_transformers_fp32(checkpoints: dict[str, Path], family: str) -> None:
    report = check_model(checkpoints[family], dtype="fp32", device="cuda")
    assert report.device.startswith("cuda")
    # GPU kernels reorder sums: a little more room than the CPU's 1e-4
    assert all(within for *_, within in report.verdicts(tolerance=5e-4).values())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_low_precision_on_the_gpu_is_as_close_as_transformers(
    checkpoints: dict[str, Path], family: str, dtype: str
) -> None:
    backend = "flash_attn" if importlib.util.find_spec("flash_attn") else "sdpa"
    report = check_model(checkpoints[family], dtype=dtype, device="cuda", attention_backend=backend)
    assert all(within for *_, within in report.verdicts(tolerance=1e-4).values()), report
