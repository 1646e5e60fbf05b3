"""Engine replica choice: prefix affinity within a load slack, else the least loaded, adapter
holders first among equals."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

from core.prompt import Prompt
from serve.routing import AFFINITY_SLACK, EngineRequestRouter, ReplicaLoad, prefix_key, rank

IMAGE = 3


def prompt(question: tuple[int, ...], tenant: str = "acme", digest: str = "aa", public: int = 0) -> Prompt:
    from PIL import Image

    ids = (1, 50, 51, 52, IMAGE, *question)  # system tokens, the image, the question
    return Prompt(ids, (Image.new("RGB", (4, 4)),), IMAGE, (digest,), tenant=tenant, public_tokens=public)


def idle(name: str, **kw: object) -> ReplicaLoad:
    return ReplicaLoad(
        **{"replica_id": name, "waiting": 0, "running": 0, "kv_used": 0.0, "has_adapter": False, **kw}
    )  # type: ignore[arg-type]


def test_the_same_image_and_system_prompt_of_a_tenant_share_a_key() -> None:
    assert prefix_key(prompt((7, 8))) == prefix_key(prompt((9,)))
    assert prefix_key(prompt((7,), tenant="globex")) != prefix_key(prompt((7,)))
    assert prefix_key(prompt((7,), digest="bb")) != prefix_key(prompt((7,)))
    assert prefix_key(prompt((7,), tenant="globex", public=4)) == prefix_key(prompt((7,), public=4))


def test_a_prefix_keeps_its_replica_and_prefixes_spread_over_replicas() -> None:
    replicas = [idle(f"r{i}") for i in range(4)]
    owners = [rank(replicas, f"key-{k}")[0] for k in range(200)]
    assert all(len(first) == 1 for first in owners)
    assert owners[:10] == [rank(list(reversed(replicas)), f"key-{k}")[0] for k in range(10)]
    counts = {r.replica_id: sum(first == [r.replica_id] for first in owners) for r in replicas}
    assert all(c >= 20 for c in counts.values()), counts


def test_removing_a_replica_moves_only_its_own_prefixes() -> None:
    replicas = [idle(f"r{i}") for i in range(4)]
    before = {k: rank(replicas, f"key-{k}")[0][0] for k in range(200)}
    after = {k: rank(replicas[:3], f"key-{k}")[0][0] for k in range(200)}
    assert all(after[k] == before[k] for k in before if before[k] != "r3")


def test_a_busy_prefix_owner_gives_way_to_the_least_loaded() -> None:
    replicas = [idle(f"r{i}") for i in range(3)]
    owner = rank(replicas, "key")[0][0]
    near = [
        dataclasses.replace(r, running=int(AFFINITY_SLACK)) if r.replica_id == owner else r for r in replicas
    ]
    assert rank(near, "key")[0] == [owner]  # within the slack: affinity wins
    busy = [dataclasses.replace(r, running=20) if r.replica_id == owner else r for r in replicas]
    first, rest = rank(busy, "key")
    assert owner not in first and rest[-1] == owner


def test_kv_pressure_counts_as_load() -> None:
    replicas = [idle("a", kv_used=0.9), idle("b", kv_used=0.1)]
    assert rank(replicas, None)[0] == ["b"]


def test_without_a_prefix_the_adapter_holder_wins_among_equals() -> None:
    replicas = [idle("a"), idle("b", has_adapter=True), idle("c", running=5, has_adapter=True)]
    assert rank(replicas, None) == [["b"], ["a", "c"]]
    assert rank([idle("a"), idle("b")], None) == [["a", "b"], []]
    assert rank([], "key") == []


def test_the_ray_router_ranks_real_replica_records() -> None:
    def replica(name: str, running: int, models: set[str]) -> SimpleNamespace:
        return SimpleNamespace(
            replica_id=name, routing_stats={"running": running, "waiting": 0, "kv_used": 0.0},
            multiplexed_model_ids=models,
        )  # fmt: skip

    replicas = [replica("a", 9, set()), replica("b", 0, {"bob"}), replica("c", 0, set())]
    pending = SimpleNamespace(args=[object()], metadata=SimpleNamespace(multiplexed_model_id="bob"))
    ranks = asyncio.run(EngineRequestRouter.choose_replicas(None, replicas, pending))  # type: ignore[arg-type]
    assert [[r.replica_id for r in tier] for tier in ranks] == [["b"], ["c", "a"]]
    with_prompt = SimpleNamespace(args=[prompt((7,))], metadata=SimpleNamespace(multiplexed_model_id=""))
    ranks = asyncio.run(EngineRequestRouter.choose_replicas(None, replicas, with_prompt))  # type: ignore[arg-type]
    assert len(ranks[0]) == 1 and ranks[0][0].replica_id in {"b", "c"}  # a is beyond the slack
