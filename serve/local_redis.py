"""A private redis-server on a free local port, for ``covspec serve`` and the tests.

It keeps nothing on disk and evicts least-recently-used keys at ``maxmemory``: it is a cache
(prefix KV), never a store of record.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalRedis:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_redis(maxmemory: str = "256mb", timeout_s: float = 10) -> LocalRedis:
    """Start redis-server; ``RuntimeError`` with what to do when it is missing or does not come up."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: `apt-get install redis-server` (make setup does)")
    port = free_port()
    args = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru",
    ]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"redis-server exited: {process.stderr.read().decode()[-500:] if process.stderr else ''}"
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return LocalRedis(process, port)
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"redis-server did not accept connections on port {port} within {timeout_s} s")
