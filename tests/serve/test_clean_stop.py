"""``covspec serve`` stops cleanly on SIGTERM (``docker stop``, systemd, Kubernetes) and SIGINT
(Ctrl-C), sent to its process or to its whole process group: a request still running is answered
whole (signalled alone), and within 20 s everything it started is gone (the app, its Ray, its
Redis) with exit code 0. That a draining gateway refuses new requests with 503 and
``Retry-After`` is tested on the gateway itself (``test_gateway_http.py``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from serve.local_redis import free_port

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-demo-alice"  # deploy/demo-keys.yaml
STOP_WITHIN_S = 20.0


def _start(port: int) -> tuple[subprocess.Popen[str], list[str]]:
    """``covspec serve`` in a process group of its own, once it says it is up; its output so far."""
    cmd = [sys.executable, "-m", "serve.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if "is up" in line:
            break
    else:
        pytest.fail("covspec serve exited before coming up:\n" + "".join(lines[-40:]))
    for line in proc.stdout:  # the announcement's lines, up to its last
        lines.append(line)
        if "stops everything" in line:
            return proc, lines
    pytest.fail("covspec serve stopped announcing itself")


def _stream(url: str, out: dict[str, object], first: threading.Event) -> None:
    """A streamed answer (``first`` set at its first chunk); what came of it in ``out``."""
    messages = [{"role": "user", "content": "describe the picture"}]
    body = {"messages": messages, "max_tokens": 200, "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        out["status"] = r.status_code
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                first.set()
    out["done"] = bool(events) and events[-1] == "[DONE]"
    out["errors"] = [e for e in events[:-1] if "error" in json.loads(e)]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _redis_alive(port: int) -> bool:
    pattern = f"redis-server 127.0.0.1:{port}"
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, check=False).returncode == 0


@pytest.mark.parametrize(
    ("sig", "group"),
    [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGTERM, True)],
    ids=["sigterm-process", "sigint-process", "sigterm-group"],
)
def test_a_stop_signal_finishes_running_requests_and_leaves_nothing_behind(sig: int, group: bool) -> None:
    port = free_port()
    proc, lines = _start(port)
    url = f"http://127.0.0.1:{port}"
    match = re.search(r"Redis: redis://127\.0\.0\.1:(\d+)", "".join(lines))
    assert match is not None
    redis_port = int(match.group(1))
    assert _redis_alive(redis_port)
    running: dict[str, object] = {}
    first = threading.Event()
    streaming = threading.Thread(target=_stream, args=(url, running, first))
    streaming.start()
    assert first.wait(60)  # the answer is under way
    start = time.monotonic()
    if group:
        os.killpg(proc.pid, sig)  # systemd's default: every process of the service
    else:
        proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    while _group_alive(proc.pid) and time.monotonic() - start < STOP_WITHIN_S:
        time.sleep(0.1)  # its children exit (and are reaped) just after it
    elapsed = time.monotonic() - start
    streaming.join(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert "\nStopped" in out
    assert not _group_alive(proc.pid) and not _redis_alive(redis_port)  # no orphan
    assert elapsed < STOP_WITHIN_S, f"gone after {elapsed:.1f} s"
    if not group:  # the running request was answered whole
        assert running == {"status": 200, "done": True, "errors": []}
