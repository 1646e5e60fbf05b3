"""The asyncio streaming interface: concurrent streams, per-request errors, cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.plan import RequestOutput
from core.sampling import SamplingParams
from scheduler.async_engine import AsyncEngine
from scheduler.engine import Completion
from serve.engine_builder import EngineOptions, build_engine
from tests.serve.engine_helpers import Oracle, random_image


@pytest.fixture
def engine(folders: dict[str, Path]) -> AsyncEngine:
    built = build_engine(folders["target"], folders["noisy"], EngineOptions(policy="fixed", fixed_nodes=4))
    eng = AsyncEngine(built.engine)
    yield eng
    eng.shutdown()


def test_concurrent_streams_each_get_the_targets_greedy_tokens(engine: AsyncEngine, oracle: Oracle) -> None:
    questions = ["what is it", "describe the picture", "tell me more about the colors"]

    async def one(i: int) -> tuple[list[int], Completion]:
        streamed: list[int] = []
        prompt = oracle.prompt(questions[i], random_image(70 + i), None)
        async for item in engine.stream(prompt, SamplingParams(max_tokens=12)):
            if isinstance(item, RequestOutput):
                streamed.extend(item.new_token_ids)
            else:
                return streamed, item
        raise AssertionError("no completion")

    async def main() -> list[tuple[list[int], Completion]]:
        return await asyncio.gather(*(one(i) for i in range(3)))

    for i, (streamed, done) in enumerate(asyncio.run(main())):
        expected = oracle.greedy(questions[i], random_image(70 + i), None, 12)
        assert streamed == list(done.token_ids) == expected


def test_a_bad_request_fails_alone_and_the_loop_keeps_serving(engine: AsyncEngine, oracle: Oracle) -> None:
    prompt = oracle.prompt("what is it", None, None)

    async def main() -> tuple[BaseException | Completion, Completion]:
        bad = engine.generate(prompt, SamplingParams(max_tokens=100_000))
        good = engine.generate(prompt, SamplingParams(max_tokens=5))
        results = await asyncio.gather(bad, good, return_exceptions=True)
        return results[0], results[1]  # type: ignore[return-value]

    bad, good = asyncio.run(main())
    assert isinstance(bad, ValueError) and "context window" in str(bad)
    assert isinstance(good, Completion) and len(good.token_ids) > 0
    assert engine.alive


def test_leaving_a_stream_early_aborts_its_request(engine: AsyncEngine, oracle: Oracle) -> None:
    prompt = oracle.prompt("describe the picture", random_image(80), None)
    aborted: list[RequestOutput | None] = []
    abort = engine.engine.abort
    engine.engine.abort = lambda request_id: aborted.append(abort(request_id)) or aborted[-1]  # type: ignore[method-assign]

    async def main() -> None:
        async for item in engine.stream(prompt, SamplingParams(max_tokens=40, ignore_eos=True)):
            if isinstance(item, RequestOutput) and item.new_token_ids:
                break
        await asyncio.sleep(0.5)

    asyncio.run(main())
    pool = engine.engine.scheduler.pool
    for _ in range(50):
        if not engine.engine.has_unfinished():
            break
        asyncio.run(asyncio.sleep(0.1))
    assert not engine.engine.has_unfinished()
    assert pool.num_free_blocks == pool.num_blocks
    assert [out.finish_reason if out else None for out in aborted] == ["abort"]
