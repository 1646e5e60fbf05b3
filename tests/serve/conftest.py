"""Shared by the serving tests: built once per session, random-weight target and drafters and the
real Ray Serve application on the shipped tiny models; a stand-in for Ray's metrics API."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from models.synthetic import RandomLlavaSpec, build_random_llava
from models.tiny.personas import get_persona
from scheduler.async_engine import AsyncEngine
from serve import metrics as metrics_module
from serve.auth import KeyStore, add_key
from serve.engine_builder import BuiltEngine, EngineOptions, build_engine
from serve.engine_client import LocalEngineClient
from serve.gateway import Gateway, GatewayConfig, make_app
from serve.local_redis import LocalRedis, start_redis
from serve.openai.images import ImageLimits
from serve.settings import PrefixCacheSettings, ServeSettings
from tests.serve.engine_helpers import Oracle, noisy_copy
from tests.serve.http_helpers import serving

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``target`` and three drafters for it: ``unrelated`` (another random model, almost nothing
    accepted), ``noisy`` (the target with noise, partly accepted) and ``same`` (all accepted)."""
    root = tmp_path_factory.mktemp("engine")
    target = build_random_llava(root / "target", RandomLlavaSpec(seed=1))
    unrelated = RandomLlavaSpec(seed=2, hidden_size=32, num_layers=1)
    return {
        "target": target,
        "unrelated": build_random_llava(root / "unrelated", unrelated),
        "noisy": noisy_copy(target, root / "noisy", scale=0.05, seed=3),
        "same": target,
    }


@pytest.fixture(scope="session")
def oracle(folders: dict[str, Path]) -> Oracle:
    return Oracle(folders["target"])


@dataclass(frozen=True)
class RayApp:
    url: str  # http://127.0.0.1:<port>: Gateway + Engine (drafter inside the engine)
    # <url>/pool: Gateway + Engine + DrafterPool (the drafter as its own deployment, pipelined,
    # across a link with a round trip and jitter)
    pool_url: str
    keys: dict[str, str]  # user -> API key
    redis: LocalRedis  # the prefix-KV Redis both applications share
    settings: ServeSettings  # of the application at ``url``


@pytest.fixture(scope="session")
def ray_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayApp]:
    """The real Ray Serve application on the shipped tiny models (one local Ray and one Redis for
    the session)."""
    import ray
    from ray import serve

    from serve.auth import add_key
    from serve.deployments import build_app
    from serve.local_redis import free_port
    from serve.settings import DeploymentSettings, DrafterPoolSettings, LinkSettings

    keys_file = tmp_path_factory.mktemp("ray-keys") / "keys.yaml"
    keys = {u: add_key(keys_file, u, f"t-{u}", u) for u in ("alice", "bob")}
    redis = start_redis()
    settings = ServeSettings(
        prefix_cache=PrefixCacheSettings(redis_url=redis.url),
        keys_file=keys_file,
        policy="fixed",
        engine=DeploymentSettings(num_cpus=0.5),
        gateway=DeploymentSettings(num_cpus=0.2),
    )
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings.model_dump(mode="json")), name="covspec", route_prefix="/")
        link = LinkSettings(rtt_ms=2.0, jitter_ms=2.0)  # calls overtake each other
        pool = DrafterPoolSettings(num_cpus=0.5, link=link, timeout_s=2.0)
        # fixed: every step drafts, so a test sees the pool's work (load_aware rightly drafts
        # little across a process hop on 2 cores; its calibration over the link is tested in
        # test_remote_drafter.py)
        pooled = settings.model_copy(update={"drafter_pool": pool})
        serve.run(build_app(pooled.model_dump(mode="json")), name="covspec-pool", route_prefix="/pool")
        yield RayApp(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/pool", keys, redis, settings)
    finally:
        serve.shutdown()
        ray.shutdown()
        redis.stop()


@dataclass
class Recorded:
    name: str
    values: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def inc(self, value: float = 1, tags: dict[str, str] | None = None) -> None:
        self.values.append((value, tags or {}))

    observe = set = inc


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, Recorded]:
    made: dict[str, Recorded] = {}

    def make(name: str, **_: Any) -> Recorded:
        made[name] = Recorded(name)
        return made[name]

    fake = SimpleNamespace(Counter=make, Gauge=make, Histogram=make)
    monkeypatch.setattr(metrics_module, "_metrics", lambda: fake)
    return made


GATEWAY_USERS = ("alice", "bob")


@dataclass
class Server:
    """The gateway over HTTP (uvicorn in a thread) with an in-process engine on the shipped tiny
    models; one per test module."""

    url: str
    keys: dict[str, str]  # user -> API key
    built: BuiltEngine
    gateway: Gateway
    responses: list[tuple[int, str | None]]  # (status, tenant) of every chat response, as metrics see them


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys = {user: add_key(keys_file, user, tenant=f"t-{user}", adapter=user) for user in GATEWAY_USERS}
    adapters = tuple((u, CHECKPOINTS / "adapters" / u) for u in GATEWAY_USERS)
    built = build_engine(
        CHECKPOINTS / "tiny-target",
        CHECKPOINTS / "tiny-drafter",
        EngineOptions(policy="fixed", adapters=adapters),
    )
    engine = AsyncEngine(built.engine)
    config = GatewayConfig(
        adapters=frozenset(GATEWAY_USERS),
        image_limits=ImageLimits(max_images=2, max_bytes=200_000, max_pixels=256 * 256),
        max_body_bytes=400_000,
        max_in_flight=8,
        public_system_prompts=frozenset({get_persona(None).system}),
    )
    responses: list[tuple[int, str | None]] = []
    gateway = Gateway(
        LocalEngineClient(engine), built.processor, KeyStore.load(keys_file), config,
        record=lambda status, tenant: responses.append((status, tenant)),
    )  # fmt: skip
    with serving(make_app(gateway)) as url:
        yield Server(url, keys, built, gateway, responses)
    engine.shutdown()
