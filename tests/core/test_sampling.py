"""SamplingParams validation, and the distribution probs_from_logits hands both models."""

from __future__ import annotations

import math

import pytest
import torch

from core.sampling import SamplingParams, probs_from_logits


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
        ({"temperature": math.nan}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_k": -1}, r"top_k must be >= 0 \(0 = off\), got -1"),
        ({"stop": ("end", "")}, "stop strings must be non-empty"),
    ],
)
def test_invalid_parameters_are_rejected(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


def test_boundary_values_are_accepted() -> None:
    params = SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, stop=("x",))
    assert params.greedy
    assert not SamplingParams(temperature=1e-3).greedy


def test_greedy_gives_the_one_hot_of_the_argmax() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, -3.0, 0.0, 4.0]])
    probs = probs_from_logits(logits, SamplingParams(temperature=0.0))
    assert probs.dtype == torch.float32
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def test_greedy_ties_go_to_the_lowest_token_id() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0]])
    probs = probs_from_logits(logits, SamplingParams())
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]]


def test_greedy_ignores_top_k_and_top_p() -> None:
    logits = torch.tensor([[1.0, 4.0, 2.0]])
    probs = probs_from_logits(logits, SamplingParams(top_k=2, top_p=0.1))
    assert probs.tolist() == [[0.0, 1.0, 0.0]]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_divides_the_logits_before_softmax(temperature: float) -> None:
    logits = [[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0]]
    expected = []
    for row in logits:  # softmax(logits / T) by hand
        weights = [math.exp(x / temperature) for x in row]
        expected.append([w / sum(weights) for w in weights])
    probs = probs_from_logits(torch.tensor(logits), SamplingParams(temperature=temperature))
    torch.testing.assert_close(probs, torch.tensor(expected))


def test_half_precision_logits_give_float32_probabilities() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float16)
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.tensor([[0.25, 0.75]]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_keeps_exactly_the_k_most_likely_tokens(k: int) -> None:
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.0, 0.0], [4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=k))
    kept = [set(row.nonzero().flatten().tolist()) for row in probs]
    assert kept == [set([1, 3, 0][:k]), set(range(k))]  # row 0 ranks tokens 1, 3, 0, 4, 2
    # the survivors keep their relative weights: softmax over the k best logits only
    best = logits[1, :k]
    torch.testing.assert_close(probs[1, :k], torch.softmax(best, -1))


def test_top_k_at_or_above_vocab_size_keeps_everything() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    full = probs_from_logits(logits, SamplingParams(temperature=1.0))
    assert torch.equal(probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=3)), full)
    assert torch.equal(probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=50)), full)
    assert bool((full > 0).all())


def test_top_p_keeps_the_smallest_prefix_that_reaches_p() -> None:
    # probabilities 0.1, 0.5, 0.25, 0.15 (token order); sorted: 0.5, 0.25, 0.15, 0.1
    logits = torch.tensor([[0.1, 0.5, 0.25, 0.15]]).log()
    # 0.5 alone does not reach 0.7, 0.5 + 0.25 does: tokens 1 and 2, renormalised to 2/3, 1/3
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(probs, torch.tensor([[0.0, 2 / 3, 1 / 3, 0.0]]))
    # 0.5 alone already reaches 0.45: the top token only
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.45))
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    # 0.9 needs three tokens (0.5 + 0.25 + 0.15)
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.9))
    torch.testing.assert_close(probs, torch.tensor([[0.0, 0.5, 0.25, 0.15]]) / 0.9)


def test_top_p_applies_per_row() -> None:
    logits = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]).log()
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.75))
    torch.testing.assert_close(probs, torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 0.0, 1.0]]))


def test_top_k_then_top_p_on_the_renormalised_survivors() -> None:
    # top_k=3 keeps 0.4, 0.3, 0.2 (renormalised to 4/9, 3/9, 2/9); top_p=0.7 then needs 4/9 + 3/9
    logits = torch.tensor([[0.4, 0.1, 0.3, 0.2]]).log()
    probs = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.7))
    torch.testing.assert_close(probs, torch.tensor([[4 / 7, 0.0, 3 / 7, 0.0]]))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=4),
        SamplingParams(temperature=1.0, top_p=0.3),
        SamplingParams(temperature=0.9, top_k=5, top_p=0.8),
    ],
)
def test_rows_are_distributions(params: SamplingParams) -> None:
    logits = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)) * 3
    probs = probs_from_logits(logits, params)
    assert bool((probs >= 0).all())
    torch.testing.assert_close(probs.sum(-1), torch.ones(16))
    # the most likely token always survives
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
