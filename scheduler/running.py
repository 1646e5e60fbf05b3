"""Every live request, in the order it arrived: the waiting queue and the running list.

A request is waiting (no KV: new, or preempted with its output kept for recomputation) or
running (it holds KV blocks); it leaves both, and the registry, when it finishes. When KV blocks
run out, the newest running request is preempted and goes back to the front of the queue, so
the oldest requests keep their progress and no request is lost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from kvcache.block_pool import BlockPool, IntegrityError
from kvcache.sequence_blocks import SequenceBlocks
from scheduler.request import RequestState, Status


class RunningSet:
    def __init__(self, pool: BlockPool, on_release: Callable[[int], None]) -> None:
        self.pool = pool
        self.on_release = on_release  # told when a request's KV is dropped (the drafter frees its own)
        self.waiting: deque[RequestState] = deque()  # oldest first
        self.running: list[RequestState] = []  # in admission order
        self.requests: dict[int, RequestState] = {}  # every waiting or running request

    def add(self, req: RequestState) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def emptiest_group(self, groups: int) -> int:
        """The group with the fewest live requests (the lowest on a tie)."""
        sizes = [0] * groups
        for r in self.requests.values():
            sizes[r.group] += 1
        return min(range(groups), key=sizes.__getitem__)

    def admit(self, req: RequestState, blocks: SequenceBlocks) -> None:
        """Move a waiting ``req`` to the running list with the KV ``blocks`` it starts from."""
        self.waiting.remove(req)
        req.blocks, req.status = blocks, Status.RUNNING
        self.running.append(req)

    def reserve_or_preempt(self, req: RequestState, n: int) -> bool:
        """Reserve ``n`` KV entries for running ``req``, preempting the newest requests of its
        group until they fit (another group's requests may be in a step on its way); False when
        ``req`` itself had to be preempted."""
        assert req.blocks is not None
        while not req.blocks.can_reserve(n):
            victim = next(r for r in reversed(self.running) if r.group == req.group)
            self.preempt(victim)
            if victim is req:
                return False
        req.blocks.reserve(n)
        return True

    def preempt(self, req: RequestState) -> None:
        """Free running ``req``'s KV and queue it first: it is recomputed when admitted again."""
        self._release(req)
        self.running.remove(req)
        req.status, req.fetched = Status.WAITING, False  # it asks the prefix cache again
        req.preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: RequestState) -> None:
        """End ``req`` (waiting or running): its KV freed, gone from the registry."""
        if req.status is Status.WAITING:
            self.waiting.remove(req)
        elif req.status is Status.RUNNING:
            self._release(req)
            self.running.remove(req)
        req.status = Status.FINISHED
        self.requests.pop(req.request_id, None)

    def check_integrity(self) -> None:
        """Raise ``IntegrityError`` unless every used block belongs to a running request and
        the registry is exactly the waiting and running requests."""
        self.pool.check_integrity()
        held: set[int] = set()
        for req in self.running:
            if req.blocks is None or req.status is not Status.RUNNING:
                raise IntegrityError(f"running request {req.request_id} has no blocks")
            req.blocks.check_integrity()
            held.update(req.blocks.blocks)
        used = self.pool.num_blocks - self.pool.num_free_blocks
        if len(held) != used:
            raise IntegrityError(f"{used} blocks in use but running requests hold {len(held)}")
        if any(r.blocks is not None or r.status is not Status.WAITING for r in self.waiting):
            raise IntegrityError("a waiting request holds blocks")
        live = {r.request_id for r in (*self.waiting, *self.running)}
        if live != set(self.requests) or len(live) != len(self.waiting) + len(self.running):
            raise IntegrityError("the registry differs from the waiting and running requests")

    def _release(self, req: RequestState) -> None:
        assert req.blocks is not None
        req.blocks.release()
        req.blocks = None
        self.on_release(req.request_id)
