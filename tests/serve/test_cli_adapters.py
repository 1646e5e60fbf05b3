"""``covspec train-adapter`` as a process: a PEFT adapter folder with card, log and loss curve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _covspec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", "train-adapter", *args],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


def test_train_adapter_writes_a_peft_folder_with_card_and_tau(tmp_path: Path) -> None:
    out = tmp_path / "carol"
    small = ["--samples", "32", "--steps", "4", "--eval-n", "4"]
    result = _covspec("--user", "carol", "--out", str(out), *small)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["user"] == "carol" and summary["steps"] == 4 and summary["tau_base"] >= 1.0
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "loss.png",
        "train_log.json",
    ):
        assert (out / name).is_file(), name
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["losses"]) == 4
    assert "adapter" in result.stderr  # the progress bar
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-drafter"


def test_train_adapter_unknown_user_fails_with_one_line(tmp_path: Path) -> None:
    result = _covspec("--user", "mallory", "--out", str(tmp_path / "m"))
    assert result.returncode == 2
    assert "unknown demo user 'mallory'" in result.stderr and len(result.stderr.strip().splitlines()) == 1
