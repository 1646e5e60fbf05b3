"""``covspec check-model`` and ``make-random-checkpoint`` as a user runs them: as processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _covspec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,extra",
    [
        ("llava", ["--text", "llama", "--vision", "clip"]),
        ("llava", ["--text", "qwen2", "--vision", "siglip", "--tie"]),
        ("llava-next", ["--kv-heads", "1"]),
        ("llava-onevision", ["--text", "qwen2", "--vision", "siglip", "--tie"]),
        ("qwen2-vl", ["--kv-heads", "1"]),
        ("qwen2.5-vl", ["--tie"]),
    ],
)
def test_check_model_json_reports_all_diffs_within_tolerance(
    family: str, extra: list[str], tmp_path: Path
) -> None:
    made = _covspec("make-random-checkpoint", "--family", family, "--out", str(tmp_path / "m"), *extra)
    assert made.returncode == 0, made.stderr
    result = _covspec("check-model", "--model", str(tmp_path / "m"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("prefill_max_abs_diff", "decode_max_abs_diff", "tree_max_abs_diff", "batch_max_abs_diff"):
        assert 0.0 <= report[key] <= 1e-4
    assert report["tree_nodes"] >= 6 and report["ok"] is True


def test_check_model_in_bf16_prints_transformers_own_bf16_error_beside_ours(tmp_path: Path) -> None:
    made = _covspec("make-random-checkpoint", "--family", "qwen2.5-vl", "--out", str(tmp_path / "m"))
    assert made.returncode == 0, made.stderr
    result = _covspec("check-model", "--model", str(tmp_path / "m"), "--dtype", "bf16")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:4]] == [
        "prefill_max_abs_diff", "decode_max_abs_diff", "tree_max_abs_diff", "batch_max_abs_diff",
    ]  # fmt: skip
    assert all("transformers bf16:" in line and line.endswith("ok") for line in lines[:4])
    assert lines[-1].endswith("bfloat16 on cpu")


def test_check_model_on_a_folder_that_is_not_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    result = _covspec("check-model", "--model", str(tmp_path))
    assert result.returncode == 2
    expected = f"{tmp_path} is not a Hugging Face checkpoint folder: it has no config.json"
    assert result.stderr.strip().splitlines() == [f"covspec check-model: error: {expected}"]
    assert "Traceback" not in result.stderr


def test_make_random_checkpoint_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("keep me")
    result = _covspec("make-random-checkpoint", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "exists and is not empty" in result.stderr
    assert (tmp_path / "x").read_text() == "keep me"
