"""Grow one request's draft tree level by level from the drafter's distributions.

EAGLE-2-style dynamic trees with two confidence rules:

- **parallel branching**: where the drafter's top-1 minus top-2 probability (the *margin*) at a
  node is below ``branch_margin``, the runner-up becomes a second child;
- **margin gating**: where the margin is below ``stop_margin``, the node's children are leaves
  (a branch is not deepened past a point where the drafter is guessing).

Each level expands the ``width`` best nodes of the newest depth by cumulative draft
log-probability. At the end a global rerank keeps the best nodes within the budget.

Exactness for sampling. Children are drawn from ``q`` without replacement (the second child from
``q`` with the first removed), and every decision about *how many* children a node has is made
before they are drawn: it depends on the node's own margin and score, never on its children's
tokens. So the rerank ranks a node's children as one group by the parent's score, and cuts a
group only to a prefix of its draw order. Recursive rejection at each node then sees children
drawn exactly as it assumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.draft import DraftBudget, DraftProposal
from core.sampling import SamplingParams
from core.tree import ROOT, DraftTree


@dataclass(frozen=True)
class TreeShape:
    """Drafting knobs that do not change per step (the budget does)."""

    width: int = 4  # nodes expanded per depth level
    branch_margin: float = 0.5  # margin below this: the runner-up becomes a sibling (0 = never)
    stop_margin: float = 0.05  # margin below this: the node's children are not deepened (0 = never)

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if not 0 <= self.stop_margin <= 1 or not 0 <= self.branch_margin <= 1:
            raise ValueError("margins must lie in [0, 1]")


@dataclass
class _Node:
    token: int
    parent: int  # index into TreeGrower.nodes, or ROOT
    depth: int  # 1 for children of the root
    score: float  # cumulative draft log-probability, made non-increasing along paths and siblings
    deepen: bool  # whether this node may get children


class TreeGrower:
    """One request's tree under construction; the drafter pool feeds it one level at a time."""

    def __init__(
        self, budget: DraftBudget, shape: TreeShape, sampling: SamplingParams, generator: torch.Generator
    ) -> None:
        self.budget, self.shape, self.sampling, self.generator = budget, shape, sampling, generator
        self.nodes: list[_Node] = []
        self.child_groups: dict[int, list[int]] = {}  # parent (or ROOT) -> children, draw order
        self.probs: dict[int, torch.Tensor] = {}  # parent (or ROOT) -> q its children came from
        self._newest: list[int] = []

    def expand(self, parent: int, q: torch.Tensor) -> None:
        """Add ``parent``'s children drawn from ``q`` [vocab] (ROOT for the root)."""
        self.expand_rows([parent], q[None])

    def expand_rows(self, parents: list[int], q: torch.Tensor) -> None:
        """Add each parent's children drawn from its row of ``q`` [len(parents), vocab]; the
        top-2 of all rows come from one ``topk``, read back to Python once."""
        top = torch.topk(q, 2, dim=-1)
        for parent, row, (p1, p2), pair in zip(
            parents, q, top.values.tolist(), top.indices.tolist(), strict=True
        ):
            margin = p1 - p2
            count = 2 if margin < self.shape.branch_margin and p2 > 0 else 1
            tokens = pair[:count] if self.sampling.greedy else self._draw(row, count)
            known = {pair[0]: p1, pair[1]: p2}
            depth = 1 if parent == ROOT else self.nodes[parent].depth + 1
            deepen = margin >= self.shape.stop_margin and depth < self.budget.max_depth
            score = 0.0 if parent == ROOT else self.nodes[parent].score
            self.probs[parent] = row
            group = self.child_groups.setdefault(parent, [])
            for token in tokens:
                prob = known[token] if token in known else float(row[token])
                own = score + math.log(max(prob, 1e-30))
                if group:
                    own = min(own, self.nodes[group[-1]].score)
                group.append(len(self.nodes))
                self._newest.append(len(self.nodes))
                self.nodes.append(_Node(token, parent, depth, own, deepen))

    def frontier(self) -> list[int]:
        """The nodes to expand next (best ``width`` of the newest ones that may deepen); clears
        the newest list. Empty when the tree is done."""
        ready = [i for i in self._newest if self.nodes[i].deepen]
        self._newest = []
        return sorted(ready, key=lambda i: (-self.nodes[i].score, i))[: self.shape.width]

    def with_ancestors(self, nodes: list[int]) -> list[int]:
        """``nodes`` and all their ancestors, in node order (topological)."""
        keep: set[int] = set()
        for node in nodes:
            while node != ROOT and node not in keep:
                keep.add(node)
                node = self.nodes[node].parent
        return sorted(keep)

    def depth_of(self, node: int) -> int:
        return self.nodes[node].depth

    def token_of(self, node: int) -> int:
        return self.nodes[node].token

    def subtree(self, nodes: list[int]) -> DraftTree:
        """The tree of ``nodes`` (ancestor-closed, parents before children), renumbered 0..n-1."""
        index = {node: i for i, node in enumerate(nodes)}
        parents = [ROOT if self.nodes[n].parent == ROOT else index[self.nodes[n].parent] for n in nodes]
        return DraftTree(
            token_ids=torch.tensor([self.nodes[n].token for n in nodes], dtype=torch.long),
            parents=torch.tensor(parents, dtype=torch.long),
        )

    def proposal(self, request_id: int) -> DraftProposal:
        """The final tree: children groups by their parent's score, best first, within max_nodes
        (a group that does not fit keeps a prefix of its draw order)."""
        order = self._breadth_first(self._select_groups())
        tree = self.subtree(order)
        scores = torch.tensor([self.nodes[i].score for i in order], dtype=torch.float32)
        if self.sampling.greedy:
            return DraftProposal(request_id, tree, scores=scores)
        rows = [ROOT, *order]
        vocab = self.probs[ROOT].shape[0]
        zeros = torch.zeros(vocab)
        draft_probs = torch.stack([self.probs.get(r, zeros) for r in rows])
        return DraftProposal(request_id, tree, draft_probs, scores=scores)

    def _draw(self, q: torch.Tensor, count: int) -> list[int]:
        first = int(torch.multinomial(q, 1, generator=self.generator))
        if count == 1:
            return [first]
        rest = q.clone()
        rest[first] = 0.0
        return [first, int(torch.multinomial(rest / rest.sum(), 1, generator=self.generator))]

    def _select_groups(self) -> set[int]:
        def priority(parent: int) -> tuple[float, int, int]:
            if parent == ROOT:
                return (0.0, 0, ROOT)
            return (-self.nodes[parent].score, self.nodes[parent].depth, parent)

        kept: set[int] = set()
        room = self.budget.max_nodes
        for parent in sorted(self.child_groups, key=priority):
            group = self.child_groups[parent]
            if parent == ROOT or parent in kept:
                # a prefix of the draw order; its length depends only on better-scored groups
                kept.update(group[:room])
                room -= len(group[:room])
        return kept

    def _breadth_first(self, kept: set[int]) -> list[int]:
        """Kept nodes by depth, then by parent's place, then in draw order (siblings stay in the
        order they were drawn, which recursive rejection relies on)."""
        order: list[int] = []
        level = [c for c in self.child_groups.get(ROOT, []) if c in kept]
        while level:
            order.extend(level)
            level = [c for p in level for c in self.child_groups.get(p, []) if c in kept]
        return order
