"""Engine clients for the gateway: the engine in this process (an ``AsyncEngine``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from core.plan import RequestOutput
from core.prompt import Prompt
from core.sampling import SamplingParams
from scheduler.async_engine import AsyncEngine
from scheduler.engine import Completion


class LocalEngineClient:
    """The gateway's :class:`serve.gateway.EngineClient` over an engine in this process."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def stream(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        adapter: str | None,
        whole: bool = False,
        learn: bool = False,
    ) -> AsyncIterator[RequestOutput | Completion]:
        async for item in self.engine.stream(prompt, sampling, adapter=adapter, learn=learn):
            if not whole or isinstance(item, Completion):
                yield item

    async def alive(self) -> bool:
        return self.engine.alive
