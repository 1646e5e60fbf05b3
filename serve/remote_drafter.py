"""The drafter as a separate Ray Serve deployment: the engine's client and the deployment's body.

Each engine step calls the DrafterPool deployment once, with every request that gets a tree.
What crosses the wire is kept small: a request's prompt (with its images) is sent only on its
first call, releases ride along with the next call instead of costing a round trip each, and the
reply carries the pool's KV use, which the draft policy reads every step. Request ids are
namespaced by engine replica, so several engines can share one drafter pool.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.draft import DraftBudget, DraftProposal, DraftRequest
from core.prompt import Prompt
from core.sampling import SamplingParams
from scheduler.cost import CostCurve


@dataclass(frozen=True)
class DraftCall:
    """A :class:`core.draft.DraftRequest` on the wire; ``prompt`` only on the request's first call."""

    request_id: int
    prompt: Prompt | None
    output_ids: tuple[int, ...]
    budget: DraftBudget
    sampling: SamplingParams
    adapter: str | None


@dataclass(frozen=True)
class DraftReply:
    proposals: tuple[DraftProposal, ...]  # one per call, in order
    kv_used: float  # fraction of the pool's drafter KV blocks in use after this call


class RemoteDrafter:
    """The engine's :class:`serve.engine_builder.DrafterService` over the DrafterPool handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.engine_id = uuid.uuid4().hex  # this engine's namespace in the shared pool
        self._sent: set[int] = set()  # requests whose prompt the pool holds
        self._releases: list[int] = []
        self._kv_used = 0.0

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        calls = [
            DraftCall(
                r.request_id,
                None if r.request_id in self._sent else r.prompt,
                r.output_ids,
                r.budget,
                r.sampling,
                r.adapter,
            )
            for r in requests
        ]
        reply: DraftReply = self.handle.propose.remote(self.engine_id, self._take_releases(), calls).result()
        self._sent.update(r.request_id for r in requests)
        self._kv_used = reply.kv_used
        return list(reply.proposals)

    def release(self, request_id: int) -> None:
        if request_id in self._sent:
            self._sent.discard(request_id)
            self._releases.append(request_id)

    def has_adapter(self, name: str) -> bool:
        return bool(self.handle.has_adapter.remote(name).result())

    def check_integrity(self) -> None:
        self.handle.check_integrity.remote(self.engine_id, self._take_releases()).result()

    def kv_used(self) -> float:
        return self._kv_used

    def _take_releases(self) -> list[int]:
        """The releases not yet told to the pool; they go with the next call."""
        releases, self._releases = self._releases, []
        return releases

    def forward_cost(self, tokens: tuple[int, ...]) -> CostCurve:
        curve: CostCurve = self.handle.forward_cost.remote(tokens).result()
        return curve


class DrafterPoolServer:
    """The body of the ``DrafterPool`` deployment: one drafter pool for every engine that calls."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool  # serve.engine_builder.LocalDrafter
        self._lock = threading.Lock()  # Serve may run calls concurrently; the pool is not thread-safe
        self._local: dict[tuple[str, int], int] = {}  # (engine, request) -> the pool's request id
        self._prompts: dict[int, Prompt] = {}
        self._next = 0

    def propose(self, engine_id: str, releases: list[int], calls: list[DraftCall]) -> DraftReply:
        with self._lock:
            self._release(engine_id, releases)
            requests = [self._request(engine_id, c) for c in calls]
            proposals = self.pool.propose(requests)
            back = tuple(
                dataclasses.replace(p, request_id=c.request_id) for p, c in zip(proposals, calls, strict=True)
            )
            return DraftReply(back, self.pool.kv_used())

    def has_adapter(self, name: str) -> bool:
        with self._lock:
            return bool(self.pool.has_adapter(name))

    def check_integrity(self, engine_id: str, releases: list[int]) -> None:
        with self._lock:
            self._release(engine_id, releases)
            self.pool.check_integrity()

    def forward_cost(self, tokens: tuple[int, ...]) -> CostCurve:
        with self._lock:
            cost: CostCurve = self.pool.forward_cost(tokens)
            return cost

    def _request(self, engine_id: str, call: DraftCall) -> DraftRequest:
        key = (engine_id, call.request_id)
        if key not in self._local:
            if call.prompt is None:
                raise ValueError(
                    f"engine {engine_id} sent request {call.request_id} without its prompt first"
                )
            self._local[key] = self._next
            self._prompts[self._next] = call.prompt
            self._next += 1
        local = self._local[key]
        return DraftRequest(
            local, self._prompts[local], call.output_ids, call.budget, call.sampling, call.adapter
        )

    def _release(self, engine_id: str, request_ids: list[int]) -> None:
        for rid in request_ids:
            local = self._local.pop((engine_id, rid), None)
            if local is not None:
                self._prompts.pop(local, None)
                self.pool.release(local)
