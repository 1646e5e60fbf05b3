"""What one draft call asks of the drafter pool: it keeps a request's KV only as far as the call's
output tokens agree with the previous call's (a guessed path that did not come true is dropped
and recomputed, never reused), and a call told to stop ends its trees where they are."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.draft import DraftBudget, DraftRequest
from core.sampling import SamplingParams
from serve.engine_builder import EngineOptions, LocalDrafter, build_drafter
from tests.serve.engine_helpers import Oracle

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
BUDGET = DraftBudget(max_nodes=6, max_depth=4)


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle(CHECKPOINTS / "tiny-target")


def _drafter(oracle: Oracle) -> LocalDrafter:
    return build_drafter(CHECKPOINTS / "tiny-drafter", oracle.processor.tokenizer, EngineOptions())


def _tree(drafter: LocalDrafter, oracle: Oracle, outputs: tuple[int, ...]) -> list[int]:
    prompt = oracle.prompt("what color is the square?", None, None)
    (proposal,) = drafter.propose([DraftRequest(0, prompt, outputs, BUDGET, SamplingParams())])
    drafter.check_integrity()
    return proposal.tree.token_ids.tolist()


@pytest.mark.parametrize(
    "guess",
    [(40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56), (30, 31, 99), (30,)],
    ids=["long-wrong-guess", "right-then-wrong", "a-prefix-of-the-truth"],
)
def test_a_tree_after_a_guess_that_did_not_come_true_is_the_fresh_pools(
    oracle: Oracle, guess: tuple[int, ...]
) -> None:
    truth = (30, 31, 32, 33)
    fresh = _drafter(oracle)
    expected = _tree(fresh, oracle, truth)
    drafter = _drafter(oracle)
    _tree(drafter, oracle, (30,))
    _tree(drafter, oracle, guess)  # a proactive call: a path not verified yet
    assert _tree(drafter, oracle, truth) == expected
    assert drafter.states[0].outputs == truth
    assert drafter.pool.num_free_blocks == fresh.pool.num_free_blocks  # the guess's blocks came back
    drafter.release(0)
    assert drafter.num_free_blocks == drafter.pool.num_blocks


def test_the_same_outputs_twice_recompute_only_the_root(oracle: Oracle) -> None:
    drafter = _drafter(oracle)
    first = _tree(drafter, oracle, (30, 31))
    assert _tree(drafter, oracle, (30, 31)) == first


def test_a_call_told_to_stop_returns_its_trees_as_grown_so_far(oracle: Oracle) -> None:
    prompt = oracle.prompt("what color is the square?", None, None)
    request = DraftRequest(0, prompt, (374, 358), BUDGET, SamplingParams())  # the target's first two
    (whole,) = _drafter(oracle).propose([request])
    drafter = _drafter(oracle)
    (cut,) = drafter.propose([request], stop=lambda: True)  # before the first level below the root
    assert set(cut.tree.parents.tolist()) == {-1} and whole.tree.depths().max() > 1
    assert cut.tree.token_ids.tolist() == whole.tree.token_ids[whole.tree.parents == -1].tolist()
    drafter.check_integrity()


def test_a_held_request_asked_for_a_tree_after_no_output_is_refused(oracle: Oracle) -> None:
    drafter = _drafter(oracle)
    _tree(drafter, oracle, ())
    with pytest.raises(ValueError, match="after an output token"):
        _tree(drafter, oracle, ())
