"""The service's configuration, validated by pydantic: model folders, keys, deployments, limits.

The same object comes from ``deploy/*.yaml`` (the ``args:`` of the Serve application) and from
``covspec serve``; an unknown key or a bad value is refused with the path to it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.link import Link

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingSettings(Strict):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=32, gt=0, description="per replica, what Serve scales on")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class DeploymentSettings(Strict):
    num_replicas: int = Field(default=1, ge=1, description="fixed replica count (ignored with autoscaling)")
    autoscaling: AutoscalingSettings | None = None
    num_cpus: float = Field(default=1.0, gt=0, description="Ray CPUs per replica; torch threads follow it")
    num_gpus: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources, e.g. edge")
    max_ongoing_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=256, ge=-1, description="-1: unbounded (not recommended)")

    def serve_options(self) -> dict[str, object]:
        """Keyword arguments of ``Deployment.options`` for this deployment."""
        options: dict[str, object] = {
            "ray_actor_options": self.ray_actor_options(),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.autoscaling is None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        return options

    def ray_actor_options(self) -> dict[str, object]:
        options: dict[str, object] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            options["resources"] = dict(self.resources)
        return options


class LinkSettings(Strict):
    """The modelled network between engines and the drafter pool (``serve/link.py``)."""

    rtt_ms: float = Field(default=0.0, ge=0, description="round trip; each message waits half")
    jitter_ms: float = Field(default=0.0, ge=0, description="each message waits a further uniform 0..jitter")
    bandwidth_mbps: float | None = Field(default=None, gt=0, description="each way; unset: no transfer time")

    def model(self) -> Link:
        return Link(self.rtt_ms, self.jitter_ms, self.bandwidth_mbps)


class DrafterPoolSettings(DeploymentSettings):
    """The DrafterPool deployment: where it runs, and the link engines reach it over."""

    link: LinkSettings = LinkSettings()
    timeout_s: float = Field(
        default=5.0, gt=0, description="a draft call not answered by then: that step decodes plainly"
    )


class PrefixCacheSettings(Strict):
    enabled: bool = Field(default=True, description="reuse the KV of prompt blocks computed before")
    redis_url: str | None = Field(
        default=None,
        description="share prefix KV through this Redis; default: $REDIS_URL (covspec serve sets it)",
    )
    public_system_prompts: list[str] = Field(
        default_factory=list,
        description="system prompts whose KV every tenant may share (published personas)",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url {url!r} must start with redis://, rediss:// or unix://")
        return url


class OnlineLearningSettings(Strict):
    """Per-user drafter adapters trained from the target's own answers while the service runs
    (``drafter_pool.learner``); only for keys with ``learn: true``, and only when enabled."""

    enabled: bool = False
    dir: Path = Field(
        default=Path("learned-adapters"),
        description="where learning users' samples and published versions live (shared by the "
        "engine, drafter and trainer replicas: a shared file system on a cluster)",
    )
    min_samples: int = Field(default=40, ge=1, description="new samples of a user before training again")
    max_samples: int = Field(default=400, ge=1, description="samples kept per user (oldest dropped)")
    holdout: int = Field(default=16, ge=1, description="a user's latest samples that judge a new version")
    steps: int = Field(default=120, ge=1, description="optimizer steps per version")
    batch: int = Field(default=16, ge=1)
    rank: int = Field(default=8, ge=1, le=64)
    lr: float = Field(default=2e-3, gt=0)
    min_gain: float = Field(default=0.0, ge=0, description="acceptance a version must add to be published")
    poll_s: float = Field(default=2.0, gt=0, description="how often the trainer and drafters look for news")
    trainer: DeploymentSettings = DeploymentSettings(num_cpus=0.5, max_ongoing_requests=4)

    @model_validator(mode="after")
    def _enough(self) -> OnlineLearningSettings:
        if self.max_samples < self.holdout + self.batch:
            raise ValueError(
                f"max_samples ({self.max_samples}) must hold holdout ({self.holdout}) "
                f"+ one batch ({self.batch})"
            )
        return self


class ServeSettings(Strict):
    target: Path = CHECKPOINTS / "tiny-target"
    drafter: Path | None = CHECKPOINTS / "tiny-drafter"  # None: plain decoding
    adapters_dir: Path | None = CHECKPOINTS / "adapters"  # each subfolder a user's drafter LoRA
    keys_file: Path = Path("deploy/demo-keys.yaml")
    model_name: str = "tiny-target"
    policy: str = "load_aware"
    dtype: str = "fp32"
    max_batch_tokens: int = Field(default=512, ge=16)
    default_max_tokens: int = Field(default=256, ge=1)
    max_images: int = Field(default=4, ge=0)
    max_image_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=4096 * 4096, ge=64)
    image_hosts: list[str] = Field(default_factory=list, description="hosts http(s) images may come from")
    image_fetch_timeout_s: float = Field(default=5.0, gt=0)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_in_flight: int = Field(default=64, ge=1, description="per gateway replica; beyond it 503")
    shutdown_grace_s: float = Field(
        default=10.0, ge=0, description="covspec serve stopping: how long running requests may take to finish"
    )
    tenant_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="the share of max_in_flight one tenant may hold; beyond it, tenant_wait_s, then 429",
    )
    tenant_wait_s: float = Field(
        default=30.0,
        ge=0,
        description="how long a request over its tenant's share waits for one of the tenant's requests "
        "to finish before its 429 (0: at once)",
    )
    engine: DeploymentSettings = DeploymentSettings(num_cpus=1.0)
    # the drafter as its own deployment (called once per engine step); None: inside each engine
    drafter_pool: DrafterPoolSettings | None = None
    pipeline: bool = Field(
        default=True,
        description="with a drafter pool: draft one group's trees while another group's are verified",
    )
    proactive: bool = Field(
        default=True,
        description="with a drafter pool: draft each request's next tree while its tree is verified "
        "(where the drafter would idle, and while it shortens the steps' wait for their trees)",
    )
    gateway: DeploymentSettings = DeploymentSettings(num_cpus=0.2, max_ongoing_requests=256)
    prefix_cache: PrefixCacheSettings = PrefixCacheSettings()
    online_learning: OnlineLearningSettings = OnlineLearningSettings()

    def resolved(self, base: Path) -> ServeSettings:
        """The same settings with relative paths made absolute against ``base`` (replicas may run
        in another working directory)."""

        def absolute(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else (base / p).resolve())

        return self.model_copy(
            update={
                "target": absolute(self.target),
                "drafter": absolute(self.drafter),
                "adapters_dir": absolute(self.adapters_dir),
                "keys_file": absolute(self.keys_file),
                "online_learning": self.online_learning.model_copy(
                    update={"dir": absolute(self.online_learning.dir)}
                ),
            }
        )

    def adapter_folders(self) -> tuple[tuple[str, Path], ...]:
        """(name, folder) of every adapter under ``adapters_dir`` (a folder with an adapter config)."""
        if self.drafter is None or self.adapters_dir is None or not self.adapters_dir.is_dir():
            return ()
        found = sorted(p for p in self.adapters_dir.iterdir() if (p / "adapter_config.json").is_file())
        return tuple((p.name, p) for p in found)
