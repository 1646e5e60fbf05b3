"""Exploration: which neighbour of the best budget a decode step tries, and how often."""

from __future__ import annotations

import pytest

from scheduler.policy.exploration import Exploration

RATES = {(0, 0): 1.0, (2, 2): 1.5, (4, 4): 2.0, (8, 8): 1.2}  # best (4, 4)


def _never_measured(key: tuple[int, int]) -> int:
    return 0


def _picks(exploration: Exploration, steps: range, measured=_never_measured) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    return [exploration.pick(s, (4, 4), RATES, measured) for s in steps]


def test_only_every_nth_decode_step_explores_taking_the_neighbours_in_turn() -> None:
    picks = _picks(Exploration(every=4), range(1, 17))
    tried = {s: p for s, p in zip(range(1, 17), picks, strict=True) if p != (4, 4)}
    assert tried == {4: (8, 8), 8: (2, 2), 12: (8, 8), 16: (2, 2)}


def test_never_exploring_always_gives_the_best() -> None:
    assert set(_picks(Exploration(every=0), range(1, 50))) == {(4, 4)}


def test_the_choice_depends_on_the_step_not_on_how_often_it_was_asked() -> None:
    exploration = Exploration(every=2)
    assert _picks(exploration, range(1, 9)) == _picks(exploration, range(1, 9))


def test_a_measured_neighbour_predicted_far_worse_is_not_tried() -> None:
    measured = lambda key: 100  # noqa: E731
    picks = _picks(Exploration(every=2, margin=0.3, backoff=1), range(1, 41), measured)
    assert (8, 8) not in picks  # 1.2 < 0.7 * 2.0
    assert (2, 2) in picks  # 1.5 >= 1.4


def test_a_neighbour_never_checked_at_this_load_is_tried_however_bad_its_prediction() -> None:
    picks = _picks(Exploration(every=2, margin=0.3), range(1, 41))
    assert (8, 8) in picks


@pytest.mark.parametrize(("steps", "spacing"), [(0, 1), (4, 1), (7, 1), (8, 2), (12, 4), (16, 8), (400, 8)])
def test_a_well_measured_neighbour_is_tried_on_ever_fewer_of_its_turns(steps: int, spacing: int) -> None:
    assert Exploration(measured_steps=4, backoff=8).spacing(steps) == spacing


def test_backoff_thins_a_measured_neighbours_tries() -> None:
    measured = lambda key: 16  # noqa: E731  (three doublings past 4: every 8th turn)
    tries = {}
    for backoff in (1, 8):
        picks = _picks(Exploration(every=2, margin=1.0, backoff=backoff), range(1, 129), measured)
        tries[backoff] = sum(p != (4, 4) for p in picks)
    assert tries == {1: 64, 8: 8}


@pytest.mark.parametrize("options", [{"every": -1}, {"margin": 1.5}, {"backoff": 0}, {"measured_steps": 0}])
def test_exploration_validation(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="invalid exploration"):
        Exploration(**options)  # type: ignore[arg-type]
