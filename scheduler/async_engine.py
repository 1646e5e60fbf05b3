"""An asyncio face on the engine: many coroutines stream their requests from one step loop.

The engine is not thread-safe, so it is touched only by one loop thread. Coroutines hand new
requests and aborts to that thread through a queue and receive their outputs through their own
``asyncio.Queue``, fed with ``call_soon_threadsafe``. A request that fails to start (bad input)
raises in its own coroutine; the loop keeps running for everyone else.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from core.plan import Completion, RequestOutput
from core.prompt import Prompt
from core.sampling import SamplingParams
from scheduler.engine import Engine


@dataclass(frozen=True)
class _Submit:
    prompt: Prompt
    sampling: SamplingParams
    compression: float | None
    adapter: str | None
    learn: bool
    outputs: asyncio.Queue[int | RequestOutput | Completion | BaseException]
    loop: asyncio.AbstractEventLoop


@dataclass(frozen=True)
class _Abort:
    request_id: int


class AsyncEngine:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self._inbox: queue.Queue[_Submit | _Abort | None] = queue.Queue()
        self._streams: dict[int, _Submit] = {}
        self._idle_wait_s = idle_wait_s
        self._thread = threading.Thread(target=self._run, name="covspec-engine-loop", daemon=True)
        self.error: BaseException | None = None  # set if the loop itself died
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def stream(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        compression: float | None = None,
        adapter: str | None = None,
        learn: bool = False,
    ) -> AsyncIterator[RequestOutput | Completion]:
        """Every step's output for this request, then its :class:`Completion`. Cancelling the
        consumer aborts the request. ``adapter`` names the drafter LoRA of the caller (``learn``:
        one learned online, which may have no version yet)."""
        if not self.alive:
            raise RuntimeError(f"the engine loop is not running: {self.error!r}")
        outputs: asyncio.Queue[int | RequestOutput | Completion | BaseException] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._inbox.put(_Submit(prompt, sampling, compression, adapter, learn, outputs, loop))
        request_id, completed = None, False
        try:
            while not completed:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, int):  # the engine accepted the request under this id
                    request_id = item
                    continue
                completed = isinstance(item, Completion)
                yield item
        finally:
            if request_id is not None and not completed:
                self._inbox.put(_Abort(request_id))

    async def generate(
        self, prompt: Prompt, sampling: SamplingParams, adapter: str | None = None
    ) -> Completion:
        async for item in self.stream(prompt, sampling, adapter=adapter):
            if isinstance(item, Completion):
                return item
        raise RuntimeError("the request ended without a completion")

    def shutdown(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            while self._drain(block=not self.engine.has_unfinished()):
                for out in self.engine.step():
                    self._deliver(out)
        except BaseException as e:  # the loop is dead: tell every waiting request why
            self.error = e
            for sub in self._streams.values():
                sub.loop.call_soon_threadsafe(
                    sub.outputs.put_nowait, RuntimeError(f"engine loop failed: {e!r}")
                )
            raise

    def _drain(self, block: bool) -> bool:
        """Apply queued submissions and aborts; False when asked to stop."""
        while True:
            try:
                msg = self._inbox.get(timeout=self._idle_wait_s) if block else self._inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if msg is None:
                return False
            if isinstance(msg, _Abort):
                self.engine.abort(msg.request_id)
                self._streams.pop(msg.request_id, None)
                continue
            try:
                request_id = self.engine.add_request(
                    msg.prompt, msg.sampling, msg.compression, msg.adapter, learn=msg.learn
                )
            except ValueError as e:
                msg.loop.call_soon_threadsafe(msg.outputs.put_nowait, e)
                continue
            self._streams[request_id] = msg
            msg.loop.call_soon_threadsafe(msg.outputs.put_nowait, request_id)

    def _deliver(self, out: RequestOutput) -> None:
        sub = self._streams.get(out.request_id)
        if sub is None:
            return
        sub.loop.call_soon_threadsafe(sub.outputs.put_nowait, out)
        if out.completion is not None:
            del self._streams[out.request_id]
            sub.loop.call_soon_threadsafe(sub.outputs.put_nowait, out.completion)
