"""A tree's likeliest path and the branch under one of its root's children (proactive drafting)."""

from __future__ import annotations

import torch

from core.draft import DraftBudget, DraftProposal
from core.tree import ROOT, DraftTree

# root -> 10 (a) and 11 (b); a -> 12 (c) and 13 (d); b -> 14 (e); c -> 15 (f)
TOKENS = [10, 11, 12, 13, 14, 15]
PARENTS = [ROOT, ROOT, 0, 0, 1, 2]
SCORES = [-0.1, -0.9, -0.3, -1.5, -1.0, -0.8]


def proposal(scores: list[float] | None = SCORES, probs: bool = False) -> DraftProposal:
    tree = DraftTree(torch.tensor(TOKENS), torch.tensor(PARENTS))
    rows = torch.arange(7, dtype=torch.float32)[:, None].expand(7, 5).clone() if probs else None
    return DraftProposal(3, tree, rows, None if scores is None else torch.tensor(scores))


def test_likeliest_path_ends_at_the_best_scored_leaf() -> None:
    assert proposal().likeliest_path() == (10, 12, 15)  # leaf f (-0.8) beats e (-1.0) and d
    shallow = [-0.1, -0.2, -0.3, -1.5, -0.3, -0.8]
    assert proposal(shallow).likeliest_path() == (11, 14)


def test_without_scores_the_likeliest_path_follows_first_children() -> None:
    assert proposal(None).likeliest_path() == (10, 12, 15)


def test_an_empty_tree_has_no_path() -> None:
    empty = torch.empty(0, dtype=torch.long)
    assert DraftProposal(0, DraftTree(empty, empty.clone())).likeliest_path() == ()


def test_the_branch_under_a_root_child_is_rerooted_with_its_rows_and_scores() -> None:
    branch = proposal(probs=True).after(10, DraftBudget(8, 8))
    assert branch is not None
    assert branch.tree.token_ids.tolist() == [12, 13, 15]
    assert branch.tree.parents.tolist() == [ROOT, ROOT, 0]
    assert branch.draft_probs is not None  # row 0: a's (node 0, row 1); then c, d, f
    assert branch.draft_probs[:, 0].tolist() == [1.0, 3.0, 4.0, 6.0]
    assert branch.scores is not None
    assert torch.allclose(branch.scores, torch.tensor([-0.2, -1.4, -0.7]))


def test_the_branch_is_cut_to_the_budget_breadth_first() -> None:
    branch = proposal().after(10, DraftBudget(max_nodes=2, max_depth=8))
    assert branch is not None and branch.tree.token_ids.tolist() == [12, 13]
    shallow = proposal().after(10, DraftBudget(max_nodes=8, max_depth=1))
    assert shallow is not None and shallow.tree.token_ids.tolist() == [12, 13]


def test_a_token_no_root_child_holds_has_no_branch() -> None:
    assert proposal().after(12, DraftBudget(8, 8)) is None  # a grandchild, not a root child
    leaf = proposal().after(11, DraftBudget(8, 8))
    assert leaf is not None and leaf.tree.token_ids.tolist() == [14]
