"""Who runs each step, with how many tokens and how big a tree; and what came of it.

There is no prefill phase: a request's next item is simply its missing tokens (the whole prompt
in chunks of at most the step's token budget, then one token per step), and an item that reaches
the end of its sequence samples and may carry a draft tree. Running requests go first, oldest
first; admissions share what is left of the token budget.

The scheduler composes small managers: :class:`RunningSet` (the requests, preemption),
:class:`PrefixAdmission` (where a request's KV starts), :class:`DraftPlanner` (trees that fit)
and :class:`OutputProcessor` (kept tokens, text, finish reasons). ``schedule`` returns a
:class:`core.plan.StepPlan`; ``update`` commits the verifier's outcomes and returns a
:class:`core.plan.StepReport`, which the engine hands to the policy with the step's timing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.draft import NO_DRAFT
from core.plan import Accepted, Completion, RequestOutput, StepLoad, StepPlan, StepReport, StepTiming
from core.verify import VerifyItem, VerifyOutcome
from kvcache.block_pool import BlockPool
from kvcache.prefix_cache import PrefixCache
from scheduler.admission import PrefixAdmission
from scheduler.drafts import DraftPlanner
from scheduler.output import OutputProcessor
from scheduler.policy import Policy
from scheduler.request import RequestState, Status
from scheduler.running import RunningSet

Scheduled = list[tuple[RequestState, int]]  # (request, tokens of its item this step)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 512  # tokens per verifier forward: chunks, last tokens and tree nodes
    max_running: int = 64  # requests holding KV at once
    max_model_len: int = 1024  # the target's context window (positions)
    # requests split into this many groups, each planned and verified in its own step, so one
    # group's trees can be drafted while another's are verified (1: every request every step)
    groups: int = 1

    def __post_init__(self) -> None:
        if min(self.max_batch_tokens, self.max_running, self.groups) < 1 or self.max_model_len < 2:
            raise ValueError(f"invalid scheduler config {self}")


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        policy: Policy,
        config: SchedulerConfig | None = None,
        on_release: Callable[[int], None] = lambda request_id: None,
        drafter_kv_used: Callable[[], float] = lambda: 0.0,
        prefix: PrefixCache | None = None,
        output: OutputProcessor | None = None,
    ) -> None:
        self.pool, self.policy, self.config = pool, policy, config or SchedulerConfig()
        self.drafter_kv_used = drafter_kv_used  # fraction of the drafter's KV pool in use now
        self.prefix = prefix  # None: every prompt is computed in full
        self.queue = RunningSet(pool, on_release)
        self.admission = PrefixAdmission(pool, prefix)
        self.drafts = DraftPlanner(self.config.max_model_len)
        self.output = output or OutputProcessor()

    # -- requests -------------------------------------------------------------------------

    def add(self, req: RequestState) -> None:
        """Queue a new request; raises ``ValueError`` if it can never fit."""
        total = req.num_prompt + req.sampling.max_tokens
        if total > self.config.max_model_len:
            raise ValueError(
                f"prompt ({req.num_prompt} tokens, images expanded) plus max_tokens "
                f"({req.sampling.max_tokens}) is {total}, beyond the {self.config.max_model_len}-token "
                "context window; shorten the prompt or lower max_tokens"
            )
        if -(-total // self.pool.block_size) > self.pool.num_blocks:
            raise ValueError(f"request needs {total} KV entries, more than the whole KV pool holds")
        req.group = self.queue.emptiest_group(self.config.groups)
        self.queue.add(req)

    def get(self, request_id: int) -> RequestState | None:
        """The live (waiting or running) request with this id, if any."""
        return self.queue.requests.get(request_id)

    def abort(self, request_id: int) -> RequestOutput | None:
        """Stop a request now; returns its final output, or None if it is unknown or finished."""
        req = self.queue.requests.get(request_id)
        if req is None:
            return None
        completion = self._finish(req, "abort")
        return RequestOutput(request_id, (), True, "abort", req.stats(), completion=completion)

    def has_unfinished(self) -> bool:
        return self.queue.has_unfinished()

    def wait_for_fetches(self, timeout_s: float) -> None:
        """Block until a waiting request's Redis fetch is back (or ``timeout_s``): for a step
        loop with nothing else to run."""
        self.admission.wait(self.queue.waiting, timeout_s)

    # -- the step -------------------------------------------------------------------------

    def schedule(
        self,
        group: int | None = None,
        draft: bool = True,
        overlap_tokens: int = 0,
        split: int = 1,
        peers: int = 0,
    ) -> StepPlan:
        """A step of ``group`` (None: of every group): its running requests first (oldest first)
        with their trees, then its admissions with what is left of the token budget; a tree is
        only drafted for an item that samples, and none without ``draft`` (no drafter to ask).
        The budget carries the policy's r unless the request pinned its own; the drafter applies
        it when it builds the request's KV. ``overlap_tokens``: what the verifier forwards for
        other groups while this plan's trees are drafted; ``split``: the groups the plan is
        verified in if it drafts (see :meth:`split`); ``peers``: the other groups' sampling
        requests (see :class:`core.plan.StepLoad`)."""
        running, tokens_left = self._schedule_running(group)
        sampling = [(r, n) for r, n in running if n == r.num_missing]
        load = self._load(group, running, sampling, tokens_left, overlap_tokens, split, peers)
        budget = self.policy.decide(load) if draft else NO_DRAFT
        drafts, tokens_left = self.drafts.attach(sampling, budget, tokens_left)
        admitted, tokens_left = self._admit(group, tokens_left)
        joined = [(r, n) for r, n in admitted if n == r.num_missing]
        more, tokens_left = self.drafts.attach(joined, budget, tokens_left)
        items = tuple(self._item(req, n) for req, n in running + admitted)
        return StepPlan(items, tuple(drafts + more), load, budget)

    def split(self, plan: StepPlan) -> dict[int, StepPlan]:
        """``plan`` as one plan per group it holds, each with its own load: the verifier forwards
        the other groups' tokens while a group's trees are drafted."""
        members: dict[int, set[int]] = {}
        for item in plan.items:
            members.setdefault(self.queue.requests[item.request_id].group, set()).add(item.request_id)
        parts = {g: plan.keep(ids) for g, ids in sorted(members.items())}
        total = sum(p.num_tokens for p in parts.values())
        kv = plan.load.drafter_kv_used
        return {
            g: dataclasses.replace(p, load=p.load_of_items(kv, total - p.num_tokens))
            for g, p in parts.items()
        }

    def current(self, plan: StepPlan) -> StepPlan:
        """``plan`` without the requests that ended since it was made (aborted)."""
        return plan.keep(set(self.queue.requests))

    def update(self, plan: StepPlan, outcomes: Sequence[VerifyOutcome]) -> StepReport:
        """Commit each request's accepted KV, append its tokens, finish what is done."""
        budgets = {d.request_id: d.budget for d in plan.drafts}
        outputs, accepted = [], []
        for p in plan.proposals:
            if (owner := self.queue.requests.get(p.request_id)) is not None:
                owner.link_bytes_up += p.bytes_up
                owner.link_bytes_down += p.bytes_down
                if p.adapter_version is not None:
                    owner.adapter_version = p.adapter_version
        for item, out in zip(plan.items, outcomes, strict=True):
            req = self.queue.requests[item.request_id]
            n = int(item.token_ids.shape[0])
            assert req.blocks is not None
            req.blocks.commit(n + out.num_draft, [*range(n), *(n + a for a in out.accepted_nodes)])
            self.admission.publish(req)
            if item.emits:
                budget = budgets.get(req.request_id, NO_DRAFT)
                accepted.append(Accepted(budget, out.num_draft, len(out.accepted_nodes)))
                outputs.append(self._emit(req, out))
        return StepReport(
            outputs=tuple(outputs),
            load=plan.load,
            budget=plan.budget,
            accepted=tuple(accepted),
            verify_tokens=sum(len(i.token_ids) + i.num_draft for i in plan.items),
            tree_nodes=sum(i.num_draft for i in plan.items),
            drafter_prefill=sum(p.prefill_tokens for p in plan.proposals),
            drafter_dropped=sum(p.dropped for p in plan.proposals),
            drafter_failed=plan.drafter_failed,
        )

    def learn(self, report: StepReport, timing: StepTiming) -> None:
        """Hand a finished step's report and timing to the policy."""
        self.policy.learn(report, timing)

    def check_integrity(self) -> None:
        """Raise unless every used block belongs to a running request."""
        self.queue.check_integrity()

    # -- helpers --------------------------------------------------------------------------

    def _schedule_running(self, group: int | None) -> tuple[Scheduled, int]:
        chosen: Scheduled = []
        tokens_left = self.config.max_batch_tokens
        for req in [r for r in self.queue.running if group in (None, r.group)]:
            if req.status is not Status.RUNNING or tokens_left == 0:  # preempted by an older one
                continue
            n = min(req.num_missing, tokens_left)
            if self.queue.reserve_or_preempt(req, n):
                chosen.append((req, n))
                tokens_left -= n
        return chosen, tokens_left

    def _load(
        self,
        group: int | None,
        running: Scheduled,
        sampling: Scheduled,
        tokens_left: int,
        overlap_tokens: int,
        split: int,
        peers: int,
    ) -> StepLoad:
        """The step's load as the policy sees it: who samples, the prompt tokens beside them
        (running chunks and what admissions can take), and who will sample soon."""
        waiting = [r for r in self.queue.waiting if group in (None, r.group)]
        prefill = (
            sum(n for _, n in running) - len(sampling) + min(sum(r.num_missing for r in waiting), tokens_left)
        )
        room = max(self.config.max_running - len(self.queue.running), 0)
        members = sum(group in (None, r.group) for r in self.queue.running)
        joining = members - len(sampling) + min(len(waiting), room)
        kv = self.drafter_kv_used()
        return StepLoad(len(sampling), prefill, kv, joining, overlap_tokens, split, peers)

    def _admit(self, group: int | None, tokens_left: int) -> tuple[Scheduled, int]:
        """Oldest waiting first, each from its cached prefix; one still fetching is passed over."""
        chosen: Scheduled = []
        for req in [r for r in self.queue.waiting if group in (None, r.group)]:
            if tokens_left <= 0 or len(self.queue.running) >= self.config.max_running:
                break
            blocks = self.admission.start(req)
            if blocks is None:
                continue
            cached = len(blocks.blocks)
            n = min(req.num_tokens - blocks.num_tokens, tokens_left)
            if not blocks.can_reserve(n):
                blocks.release()  # cached blocks go back to the index, still found next time
                break
            blocks.reserve(n)
            if req.preemptions == 0:
                req.cached_tokens = min(cached * self.pool.block_size, req.num_prompt)
            req.published = cached
            self.queue.admit(req, blocks)
            chosen.append((req, n))
            tokens_left -= n
        return chosen, tokens_left

    def _item(self, req: RequestState, n: int) -> VerifyItem:
        assert req.blocks is not None
        chunk = req.chunk(n)
        return VerifyItem(
            request_id=req.request_id,
            token_ids=chunk.token_ids,
            num_cached=req.num_computed,
            block_table=req.blocks.block_table,
            sampling=req.sampling,
            emits=n == req.num_missing,
            embeds=chunk.embeds,
            embed_index=chunk.embed_index,
            embed_positions=chunk.embed_positions,
            positions=chunk.positions,
            generator=req.generator,
        )

    def _emit(self, req: RequestState, out: VerifyOutcome) -> RequestOutput:
        req.verify_steps += 1
        req.draft_tokens += out.num_draft
        req.accepted_tokens += len(out.accepted_nodes)
        emission = self.output.emit(req, out.tokens)
        reason = emission.finish_reason
        completion = None if reason is None else self._finish(req, reason)
        return RequestOutput(
            req.request_id,
            emission.token_ids,
            reason is not None,
            reason,
            req.stats(),
            emission.text,
            completion,
        )

    def _finish(self, req: RequestState, reason: str) -> Completion:
        self.queue.finish(req)
        return self.output.completion(req, reason)
