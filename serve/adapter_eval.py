"""τ of the drafter on a set of samples, with or without a user's adapter, through the engine.

Used by ``covspec train-adapter`` for the adapter's card and by the adapter benchmark. The tree
budget is fixed (not load-aware), so τ depends on the drafts alone, not on this machine's speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.sampling import SamplingParams
from serve.chat import chat_prompt
from serve.engine_builder import BuiltEngine, EngineOptions, build_engine

TAU_TREE_NODES = 8


@dataclass(frozen=True)
class TauRun:
    tau: float  # output tokens per verify step, over all samples
    outputs: tuple[tuple[int, ...], ...]  # token ids per sample (must not depend on the adapter)


def adapter_engine(target: Path, drafter: Path, adapters: Sequence[tuple[str, Path]]) -> BuiltEngine:
    options = EngineOptions(policy="fixed", fixed_nodes=TAU_TREE_NODES, adapters=tuple(adapters))
    return build_engine(target, drafter, options)


def measure_tau(
    built: BuiltEngine, samples: Sequence[Any], adapter: str | None, max_tokens: int = 96
) -> TauRun:
    """Greedy answers to ``samples`` (``question.text``, ``system``, ``image()``) drafted with
    ``adapter`` (None: the base drafter), all in flight together."""
    prompts = [chat_prompt(built.processor, s.question.text, [s.image()], s.system) for s in samples]
    results = built.engine.generate(prompts, SamplingParams(max_tokens=max_tokens), adapter=adapter)
    tokens = sum(len(r.token_ids) for r in results)
    steps = sum(r.stats.verify_steps for r in results)
    return TauRun(tokens / steps, tuple(r.token_ids for r in results))
