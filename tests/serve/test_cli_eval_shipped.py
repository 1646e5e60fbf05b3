"""``covspec eval-tiny`` on the shipped tiny models, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


@pytest.mark.slow
def test_eval_tiny_json_on_the_shipped_models() -> None:
    target, drafter = str(CHECKPOINTS / "tiny-target"), str(CHECKPOINTS / "tiny-drafter")
    result = _run("eval-tiny", "--model", target, "--drafter", drafter, "--n", "12", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n"] == 12 and report["persona"] == "default"
    assert 0.0 <= report["blank_image_accuracy"] <= report["accuracy"] <= 1.0
    assert 0.0 < report["agreement"] <= 1.0
    assert set(report["per_kind"]) <= {"describe", "count", "color", "where", "exists", "bigger", "shape_at"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", *args], capture_output=True, text=True, timeout=600, check=False
    )
