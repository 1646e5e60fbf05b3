"""What the scheduler asks of the drafter for one request, and the tree it gets back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.prompt import Prompt
from core.sampling import SamplingParams
from core.tree import DraftTree


@dataclass(frozen=True)
class DraftBudget:
    """How big a tree one request may get this step, and how much of its image the drafter sees."""

    max_nodes: int  # tree nodes after the root; 0 = no speculation this step
    max_depth: int  # longest root-to-leaf path
    compression: float = 1.0  # fraction r of the drafter's visual tokens kept when it builds the KV

    def __post_init__(self) -> None:
        if self.max_nodes < 0 or self.max_depth < 0:
            raise ValueError(f"draft budget must be >= 0, got {self.max_nodes} nodes, depth {self.max_depth}")
        if (self.max_nodes == 0) != (self.max_depth == 0):
            raise ValueError("max_nodes and max_depth must both be 0 or both be positive")
        if not 0 < self.compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {self.compression}")


NO_DRAFT = DraftBudget(max_nodes=0, max_depth=0)


@dataclass(frozen=True)
class DraftRequest:
    request_id: int
    prompt: Prompt
    output_ids: tuple[int, ...]  # every verified output token; the last one is the tree's root
    budget: DraftBudget
    sampling: SamplingParams
    adapter: str | None = None  # the user's drafter LoRA; None = the base drafter

    def __post_init__(self) -> None:
        if self.budget.max_nodes == 0:
            raise ValueError(f"request {self.request_id}: a draft request needs a positive budget")


@dataclass(frozen=True)
class DraftProposal:
    request_id: int
    tree: DraftTree  # nodes after the root (the last verified token)
    # [num_nodes + 1, vocab] float32: row 0 the distribution the root's children were drawn from,
    # row i + 1 that of node i's children; None for greedy requests (children are argmax picks)
    draft_probs: torch.Tensor | None = None
    prefill_tokens: int = 0  # tokens the drafter encoded first because it held no KV for the request
    dropped: bool = False  # the drafter had no room: it holds no KV for the request now (empty tree)
    bytes_up: int = 0  # its part of the draft call, serialized (0 when the drafter is in-process)
    bytes_down: int = 0  # this proposal, serialized

    def __post_init__(self) -> None:
        rows = self.tree.num_nodes + 1
        if self.draft_probs is not None and self.draft_probs.shape[0] != rows:
            raise ValueError(f"draft_probs has {self.draft_probs.shape[0]} rows for {rows} tree rows")


@dataclass(frozen=True)
class Drafted:
    """A draft call's answer: one proposal per request, in order, and what the call cost."""

    proposals: tuple[DraftProposal, ...]
    call_ms: float  # sent to answered
    link_ms: float = 0.0  # of which on the link between engine and drafter (both ways)


class DrafterUnavailable(RuntimeError):
    """The drafter did not answer a draft call (gone, restarting, or too slow): decode plainly."""


@dataclass(frozen=True)
class Answered:
    """A :class:`core.protocols.PendingDraft` answered before it was handed back: a drafter in
    the engine's process drafts in the caller's thread."""

    drafted: Drafted

    def result(self, timeout_s: float) -> Drafted:
        return self.drafted
