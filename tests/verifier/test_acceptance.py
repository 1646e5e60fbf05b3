"""Tree acceptance on fixed logits, and a distribution test of speculative sampling."""

from __future__ import annotations

import itertools

import pytest
import torch

from core.tree import DraftTree
from verifier.acceptance import accept_greedy, accept_sampled

VOCAB = 6


def _logits(best: list[int]) -> torch.Tensor:
    """One row per (root, node...): the argmax of row r is best[r]."""
    rows = torch.zeros(len(best), VOCAB)
    for r, token in enumerate(best):
        rows[r, token] = 5.0
    return rows


def _tree(tokens: list[int], parents: list[int]) -> DraftTree:
    return DraftTree(torch.tensor(tokens), torch.tensor(parents))


def test_all_accepted_then_bonus_from_the_leaf() -> None:
    tree = _tree([1, 2, 3], [-1, 0, 1])  # a chain
    result = accept_greedy(tree, _logits([1, 2, 3, 4]))
    assert result.accepted == (0, 1, 2)
    assert result.tokens(tree) == [1, 2, 3, 4]


def test_first_rejected_emits_the_target_token_only() -> None:
    tree = _tree([1, 2], [-1, 0])
    result = accept_greedy(tree, _logits([5, 2, 0]))
    assert result.accepted == ()
    assert result.tokens(tree) == [5]


def test_branch_choice_follows_the_target() -> None:
    #        root
    #       /    \
    #   0:(1)   1:(2)
    #     |       |
    #   2:(3)   3:(4)
    tree = _tree([1, 2, 3, 4], [-1, -1, 0, 1])
    result = accept_greedy(tree, _logits([2, 0, 4, 0, 5]))
    assert result.accepted == (1, 3)
    assert result.bonus_token == 5


def test_first_matching_sibling_wins() -> None:
    tree = _tree([3, 3, 1], [-1, -1, 1])  # two siblings with the same token; only node 1 has a child
    result = accept_greedy(tree, _logits([3, 0, 1, 2]))
    assert result.accepted == (0,)  # node 0 comes first, even though node 1 would go deeper
    assert result.bonus_token == 0


def test_empty_tree_is_plain_decoding() -> None:
    tree = _tree([], [])
    assert accept_greedy(tree, _logits([4])).tokens(tree) == [4]


def test_ties_break_toward_the_lowest_token_id() -> None:
    tree = _tree([2, 4], [-1, -1])
    logits = torch.zeros(3, VOCAB)
    logits[0, [2, 4]] = 1.0  # tokens 2 and 4 tie at the root
    assert accept_greedy(tree, logits).accepted == (0,)
    logits[0, 1] = 1.0  # now 1, 2 and 4 tie: 1 is the target's greedy token, no child has it
    assert accept_greedy(tree, logits).tokens(tree) == [1]


def _target_table(seed: int) -> dict[tuple[int, ...], torch.Tensor]:
    """p(next | prefix) for prefixes of length 0..2 over a 4-token vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    table = {}
    for n in range(3):
        for prefix in itertools.product(range(4), repeat=n):
            table[prefix] = torch.softmax(torch.randn(4, generator=gen) * 1.5, dim=0)
    return table


def test_speculative_sampling_reproduces_the_target_distribution() -> None:
    """Joint distribution of the first two emitted tokens vs the target's, chi-square."""
    target = _target_table(1)
    draft = {
        k: torch.softmax(torch.log(v) * 0.3 + torch.randn(4) * 0.5, dim=0)
        for k, v in _target_table(2).items()
    }
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4)
    trials = 10000
    for _ in range(trials):
        # two children of the root, two children under each, drafted without replacement
        first = torch.multinomial(draft[()], 2, replacement=False, generator=gen).tolist()
        tokens, parents = list(first), [-1, -1]
        for i, t in enumerate(first):
            second = torch.multinomial(draft[(t,)], 2, replacement=False, generator=gen).tolist()
            tokens += second
            parents += [i, i]
        tree = _tree(tokens, parents)
        paths = [()] + [tuple(tokens[j] for j in tree.path_to(n)) for n in range(tree.num_nodes)]
        p = torch.stack([target[path] for path in paths])
        q = torch.stack([draft[path] for path in paths])
        emitted = accept_sampled(tree, p, q, gen).tokens(tree)
        if len(emitted) == 1:  # the next step would sample the second token from the target
            emitted.append(int(torch.multinomial(target[(emitted[0],)], 1, generator=gen)))
        counts[emitted[0], emitted[1]] += 1
    expected = torch.stack([target[()][a] * target[(a,)] for a in range(4)]) * trials
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7  # 15 degrees of freedom, p = 0.001


def test_siblings_drafted_without_replacement_keep_the_target_marginal() -> None:
    """Three root candidates from a draft far from the target: the first token must still follow p."""
    p, q = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.6, 0.3, 0.07, 0.03])
    gen = torch.Generator().manual_seed(0)
    trials, counts = 20000, torch.zeros(4)
    for _ in range(trials):
        tree = _tree(torch.multinomial(q, 3, replacement=False, generator=gen).tolist(), [-1, -1, -1])
        counts[accept_sampled(tree, torch.stack([p] * 4), torch.stack([q] * 4), gen).tokens(tree)[0]] += 1
    chi2 = float(((counts - p * trials) ** 2 / (p * trials)).sum())
    assert chi2 < 16.27  # 3 degrees of freedom, p = 0.001


@pytest.mark.parametrize("seed", range(3))
def test_sampling_with_identical_draft_accepts_everything(seed: int) -> None:
    tree = _tree([0, 1, 2], [-1, 0, 1])
    probs = torch.softmax(torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(seed)), dim=-1)
    # p == q: every drafted token has acceptance probability min(1, p/q) = 1
    result = accept_sampled(tree, probs, probs, torch.Generator().manual_seed(seed))
    assert result.accepted == (0, 1, 2)
