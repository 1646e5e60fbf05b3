"""The loops that drive an engine in the benchmarks, written against the public API that every
revision of this project has, so that ``benchmarks.compare_revisions`` can run this very file
inside another checkout as its worker.

Only these are used here: ``serve.engine_builder.build_engine`` and ``EngineOptions``,
``serve.chat.chat_prompt``, ``core.sampling.SamplingParams``, and the engine's ``add_request``,
``step``, ``completion``, ``has_unfinished`` and ``generate``. Import nothing else from the
project (not even ``benchmarks.harness``): an older revision may not have it.

As a worker, ``python -P <this file>`` with the working directory and ``PYTHONPATH`` set to the
tree to measure, it reads one JSON request a line on stdin and answers each with one JSON line on
stdout (see :data:`OPERATIONS`); ``{"op": "quit"}`` or the end of stdin ends it. What the project
prints goes to stderr, and so does the traceback of a request that fails (the worker then exits).
"""

from __future__ import annotations

import base64
import inspect
import io
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from benchmarks.harness import quantile
from core.sampling import SamplingParams
from serve.chat import chat_prompt
from serve.engine_builder import BuiltEngine, EngineOptions, build_engine

# Draft policies by name, as EngineOptions fields (plain data: compare_revisions sends them to
# workers of other revisions). Run them with ``prefix_cache=False`` where the same prompts come back
# every pass, so that each pass computes them and contenders compare on decoding, not on what an
# earlier pass left cached; ``none`` runs without a drafter.
POLICIES: dict[str, dict[str, Any]] = {
    "none": {"policy": "none"},
    "fixed_2": {"policy": "fixed", "fixed_nodes": 2},
    "fixed_4": {"policy": "fixed", "fixed_nodes": 4},
    "fixed_8": {"policy": "fixed", "fixed_nodes": 8},
    "load_aware": {"policy": "load_aware"},
}


@dataclass(frozen=True)
class LoopRun:
    """One pass of a closed loop over a set of prompts."""

    tokens: int
    wall_s: float
    token_s: tuple[float, ...]  # per-token latency, one entry per token after a request's first
    outputs: tuple[tuple[int, ...], ...]  # generated token ids per prompt, in prompt order

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.token_s) or [0.0]
        return {
            "tokens": self.tokens,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens / self.wall_s,
            "p50_token_ms": 1000 * statistics.median(ordered),
            "p99_token_ms": 1000 * (quantile(ordered, 0.99) or 0.0),
        }


def closed_loop(engine: Any, prompts: Sequence[Any], params: SamplingParams, concurrency: int) -> LoopRun:
    """``concurrency`` requests in flight, a new one as soon as one finishes, until every prompt is
    answered. A token's latency is the time between its request's consecutive outputs divided by
    the tokens in the later one (the first output, time to first token, is left out)."""
    start = time.perf_counter()
    waiting = list(range(len(prompts)))[::-1]  # pop() takes the next prompt in order
    index: dict[int, int] = {}  # request id -> prompt index
    last: dict[int, float] = {}  # request id -> time of its latest output with tokens
    outputs: list[tuple[int, ...]] = [() for _ in prompts]
    latencies: list[float] = []
    tokens = 0

    def submit() -> None:
        i = waiting.pop()
        index[engine.add_request(prompts[i], params)] = i

    for _ in range(min(concurrency, len(prompts))):
        submit()
    while engine.has_unfinished():
        step = engine.step()
        now = time.perf_counter()
        for out in step:
            n = len(out.new_token_ids)
            if n and out.request_id in last:
                latencies += [(now - last[out.request_id]) / n] * n
            if n:
                last[out.request_id] = now
                tokens += n
            if out.finished:
                outputs[index[out.request_id]] = tuple(engine.completion(out).token_ids)
                if waiting:
                    submit()
    return LoopRun(tokens, time.perf_counter() - start, tuple(latencies), tuple(outputs))


@dataclass(frozen=True)
class Answers:
    """Prompts answered one after another (a single user)."""

    outputs: tuple[tuple[int, ...], ...]  # generated token ids per prompt
    verify_steps: int  # target forwards over all prompts
    wall_s: float

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tau(self) -> float:
        """Tokens per verify step: 1 without speculation."""
        return self.tokens / self.verify_steps


def answer_each(engine: Any, prompts: Sequence[Any], params: SamplingParams, adapter: str | None) -> Answers:
    """Each prompt through ``engine.generate`` alone, drafted with the LoRA ``adapter``."""
    start = time.perf_counter()
    outputs, steps = [], 0
    for prompt in prompts:
        [out] = engine.generate([prompt], params, adapter=adapter)
        outputs.append(tuple(out.token_ids))
        steps += out.stats.verify_steps
    return Answers(tuple(outputs), steps, time.perf_counter() - start)


# --- the worker ---------------------------------------------------------------------------------


def image_to_text(image: Image.Image) -> str:
    """A PNG of ``image`` in base64: lossless, so every worker sees the same pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_from_text(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


@dataclass
class WorkerState:
    built: BuiltEngine | None = None
    prompts: list[Any] = field(default_factory=list)

    def engine(self) -> Any:
        if self.built is None:
            raise ValueError("no engine yet: send a build request first")
        return self.built.engine


def build(state: WorkerState, request: dict[str, Any]) -> dict[str, Any]:
    """A fresh engine: ``target``, ``drafter`` (a folder or null), ``options`` (EngineOptions
    fields; ``adapters`` as [name, folder] pairs). Any earlier engine and prompts are dropped.
    Answers the seconds it took and ``code_root``, the tree the engine's code was imported from."""
    options = dict(request["options"])
    options["adapters"] = tuple((name, Path(folder)) for name, folder in options.get("adapters", ()))
    state.built, state.prompts = None, []
    start = time.perf_counter()
    state.built = build_engine(request["target"], request["drafter"], EngineOptions(**options))
    code_root = Path(inspect.getfile(build_engine)).resolve().parents[1]  # the tree whose code runs
    return {"build_s": time.perf_counter() - start, "code_root": str(code_root)}


def load(state: WorkerState, request: dict[str, Any]) -> dict[str, Any]:
    """The prompts later requests run: ``samples``, each {text, system, image (image_to_text)}."""
    if state.built is None:
        raise ValueError("no engine yet: send a build request first")
    processor = state.built.processor
    state.prompts = [
        chat_prompt(processor, s["text"], [image_from_text(s["image"])], s["system"])
        for s in request["samples"]
    ]
    return {"prompts": len(state.prompts)}


def params_of(request: dict[str, Any]) -> SamplingParams:
    return SamplingParams(max_tokens=request["max_tokens"], ignore_eos=request["ignore_eos"])


def run_closed_loop(state: WorkerState, request: dict[str, Any]) -> dict[str, Any]:
    """One :func:`closed_loop` pass at ``concurrency``: its summary and ``outputs``."""
    run = closed_loop(state.engine(), state.prompts, params_of(request), request["concurrency"])
    return {**run.summary(), "outputs": run.outputs}


def run_answer_each(state: WorkerState, request: dict[str, Any]) -> dict[str, Any]:
    """One :func:`answer_each` pass with ``adapter``: tokens, wall_s, tokens_per_s, tau, ``outputs``."""
    answers = answer_each(state.engine(), state.prompts, params_of(request), request["adapter"])
    return {
        "tokens": answers.tokens,
        "wall_s": answers.wall_s,
        "tokens_per_s": answers.tokens / answers.wall_s,
        "tau": answers.tau,
        "outputs": answers.outputs,
    }


OPERATIONS: dict[str, Callable[[WorkerState, dict[str, Any]], dict[str, Any]]] = {
    "build": build,
    "load": load,
    "closed_loop": run_closed_loop,
    "answer_each": run_answer_each,
}


def serve_stdio() -> None:
    protocol = sys.stdout
    sys.stdout = sys.stderr  # what the project prints must not get into the replies
    state = WorkerState()
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            return
        if request["op"] not in OPERATIONS:
            raise ValueError(f"unknown operation {request['op']!r}; known: {sorted(OPERATIONS)}")
        protocol.write(json.dumps(OPERATIONS[request["op"]](state, request)) + "\n")
        protocol.flush()


if __name__ == "__main__":
    serve_stdio()
