"""What the scheduler asks of the drafter for one request, and the tree it gets back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.prompt import Prompt
from core.sampling import SamplingParams
from core.tree import ROOT, DraftTree


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
    # [num_nodes] float32: the drafter's log-probability of the path to each node (None: unknown)
    scores: torch.Tensor | None = None
    prefill_tokens: int = 0  # tokens the drafter encoded first because it held no KV for the request
    dropped: bool = False  # the drafter had no room: it holds no KV for the request now (empty tree)
    bytes_up: int = 0  # its part of the draft call, serialized (0 when the drafter is in-process)
    bytes_down: int = 0  # this proposal, serialized
    adapter_version: int | None = None  # published version of the request's adapter that drafted it

    def __post_init__(self) -> None:
        rows = self.tree.num_nodes + 1
        if self.draft_probs is not None and self.draft_probs.shape[0] != rows:
            raise ValueError(f"draft_probs has {self.draft_probs.shape[0]} rows for {rows} tree rows")
        if self.scores is not None and self.scores.shape != (rows - 1,):
            raise ValueError(f"scores {tuple(self.scores.shape)} for {rows - 1} nodes")

    def likeliest_path(self) -> tuple[int, ...]:
        """The tokens of the root-to-leaf path the drafter thinks the verifier most likely to
        accept whole: the leaf of highest ``scores`` (without scores, each node's first child
        down to a leaf)."""
        parents, tokens = self.tree.parents.tolist(), self.tree.token_ids.tolist()
        if not parents:
            return ()
        if self.scores is None:
            node, has_child = ROOT, set(parents)
            while node == ROOT or node in has_child:
                node = parents.index(node)
        else:
            leaves = self.tree.leaves()
            node = max(leaves, key=lambda i: (float(self.scores[i]), -i))  # type: ignore[index]
        return tuple(tokens[i] for i in self.tree.path_to(node))

    def after(self, token: int, budget: DraftBudget) -> DraftProposal | None:
        """The branch under the root's child ``token`` as a tree of its own (rooted at that
        token), cut to ``budget``; None when no child of the root is ``token``.

        The tree is breadth-first, so the branch's nodes in tree order are breadth-first too and
        the cut keeps a prefix of them: it shortens at most one group of siblings, to a prefix of
        its draw order, by a count that depends on the nodes before the group only. Each node keeps
        the children it was drawn with, so verifying the branch is as exact as verifying a tree
        drafted from ``token``."""
        parents, tokens = self.tree.parents.tolist(), self.tree.token_ids.tolist()
        roots = (i for i, (p, t) in enumerate(zip(parents, tokens, strict=True)) if p == ROOT and t == token)
        top = next(roots, None)
        if top is None:
            return None
        place, depth, kept = {top: ROOT}, {top: 0}, list[int]()
        for i in range(top + 1, len(parents)):
            p = parents[i]
            if p in place and depth[p] < budget.max_depth and len(kept) < budget.max_nodes:
                place[i], depth[i] = len(kept), depth[p] + 1
                kept.append(i)
        tree = DraftTree(
            torch.tensor([tokens[i] for i in kept], dtype=torch.long),
            torch.tensor([place[parents[i]] for i in kept], dtype=torch.long),
        )
        probs = None if self.draft_probs is None else self.draft_probs[[top + 1, *(i + 1 for i in kept)]]
        scores = None if self.scores is None else self.scores[kept] - self.scores[top]
        return DraftProposal(self.request_id, tree, probs, scores)


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

    def done(self) -> bool:
        return True
