"""What the scheduler decided for one step, and what each request got out of it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from core.draft import DraftProposal, DraftRequest
from core.verify import VerifyItem


@dataclass(frozen=True)
class StepPlan:
    items: tuple[VerifyItem, ...]  # one per scheduled request, no trees yet
    drafts: tuple[DraftRequest, ...]  # requests that get a tree this step (a subset of items)

    @property
    def empty(self) -> bool:
        return not self.items

    def with_trees(self, proposals: Sequence[DraftProposal]) -> list[VerifyItem]:
        """The items with each proposal's tree attached to its request's item."""
        trees = {p.request_id: p for p in proposals}
        return [dataclasses.replace(i, draft=trees.get(i.request_id)) for i in self.items]


@dataclass(frozen=True)
class RequestStats:
    prompt_tokens: int  # as fed to the target (images expanded)
    output_tokens: int
    verify_steps: int  # target forwards that emitted tokens for this request
    draft_tokens: int  # tree nodes verified
    accepted_tokens: int  # tree nodes accepted
    cached_tokens: int = 0  # prompt tokens whose KV came from a prefix cache (local or Redis)

    @property
    def tau(self) -> float:
        """Tokens per verify step, the target's own token included (1.0 = no gain)."""
        return self.output_tokens / self.verify_steps if self.verify_steps else 0.0


@dataclass(frozen=True)
class RequestOutput:
    request_id: int
    new_token_ids: tuple[int, ...]  # tokens emitted by this step
    finished: bool
    finish_reason: str | None  # "stop" (end of turn or stop string), "length", "abort"
    stats: RequestStats
    text: str = ""  # detokenized delta, filled by the engine
