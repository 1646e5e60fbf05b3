"""The gateway's admission: at most ``capacity`` requests in flight, one tenant at most ``share``.

A request over its tenant's share waits in that tenant's queue rather than bouncing: a refused
client comes back, and every refusal crosses the HTTP proxy and the gateway with its body, so on a
small machine the refusals of a flooding tenant alone can take the cores the engine needs. A
waiting request costs only its open connection. Each slot the tenant frees goes to its oldest
waiter; a waiter still waiting after ``wait_s`` is refused (429 with ``Retry-After``). Other
tenants never wait behind it: their requests take their own slots at once. A request that finds
the whole server full is refused at once (503): it would wait behind everyone, and the refusal
tells a load balancer to try another replica. Its ``Retry-After`` is a ticket
(:class:`RetryTickets`): the refused clients are lined up as if they queued, each told to come
back when a slot should be free for it, so they return about one per freed slot instead of all
at once a second later.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import Callable


class NoSlot(Exception):
    """No slot for the request: ``status`` 503 (server full or stopping) or 429 (tenant's share);
    ``retry_after_s``: when to come back (None: the server's usual ``Retry-After``)."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after_s = status, message, retry_after_s


class RetryTickets:
    """``Retry-After`` for requests refused by a full server. Slots free up at a measured rate (a
    decayed mean of the time between releases while the server is full: an idle spell says
    nothing of how fast a full one drains); each refusal takes the next free-up time after the
    last one handed out, so refused clients come back spread out, in the order they came.
    Between ``floor_s`` and ``ceiling_s``."""

    def __init__(self, floor_s: int, ceiling_s: int = 60, decay: float = 0.9) -> None:
        self.floor_s, self.ceiling_s, self.decay = floor_s, ceiling_s, decay
        self._interval_s: float | None = None  # mean time between two releases
        self._released_at: float | None = None
        self._line_ends_at = 0.0  # the time the last refused client was told to come back

    def freed(self, now: float, full: bool = True) -> None:
        """A slot was given back at ``now``; ``full``: every slot was taken until then."""
        if self._released_at is not None and full:
            gap = now - self._released_at
            self._interval_s = (
                gap if self._interval_s is None else self.decay * self._interval_s + (1 - self.decay) * gap
            )
        self._released_at = now

    def ticket(self, now: float) -> int:
        """Seconds until a slot should be free for one more refused client."""
        self._line_ends_at = max(self._line_ends_at, now) + (self._interval_s or 0.0)
        return max(self.floor_s, min(self.ceiling_s, math.ceil(self._line_ends_at - now)))


class TenantSlots:
    def __init__(
        self,
        capacity: int,
        share: int,
        wait_s: float,
        retry_after_s: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1 or not 1 <= share <= capacity or wait_s < 0:
            raise ValueError(f"invalid slots: capacity {capacity}, share {share}, wait {wait_s} s")
        self.capacity, self.share, self.wait_s = capacity, share, wait_s
        self.tickets, self.clock = RetryTickets(retry_after_s), clock
        self.in_flight: Counter[str] = Counter()  # tenants holding slots, and how many
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self.closed: str | None = None  # why nothing is admitted any more (None: open)

    def total(self) -> int:
        return self.in_flight.total()

    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    async def acquire(self, tenant: str) -> None:
        """A slot for ``tenant``, now or after waiting for one of its own; ``NoSlot`` otherwise."""
        if self.closed is not None:
            raise NoSlot(503, self.closed)
        if self.total() >= self.capacity:
            raise NoSlot(503, "the server is at capacity; retry shortly", self.tickets.ticket(self.clock()))
        queue = self._waiting.setdefault(tenant, deque())
        if self.in_flight[tenant] < self.share and not queue:
            self.in_flight[tenant] += 1
            return
        over = f"your tenant already has {self.share} requests running, its share of this server"
        if self.wait_s == 0:
            raise NoSlot(429, f"{over}; retry shortly")
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(granted)
        try:
            await asyncio.wait({granted}, timeout=self.wait_s)
        except asyncio.CancelledError:  # the client left while waiting
            self._withdraw(tenant, granted)
            raise
        if not granted.done():
            self._withdraw(tenant, granted)
            raise NoSlot(429, f"{over}, and none came free within {self.wait_s:g} s; retry shortly")
        granted.result()  # raises NoSlot when the slots were closed meanwhile

    def release(self, tenant: str) -> None:
        """Give ``tenant``'s slot back: to its oldest waiter, if it has one."""
        self.tickets.freed(self.clock(), full=self.total() >= self.capacity)
        queue = self._waiting.get(tenant)
        if queue:  # (none once closed: closing refused every waiter)
            queue.popleft().set_result(None)  # the slot changes hands
            return
        self.in_flight[tenant] -= 1
        if not self.in_flight[tenant]:
            del self.in_flight[tenant]  # the counter holds tenants with slots only
        if queue is not None and not queue:
            del self._waiting[tenant]

    def close(self, reason: str) -> None:
        """Admit nothing from now on: new requests and every waiter get ``NoSlot(503, reason)``."""
        self.closed = reason
        for queue in self._waiting.values():
            for waiter in queue:
                waiter.set_exception(NoSlot(503, reason))
        self._waiting.clear()

    def _withdraw(self, tenant: str, granted: asyncio.Future[None]) -> None:
        """A waiter leaves: out of the queue, or, had it just been given a slot, the slot back."""
        if granted.done() and not granted.cancelled() and granted.exception() is None:
            self.release(tenant)
            return
        queue = self._waiting.get(tenant)
        if queue is not None and granted in queue:
            queue.remove(granted)
        granted.cancel()
