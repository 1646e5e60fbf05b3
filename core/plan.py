"""One engine step as plain data: what the scheduler planned, and what came of it.

``StepPlan`` leaves ``Scheduler.schedule`` with the load it was planned at and the budget the
policy chose; ``StepReport`` leaves ``Scheduler.update`` with everything the step produced
(outputs, acceptance per request, tokens verified, the drafter's prefill); ``StepTiming`` is
what the step cost. A policy learns from a report and its timing, nothing else: no feedback
lives in side fields between calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from core.draft import NO_DRAFT, DraftBudget, DraftProposal, DraftRequest
from core.verify import VerifyItem


@dataclass(frozen=True)
class StepLoad:
    """The load a step runs at: what a draft policy decides from."""

    num_sampling: int  # requests that emit a token this step
    prefill_tokens: int  # prompt (or recompute) tokens of the step
    drafter_kv_used: float = 0.0  # fraction of the drafter's KV pool in use (0 without a drafter)
    num_joining: int = 0  # requests still in prefill (running or admissible): they sample soon
    # tokens the verifier forwards for other requests while this step's trees are drafted (the
    # other group's step when drafting is pipelined; 0 in lockstep, where the verifier waits)
    overlap_tokens: int = 0
    # the groups this step's requests are verified in, one after another, if they get trees
    # (pipelined: each group's trees drafted while the one before it is verified); without
    # trees they are verified together
    split: int = 1
    # sampling requests of other groups, in steps on their way: without trees this step's
    # requests are verified together with them (the engine plans everyone together again)
    num_peers: int = 0

    def __post_init__(self) -> None:
        requests = (self.num_sampling, self.num_joining, self.num_peers)
        if min(*requests, self.prefill_tokens, self.overlap_tokens) < 0:
            raise ValueError(f"a step load counts tokens and requests, got {self}")
        if self.split < 1:
            raise ValueError(f"a step is verified in at least one group, got split {self.split}")

    @property
    def decoding(self) -> bool:
        """A pure decode step: requests sample and no prompt token rides along."""
        return self.num_sampling > 0 and self.prefill_tokens == 0


@dataclass(frozen=True)
class StepPlan:
    items: tuple[VerifyItem, ...]  # one per scheduled request; trees attached by ``with_trees``
    drafts: tuple[DraftRequest, ...]  # requests that get a tree this step (a subset of items)
    load: StepLoad  # the load the step was planned at
    budget: DraftBudget = NO_DRAFT  # the policy's choice; each draft's own is cut to fit
    proposals: tuple[DraftProposal, ...] = ()  # the drafter's answers, once attached
    drafter_failed: bool = False  # the drafter did not answer: planned trees were dropped

    @property
    def empty(self) -> bool:
        return not self.items

    @property
    def num_tokens(self) -> int:
        """Tokens the verifier forwards for this plan: items and their trees' nodes."""
        return sum(len(i.token_ids) for i in self.items) + sum(d.budget.max_nodes for d in self.drafts)

    def load_of_items(self, drafter_kv_used: float, overlap_tokens: int) -> StepLoad:
        """The load of this plan's own items (a group's part of a plan made for several)."""
        sampling = sum(i.emits for i in self.items)
        tokens = sum(len(i.token_ids) for i in self.items)
        joining = len(self.items) - sampling
        return StepLoad(sampling, tokens - sampling, drafter_kv_used, joining, overlap_tokens)

    def keep(self, request_ids: set[int]) -> StepPlan:
        """This plan without the requests not in ``request_ids`` (aborted since it was made)."""
        items = tuple(i for i in self.items if i.request_id in request_ids)
        drafts = tuple(d for d in self.drafts if d.request_id in request_ids)
        return dataclasses.replace(self, items=items, drafts=drafts)

    def undrafted(self) -> StepPlan:
        """This plan decoded plainly because the drafter did not answer."""
        return dataclasses.replace(self, drafts=(), budget=NO_DRAFT, proposals=(), drafter_failed=True)

    def with_trees(self, proposals: Sequence[DraftProposal]) -> StepPlan:
        """This plan with each proposal's tree attached to its request's item."""
        trees = {p.request_id: p for p in proposals}
        items = tuple(dataclasses.replace(i, draft=trees.get(i.request_id)) for i in self.items)
        return dataclasses.replace(self, items=items, proposals=tuple(proposals))


@dataclass(frozen=True)
class RequestStats:
    prompt_tokens: int  # as fed to the target (images expanded)
    output_tokens: int
    verify_steps: int  # target forwards that emitted tokens for this request
    draft_tokens: int  # tree nodes verified
    accepted_tokens: int  # tree nodes accepted
    cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache (local or Redis)
    preemptions: int = 0  # times its KV was freed for older requests (and recomputed)
    link_bytes_up: int = 0  # its draft calls to a drafter pool, serialized (engine -> pool)
    link_bytes_down: int = 0  # its trees back, serialized (pool -> engine)
    adapter: str | None = None  # the drafter adapter it was drafted with (None: the base drafter)
    adapter_version: int | None = None  # that adapter's published version (online learning), if any

    @property
    def tau(self) -> float:
        """Tokens per verify step, the target's own token included (1.0 = no gain)."""
        return self.output_tokens / self.verify_steps if self.verify_steps else 0.0


@dataclass(frozen=True)
class Completion:
    """A finished request's whole result (carried by its last :class:`RequestOutput`)."""

    request_id: int
    token_ids: tuple[int, ...]  # generated tokens (an end-of-turn token included when produced)
    text: str  # detokenized, cut before a stop string: the streamed deltas joined
    finish_reason: str
    stats: RequestStats
    ttft_s: float  # time to the first token
    time_s: float  # time to the last token


@dataclass(frozen=True)
class RequestOutput:
    request_id: int
    new_token_ids: tuple[int, ...]  # tokens emitted by this step
    finished: bool
    finish_reason: str | None  # "stop" (end of turn or stop string), "length", "abort"
    stats: RequestStats
    text: str = ""  # detokenized delta; text that may start a stop string is held back
    completion: Completion | None = None  # the whole result, on the finished output only


@dataclass(frozen=True)
class Accepted:
    """What one emitting request's tree got this step."""

    budget: DraftBudget  # the tree budget it was given (``NO_DRAFT``: plain decoding)
    num_draft: int  # tree nodes verified
    accepted: int  # of which accepted (the target's own token comes on top)


@dataclass(frozen=True)
class StepReport:
    """Everything a step produced, for the caller and for the policy's learning."""

    outputs: tuple[RequestOutput, ...]  # one per request that emitted or finished this step
    load: StepLoad  # the load the step ran at
    budget: DraftBudget  # the policy's choice for the step
    accepted: tuple[Accepted, ...]  # one per emitting request
    verify_tokens: int  # tokens the target forwarded: prompt chunks, last tokens, tree nodes
    tree_nodes: int  # of which draft-tree nodes
    drafter_prefill: int = 0  # tokens the drafter encoded for requests it held no KV for
    drafter_dropped: int = 0  # requests whose drafter KV was dropped (its pool was full)
    drafter_failed: bool = False  # the drafter did not answer: the step decoded without trees

    @property
    def emitted_tokens(self) -> int:
        """Tokens the step's emitting requests got: accepted nodes plus the target's own."""
        return sum(a.accepted + 1 for a in self.accepted)


@dataclass(frozen=True)
class StepTiming:
    """What a step cost, in milliseconds of wall time. The draft call took ``draft_ms +
    hidden_ms``: in lockstep the step waits for all of it; pipelined, the verifier works on the
    other group meanwhile and the step waits only for what that did not hide."""

    draft_ms: float  # the step waited for its trees (0 without trees)
    verify_ms: float  # everything else: scheduling, the target's forward, acceptance, bookkeeping
    hidden_ms: float = 0.0  # of the draft call, the part the verifier spent on other work
    link_ms: float = 0.0  # of the draft call, the time on the link to the drafter (both ways)

    @property
    def call_ms(self) -> float:
        """The draft call, sent to trees back: link, queueing and the drafter's forwards."""
        return self.draft_ms + self.hidden_ms
