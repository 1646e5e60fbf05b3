"""The engine: a scheduler, a verifier and (optionally) a drafter, stepped together.

In-process form of what the Ray Serve deployments host. ``step`` is the whole algorithm:
schedule, propose, verify, update, learn. Each step's data crosses as frozen values: the
scheduler's :class:`core.plan.StepPlan`, the drafter's proposals, the verifier's outcomes, the
scheduler's :class:`core.plan.StepReport`, and what the step cost; the policy learns from the
last two only. After every step the engine publishes an :class:`EngineSnapshot` for metrics and
routing, which read nothing else of it.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence

import torch

from core.draft import DraftProposal, DraftRequest
from core.plan import Completion, RequestOutput, StepReport, StepTiming
from core.prompt import EncodedPrompt, Prompt
from core.protocols import Drafter, Verifier
from core.sampling import SamplingParams
from scheduler.request import RequestState
from scheduler.scheduler import Scheduler
from scheduler.snapshot import EngineSnapshot, PrefixCounters

__all__ = ["Completion", "Engine"]

IDLE_WAIT_S = 0.05  # with only Redis lookups pending, how long a step waits for one


class StepClock:
    """Times one step: the drafter's part, and the rest."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.draft_s = 0.0

    def drafting(
        self, propose: Callable[[Sequence[DraftRequest]], list[DraftProposal]], drafts: Sequence[DraftRequest]
    ) -> list[DraftProposal]:
        start = time.perf_counter()
        proposals = propose(drafts)
        self.draft_s += time.perf_counter() - start
        return proposals

    def timing(self) -> StepTiming:
        """Scheduling and bookkeeping count with the verify part: every step pays them."""
        total = time.perf_counter() - self.started
        return StepTiming(draft_ms=1000 * self.draft_s, verify_ms=1000 * (total - self.draft_s))


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        verifier: Verifier,
        drafter: Drafter | None,
        encode: Callable[[Prompt], EncodedPrompt],
        eos_token_ids: frozenset[int],
        seed: int = 0,
        compression: float | None = None,
        layout: Callable[[Prompt], EncodedPrompt] | None = None,
    ) -> None:
        self.scheduler, self.verifier, self.drafter = scheduler, verifier, drafter
        self.encode, self.eos_token_ids = encode, eos_token_ids
        # the prompt's rows without visual embeddings; with it, images are encoded only when a
        # chunk needs them (not at all when a prefix cache holds their rows)
        self.layout = layout
        self.compression = compression  # r for every request; None = the policy chooses
        self._ids = itertools.count()
        self._seeds = random.Random(seed)
        self.snapshot = EngineSnapshot()

    def add_request(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        compression: float | None = None,
        adapter: str | None = None,
    ) -> int:
        """Queue a request and return its id; ``ValueError`` for a request that cannot run.
        ``adapter`` names the drafter LoRA to draft it with (its output does not depend on it)."""
        arrived = time.perf_counter()  # TTFT counts encoding the prompt (the vision tower) too
        if adapter is not None and (self.drafter is None or not self.drafter.has_adapter(adapter)):
            where = "this engine decodes without a drafter" if self.drafter is None else "it is not loaded"
            raise ValueError(f"unknown drafter adapter {adapter!r}: {where}")
        ratio = self.compression if compression is None else compression
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"compression must be in (0, 1], got {ratio}")
        request_id = next(self._ids)
        seed = self._seeds.getrandbits(63) if sampling.seed is None else sampling.seed
        lazy = self.layout is not None and self.scheduler.prefix is not None and bool(prompt.images)
        encoded = self.layout(prompt) if lazy and self.layout is not None else self.encode(prompt)
        self.scheduler.add(
            RequestState(
                request_id=request_id,
                prompt=prompt,
                encoded=encoded,
                sampling=sampling,
                compression=ratio,
                generator=torch.Generator().manual_seed(seed),
                eos_token_ids=self.eos_token_ids,
                adapter=adapter,
                arrived_s=arrived,
                block_hashes=self.scheduler.admission.block_hashes(prompt, encoded),
                visual=(lambda: self.encode(prompt)) if lazy else None,
            )
        )
        return request_id

    def abort(self, request_id: int) -> RequestOutput | None:
        """Stop a request now; its final output, or None if it is unknown or finished."""
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        clock = StepClock()
        plan = self.scheduler.schedule()
        if plan.empty:
            return self._idle()
        plan = plan.with_trees(clock.drafting(self._propose, plan.drafts))
        report = self.scheduler.update(plan, self.verifier.verify(plan.items))
        self.scheduler.learn(report, clock.timing())
        self._publish(report, batch=len(plan.items))
        return list(report.outputs)

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
                if out.completion is not None:
                    done[out.request_id] = out.completion
        return [done[i] for i in ids]

    @staticmethod
    def completion(out: RequestOutput) -> Completion:
        """The finished request's whole result, from its final output."""
        if out.completion is None:
            raise ValueError(f"request {out.request_id}'s output is not its final one")
        return out.completion

    def _propose(self, drafts: Sequence[DraftRequest]) -> list[DraftProposal]:
        return self.drafter.propose(drafts) if drafts and self.drafter is not None else []

    def _idle(self) -> list[RequestOutput]:
        """Nothing to run but Redis lookups (or nothing at all): wait a little for one."""
        self.scheduler.wait_for_fetches(timeout_s=IDLE_WAIT_S)
        return []

    def _publish(self, report: StepReport, batch: int) -> None:
        sched, pool = self.scheduler, self.scheduler.pool
        self.snapshot = EngineSnapshot(
            waiting=len(sched.queue.waiting),
            running=len(sched.queue.running),
            kv_used=1 - pool.num_free_blocks / pool.num_blocks,
            drafter_kv_used=sched.drafter_kv_used(),
            totals=self.snapshot.totals.after(report, batch),
            prefix=None if sched.prefix is None else PrefixCounters.of(sched.prefix),
        )
