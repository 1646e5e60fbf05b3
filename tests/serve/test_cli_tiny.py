"""``covspec shapes-sample`` and ``covspec eval-tiny`` as processes, good and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from models.tiny.samples import make_sample

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


def _covspec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", *args], capture_output=True, text=True, timeout=600, check=False
    )


def test_shapes_sample_writes_the_scene_and_prints_its_sample(tmp_path: Path) -> None:
    out = tmp_path / "scene.png"
    result = _covspec("shapes-sample", "--seed", "42", "--persona", "dave", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    expected = make_sample(42, "dave")
    assert json.loads(result.stdout) == expected.as_json()
    assert Image.open(out).tobytes() == expected.image().tobytes()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seed", "-5"], "seed must be in [0, 2147483647], got -5"),
        (["--seed", "1", "--persona", "eve"], "unknown persona 'eve'"),
        (["--seed", "1", "--out", "/nonexistent-dir/x.png"], "folder /nonexistent-dir does not exist"),
    ],
)
def test_shapes_sample_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path
) -> None:
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "x.png")]
    result = _covspec("shapes-sample", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_eval_tiny_on_a_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    result = _covspec("eval-tiny", "--model", str(tmp_path), "--n", "2")
    assert result.returncode == 2
    assert "is not a Hugging Face checkpoint folder" in result.stderr
