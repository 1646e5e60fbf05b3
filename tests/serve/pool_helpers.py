"""A stand-in for the DrafterPool deployment's handle, for engines tested without Ray.

``handle.method.remote(...).result(timeout_s)`` calls the pool server in the caller's thread (a
link thread of ``RemoteDrafter``), as Ray would in the replica. It counts what crossed, and can
play a replica that died (every call fails) or restarted (a fresh pool that knows no request).
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from serve.remote_drafter import DrafterPoolServer


class PoolHandle:
    def __init__(self, make_server: Callable[[], DrafterPoolServer]) -> None:
        self.make_server = make_server
        self.server = make_server()
        self.down = False  # every call fails, as one to a dead replica does
        self.prompts_sent = self.drafts_sent = self.bytes_up = self.bytes_down = 0
        self._lock = threading.Lock()

    def restart(self) -> None:
        """A new replica: the pool's requests and KV are gone."""
        self.server = self.make_server()

    def __getattr__(self, name: str) -> Any:
        def remote(*args: Any) -> SimpleNamespace:
            def result(timeout_s: float | None = None) -> Any:
                if self.down:
                    raise ConnectionError("the DrafterPool replica died")
                reply = getattr(self.server, name)(*args)
                if name == "propose":
                    self._count(args[2], reply.proposals)
                return reply

            return SimpleNamespace(result=result)

        return SimpleNamespace(remote=remote)

    def _count(self, payload: list[bytes], proposals: tuple[bytes, ...]) -> None:
        calls = [pickle.loads(p) for p in payload]
        with self._lock:
            self.drafts_sent += len(calls)
            self.prompts_sent += sum(c.prompt is not None for c in calls)
            self.bytes_up += sum(map(len, payload))
            self.bytes_down += sum(map(len, proposals))
