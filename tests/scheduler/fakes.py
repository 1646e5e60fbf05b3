"""A scripted target and drafter for scheduler tests, over a real BlockPool.

The target's next token after a sequence of length ``L`` is ``next_token(L)`` (never EOS unless a
test says so), so a request's whole sequence is known in advance: prompt token ``i`` is ``i``
and output ``j`` is ``next_token(P + j)``. The verifier checks every item against that sequence,
so a chunk that feeds the wrong tokens, a KV count that drifts or a block table too short for the
item fails the test where it happens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from core.draft import DraftProposal, DraftRequest
from core.kv import KVLayout
from core.plan import Completion, StepPlan, StepReport, StepTiming
from core.prompt import EncodedPrompt, Prompt
from core.sampling import SamplingParams
from core.tree import ROOT, DraftTree
from core.verify import VerifyItem, VerifyOutcome
from kvcache.block_pool import BlockPool
from scheduler.request import RequestState
from scheduler.scheduler import Scheduler

EOS = 2
BLOCK_SIZE = 4


def next_token(length: int) -> int:
    return 10 + (7 * length) % 50


def make_pool(num_blocks: int = 64) -> BlockPool:
    layout = KVLayout(num_layers=1, num_blocks=num_blocks, block_size=BLOCK_SIZE, num_kv_heads=1, head_dim=2)
    return BlockPool(layout)


def make_request(
    request_id: int,
    num_prompt: int,
    max_tokens: int,
    ignore_eos: bool = False,
    compression: float | None = 1.0,
) -> RequestState:
    ids = torch.arange(num_prompt)
    return RequestState(
        request_id=request_id,
        prompt=Prompt(tuple(ids.tolist())),
        encoded=EncodedPrompt(ids, torch.arange(num_prompt), None, None),
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos),
        compression=compression,
        generator=torch.Generator(),
        eos_token_ids=frozenset({EOS}),
    )


def empty_tree() -> DraftTree:
    return DraftTree(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))


def expected_outputs(num_prompt: int, count: int, token: Callable[[int], int] = next_token) -> list[int]:
    return [token(num_prompt + j) for j in range(count)]


@dataclass
class ChainDrafter:
    """Proposes a chain of ``max_depth`` nodes: the target's tokens for the first ``right`` depths,
    then a token the target never picks."""

    right: int = 2
    token: Callable[[int], int] = next_token
    requests: list[DraftRequest] = field(default_factory=list)
    held: set[int] = field(default_factory=set)  # requests whose (pretend) KV it holds

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        """A request it holds no KV for reports its whole sequence as prefill."""
        proposals = []
        for req in requests:
            self.requests.append(req)
            length = len(req.prompt.token_ids) + len(req.output_ids)
            depth = req.budget.max_depth
            tokens = [self.token(length + d) if d < self.right else 3 for d in range(depth)]
            tree = DraftTree(torch.tensor(tokens, dtype=torch.long), torch.arange(depth) - 1)
            prefill = 0 if req.request_id in self.held else length
            self.held.add(req.request_id)
            proposals.append(DraftProposal(req.request_id, tree, prefill_tokens=prefill))
        return proposals

    def release(self, request_id: int) -> None:
        self.held.discard(request_id)


@dataclass
class ScriptedVerifier:
    scheduler: Scheduler
    token: Callable[[int], int] = next_token
    items: list[VerifyItem] = field(default_factory=list)

    def _sequence(self, item: VerifyItem) -> list[int]:
        req = self.scheduler.get(item.request_id)
        assert req is not None, f"request {item.request_id} is not live"
        return [*range(req.num_prompt), *expected_outputs(req.num_prompt, len(req.output_ids), self.token)]

    def verify(self, items: Sequence[VerifyItem]) -> list[VerifyOutcome]:
        outcomes = []
        for item in items:
            self.items.append(item)
            n = int(item.token_ids.shape[0])
            sequence = self._sequence(item)
            assert item.token_ids.tolist() == sequence[item.num_cached : item.num_cached + n], item
            assert len(item.block_table) * BLOCK_SIZE >= item.num_cached + n + item.num_draft
            assert item.emits == (item.num_cached + n == len(sequence))
            if not item.emits:
                outcomes.append(VerifyOutcome(item.request_id, (), (), 0))
                continue
            length, node, accepted = item.num_cached + n, ROOT, []
            if item.draft is not None:
                tree = item.draft.tree
                while True:
                    want = self.token(length + len(accepted))
                    children = [i for i, p in enumerate(tree.parents.tolist()) if p == node]
                    match = [c for c in children if int(tree.token_ids[c]) == want]
                    if not match:
                        break
                    node = match[0]
                    accepted.append(node)
            tokens = tuple(self.token(length + d) for d in range(len(accepted) + 1))
            outcomes.append(VerifyOutcome(item.request_id, tokens, tuple(accepted), item.num_draft))
        return outcomes


@dataclass
class Record:
    """What the steps of a test produced: their reports, and each finished request's result."""

    reports: list[StepReport] = field(default_factory=list)
    done: dict[int, Completion] = field(default_factory=dict)


TIMING = StepTiming(draft_ms=1.0, verify_ms=1.0)  # what every scripted step is said to cost


def step(
    sched: Scheduler,
    verifier: ScriptedVerifier,
    drafter: ChainDrafter | None = None,
    record: Record | None = None,
) -> StepPlan:
    """One engine step as ``Engine.step`` takes it, checking integrity after it."""
    plan = sched.schedule()
    plan = plan.with_trees(drafter.propose(plan.drafts) if drafter and plan.drafts else [])
    report = sched.update(plan, verifier.verify(plan.items))
    sched.learn(report, TIMING)
    sched.check_integrity()
    if record is not None:
        record.reports.append(report)
        record.done.update((o.request_id, o.completion) for o in report.outputs if o.completion)
    return plan


def run(
    sched: Scheduler,
    verifier: ScriptedVerifier,
    drafter: ChainDrafter | None = None,
    record: Record | None = None,
) -> dict[int, Completion]:
    """Step until every request is done; the completions of those that finished meanwhile."""
    record = Record() if record is None else record
    for _ in range(10_000):
        if not sched.has_unfinished():
            return record.done
        assert not step(sched, verifier, drafter, record).empty, "a step scheduled nothing"
    raise AssertionError("requests did not finish")
