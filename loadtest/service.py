"""Start ``covspec serve`` from ``deploy/local.yaml`` with some settings changed, and stop it."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "deploy" / "local.yaml"


def shipped_args() -> dict[str, Any]:
    """The app ``args`` of ``deploy/local.yaml``."""
    args: dict[str, Any] = yaml.safe_load(SHIPPED.read_text())["applications"][0]["args"]
    return args


def start_service(overrides: dict[str, Any], port: int) -> subprocess.Popen[str]:
    """``covspec serve`` on ``port`` with the shipped config's app ``args`` updated by
    ``overrides``; returns once it says it is up."""
    config = yaml.safe_load(SHIPPED.read_text())
    config["applications"][0]["args"].update(overrides)
    path = Path(tempfile.mkdtemp()) / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "serve.cli", "serve", "--config", str(path), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "is up" in line:
            return proc
    raise RuntimeError("covspec serve exited before coming up")


def stop_service(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C, as a user stops it: the app, Ray and its Redis go."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
