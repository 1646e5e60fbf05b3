"""Which draft-tree nodes the target accepts, and the one token it adds of its own.

Row 0 of the target's distributions belongs to the root (the last verified token); row ``i + 1``
to tree node ``i``. Walking down from the root, the target either accepts one child of the
current node or stops; it then emits one more token, sampled (or argmax'd) from what is left.

- Greedy: a child is accepted iff its token is the target's argmax at the parent; among
  siblings the first in node order wins; ``argmax`` breaks ties toward the lowest token id, so
  the output equals plain greedy decoding of the target token for token.
- Sampling: multi-candidate recursive rejection sampling (SpecInfer). Child ``x`` drafted from
  ``q`` is accepted with probability ``min(1, p(x) / q(x))``; on rejection ``p`` becomes the
  normalised residual ``max(p - q, 0)`` and, since siblings are drafted without replacement,
  ``q`` loses ``x``. The emitted tokens are distributed exactly as the target's own samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.tree import ROOT, DraftTree


@dataclass(frozen=True)
class Acceptance:
    accepted: tuple[int, ...]  # tree node indices, root-to-leaf order
    bonus_token: int  # the target's own token after the accepted path

    def tokens(self, tree: DraftTree) -> list[int]:
        """Every token this step emits: the accepted draft tokens, then the bonus token."""
        return [int(tree.token_ids[i]) for i in self.accepted] + [self.bonus_token]


def children_of(tree: DraftTree) -> dict[int, list[int]]:
    """Parent (``ROOT`` for the root) -> children in node order."""
    kids: dict[int, list[int]] = {ROOT: []}
    for node, parent in enumerate(tree.parents.tolist()):
        kids.setdefault(parent, []).append(node)
    return kids


def accept_greedy(tree: DraftTree, target_logits: torch.Tensor) -> Acceptance:
    """``target_logits`` [num_nodes + 1, vocab]: row 0 for the root, row i + 1 for node i."""
    kids, tokens = children_of(tree), tree.token_ids.tolist()
    best = target_logits.argmax(dim=-1).tolist()  # ties -> lowest token id
    node, accepted = ROOT, []
    while True:
        want = best[node + 1]
        match = next((c for c in kids.get(node, []) if tokens[c] == want), None)
        if match is None:
            return Acceptance(tuple(accepted), want)
        accepted.append(match)
        node = match


def accept_sampled(
    tree: DraftTree,
    target_probs: torch.Tensor,  # [num_nodes + 1, vocab] float, rows sum to 1
    draft_probs: torch.Tensor,  # [num_nodes + 1, vocab] the distribution each node's children came from
    generator: torch.Generator,
) -> Acceptance:
    """Recursive rejection sampling over the tree; exact for without-replacement siblings."""
    kids, tokens = children_of(tree), tree.token_ids.tolist()
    node, accepted = ROOT, []
    while True:
        p, q = target_probs[node + 1].double().clone(), draft_probs[node + 1].double().clone()
        chosen = None
        for child in kids.get(node, []):
            x = tokens[child]
            ratio = 1.0 if q[x] <= 0 else min(1.0, float(p[x] / q[x]))
            if float(torch.rand((), generator=generator, dtype=torch.float64)) < ratio:
                chosen = child
                break
            p = _normalised((p - q).clamp_min(0.0), fallback=p)
            q[x] = 0.0
            q = _normalised(q, fallback=q)
        if chosen is None:
            return Acceptance(tuple(accepted), int(torch.multinomial(p, 1, generator=generator)))
        accepted.append(chosen)
        node = chosen


def _normalised(x: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    total = float(x.sum())
    return x / total if total > 0 else fallback
