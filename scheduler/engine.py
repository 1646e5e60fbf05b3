"""The engine: a scheduler, a verifier and (optionally) a drafter, stepped together.

In-process form of what the Ray Serve deployments host. ``step`` is the whole algorithm:
schedule, propose, verify, update. Text and stop strings are handled here, after the tokens.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from core.plan import RequestOutput, RequestStats
from core.prompt import EncodedPrompt, Prompt
from core.protocols import Drafter, Verifier
from core.sampling import SamplingParams
from core.verify import VerifyItem
from kvcache.block_hash import prompt_block_hashes
from scheduler.request import RequestState
from scheduler.scheduler import Scheduler


@dataclass(frozen=True)
class Completion:
    request_id: int
    token_ids: tuple[int, ...]  # generated tokens (an end-of-turn token included when produced)
    text: str  # detokenized, cut before a stop string
    finish_reason: str
    stats: RequestStats
    ttft_s: float  # time to the first token
    time_s: float  # time to the last token


@dataclass
class StepTotals:
    """Running sums over the engine's steps (for metrics: differences between two reads)."""

    steps: int = 0
    requests: int = 0  # requests in each step's verifier batch
    verify_tokens: int = 0  # tokens the verifier forwards carried (chunks, last tokens, tree nodes)
    draft_nodes: int = 0


@dataclass
class _Tracking:
    started: float
    text: str = ""
    first_token_at: float | None = None
    token_ids: list[int] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        verifier: Verifier,
        drafter: Drafter | None,
        encode: Callable[[Prompt], EncodedPrompt],
        detokenize: Callable[[list[int]], str],
        eos_token_ids: frozenset[int],
        seed: int = 0,
        compression: float | None = None,
        layout: Callable[[Prompt], EncodedPrompt] | None = None,
    ) -> None:
        self.scheduler, self.verifier, self.drafter = scheduler, verifier, drafter
        self.encode, self.detokenize, self.eos_token_ids = encode, detokenize, eos_token_ids
        # the prompt's rows without visual embeddings; with it, images are encoded only when a
        # chunk needs them (not at all when a prefix cache holds their rows)
        self.layout = layout
        self.compression = compression  # r for every request; None = the draft policy chooses
        self._ids = itertools.count()
        self._seeds = random.Random(seed)
        self._tracking: dict[int, _Tracking] = {}
        self.totals = StepTotals()

    def add_request(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        compression: float | None = None,
        adapter: str | None = None,
    ) -> int:
        """Queue a request and return its id; ``ValueError`` for a request that cannot run.
        ``adapter`` names the drafter LoRA to draft it with (its output does not depend on it)."""
        started = time.perf_counter()  # TTFT counts encoding the prompt (the vision tower) too
        if adapter is not None and (self.drafter is None or not self.drafter.has_adapter(adapter)):
            where = "this engine decodes without a drafter" if self.drafter is None else "it is not loaded"
            raise ValueError(f"unknown drafter adapter {adapter!r}: {where}")
        request_id = next(self._ids)
        seed = self._seeds.getrandbits(63) if sampling.seed is None else sampling.seed
        ratio = self.compression if compression is None else compression
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"compression must be in (0, 1], got {ratio}")
        lazy = self.layout is not None and self.scheduler.prefix is not None and bool(prompt.images)
        encoded = self.layout(prompt) if lazy and self.layout is not None else self.encode(prompt)
        state = RequestState(
            request_id=request_id,
            prompt=prompt,
            encoded=encoded,
            sampling=sampling,
            compression=ratio,
            generator=torch.Generator().manual_seed(seed),
            eos_token_ids=self.eos_token_ids,
            adapter=adapter,
            block_hashes=self._block_hashes(prompt, encoded),
            visual=(lambda: self.encode(prompt)) if lazy else None,
        )
        self.scheduler.add(state)
        self._tracking[request_id] = _Tracking(started=started)
        return request_id

    def _block_hashes(self, prompt: Prompt, encoded: EncodedPrompt) -> tuple[bytes, ...]:
        """Content hashes of the prompt's full KV blocks in its tenant's (and the public)
        namespace; none without a prefix cache."""
        prefix = self.scheduler.prefix
        if prefix is None:
            return ()
        return prompt_block_hashes(prompt, encoded, self.scheduler.pool.block_size, prefix.model)

    def abort(self, request_id: int) -> RequestOutput | None:
        self._tracking.pop(request_id, None)
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan.empty:
            self.scheduler.wait_for_fetches(timeout_s=0.05)  # nothing to run but Redis lookups
            return []
        scheduled = time.perf_counter()
        proposals = self.drafter.propose(plan.drafts) if plan.drafts and self.drafter else []
        drafted = time.perf_counter()
        items = plan.with_trees(proposals)
        outcomes = self.verifier.verify(items)
        self._count(items)
        outputs = self.scheduler.update(plan, outcomes)
        done = time.perf_counter()
        # scheduling and bookkeeping count with the verify part: every step pays them
        draft_ms, other_ms = drafted - scheduled, (scheduled - started) + (done - drafted)
        self.scheduler.record_step_time(1000 * draft_ms, 1000 * other_ms)
        return [self._with_text(out) for out in outputs]

    def _count(self, items: Sequence[VerifyItem]) -> None:
        drafts = sum(i.num_draft for i in items)
        self.totals.steps += 1
        self.totals.requests += len(items)
        self.totals.verify_tokens += sum(len(i.token_ids) for i in items) + drafts
        self.totals.draft_nodes += drafts

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams | Sequence[SamplingParams],
        adapter: str | None = None,
    ) -> list[Completion]:
        """Run ``prompts`` to completion together (continuous batching), each drafted with the
        drafter LoRA ``adapter``; results in order."""
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        ids = [self.add_request(p, s, adapter=adapter) for p, s in zip(prompts, params, strict=True)]
        done: dict[int, Completion] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.finished:
                    done[out.request_id] = self.completion(out)
        return [done[i] for i in ids]

    def completion(self, out: RequestOutput) -> Completion:
        """The finished request's result (call once, with its final output)."""
        track = self._tracking.pop(out.request_id)
        now = time.perf_counter()
        first = track.first_token_at or now
        return Completion(
            request_id=out.request_id,
            token_ids=tuple(track.token_ids),
            text=track.text,
            finish_reason=out.finish_reason or "stop",
            stats=out.stats,
            ttft_s=first - track.started,
            time_s=now - track.started,
        )

    def _with_text(self, out: RequestOutput) -> RequestOutput:
        """Detokenize the new tokens; end the request at the first stop string."""
        track = self._tracking.get(out.request_id)
        if track is None:  # aborted meanwhile
            return out
        if out.new_token_ids and track.first_token_at is None:
            track.first_token_at = time.perf_counter()
        track.token_ids.extend(out.new_token_ids)
        text = self.detokenize(track.token_ids)
        stops = self.scheduler.requests[out.request_id].sampling.stop
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
            if not out.finished:
                self.scheduler.finish(out.request_id, "stop")
            out = replace(out, finished=True, finish_reason="stop")
        delta, track.text = text[len(track.text) :], text
        return replace(out, text=delta)
