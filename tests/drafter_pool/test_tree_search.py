"""TreeGrower on hand-made drafter distributions, driven level by level as the drafter pool does."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from core.draft import DraftBudget
from core.sampling import SamplingParams
from core.tree import ROOT
from drafter_pool.tree_search import TreeGrower, TreeShape

VOCAB = 8
GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0)
QFor = Callable[[TreeGrower, int], torch.Tensor]


def q_of(weights: dict[int, float]) -> torch.Tensor:
    q = torch.zeros(VOCAB)
    for token, weight in weights.items():
        q[token] = weight
    return q


def grow(
    q_for: QFor,
    nodes: int = 16,
    depth: int = 4,
    shape: TreeShape | None = None,
    sampling: SamplingParams = GREEDY,
    seed: int = 0,
    expanded: list[list[int]] | None = None,
) -> TreeGrower:
    """Expand the root, then each frontier until it is empty; ``expanded`` gets each level's frontier."""
    g = TreeGrower(
        DraftBudget(max_nodes=nodes, max_depth=depth),
        shape or TreeShape(width=4, branch_margin=0.5, stop_margin=0.05),
        sampling,
        torch.Generator().manual_seed(seed),
    )
    g.expand(ROOT, q_for(g, ROOT))
    while frontier := g.frontier():
        if expanded is not None:
            expanded.append(frontier)
        for node in frontier:
            g.expand(node, q_for(g, node))
    return g


def confident(g: TreeGrower, node: int) -> torch.Tensor:
    """Margin 0.8: the next token is depth + 1 (1 below the root)."""
    depth = 0 if node == ROOT else g.depth_of(node)
    return q_of({depth + 1: 0.9, 7: 0.1})


def two_way(g: TreeGrower, node: int) -> torch.Tensor:
    """Root: 1 (0.6) or 2 (0.4); below: 3 (0.55) or 4 (0.45); both margins below 0.5."""
    return q_of({1: 0.6, 2: 0.4}) if node == ROOT else q_of({3: 0.55, 4: 0.45})


def test_greedy_chain_when_margins_are_high() -> None:
    tree = grow(confident, nodes=16, depth=3).proposal(7).tree
    assert tree.token_ids.tolist() == [1, 2, 3]
    assert tree.parents.tolist() == [ROOT, 0, 1]


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_chain_depth_is_limited_by_max_depth(depth: int) -> None:
    proposal = grow(confident, nodes=16, depth=depth).proposal(3)
    assert proposal.request_id == 3
    assert proposal.tree.token_ids.tolist() == list(range(1, depth + 1))
    assert proposal.draft_probs is None  # greedy


def test_branches_when_margin_is_low() -> None:
    root = q_of({2: 0.625, 4: 0.375, 6: 0.0})  # margin 0.25
    shape = TreeShape(width=4, branch_margin=0.26, stop_margin=0.0)
    tree = grow(lambda g, n: root, depth=1, shape=shape).proposal(0).tree
    assert tree.token_ids.tolist() == [2, 4]  # top-1 first, then the runner-up
    assert tree.parents.tolist() == [ROOT, ROOT]


@pytest.mark.parametrize("branch_margin", [0.25, 0.0])
def test_no_branch_when_margin_is_not_below_branch_margin(branch_margin: float) -> None:
    root = q_of({2: 0.625, 4: 0.375})  # margin 0.25 exactly
    shape = TreeShape(width=4, branch_margin=branch_margin, stop_margin=0.0)
    tree = grow(lambda g, n: root, depth=1, shape=shape).proposal(0).tree
    assert tree.token_ids.tolist() == [2]


def test_no_runner_up_when_it_has_no_probability() -> None:
    shape = TreeShape(width=4, branch_margin=1.0, stop_margin=0.0)  # every margin is below 1 ...
    tree = grow(lambda g, n: q_of({5: 1.0}), depth=1, shape=shape).proposal(0).tree
    assert tree.token_ids.tolist() == [5]  # ... but a zero-probability runner-up is never drawn


def test_margin_gating_makes_children_leaves() -> None:
    unsure = q_of({1: 0.5, 2: 0.25, 3: 0.25})  # margin 0.25: no branching below 0.1
    budget = DraftBudget(max_nodes=8, max_depth=5)
    g = TreeGrower(budget, TreeShape(4, branch_margin=0.1, stop_margin=0.3), GREEDY, torch.Generator())
    g.expand(ROOT, unsure)
    assert g.frontier() == []  # the root's child may not deepen
    assert g.proposal(0).tree.token_ids.tolist() == [1]
    deep = grow(lambda g, n: unsure, depth=5, shape=TreeShape(4, branch_margin=0.1, stop_margin=0.25))
    assert deep.proposal(0).tree.token_ids.tolist() == [1, 1, 1, 1, 1]  # margin 0.25 is not below


def test_gating_midway_stops_that_branch_only() -> None:
    def q_for(g: TreeGrower, node: int) -> torch.Tensor:
        if node == ROOT:
            return q_of({1: 0.6, 2: 0.4})  # branches: margin 0.2 < 0.5
        if g.token_of(node) == 1:
            return q_of({3: 0.52, 4: 0.48})  # margin 0.04 < stop 0.05: its children are leaves
        return q_of({5: 0.95, 6: 0.05})

    tree = grow(q_for, depth=4).proposal(0).tree
    assert tree.token_ids.tolist() == [1, 2, 3, 4, 5, 5, 5]
    assert tree.parents.tolist() == [ROOT, ROOT, 0, 0, 1, 4, 5]
    assert tree.depths().tolist() == [1, 1, 2, 2, 2, 3, 4]


@pytest.mark.parametrize(
    ("width", "levels"), [(1, [[0], [2]]), (2, [[0, 1], [2, 3]]), (4, [[0, 1], [2, 3, 4, 5]])]
)
def test_width_limits_the_nodes_expanded_per_level(width: int, levels: list[list[int]]) -> None:
    expanded: list[list[int]] = []
    grow(two_way, depth=3, shape=TreeShape(width=width), expanded=expanded)
    # depth-2 scores: 0.6*0.55 (node 2) > 0.6*0.45 (3) > 0.4*0.55 (4) > 0.4*0.45 (5)
    assert expanded == levels


def test_proposal_keeps_best_groups_within_max_nodes() -> None:
    # groups by parent score: root [1, 2]; node 0 (0.6) [3, 4]; node 1 (0.4) [3, 4]; depth 2 ...
    g = grow(two_way, nodes=5, depth=2)
    tree = g.proposal(0).tree
    assert tree.token_ids.tolist() == [1, 2, 3, 4, 3]  # node 1's group keeps a prefix of one
    assert tree.parents.tolist() == [ROOT, ROOT, 0, 0, 1]


@pytest.mark.parametrize("max_nodes", [1, 2, 3, 4, 6, 7, 11, 40])
def test_proposal_respects_the_budget_and_topological_order(max_nodes: int) -> None:
    tree = grow(two_way, nodes=max_nodes, depth=3).proposal(0).tree
    assert tree.num_nodes == min(max_nodes, 2 + 4 + 4 * 2)  # 14 nodes when nothing is cut
    parents = tree.parents.tolist()
    assert all(ROOT <= p < i for i, p in enumerate(parents))
    for parent in {ROOT, *range(tree.num_nodes)}:
        children = [i for i, p in enumerate(parents) if p == parent]
        # siblings keep draw order (greedy: top-1 then runner-up), never just the runner-up
        assert [int(tree.token_ids[c]) for c in children] in ([], [1], [1, 2], [3], [3, 4])


def test_group_cut_keeps_the_first_drawn_even_when_less_likely() -> None:
    both = q_of({1: 0.3, 2: 0.7})  # margin 0.4: two children, drawn in random order
    inverted = 0
    for seed in range(40):
        g = grow(lambda g, n: both, nodes=3, depth=2, sampling=SAMPLED, seed=seed)
        first, second = g.token_of(0), g.token_of(1)  # root's draws, in draw order
        inverted += first == 1
        tree = g.proposal(0).tree
        assert tree.token_ids[:2].tolist() == [first, second]
        # the later-drawn sibling's group never outranks the first one's, even if more likely
        assert tree.parents.tolist() == [ROOT, ROOT, 0]
        assert int(tree.token_ids[2]) == g.token_of(2)  # node 0's first draw, a prefix of its group
    assert inverted > 0  # the less likely token was drawn first at least once


def test_sampling_reports_draft_probs_and_draws_from_their_support() -> None:
    def q_for(g: TreeGrower, node: int) -> torch.Tensor:
        if node == ROOT:
            return q_of({0: 0.4, 3: 0.35, 6: 0.25})
        return q_of({(g.token_of(node) + 1) % VOCAB: 0.5, 5: 0.5})

    for seed in range(20):
        g = grow(q_for, nodes=6, depth=3, sampling=SAMPLED, seed=seed)
        proposal = g.proposal(1)
        tree, probs = proposal.tree, proposal.draft_probs
        assert probs is not None and probs.shape == (tree.num_nodes + 1, VOCAB)
        assert torch.equal(probs[0], q_for(g, ROOT))
        for i, (token, parent) in enumerate(zip(tree.token_ids.tolist(), tree.parents.tolist(), strict=True)):
            assert probs[parent + 1, token] > 0  # drawn from its parent's row
            row = probs[i + 1]
            assert torch.equal(row, torch.zeros(VOCAB)) or torch.equal(
                row, q_of({(token + 1) % 8: 0.5, 5: 0.5})
            )
        children_of_root = tree.token_ids[tree.parents == ROOT].tolist()
        assert len(set(children_of_root)) == len(children_of_root)  # without replacement


def test_leaves_report_zero_rows() -> None:
    g = grow(confident, nodes=8, depth=2, sampling=SAMPLED)
    proposal = g.proposal(0)
    assert proposal.draft_probs is not None
    leaves = proposal.tree.leaves()
    assert proposal.draft_probs[[leaf + 1 for leaf in leaves]].abs().sum() == 0


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED])
def test_single_node_budget_with_a_branching_root(sampling: SamplingParams) -> None:
    g = grow(two_way, nodes=1, depth=1, sampling=sampling, seed=5)
    assert len(g.child_groups[ROOT]) == 2  # the root did branch
    proposal = g.proposal(0)
    assert proposal.tree.token_ids.tolist() == [g.token_of(0)]
    assert proposal.tree.parents.tolist() == [ROOT]
    if sampling is SAMPLED:
        assert proposal.draft_probs is not None and proposal.draft_probs.shape == (2, VOCAB)


def test_scores_are_cumulative_log_probabilities() -> None:
    g = grow(two_way, nodes=16, depth=2)
    assert g.nodes[2].score == pytest.approx(math.log(0.6 * 0.55))
    assert g.nodes[5].score == pytest.approx(math.log(0.4 * 0.45))


@pytest.mark.parametrize(
    "options", [{"width": 0}, {"branch_margin": -0.1}, {"branch_margin": 1.5}, {"stop_margin": 2.0}]
)
def test_invalid_shapes_are_rejected(options: dict) -> None:
    with pytest.raises(ValueError):
        TreeShape(**options)
