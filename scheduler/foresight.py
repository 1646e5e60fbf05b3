"""Proactive drafting: the drafter drafts a request's next tree while its current one is verified.

A step sends its trees to the verifier; if the drafter would otherwise sit idle meanwhile, the
engine sends it a proactive call at once. For each request the call asks for a tree after the
root-to-leaf path the drafter rates likeliest to be accepted whole in the tree being verified
(:meth:`core.draft.DraftProposal.likeliest_path`), one level deeper than the step's budget: the
new tree's root children are the drafter's guesses at the token the verifier adds after it.
When the verifier accepts that path whole and its own token is one of those guesses, the branch
under it is the request's next tree, already drafted (:meth:`core.draft.DraftProposal.after`);
any other outcome discards the tree, and the drafter drops the guessed path's KV on its next
call (``drafter_pool.pool``).

Outputs stay the target's: a tree drafted ahead is drafted from exactly the context the request
has when it is used, and the verifier decides alone. Only the speed depends on the guesses.

Whether it pays depends on how often a whole path is accepted, and on what a miss costs (the
drafter yields to the next ordinary call, but only between tree levels). :class:`ProactiveGate`
measures it where it runs: the steps after a chance to send a proactive call wait for their
trees for some time, sent or not, and the gate sends where that wait is shorter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import astuple, dataclass

from core.draft import DraftBudget, Drafted, DraftProposal, DraftRequest
from core.plan import StepPlan
from core.protocols import PendingDraft


@dataclass(frozen=True)
class ProactiveStats:
    """Running sums over an engine's proactive calls (metrics take differences)."""

    calls: int = 0
    declined: int = 0  # chances to send one that the gate let pass
    trees: int = 0  # next trees drafted ahead
    hits: int = 0  # of which a step verified (the branch under the verifier's token)
    wasted_nodes: int = 0  # nodes drafted ahead that no step verified (of calls that answered)
    # bytes of proactive calls that no request's stats carry (read after the request finished,
    # or without a tree for it in the step that read them)
    unbilled_up: int = 0
    unbilled_down: int = 0

    def plus(self, other: ProactiveStats) -> ProactiveStats:
        return ProactiveStats(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


def ahead_requests(plan: StepPlan, eos_token_ids: frozenset[int]) -> list[DraftRequest]:
    """The proactive call for ``plan`` with its trees: one request per tree whose likeliest path
    could leave its request running, drafted after that path one level deeper than its budget."""
    trees = {p.request_id: p for p in plan.proposals}
    requests = []
    for d in plan.drafts:
        tree = trees.get(d.request_id)
        path = () if tree is None else tree.likeliest_path()
        outputs = d.output_ids + path
        if not path or eos_token_ids.intersection(path) or len(outputs) + 1 >= d.sampling.max_tokens:
            continue
        budget = DraftBudget(d.budget.max_nodes + 2, d.budget.max_depth + 1, d.budget.compression)
        requests.append(dataclasses.replace(d, output_ids=outputs, budget=budget))
    return requests


PROBE_EVERY = 8  # chances between tries of the choice the gate does not prefer
GATE_DECAY = 0.95  # weight of a step's wait in the gate's means, per later step of the same choice


@dataclass
class _Mean:
    total: float = 0.0
    weight: float = 0.0

    def add(self, value: float, decay: float) -> None:
        self.total = decay * self.total + value
        self.weight = decay * self.weight + 1

    @property
    def mean(self) -> float:
        return self.total / self.weight if self.weight else math.inf


class ProactiveGate:
    """Whether to take a chance to send a proactive call. The engine reports each step that came
    after a chance with whether it was taken and how long the step waited for its trees; the gate
    takes chances while the steps after taken ones wait less on average (recent steps weigh most),
    and makes the other choice every ``probe_every``-th chance so that either mean stays current
    (a change of load or of acceptance turns it around). Untried, it sends; with ``probe_every``
    0 it never declines (so it always sends)."""

    def __init__(self, probe_every: int = PROBE_EVERY, decay: float = GATE_DECAY) -> None:
        if probe_every == 1 or probe_every < 0 or not 0 < decay <= 1:
            raise ValueError(f"probe_every must be 0 or >= 2 and decay in (0, 1], got {probe_every}, {decay}")
        self.probe_every, self.decay = probe_every, decay
        self.waits = {True: _Mean(), False: _Mean()}
        self.chances = 0

    @property
    def preferred(self) -> bool:
        return self.waits[True].mean <= self.waits[False].mean

    def send(self) -> bool:
        self.chances += 1
        probe = self.probe_every > 0 and self.chances % self.probe_every == 0
        return self.preferred != probe

    def learn(self, sent: bool, wait_ms: float) -> None:
        self.waits[sent].add(wait_ms, self.decay)


@dataclass(frozen=True)
class Foresight:
    """A proactive call on its way and the outputs it drafted each request's tree after."""

    guesses: dict[int, tuple[int, ...]]  # request -> its verified outputs and the guessed path
    pending: PendingDraft
    sent_s: float  # perf_counter when it was handed off

    @classmethod
    def of(cls, requests: Sequence[DraftRequest], pending: PendingDraft, sent_s: float) -> Foresight:
        return cls({r.request_id: r.output_ids for r in requests}, pending, sent_s)

    def concerns(self, plan: StepPlan) -> bool:
        """Whether ``plan`` holds a request this call drafted for (after it, the call is stale)."""
        return any(i.request_id in self.guesses for i in plan.items)

    def used_by(self, plan: StepPlan) -> bool:
        """Whether one of ``plan``'s trees may come from this call."""
        return any(self.guesses.get(d.request_id) == d.output_ids[:-1] for d in plan.drafts)

    def match(self, drafted: Drafted, drafts: Sequence[DraftRequest]) -> Matched:
        """What this call's answer ``drafted`` holds for the step of ``drafts``."""
        ahead = {p.request_id: p for p in drafted.proposals}
        ready: dict[int, DraftProposal] = {}
        for d in drafts:
            tree = ahead.get(d.request_id)
            if tree is None or self.guesses.get(d.request_id) != d.output_ids[:-1]:
                continue
            branch = tree.after(d.output_ids[-1], d.budget)
            if branch is not None and branch.tree.num_nodes:
                ready[d.request_id] = branch
        used = sum(branch.tree.num_nodes + 1 for branch in ready.values())  # with the token it hangs on
        link = {p.request_id: (p.bytes_up, p.bytes_down) for p in drafted.proposals}
        wasted = sum(p.tree.num_nodes for p in drafted.proposals) - used
        return Matched(ready, wasted, link, drafted.call_ms, drafted.link_ms)


@dataclass(frozen=True)
class Matched:
    """A proactive call's answer, read against the step its trees were drafted for."""

    ready: dict[int, DraftProposal]  # request -> its tree (the branch under the verifier's token)
    wasted_nodes: int  # nodes drafted that no tree uses (a used branch's own token counts as used)
    link_bytes: dict[int, tuple[int, int]]  # request -> its part of the call, up and down
    call_ms: float  # the call, sent to answered
    link_ms: float  # of which on the link

    def charged(self, proposals: Sequence[DraftProposal]) -> tuple[DraftProposal, ...]:
        """``proposals`` (the step's trees from its own call) and the ready ones, each carrying
        its request's bytes of the proactive call too: a request pays for its guesses."""

        def charge(p: DraftProposal) -> DraftProposal:
            up, down = self.link_bytes.get(p.request_id, (0, 0))
            return dataclasses.replace(p, bytes_up=p.bytes_up + up, bytes_down=p.bytes_down + down)

        return tuple(charge(p) for p in (*proposals, *self.ready.values()))

    def unbilled(self, billed: Sequence[DraftProposal]) -> ProactiveStats:
        """The bytes of the call that no proposal of ``billed`` carries."""
        carried = {p.request_id for p in billed}
        rest = [b for rid, b in self.link_bytes.items() if rid not in carried]
        return ProactiveStats(unbilled_up=sum(u for u, _ in rest), unbilled_down=sum(d for _, d in rest))
