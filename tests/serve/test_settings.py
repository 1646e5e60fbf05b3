"""Service settings: the shipped configs validate; mistakes are refused with their path."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serve.commands.serve_cmd import app_args
from serve.settings import ServeSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize("name", ["local.yaml", "cluster.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    settings = ServeSettings.model_validate(app_args(DEPLOY / name))
    assert settings.engine.max_ongoing_requests >= 1


def test_local_config_finds_the_four_demo_adapters() -> None:
    settings = ServeSettings.model_validate(app_args(DEPLOY / "local.yaml")).resolved(DEPLOY.parent)
    assert [name for name, _ in settings.adapter_folders()] == ["alice", "bob", "carol", "dave"]
    assert settings.keys_file.is_file() and settings.target.is_absolute()


def test_local_config_runs_the_drafter_pool_as_its_own_deployment_pipelined() -> None:
    settings = ServeSettings.model_validate(app_args(DEPLOY / "local.yaml"))
    assert settings.drafter_pool is not None and settings.pipeline
    assert settings.drafter_pool.link.model().idle  # one machine: no modelled network
    cpus = settings.engine.num_cpus + settings.drafter_pool.num_cpus + settings.gateway.num_cpus
    assert cpus <= 2  # fits the two cores of the smallest machine it is demoed on


def test_a_link_is_configured_under_the_drafter_pool() -> None:
    pool = {"link": {"rtt_ms": 20, "jitter_ms": 5, "bandwidth_mbps": 10}, "timeout_s": 2}
    settings = ServeSettings.model_validate({"drafter_pool": pool})
    assert settings.drafter_pool is not None
    link = settings.drafter_pool.link.model()
    assert (link.rtt_ms, link.jitter_ms, link.bandwidth_mbps) == (20, 5, 10)
    assert settings.drafter_pool.timeout_s == 2


def test_cluster_engine_autoscales_on_gpus() -> None:
    options = ServeSettings.model_validate(app_args(DEPLOY / "cluster.yaml")).engine.serve_options()
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 8,
        "target_ongoing_requests": 32,
    }
    assert options["ray_actor_options"] == {"num_cpus": 4.0, "num_gpus": 1.0}
    pool = ServeSettings.model_validate(app_args(DEPLOY / "cluster.yaml")).drafter_pool
    assert pool is not None and pool.ray_actor_options()["resources"] == {"edge": 1.0}


def test_replicas_that_ask_for_a_gpu_run_their_models_on_it() -> None:
    from serve.deployments import engine_options

    cluster = ServeSettings.model_validate(app_args(DEPLOY / "cluster.yaml"))
    assert engine_options(cluster, cluster.engine).device == "cuda"  # num_gpus: 1.0
    assert cluster.drafter_pool is not None
    assert engine_options(cluster, cluster.drafter_pool).device == "cpu"  # the edge nodes' CPUs
    local = ServeSettings.model_validate(app_args(DEPLOY / "local.yaml"))
    assert engine_options(local, local.engine).device == "cpu"


@pytest.mark.parametrize(
    "args,where",
    [
        ({"engine": {"num_cpu": 1}}, "engine.num_cpu"),
        ({"engine": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "min_replicas (3) exceeds"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"polcy": "none"}, "polcy"),
        ({"prefix_cache": {"redis_url": "localhost:6379"}}, "must start with redis://"),
        ({"prefix_cache": {"public_system_prompt": []}}, "prefix_cache.public_system_prompt"),
        ({"drafter_pool": {"link": {"rtt_ms": -1}}}, "drafter_pool.link.rtt_ms"),
        ({"drafter_pool": {"link": {"bandwidth_mbps": 0}}}, "drafter_pool.link.bandwidth_mbps"),
        ({"drafter_pool": {"link": {"latency_ms": 3}}}, "drafter_pool.link.latency_ms"),
        ({"pipeline": "sometimes"}, "pipeline"),
    ],
)
def test_mistakes_are_refused_with_their_path(args: dict[str, object], where: str) -> None:
    with pytest.raises(ValidationError, match=where.replace("(", r"\(").replace(")", r"\)")):
        ServeSettings.model_validate(args)


def test_config_file_with_two_applications_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("applications: [{args: {}}, {args: {}}]")
    with pytest.raises(ValueError, match="exactly one entry under applications"):
        app_args(config)


def test_online_learning_is_off_unless_enabled_and_its_sizes_must_fit() -> None:
    settings = ServeSettings.model_validate(app_args(DEPLOY / "local.yaml"))
    assert settings.online_learning.enabled is False
    with pytest.raises(
        ValidationError, match=r"max_samples \(20\) must hold holdout \(16\) \+ one batch \(16\)"
    ):
        ServeSettings.model_validate({"online_learning": {"enabled": True, "max_samples": 20}})
    with pytest.raises(ValidationError, match="min_samples"):
        ServeSettings.model_validate({"online_learning": {"min_samples": 0}})
