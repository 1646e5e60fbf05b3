"""The Ray Serve deployments: ``Engine`` (scheduler, KV, verifier and drafter with the users'
adapters) and ``Gateway`` (the FastAPI ingress), composed with a deployment handle.

The engine replica runs its step loop in a thread (``AsyncEngine``); the gateway streams a
request's outputs from it through the handle, and cancelling that stream (a client hung up)
cancels the replica's generator, which aborts the request there. Requests carry their adapter as
Ray Serve's multiplexed model id: the router prefers engine replicas already drafting with it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from core.plan import RequestOutput
from core.prompt import Prompt
from core.sampling import SamplingParams
from scheduler.engine import Completion
from serve.holdings import Holdings
from serve.metrics import AdapterMetrics, EngineMetrics, GatewayMetrics
from serve.settings import DeploymentSettings, ServeSettings
from serve.trainer import TrainerServer


def use_cpus(num_cpus: float) -> None:
    """Torch threads = the CPUs Ray gave this replica (replicas that each grab every core slow
    each other down)."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def engine_options(settings: ServeSettings, placement: DeploymentSettings) -> Any:
    """The engine (or drafter pool) options of a replica placed as ``placement`` says: its
    models run on the GPU Ray gave it when it asks for any (``num_gpus`` > 0), else on its CPUs."""
    from scheduler.engine import DRAFT_TIMEOUT_S
    from serve.engine_builder import EngineOptions

    cache, pool, learning = settings.prefix_cache, settings.drafter_pool, settings.online_learning
    return EngineOptions(
        policy=settings.policy, dtype=settings.dtype, max_batch_tokens=settings.max_batch_tokens,
        device="cuda" if placement.num_gpus > 0 else "cpu",
        adapters=settings.adapter_folders(), prefix_cache=cache.enabled,
        redis_url=cache.redis_url or os.environ.get("REDIS_URL"),
        pipeline=settings.pipeline, proactive=settings.proactive,
        draft_timeout_s=pool.timeout_s if pool else DRAFT_TIMEOUT_S,
        learned_dir=learning.dir if learning.enabled else None, learned_poll_s=learning.poll_s,
    )  # fmt: skip


class EngineServer:
    """The body of the ``Engine`` deployment (plain class: testable without Ray). With a
    ``drafter`` handle the drafter runs in the DrafterPool deployment, else in this replica."""

    def __init__(
        self,
        settings: ServeSettings,
        drafter: DeploymentHandle | None = None,
        trainer: DeploymentHandle | None = None,  # the AdapterTrainer (online learning), if on
    ) -> None:
        from drafter_pool.samples import SampleStore
        from scheduler.async_engine import AsyncEngine
        from serve.engine_builder import build_engine
        from serve.metrics import LearningMetrics
        from serve.remote_drafter import RemoteDrafter

        use_cpus(settings.engine.num_cpus)
        options = engine_options(settings, settings.engine)
        if drafter is None or settings.drafter_pool is None:
            self.built = build_engine(settings.target, settings.drafter, options)
        else:  # building calls the pool (cost calibration); a blocking handle call may not run on
            # the replica's event loop, where Serve runs this constructor
            pool = settings.drafter_pool
            remote = RemoteDrafter(drafter, pool.link.model(), pool.timeout_s)
            with ThreadPoolExecutor(1) as thread:
                self.built = thread.submit(build_engine, settings.target, None, options, remote).result()
        self.engine = AsyncEngine(self.built.engine)
        self.metrics = EngineMetrics()
        learning = settings.online_learning
        # bound here so that Serve runs the trainer with the app; the sample store is their interface
        self.trainer = trainer
        self.samples = SampleStore(learning.dir, learning.max_samples) if learning.enabled else None
        self.learning_metrics = LearningMetrics() if learning.enabled else None
        threading.Thread(target=self._sample_metrics, name="covspec-metrics", daemon=True).start()

    @serve.multiplexed(max_num_models_per_replica=16)
    async def adapter_in_use(self, adapter: str) -> str:
        """Tells Ray Serve's router that this replica drafts with ``adapter`` now, so the same
        user's next requests prefer it (adapter affinity); the registry does the real loading."""
        return adapter

    async def stream(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        adapter: str | None,
        whole: bool = False,
        learn: bool = False,
    ) -> AsyncIterator[RequestOutput | Completion]:
        """The request's outputs (``whole``: its ``Completion`` only: every item crosses to the
        gateway's process, and a caller waiting for the whole answer needs one). With ``learn``
        a finished answer is kept as a sample of ``adapter``'s user (online learning)."""
        if adapter is not None:
            await self.adapter_in_use(adapter)
        async for item in self.engine.stream(prompt, sampling, adapter=adapter, learn=learn):
            if isinstance(item, Completion):
                self.metrics.finished(item)
                if learn and adapter is not None:
                    await self._keep(prompt, adapter, item)
            elif whole:
                continue
            yield item

    async def _keep(self, prompt: Prompt, adapter: str, completion: Completion) -> None:
        """``completion`` as a sample of ``adapter``'s user, in the user's tenant (an answer cut
        short by an abort or an error teaches nothing)."""
        if self.samples is None or completion.finish_reason not in ("stop", "length"):
            return
        await asyncio.to_thread(self.samples.add, prompt.tenant, adapter, prompt, completion.token_ids)
        if self.learning_metrics is not None and completion.stats.verify_steps:
            self.learning_metrics.tau.observe(completion.stats.tau, tags={"user": adapter})

    def _sample_metrics(self, period_s: float = 1.0) -> None:
        """Queue, KV, batch and adapter gauges, read from the engine every ``period_s``."""
        while self.engine.alive:
            self.metrics.sample(self.built.engine.snapshot, self.built.adapters)
            time.sleep(period_s)

    async def alive(self) -> bool:
        return self.engine.alive

    def record_routing_stats(self) -> dict[str, float]:
        """What the Engine deployment's router balances on (``serve/routing.py``), from the
        snapshot the step loop published last."""
        snapshot = self.built.engine.snapshot
        return {
            "waiting": float(snapshot.waiting),
            "running": float(snapshot.running),
            "kv_used": snapshot.kv_used,
        }

    def holdings(self) -> dict[str, Holdings]:
        """What this replica holds for requests: ``engine`` (the target's side), and ``drafter``
        when the drafter runs in this replica. Zero at rest unless something leaks."""
        from drafter_pool.pool import DrafterPool

        engine = self.built.engine
        held = {"engine": Holdings.of_engine(engine)}
        if isinstance(engine.drafter, DrafterPool):
            held["drafter"] = Holdings.of_drafter(engine.drafter)
        return held

    def check_health(self) -> None:
        """Ray Serve calls this periodically; a dead step loop marks the replica unhealthy."""
        if not self.engine.alive:
            raise RuntimeError(f"engine loop died: {self.engine.error!r}")


class RayEngineClient:
    """The gateway's :class:`serve.gateway.EngineClient` over the Engine deployment's handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle
        self.streaming = handle.options(stream=True)

    async def stream(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        adapter: str | None,
        whole: bool = False,
        learn: bool = False,
    ) -> AsyncIterator[RequestOutput | Completion]:
        handle = self.streaming if adapter is None else self.streaming.options(multiplexed_model_id=adapter)
        outputs = handle.stream.remote(prompt, sampling, adapter, whole, learn)
        try:
            async for item in outputs:
                yield item
        except RayActorError as e:  # the replica's process died (Serve starts another)
            raise RuntimeError(f"the engine replica is gone ({type(e).__name__})") from e
        finally:
            outputs.cancel()  # no-op when finished; aborts the request in the engine otherwise

    async def alive(self) -> bool:
        try:
            return bool(await self.handle.alive.remote())
        except RayActorError:  # no replica answered: it died, and its successor is not up yet
            return False


class DrafterPoolReplica:
    """The body of the ``DrafterPool`` deployment: the shared drafter with every user's adapter."""

    def __init__(self, settings: ServeSettings) -> None:
        from transformers import AutoTokenizer

        from serve.engine_builder import build_drafter
        from serve.remote_drafter import DrafterPoolServer

        if settings.drafter is None or settings.drafter_pool is None:
            raise ValueError("a DrafterPool deployment needs settings.drafter and settings.drafter_pool")
        use_cpus(settings.drafter_pool.num_cpus)
        tokenizer = AutoTokenizer.from_pretrained(settings.target, local_files_only=True)
        options = engine_options(settings, settings.drafter_pool)
        self.server = DrafterPoolServer(build_drafter(settings.drafter, tokenizer, options))
        self.metrics = AdapterMetrics()
        threading.Thread(target=self._sample_metrics, name="covspec-metrics", daemon=True).start()

    def _sample_metrics(self, period_s: float = 1.0) -> None:
        while True:
            self.metrics.sample(self.server.pool.adapters)
            time.sleep(period_s)

    def propose(self, engine_id: str, releases: list[int], calls: list[Any], ahead: bool = False) -> Any:
        return self.server.propose(engine_id, releases, calls, ahead)

    def has_adapter(self, name: str) -> bool:
        return self.server.has_adapter(name)

    def check_integrity(self, engine_id: str, releases: list[int]) -> None:
        self.server.check_integrity(engine_id, releases)

    def forward_cost(self, tokens: tuple[int, ...]) -> Any:
        return self.server.forward_cost(tokens)

    def holdings(self) -> Holdings:
        """What the pool holds for requests (drafter states, KV, adapter pins)."""
        return self.server.holdings()

    def engines_served(self) -> int:
        """How many engine replicas have called this pool."""
        return len(self.server.engines)


api = FastAPI(title="CoVSpec Serve")


class GatewayServer:
    """The body of the ``Gateway`` deployment: routes delegate to :class:`serve.gateway.Gateway`."""

    def __init__(self, engine: DeploymentHandle, settings: ServeSettings) -> None:
        from models.processor import folder_processor
        from serve.auth import KeyStore
        from serve.gateway import Gateway, GatewayConfig
        from serve.openai.images import ImageLimits

        use_cpus(settings.gateway.num_cpus)
        config = GatewayConfig(
            model_name=settings.model_name,
            adapters=frozenset(name for name, _ in settings.adapter_folders()),
            image_limits=ImageLimits(
                settings.max_images,
                settings.max_image_bytes,
                settings.max_image_pixels,
                frozenset(settings.image_hosts),
                settings.image_fetch_timeout_s,
            ),
            default_max_tokens=settings.default_max_tokens,
            max_body_bytes=settings.max_body_bytes,
            max_in_flight=settings.max_in_flight,
            tenant_share=settings.tenant_share,
            tenant_wait_s=settings.tenant_wait_s,
            public_system_prompts=frozenset(settings.prefix_cache.public_system_prompts),
            learning=settings.online_learning.enabled and settings.drafter is not None,
        )
        processor = folder_processor(settings.target)
        keys, metrics = KeyStore.load(settings.keys_file), GatewayMetrics()
        self.gateway = Gateway(RayEngineClient(engine), processor, keys, config, record=metrics.request)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self.gateway.chat(request)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self.gateway.models(request)

    @api.get("/health")
    async def health(self) -> Response:
        return await self.gateway.health()

    def drain(self) -> int:
        """Stop admitting (``covspec serve`` stopping); the requests still running."""
        return self.gateway.drain()


EngineDeployment = serve.deployment(name="Engine")(EngineServer)
DrafterPoolDeployment = serve.deployment(name="DrafterPool")(DrafterPoolReplica)
GatewayDeployment = serve.deployment(name="Gateway")(serve.ingress(api)(GatewayServer))
TrainerDeployment = serve.deployment(name="AdapterTrainer")(TrainerServer)


def build_app(args: dict[str, Any]) -> Any:
    """The Serve application from ``args`` (a ``ServeSettings`` as a dict): the ``import_path``
    target of ``deploy/*.yaml`` (``serve.deployments:build_app``)."""
    settings = ServeSettings.model_validate(args)

    drafter = None
    if settings.drafter_pool is not None and settings.drafter is not None:
        drafter = DrafterPoolDeployment.options(**settings.drafter_pool.serve_options()).bind(settings)
    from ray.serve.config import RequestRouterConfig

    router = RequestRouterConfig(  # prefix affinity and load (serve/routing.py); stats every second
        request_router_class="serve.routing:EngineRequestRouter",
        request_routing_stats_period_s=1.0,
        request_routing_stats_timeout_s=1.0,
    )
    engine_options = {**settings.engine.serve_options(), "request_router_config": router}
    trainer = None
    if settings.online_learning.enabled and settings.drafter is not None:
        trainer = TrainerDeployment.options(**settings.online_learning.trainer.serve_options()).bind(settings)
    engine = EngineDeployment.options(**engine_options).bind(settings, drafter, trainer)
    return GatewayDeployment.options(**settings.gateway.serve_options()).bind(engine, settings)
