"""The gateway's admission slots: a tenant over its share waits for its own slots (in order), never
delays another tenant, and is refused after its wait; a full server refuses at once; nothing is
lost when a waiter leaves or the server stops."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from serve.tenant_slots import NoSlot, RetryTickets, TenantSlots


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_request_over_its_share_waits_and_takes_its_tenants_next_free_slot_in_order() -> None:
    async def scenario() -> None:
        slots = TenantSlots(capacity=8, share=2, wait_s=5)
        await slots.acquire("flood")
        await slots.acquire("flood")
        first = asyncio.create_task(slots.acquire("flood"))
        second = asyncio.create_task(slots.acquire("flood"))
        await settle()
        assert not first.done() and not second.done() and slots.waiting() == 2
        slots.release("flood")
        await settle()
        assert first.done() and not second.done()  # the oldest waiter, and only it
        assert slots.in_flight == {"flood": 2}  # the slot changed hands
        slots.release("flood")
        await second
        assert slots.in_flight == {"flood": 2} and slots.waiting() == 0

    run(scenario)


def test_another_tenant_never_waits_behind_a_flooding_one() -> None:
    async def scenario() -> None:
        slots = TenantSlots(capacity=8, share=2, wait_s=5)
        for _ in range(2):
            await slots.acquire("flood")
        waiters = [asyncio.create_task(slots.acquire("flood")) for _ in range(20)]
        await settle()
        await asyncio.wait_for(slots.acquire("quiet"), timeout=0.1)
        assert slots.in_flight == {"flood": 2, "quiet": 1}
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert slots.waiting() == 0

    run(scenario)


def test_a_waiter_is_refused_with_429_after_its_wait_and_holds_nothing() -> None:
    async def scenario() -> None:
        slots = TenantSlots(capacity=8, share=1, wait_s=0.05)
        await slots.acquire("flood")
        with pytest.raises(NoSlot) as refused:
            await slots.acquire("flood")
        assert refused.value.status == 429 and "0.05 s" in refused.value.message
        assert slots.in_flight == {"flood": 1} and slots.waiting() == 0
        slots.release("flood")
        assert slots.total() == 0

    run(scenario)


def test_without_a_wait_a_request_over_its_share_is_refused_at_once() -> None:
    async def scenario() -> None:
        slots = TenantSlots(capacity=8, share=1, wait_s=0)
        await slots.acquire("flood")
        with pytest.raises(NoSlot) as refused:
            await slots.acquire("flood")
        assert refused.value.status == 429 and slots.waiting() == 0

    run(scenario)


def test_a_full_server_refuses_with_503_at_once() -> None:
    async def scenario() -> None:
        slots = TenantSlots(capacity=2, share=2, wait_s=5)
        await slots.acquire("a")
        await slots.acquire("b")
        with pytest.raises(NoSlot) as refused:
            await asyncio.wait_for(slots.acquire("c"), timeout=0.1)
        assert refused.value.status == 503 and slots.total() == 2

    run(scenario)


def test_a_waiter_that_leaves_gives_back_a_slot_granted_as_it_left() -> None:
    async def scenario() -> None:
        slots = TenantSlots(capacity=8, share=1, wait_s=5)
        await slots.acquire("flood")
        leaving = asyncio.create_task(slots.acquire("flood"))
        staying = asyncio.create_task(slots.acquire("flood"))
        await settle()
        slots.release("flood")  # granted to the first waiter ...
        leaving.cancel()  # ... which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await asyncio.wait_for(staying, timeout=1)  # the slot went on to the next waiter
        assert slots.in_flight == {"flood": 1} and slots.waiting() == 0

    run(scenario)


def test_closing_refuses_the_waiters_and_everyone_after_with_503() -> None:
    async def scenario() -> None:
        slots = TenantSlots(capacity=8, share=1, wait_s=5)
        await slots.acquire("flood")
        waiter = asyncio.create_task(slots.acquire("flood"))
        await settle()
        slots.close("the server is stopping")
        for attempt in (waiter, slots.acquire("quiet")):
            with pytest.raises(NoSlot) as refused:
                await attempt
            assert refused.value.status == 503 and "stopping" in refused.value.message
        slots.release("flood")  # the running one finishes
        assert slots.total() == 0

    run(scenario)


def test_clients_refused_by_a_full_server_are_told_to_come_back_one_per_freed_slot() -> None:
    """Slots free every 0.5 s: ten refused clients are spread over five seconds, in order, instead
    of all coming back a second later."""
    tickets = RetryTickets(floor_s=1)
    for second in range(8):
        tickets.freed(now=second / 2)
    assert [tickets.ticket(now=4.0) for _ in range(10)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert tickets.ticket(now=100.0) == 1  # the line has gone by: back to the floor


def test_retry_after_tickets_stay_within_their_floor_and_ceiling() -> None:
    tickets = RetryTickets(floor_s=2, ceiling_s=10)
    assert tickets.ticket(now=0.0) == 2  # no release measured yet
    tickets.freed(now=0.0)
    tickets.freed(now=30.0)  # one slot every 30 s
    assert tickets.ticket(now=30.0) == 10


def test_a_full_server_hands_out_its_tickets_with_the_503() -> None:
    async def scenario() -> None:
        now = [0.0]
        slots = TenantSlots(capacity=2, share=2, wait_s=5, retry_after_s=1, clock=lambda: now[0])
        await slots.acquire("a")
        await slots.acquire("b")
        for t in (0.0, 3.0, 6.0):  # the server is full, and a slot frees every 3 s
            now[0] = t
            slots.release("a")
            await slots.acquire("a")
        waits = []
        for _ in range(3):
            with pytest.raises(NoSlot) as refused:
                await slots.acquire("c")
            waits.append(refused.value.retry_after_s)
        assert waits == [3, 6, 9]

    run(scenario)


def test_an_idle_spell_does_not_stretch_the_tickets() -> None:
    tickets = RetryTickets(floor_s=1)
    for second in range(8):
        tickets.freed(now=second / 2)
    tickets.freed(now=3600.0, full=False)  # the first release after an idle hour
    assert tickets.ticket(now=3600.0) == 1
