"""The proactive gate sends proactive calls where the steps after them wait less for their trees."""

from __future__ import annotations

import pytest

from scheduler.foresight import ProactiveGate


def _run(gate: ProactiveGate, wait_ms: dict[bool, float], chances: int) -> list[bool]:
    choices = []
    for _ in range(chances):
        sent = gate.send()
        choices.append(sent)
        gate.learn(sent, wait_ms[sent])
    return choices


def test_an_untried_gate_sends() -> None:
    assert ProactiveGate().send()


def test_the_gate_keeps_sending_where_steps_after_a_call_wait_less() -> None:
    choices = _run(ProactiveGate(probe_every=8), {True: 2.0, False: 7.0}, 64)
    assert choices.count(False) == 8  # only the probes
    assert all(not c for i, c in enumerate(choices, 1) if i % 8 == 0)


def test_the_gate_stops_sending_where_calls_ahead_do_not_pay_and_still_probes() -> None:
    choices = _run(ProactiveGate(probe_every=8), {True: 8.0, False: 7.0}, 64)
    assert choices[:7] == [True] * 7 and not choices[7]  # the first probe tries declining
    assert choices[8:].count(True) == 7  # from then on it sends on the probes only


def test_the_gate_turns_around_when_acceptance_changes() -> None:
    gate = ProactiveGate(probe_every=4)
    _run(gate, {True: 9.0, False: 7.0}, 40)
    assert not gate.preferred
    choices = _run(gate, {True: 1.0, False: 7.0}, 40)  # the guesses start coming true
    assert gate.preferred and choices[-8:].count(False) == 2  # the probes only


def test_a_gate_that_never_probes_always_sends() -> None:
    assert all(_run(ProactiveGate(probe_every=0), {True: 9.0, False: 1.0}, 20))


@pytest.mark.parametrize(("probe_every", "decay"), [(1, 0.9), (-2, 0.9), (8, 0.0), (8, 1.5)])
def test_bad_gate_settings_are_refused(probe_every: int, decay: float) -> None:
    with pytest.raises(ValueError, match="probe_every"):
        ProactiveGate(probe_every, decay)
