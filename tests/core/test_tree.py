from __future__ import annotations

import pytest
import torch

from core.tree import DraftTree


def _tree() -> DraftTree:
    #   root -> 0 -> 2 -> 4
    #        \      \-> 3
    #         -> 1 -> 5
    return DraftTree(torch.arange(6) + 10, torch.tensor([-1, -1, 0, 0, 2, 1]))


def test_depths_count_from_the_root_children() -> None:
    assert _tree().depths().tolist() == [1, 1, 2, 2, 3, 2]


def test_ancestor_mask_allows_self_and_ancestors_only() -> None:
    mask = _tree().ancestor_mask()
    assert mask[4].nonzero().flatten().tolist() == [0, 2, 4]
    assert mask[5].nonzero().flatten().tolist() == [1, 5]
    assert not mask[3, 2]  # siblings never see each other


def test_paths_and_leaves() -> None:
    tree = _tree()
    assert tree.path_to(4) == [0, 2, 4]
    assert tree.leaves() == [3, 4, 5]


def test_parent_after_child_is_rejected() -> None:
    with pytest.raises(ValueError, match="parents must satisfy"):
        DraftTree(torch.tensor([1, 2]), torch.tensor([1, -1]))


def test_mismatched_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="must be equal 1-D shapes"):
        DraftTree(torch.tensor([1, 2]), torch.tensor([-1]))


def test_ancestor_mask_of_a_chain_is_lower_triangular_and_empty_tree_is_empty() -> None:
    chain = DraftTree(torch.arange(4), torch.tensor([-1, 0, 1, 2]))
    assert torch.equal(chain.ancestor_mask(), torch.ones(4, 4, dtype=torch.bool).tril())
    empty = DraftTree(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    assert empty.ancestor_mask().shape == (0, 0)


def test_parent_below_root_is_rejected() -> None:
    with pytest.raises(ValueError, match="parents must satisfy"):
        DraftTree(torch.tensor([1, 2]), torch.tensor([-1, -2]))
