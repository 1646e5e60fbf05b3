"""The drafter as a separate Ray Serve deployment: the engine's client and the deployment's body.

A draft call carries every request of one planned step. What crosses the link is kept small: a
request's prompt (with its images) is sent only on its first call, releases ride along with a
later call instead of costing a round trip each, and the reply carries the pool's KV use, which
the draft policy reads every step. Each request's part of a call and each proposal is pickled on
its own, so the bytes a request puts on the link are counted exactly. Request ids are namespaced
by engine replica, so several engines share one drafter pool.

Calls go out from a few link threads and the engine does not wait for them until it needs the
trees; the :class:`serve.link.Link` delays each message there. Two calls may be out at once (one
per pipeline group), so a release waits until no call still carries its request: a release can
never overtake the request's draft. A pool that restarted knows no request: it answers those
without their prompt with an empty tree and names them, and the engine sends their prompts again.
"""

from __future__ import annotations

import dataclasses
import pickle
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any

from core.draft import DraftBudget, Drafted, DrafterUnavailable, DraftRequest
from core.prompt import Prompt
from core.sampling import SamplingParams
from drafter_pool.pool import empty_proposal
from scheduler.cost import CostCurve
from serve.holdings import Holdings
from serve.link import NO_LINK, Link

LINK_THREADS = 4  # calls out at once: one per pipeline group, and room for a slow one
RELEASE_BATCH = 16  # releases that go in a call of their own when no draft call takes them
# (the last request the pool holds for an engine is released at once: an idle engine holds nothing)


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
    proposals: tuple[bytes, ...]  # one pickled DraftProposal per call, in order
    kv_used: float  # fraction of the pool's drafter KV blocks in use after this call
    unknown: tuple[int, ...] = ()  # requests sent without a prompt that the pool does not hold


def pack(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


class RemoteDraft:
    """A draft call on its way (:class:`core.protocols.PendingDraft`)."""

    def __init__(self, future: Future[Drafted]) -> None:
        self.future = future

    def result(self, timeout_s: float) -> Drafted:
        try:
            return self.future.result(timeout=timeout_s)
        except FutureTimeout as e:
            raise DrafterUnavailable(f"the drafter pool did not answer within {timeout_s} s") from e

    def done(self) -> bool:
        return self.future.done()


class RemoteDrafter:
    """The engine's :class:`serve.engine_builder.DrafterService` over the DrafterPool handle,
    across ``link``."""

    def __init__(self, handle: Any, link: Link = NO_LINK, timeout_s: float = 5.0, seed: int = 0) -> None:
        self.handle, self.link, self.timeout_s = handle, link, timeout_s
        self.engine_id = uuid.uuid4().hex  # this engine's namespace in the shared pool
        self._lock = threading.Lock()  # the engine's thread and the link threads share what follows
        self._sent: set[int] = set()  # requests whose prompt the pool holds
        self._releases: set[int] = set()  # released, not yet told to the pool
        self._in_flight: Counter[int] = Counter()  # requests in calls not answered yet
        self._adapters: set[str] = set()  # adapters the pool said it has
        self._kv_used = 0.0
        self._rng = random.Random(seed)  # the link's jitter
        self._threads = ThreadPoolExecutor(LINK_THREADS, thread_name_prefix="covspec-link")
        self._releasing: set[Future[None]] = set()  # release-only calls not answered yet

    def submit(self, requests: Sequence[DraftRequest], ahead: bool = False) -> RemoteDraft:
        with self._lock:
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
            ids = [r.request_id for r in requests]
            releases = self._take_releases()
            self._in_flight.update(ids)
            rng = random.Random(self._rng.getrandbits(64))
        payload = [pack(c) for c in calls]
        return RemoteDraft(self._threads.submit(self._call, ids, releases, payload, rng, ahead))

    def _call(
        self, ids: list[int], releases: list[int], payload: list[bytes], rng: random.Random, ahead: bool
    ) -> Drafted:
        """In a link thread: the call across the link and back."""
        start = time.perf_counter()
        try:
            on_link = self.link.carry(sum(map(len, payload)), rng)
            reply: DraftReply = self.handle.propose.remote(self.engine_id, releases, payload, ahead).result(
                timeout_s=self.timeout_s
            )
            on_link += self.link.carry(sum(map(len, reply.proposals)), rng)
        except Exception as e:  # gone, restarting or too slow: the engine decodes plainly
            with self._lock:
                self._sent.difference_update(ids)  # their prompts go again (a known one is ignored)
                self._releases.update(releases)  # telling a pool twice is harmless
            raise DrafterUnavailable(f"the drafter pool did not answer: {e!r}") from e
        finally:
            with self._lock:
                self._in_flight.subtract(ids)
                self._in_flight = +self._in_flight  # drop the zeros
        proposals = tuple(
            dataclasses.replace(pickle.loads(down), bytes_up=len(up), bytes_down=len(down))
            for up, down in zip(payload, reply.proposals, strict=True)
        )
        with self._lock:
            self._sent.update(i for i in ids if i not in self._releases)
            self._sent.difference_update(reply.unknown)
            self._kv_used = reply.kv_used
            idle = self._take_releases() if not self._sent else []
        if idle:  # released while this call carried them, and nothing else is held
            self._send_releases(idle, random.Random(rng.getrandbits(64)))
        return Drafted(proposals, 1000 * (time.perf_counter() - start), 1000 * on_link)

    def release(self, request_id: int) -> None:
        """Told with the next draft call; while the policy drafts nothing, every
        ``RELEASE_BATCH`` releases go in a call of their own, so the pool frees their KV, and so
        does the release of the last request the pool holds for this engine (an idle engine
        leaves nothing behind in the pool)."""
        with self._lock:
            if request_id in self._sent or request_id in self._in_flight:
                self._sent.discard(request_id)
                self._releases.add(request_id)
            due = len(self._releases) >= RELEASE_BATCH or not self._sent
            releases = self._take_releases() if due else []
            rng = random.Random(self._rng.getrandbits(64))
        if releases:
            self._send_releases(releases, rng)

    def _send_releases(self, releases: list[int], rng: random.Random) -> None:
        """``releases`` in a call of their own, from a link thread."""
        future = self._threads.submit(self._release_only, releases, rng)
        with self._lock:
            self._releasing.add(future)
        future.add_done_callback(self._releasing.discard)

    def _release_only(self, releases: list[int], rng: random.Random) -> None:
        try:
            self.link.carry(len(pack(releases)), rng)
            self.handle.propose.remote(self.engine_id, releases, []).result(timeout_s=self.timeout_s)
        except Exception:  # told with a later call instead
            with self._lock:
                self._releases.update(releases)

    def has_adapter(self, name: str) -> bool:
        """Whether the pool has ``name``; True while the pool cannot be asked (the gateway let
        only configured adapters through, and a pool without it drafts with the base drafter)."""
        if name in self._adapters:
            return True
        try:
            known = bool(self.handle.has_adapter.remote(name).result(timeout_s=self.timeout_s))
        except Exception:
            return True
        if known:
            self._adapters.add(name)
        return known

    def check_integrity(self) -> None:
        with self._lock:
            releasing = list(self._releasing)
        futures_wait(releasing, timeout=self.timeout_s)  # the pool is checked after they land
        with self._lock:
            releases = self._take_releases()
        self.handle.check_integrity.remote(self.engine_id, releases).result()

    def kv_used(self) -> float:
        return self._kv_used

    def _take_releases(self) -> list[int]:
        """The releases no call in flight still carries; they go with the next call."""
        ready = sorted(r for r in self._releases if r not in self._in_flight)
        self._releases.difference_update(ready)
        return ready

    def forward_cost(self, tokens: tuple[int, ...]) -> CostCurve:
        curve: CostCurve = self.handle.forward_cost.remote(tokens).result()
        return curve


class DrafterPoolServer:
    """The body of the ``DrafterPool`` deployment: one drafter pool for every engine that calls."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool  # serve.engine_builder.LocalDrafter
        self._lock = threading.Lock()  # Serve runs calls concurrently; the pool is not thread-safe
        self._waiting = 0  # calls (not ahead) waiting for the lock: a call ahead makes way for them
        self._count_lock = threading.Lock()
        self._local: dict[tuple[str, int], int] = {}  # (engine, request) -> the pool's request id
        self._prompts: dict[int, Prompt] = {}
        self._next = 0
        self.engines: set[str] = set()  # engine replicas that called (they share this pool)

    def propose(
        self, engine_id: str, releases: list[int], payload: list[bytes], ahead: bool = False
    ) -> DraftReply:
        """One draft call: ``payload`` holds one pickled :class:`DraftCall` per request. A call
        ``ahead`` (proactive) stops growing its trees as soon as another call waits."""
        calls: list[DraftCall] = [pickle.loads(p) for p in payload]
        self._queue(+1, ahead)
        with self._lock:
            self._queue(-1, ahead)
            self.engines.add(engine_id)
            self._release(engine_id, releases)
            requests = [self._request(engine_id, c) for c in calls]
            stop = (lambda: self._waiting > 0) if ahead else None
            trees = iter(self.pool.propose([r for r in requests if r is not None], stop))
            back, unknown = [], []
            for c, req in zip(calls, requests, strict=True):
                tree = empty_proposal(c.request_id) if req is None else next(trees)
                if req is None:
                    unknown.append(c.request_id)
                dropped = tree.dropped or req is None
                back.append(pack(dataclasses.replace(tree, request_id=c.request_id, dropped=dropped)))
            return DraftReply(tuple(back), self.pool.kv_used(), tuple(unknown))

    def _queue(self, step: int, ahead: bool) -> None:
        if not ahead:
            with self._count_lock:
                self._waiting += step

    def has_adapter(self, name: str) -> bool:
        with self._lock:
            return bool(self.pool.has_adapter(name))

    def check_integrity(self, engine_id: str, releases: list[int]) -> None:
        with self._lock:
            self._release(engine_id, releases)
            self.pool.check_integrity()

    def holdings(self) -> Holdings:
        with self._lock:
            return Holdings.of_drafter(self.pool)

    def forward_cost(self, tokens: tuple[int, ...]) -> CostCurve:
        with self._lock:
            cost: CostCurve = self.pool.forward_cost(tokens)
            return cost

    def _request(self, engine_id: str, call: DraftCall) -> DraftRequest | None:
        """``call`` as the pool's request; None for one it does not hold that came without its
        prompt (the pool restarted since it was sent)."""
        key = (engine_id, call.request_id)
        if key not in self._local:
            if call.prompt is None:
                return None
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
