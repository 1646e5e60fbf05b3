"""Which Engine replica a request goes to: where its prefix KV already is, unless that replica
is much busier than another; among equals, one that already drafts with the caller's adapter.

Every replica reports its load (``EngineServer.record_routing_stats``: requests waiting and
running, KV blocks in use); the router scores each candidate by that load, prefers the replica
a prompt's prefix maps to (rendezvous hashing over the replicas, so the same image + system
prompt of a tenant keeps landing where its KV is cached, and only ~1/N of prefixes move when a
replica comes or goes), and falls back to the least loaded. Ray Serve then takes, within the
first rank, the replica with the shortest queue that accepts the request; a full rank falls
through to the next.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import FIFOMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from core.prompt import Prompt

AFFINITY_SLACK = 4.0  # load units a prefix's replica may exceed the least loaded one by
KV_WEIGHT = 16.0  # load units of a full KV pool (a nearly full replica preempts and recomputes)
PREFIX_TOKENS = 256  # at most this many leading tokens identify a prompt's shareable prefix


@dataclass(frozen=True)
class ReplicaLoad:
    replica_id: str
    waiting: int  # requests queued for KV in its engine
    running: int  # requests holding KV
    kv_used: float  # fraction of its target KV blocks in use
    has_adapter: bool  # already drafts with the caller's adapter

    @property
    def score(self) -> float:
        return self.waiting * 2 + self.running + KV_WEIGHT * self.kv_used


def prefix_key(prompt: Prompt) -> str:
    """What identifies a prompt's reusable prefix for routing: its namespace (tenant, or public
    for a declared public prefix), its images and its tokens up to the last image (or the first
    ``PREFIX_TOKENS`` without images)."""
    ids = prompt.token_ids
    images = [i for i, t in enumerate(ids) if t == prompt.image_token_id]
    end = images[-1] + 1 if images else min(len(ids), PREFIX_TOKENS)
    who = "public" if prompt.public_tokens else f"tenant:{prompt.tenant}"
    h = hashlib.sha256(who.encode())
    h.update(repr(ids[: min(end, PREFIX_TOKENS)]).encode())
    for digest in prompt.digests:
        h.update(digest.encode())
    return h.hexdigest()


def affinity(key: str, replica_id: str) -> int:
    """Rendezvous weight of ``replica_id`` for ``key``: the highest weight owns the prefix."""
    return int.from_bytes(hashlib.sha256(f"{key}|{replica_id}".encode()).digest()[:8], "big")


def rank(replicas: Sequence[ReplicaLoad], key: str | None) -> list[list[str]]:
    """Replica ids in ranks, most preferred first (see the module docstring)."""
    if not replicas:
        return []
    least = min(r.score for r in replicas)
    by_load = sorted(replicas, key=lambda r: (r.score, not r.has_adapter, r.replica_id))
    if key is not None:
        owner = max(replicas, key=lambda r: affinity(key, r.replica_id))
        if owner.score <= least + AFFINITY_SLACK:
            return [[owner.replica_id], [r.replica_id for r in by_load if r is not owner]]
    near = [r for r in by_load if r.score <= least + 1]
    first = [r for r in near if r.has_adapter] or near
    return [[r.replica_id for r in first], [r.replica_id for r in by_load if r not in first]]


class EngineRequestRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """Ray Serve's router for the Engine deployment (``RequestRouterConfig`` names it)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        prompt, adapter = None, ""
        if pending_request is not None:
            first = pending_request.args[0] if pending_request.args else None
            prompt = first if isinstance(first, Prompt) else None
            adapter = pending_request.metadata.multiplexed_model_id or ""
        loads = [load_of(r, adapter) for r in candidate_replicas]
        by_id = {str(r.replica_id): r for r in candidate_replicas}
        ranks = rank(loads, prefix_key(prompt) if prompt is not None else None)
        return [[by_id[i] for i in tier] for tier in ranks if tier]


def load_of(replica: Any, adapter: str) -> ReplicaLoad:
    stats = replica.routing_stats or {}
    return ReplicaLoad(
        replica_id=str(replica.replica_id),
        waiting=int(stats.get("waiting", 0)),
        running=int(stats.get("running", 0)),
        kv_used=float(stats.get("kv_used", 0.0)),
        has_adapter=bool(adapter) and adapter in replica.multiplexed_model_ids,
    )
