"""``covspec serve`` from ``deploy/local.yaml`` with some settings changed: start, look into, stop."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
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


@dataclass(frozen=True)
class Service:
    """A running ``covspec serve``: where to send requests, and its process."""

    url: str
    pid: int

    def processes(self) -> list[psutil.Process]:
        """The service's process and every process under it (Ray's, its replicas', Redis)."""
        root = psutil.Process(self.pid)
        return [root, *root.children(recursive=True)]

    def rss_mb(self) -> float:
        """Resident memory of the service and every process under it."""
        total = 0
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total / 2**20

    def find(self, title: str) -> psutil.Process:
        """The one process under the service whose command line (a Ray actor's process title,
        e.g. ``ServeReplica:covspec:Engine``, or a program such as ``redis-server``) holds
        ``title``."""
        found = []
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                if title in " ".join(p.cmdline()):
                    found.append(p)
        if len(found) != 1:
            raise LookupError(f"{len(found)} processes of the service match {title!r}, not one")
        return found[0]
