"""The engine: a scheduler, a verifier and (optionally) a drafter, stepped together.

In-process form of what the Ray Serve deployments host. ``step`` is the whole algorithm:
schedule, send the draft call, verify, update, learn. Each step's data crosses as frozen values:
the scheduler's :class:`core.plan.StepPlan`, the drafter's proposals, the verifier's outcomes,
the scheduler's :class:`core.plan.StepReport`, and what the step cost; the policy learns from the
last two only. After every step the engine publishes an :class:`EngineSnapshot` for metrics and
routing, which read nothing else of it.

Lockstep (one group), a step plans every running request, waits for their trees and verifies
them. Pipelined (two groups), each request belongs to one group and a step verifies one group's
trees while the other group's draft call is out: the drafter and the verifier work at the same
time, and the link's round trip hides behind a verification. Outputs do not depend on the
timing: a request's tree is whatever came back for its plan, and the verifier decides alone.
A drafter that does not answer costs one step's trees, never a request: the engine decodes
plainly and asks again after a backoff.

Proactive (``scheduler.foresight``), while a step's trees are verified and no other call keeps
the drafter busy, the drafter drafts each request's next tree after the path it rates likeliest
to be accepted: when the verifier accepts that path, the next step's tree is there without a call.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from core.draft import Answered, Drafted, DrafterUnavailable, DraftRequest
from core.plan import Completion, RequestOutput, StepPlan, StepReport, StepTiming
from core.prompt import EncodedPrompt, Prompt
from core.protocols import DraftClient, PendingDraft, Verifier
from core.sampling import SamplingParams
from scheduler.foresight import Foresight, Matched, ProactiveGate, ProactiveStats, ahead_requests
from scheduler.request import RequestState
from scheduler.scheduler import Scheduler
from scheduler.snapshot import EngineSnapshot, PrefixCounters

__all__ = ["Completion", "DrafterHealth", "Engine"]

IDLE_WAIT_S = 0.05  # with only Redis lookups pending, how long a step waits for one
DRAFT_TIMEOUT_S = 5.0  # a draft call not answered by then is given up: the step decodes plainly
RETRY_AFTER_S = (0.5, 8.0)  # backoff before asking a failed drafter again: first, longest
NOTHING_TO_DRAFT = Answered(Drafted((), call_ms=0.0))
ALL = -1  # the key of a step planned for every group together


@dataclass(frozen=True)
class _Clock:
    """A step's draft call as the step saw it; :meth:`after` makes the step's timing."""

    waited_s: float = 0.0  # blocked on a call that never answered
    draft_ms: float = 0.0  # the call's part the step waited for (all of it in lockstep)
    hidden_ms: float = 0.0
    link_ms: float = 0.0

    def after(self, total_s: float) -> StepTiming:
        draft_ms = self.draft_ms + 1000 * self.waited_s
        verify_ms = max(1000 * total_s - draft_ms, 0.0)
        return StepTiming(draft_ms, verify_ms, self.hidden_ms, self.link_ms)

    def plus(self, other: _Clock) -> _Clock:
        """Both calls' parts (a step with trees from a proactive call and from its own)."""
        return _Clock(
            self.waited_s + other.waited_s,
            self.draft_ms + other.draft_ms,
            self.hidden_ms + other.hidden_ms,
            self.link_ms + other.link_ms,
        )


@dataclass(frozen=True)
class _Flight:
    """A group's planned step whose draft call is out."""

    group: int  # ``ALL`` for a step of every group
    plan: StepPlan
    pending: PendingDraft
    sent_s: float  # perf_counter when the call was handed off (after ``submit`` returned)
    ahead: Matched | None = None  # trees a proactive call drafted for the plan, and its bytes
    ahead_clock: _Clock = _Clock()  # that call, as this step saw it
    after_chance: bool | None = None  # the step before had a chance to send a proactive call: taken?


class DrafterHealth:
    """Whether to ask the drafter now: after a failure, not until a doubling backoff passed."""

    def __init__(self, backoff_s: tuple[float, float] = RETRY_AFTER_S) -> None:
        self.first_s, self.longest_s = backoff_s
        self.failures = 0  # calls that got no answer, all told
        self._streak = 0  # failures since the last answer
        self._retry_s = 0.0  # perf_counter before which the drafter is not asked

    def available(self) -> bool:
        return time.perf_counter() >= self._retry_s

    def answered(self) -> None:
        self._streak = 0

    def failed(self) -> None:
        self.failures += 1
        self._streak += 1
        wait = min(self.first_s * 2 ** (self._streak - 1), self.longest_s)
        self._retry_s = time.perf_counter() + wait


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        verifier: Verifier,
        drafter: DraftClient | None,
        encode: Callable[[Prompt], EncodedPrompt],
        eos_token_ids: frozenset[int],
        seed: int = 0,
        compression: float | None = None,
        layout: Callable[[Prompt], EncodedPrompt] | None = None,
        draft_timeout_s: float = DRAFT_TIMEOUT_S,
        proactive: bool = False,
    ) -> None:
        self.scheduler, self.verifier, self.drafter = scheduler, verifier, drafter
        self.encode, self.eos_token_ids = encode, eos_token_ids
        # the prompt's rows without visual embeddings; with it, images are encoded only when a
        # chunk needs them (not at all when a prefix cache holds their rows)
        self.layout = layout
        self.compression = compression  # r for every request; None = the policy chooses
        self.draft_timeout_s = draft_timeout_s
        self.proactive = proactive  # pays only with a drafter in another process
        self.proactive_stats = ProactiveStats()
        self._foresight: Foresight | None = None
        self._stale: list[Foresight] = []  # proactive calls no step needs, read once answered
        self.gate = ProactiveGate()
        self._chance: tuple[frozenset[int], bool] | None = None  # its requests, and whether taken
        self.health = DrafterHealth()
        self._ids = itertools.count()
        self._seeds = random.Random(seed)
        self._flights: dict[int, _Flight] = {}  # group -> its planned step, trees on the way
        self.snapshot = EngineSnapshot()

    @property
    def pipelined(self) -> bool:
        return self.scheduler.config.groups > 1

    def add_request(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        compression: float | None = None,
        adapter: str | None = None,
        learn: bool = False,
    ) -> int:
        """Queue a request and return its id; ``ValueError`` for a request that cannot run.
        ``adapter`` names the drafter LoRA to draft it with (its output does not depend on it);
        with ``learn`` it is learned online and may have no version yet (the base drafter drafts
        until one is published)."""
        arrived = time.perf_counter()  # TTFT counts encoding the prompt (the vision tower) too
        known = adapter is not None and self.drafter is not None and self.drafter.has_adapter(adapter)
        if adapter is not None and not known and not learn:
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
                adapter=adapter if self.drafter is not None else None,
                adapter_known=known,
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
        started = time.perf_counter()
        self._send_drafts()
        flight = min(self._flights.values(), key=lambda f: f.sent_s, default=None)
        if flight is None:
            return self._idle()
        del self._flights[flight.group]
        plan = self.scheduler.current(flight.plan)
        if plan.empty:  # every request of it was aborted while its trees were drafted
            return []
        plan, clock = self._trees(plan, flight)
        self._foresee(plan)
        report = self.scheduler.update(plan, self.verifier.verify(plan.items))
        timing = clock.after(time.perf_counter() - started)
        if flight.after_chance is not None and not report.drafter_failed:
            self.gate.learn(flight.after_chance, timing.draft_ms)
        if not report.drafter_failed:  # a timeout's wait says nothing of what drafting costs
            self.scheduler.learn(report, timing)
        self._sweep_stale()
        self._publish(report, timing, batch=len(plan.items))
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

    def _send_drafts(self) -> None:
        """Plan the next steps and send their draft calls. With nothing on its way, every
        request is planned together: without trees (or in lockstep) that is one step; with
        trees, pipelined, it goes out as one step per group, each group's call its own. While
        calls are out, each group verified since is planned again at once, so its call overlaps
        the other groups' verification; once the policy stops drafting, the steps on their way
        are verified and everyone is planned together again."""
        draft = self.drafter is not None and self.health.available()
        groups = self.scheduler.config.groups
        if not self._flights:
            plan = self.scheduler.schedule(None, draft=draft, split=groups if draft else 1)
            parts = self.scheduler.split(plan) if plan.drafts and groups > 1 else {ALL: plan}
            for group, part in parts.items():
                self._send(group, part)
            return
        if not any(f.plan.drafts for f in self._flights.values()):
            return  # no call to overlap: verify what is on its way, then plan everyone together
        for group in range(groups):
            if group not in self._flights:
                overlap = sum(f.plan.num_tokens for f in self._flights.values())
                peers = sum(f.plan.load.num_sampling for f in self._flights.values())
                plan = self.scheduler.schedule(group, draft=draft, overlap_tokens=overlap, peers=peers)
                self._send(group, plan)

    def _send(self, group: int, plan: StepPlan) -> None:
        if plan.empty:
            return
        ahead, ahead_clock = self._foreseen(plan)
        rest = tuple(d for d in plan.drafts if ahead is None or d.request_id not in ahead.ready)
        pending: PendingDraft = NOTHING_TO_DRAFT
        if rest and self.drafter is not None:
            pending = self.drafter.submit(rest)
        after = None
        if self._chance is not None and any(i.request_id in self._chance[0] for i in plan.items):
            after, self._chance = self._chance[1], None
        self._flights[group] = _Flight(group, plan, pending, time.perf_counter(), ahead, ahead_clock, after)

    def _foresee(self, plan: StepPlan) -> None:
        """Send the proactive call for ``plan``'s trees, about to be verified, when nothing else
        keeps the drafter busy meanwhile: the calls of other groups are answered, and so is the
        last proactive call (one left unread is stale now: its requests finished); and when
        :class:`scheduler.foresight.ProactiveGate` finds it pays."""
        if not (self.proactive and plan.proposals and self.drafter is not None and self.health.available()):
            return
        if any(not f.pending.done() for f in self._flights.values()):
            return
        if self._foresight is not None:
            if not self._foresight.pending.done():
                return
            self._stale.append(self._foresight)
        requests = ahead_requests(plan, self.eos_token_ids)
        if not requests:
            return
        sent = self.gate.send()
        self._chance = (frozenset(r.request_id for r in requests), sent)
        if not sent:
            self._count(ProactiveStats(declined=1))
            return
        pending = self.drafter.submit(requests, ahead=True)
        self._foresight = Foresight.of(requests, pending, time.perf_counter())
        self._count(ProactiveStats(calls=1, trees=len(requests)))

    def _foreseen(self, plan: StepPlan) -> tuple[Matched | None, _Clock]:
        """The trees of ``plan`` the proactive call holds, waiting for it if it may hold one."""
        foresight = self._foresight
        if foresight is None or not foresight.concerns(plan):
            return None, _Clock()
        self._foresight = None
        if not foresight.used_by(plan):  # its guesses did not come true
            self._stale.append(foresight)
            return None, _Clock()
        waiting = time.perf_counter()
        ahead = self._read_foresight(foresight, plan.drafts)
        waited_ms = 1000 * (time.perf_counter() - waiting)
        if ahead is None:
            return None, _Clock(waited_s=waited_ms / 1000)
        return ahead, _Clock(0.0, waited_ms, max(ahead.call_ms - waited_ms, 0.0), ahead.link_ms)

    def _read_foresight(self, foresight: Foresight, drafts: Sequence[DraftRequest]) -> Matched | None:
        """``foresight``'s answer read against ``drafts`` and counted (None if it never came)."""
        try:
            drafted = foresight.pending.result(self.draft_timeout_s)
        except DrafterUnavailable:
            self.health.failed()
            return None
        ahead = foresight.match(drafted, drafts)
        self._count(ProactiveStats(hits=len(ahead.ready), wasted_nodes=ahead.wasted_nodes))
        return ahead

    def _sweep_stale(self) -> None:
        """Count the stale proactive calls answered by now: their trees wasted, their bytes
        carried by no request."""
        for foresight in [f for f in self._stale if f.pending.done()]:
            self._stale.remove(foresight)
            ahead = self._read_foresight(foresight, ())
            if ahead is not None:
                self._count(ahead.unbilled(()))

    def _count(self, stats: ProactiveStats) -> None:
        self.proactive_stats = self.proactive_stats.plus(stats)

    def _trees(self, plan: StepPlan, flight: _Flight) -> tuple[StepPlan, _Clock]:
        """``plan`` (``flight``'s, less aborted requests) with its trees once they came; without
        trees when the drafter did not answer in time."""
        waiting = time.perf_counter()
        try:
            drafted = flight.pending.result(self.draft_timeout_s)
        except DrafterUnavailable:
            self.health.failed()
            if flight.ahead is not None:  # its trees go with the others; its bytes crossed all the same
                self._count(flight.ahead.unbilled(()))
            return plan.undrafted(), _Clock(waited_s=time.perf_counter() - waiting)
        if plan.drafts:
            self.health.answered()
        # what verifying other groups hid of the call: the time from handing it off to waiting
        hidden_ms = min(drafted.call_ms, 1000 * (waiting - flight.sent_s))
        clock = _Clock(0.0, drafted.call_ms - hidden_ms, hidden_ms, drafted.link_ms).plus(flight.ahead_clock)
        proposals = drafted.proposals
        if flight.ahead is not None:
            proposals = flight.ahead.charged(proposals)
            self._count(flight.ahead.unbilled(proposals))
        return plan.with_trees(proposals), clock

    def _idle(self) -> list[RequestOutput]:
        """Nothing to run but Redis lookups (or nothing at all): wait a little for one."""
        self._sweep_stale()
        self.scheduler.wait_for_fetches(timeout_s=IDLE_WAIT_S)
        return []

    def _publish(self, report: StepReport, timing: StepTiming, batch: int) -> None:
        sched, pool = self.scheduler, self.scheduler.pool
        self.snapshot = EngineSnapshot(
            waiting=len(sched.queue.waiting),
            running=len(sched.queue.running),
            kv_used=1 - pool.num_free_blocks / pool.num_blocks,
            drafter_kv_used=sched.drafter_kv_used(),
            totals=self.snapshot.totals.after(report, timing, batch),
            prefix=None if sched.prefix is None else PrefixCounters.of(sched.prefix),
            proactive=self.proactive_stats,
        )
