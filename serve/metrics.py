"""The service's metrics, through Ray's metrics API (Ray dashboard, Prometheus, Grafana).

Ray Serve adds the deployment, replica and application tags; names carry the ``covspec_``
prefix (Prometheus shows them as ``ray_covspec_...``). Tags stay low-cardinality: HTTP status
class, tenant (from the keys file, a bounded set), never users' request contents.
"""

from __future__ import annotations

from typing import Any

from scheduler.snapshot import EngineSnapshot, PrefixCounters, StepTotals

LATENCY_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
TAU = [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0]


def _metrics() -> Any:
    from ray.serve import metrics

    return metrics


class GatewayMetrics:
    """Counted by the Gateway deployment: every response by status and tenant."""

    def __init__(self) -> None:
        m = _metrics()
        self.requests = m.Counter(
            "covspec_requests",
            description="chat requests by HTTP status and tenant",
            tag_keys=("status", "tenant"),
        )

    def request(self, status: int, tenant: str | None) -> None:
        self.requests.inc(1, tags={"status": str(status), "tenant": tenant or "unknown"})


class EngineMetrics:
    """Recorded by the Engine deployment: per finished request, and sampled from the engine."""

    def __init__(self) -> None:
        m = _metrics()
        hist = m.Histogram
        self.ttft = hist("covspec_ttft_seconds", description="time to first token", boundaries=LATENCY_S)
        self.tpot = hist(
            "covspec_tpot_seconds", description="time per output token after the first", boundaries=LATENCY_S
        )
        self.e2e = hist(
            "covspec_e2e_seconds", description="request time, end to end in the engine", boundaries=LATENCY_S
        )
        self.tau = hist("covspec_tau", description="tokens per verify step, per request", boundaries=TAU)
        self.verify_steps = m.Counter(
            "covspec_spec_verify_steps", description="verify steps of finished requests"
        )
        self.draft_tokens = m.Counter("covspec_spec_draft_tokens", description="draft tree nodes verified")
        self.accepted_tokens = m.Counter("covspec_spec_accepted_tokens", description="draft tokens accepted")
        self.output_tokens = m.Counter("covspec_output_tokens", description="tokens generated")
        self.batch_requests = m.Gauge(
            "covspec_verifier_batch_requests",
            description="requests per verifier step (mean since last sample)",
        )
        self.step_tokens = m.Gauge(
            "covspec_verifier_tokens_per_step",
            description="tokens per verifier forward (mean since last sample)",
        )
        self.waiting = m.Gauge("covspec_queue_waiting", description="requests waiting for KV")
        self.running = m.Gauge("covspec_queue_running", description="requests holding KV")
        self.kv_used = m.Gauge("covspec_kv_blocks_used_fraction", description="target KV blocks in use")
        self.drafter_kv_used = m.Gauge(
            "covspec_drafter_kv_blocks_used_fraction", description="drafter KV blocks in use"
        )
        self.drafter_dropped = _Increments(
            m.Counter(
                "covspec_drafter_kv_dropped",
                description="requests whose drafter KV was dropped for want of room (they decode plainly)",
            )
        )
        self.undrafted = _Increments(
            m.Counter(
                "covspec_drafter_unanswered_steps",
                description="steps decoded plainly because the drafter pool did not answer",
            )
        )
        self.draft_wait = _Increments(
            m.Counter("covspec_draft_wait_ms", description="milliseconds steps waited for their trees")
        )
        self.draft_hidden = _Increments(
            m.Counter(
                "covspec_draft_hidden_ms",
                description="milliseconds of draft calls hidden behind verifying another group (pipelined)",
            )
        )
        self.link_bytes = m.Counter(
            "covspec_link_bytes",
            description="serialized bytes between engine and drafter pool (finished requests' and "
            "those of proactive calls answered after their request finished)",
            tag_keys=("direction",),
        )
        self.unbilled = _Increments(self.link_bytes)
        self.proactive = {
            field: _Increments(m.Counter(f"covspec_proactive_{field}", description=text))
            for field, text in (
                ("trees", "next trees drafted while the current ones were verified"),
                ("hits", "of which a step verified (the verifier accepted the guessed path)"),
                ("wasted_nodes", "tree nodes drafted ahead that no step verified"),
            )
        }
        self.adapters = AdapterMetrics()
        self.prefix = PrefixMetrics()
        self._seen = StepTotals()

    def finished(self, completion: Any) -> None:
        s = completion.stats
        self.ttft.observe(completion.ttft_s)
        self.e2e.observe(completion.time_s)
        if s.output_tokens > 1:
            self.tpot.observe((completion.time_s - completion.ttft_s) / (s.output_tokens - 1))
        if s.verify_steps:
            self.tau.observe(s.tau)
            self.verify_steps.inc(s.verify_steps)
        if s.draft_tokens:
            self.draft_tokens.inc(s.draft_tokens)
        if s.accepted_tokens:
            self.accepted_tokens.inc(s.accepted_tokens)
        if s.output_tokens:
            self.output_tokens.inc(s.output_tokens)
        if s.link_bytes_up:
            self.link_bytes.inc(s.link_bytes_up, tags={"direction": "up"})
        if s.link_bytes_down:
            self.link_bytes.inc(s.link_bytes_down, tags={"direction": "down"})

    def sample(self, snapshot: EngineSnapshot, adapters: Any) -> None:
        """Gauges from the engine's latest snapshot, and increments since the last sample."""
        totals, seen = snapshot.totals, self._seen
        self.waiting.set(snapshot.waiting)
        self.running.set(snapshot.running)
        self.kv_used.set(snapshot.kv_used)
        self.drafter_kv_used.set(snapshot.drafter_kv_used)
        steps = totals.steps - seen.steps
        if steps:
            self.batch_requests.set((totals.batch_requests - seen.batch_requests) / steps)
            self.step_tokens.set((totals.verify_tokens - seen.verify_tokens) / steps)
        self.drafter_dropped.to(totals.drafter_dropped)
        self.undrafted.to(totals.undrafted_steps)
        self.draft_wait.to(int(totals.draft_wait_ms))
        self.draft_hidden.to(int(totals.draft_hidden_ms))
        self._seen = totals
        ahead = snapshot.proactive
        self.unbilled.to(ahead.unbilled_up, tags={"direction": "up"})
        self.unbilled.to(ahead.unbilled_down, tags={"direction": "down"})
        for field, counter in self.proactive.items():
            counter.to(getattr(ahead, field))
        if adapters is not None:
            self.adapters.sample(adapters)
        if snapshot.prefix is not None:
            self.prefix.sample(snapshot.prefix)


class _Increments:
    """A Ray counter fed from a running total read now and then."""

    def __init__(self, counter: Any) -> None:
        self.counter, self._seen = counter, {}

    def to(self, total: int, tags: dict[str, str] | None = None) -> None:
        key = tuple(sorted((tags or {}).items()))
        new = total - self._seen.get(key, 0)
        if new > 0:
            self.counter.inc(new, tags=tags)
        self._seen[key] = total


class AdapterMetrics:
    """Adapter loads and evictions, from the registry's running counts (wherever it lives: the
    engine replica, or the DrafterPool deployment)."""

    def __init__(self) -> None:
        m = _metrics()
        self.loads = _Increments(
            m.Counter("covspec_adapter_loads", description="adapters written into a slot")
        )
        self.evictions = _Increments(
            m.Counter("covspec_adapter_evictions", description="adapters evicted (LRU)")
        )

    def sample(self, registry: Any) -> None:
        self.loads.to(registry.stats.loads)
        self.evictions.to(registry.stats.evictions)


class PrefixMetrics:
    """Prefix-cache blocks by tier, Redis traffic, faults and load time, from the prefix cache's
    and its Redis tier's running counts."""

    def __init__(self) -> None:
        m = _metrics()
        self.blocks = _Increments(
            m.Counter(
                "covspec_prefix_blocks",
                description="prompt KV blocks by where they came from: local, redis, computed",
                tag_keys=("source",),
            )
        )
        self.rejected = _Increments(
            m.Counter(
                "covspec_prefix_redis_rejected",
                description="Redis values refused by a check (a miss), by reason",
                tag_keys=("reason",),
            )
        )
        self.redis_bytes = _Increments(
            m.Counter(
                "covspec_prefix_redis_bytes", description="bytes read / written", tag_keys=("direction",)
            )
        )
        self.redis_errors = _Increments(
            m.Counter("covspec_prefix_redis_errors", description="Redis commands failed or timed out")
        )
        self.dropped = _Increments(
            m.Counter("covspec_prefix_redis_dropped_writes", description="blocks not written to Redis")
        )
        self.load = m.Histogram(
            "covspec_prefix_load_seconds", description="Redis fetch to KV in the pool", boundaries=LATENCY_S
        )
        self.breaker = m.Gauge("covspec_prefix_redis_breaker_open", description="1 while the breaker is open")
        self.cached = m.Gauge("covspec_prefix_cached_blocks", description="KV blocks indexed by content")
        self._loads = 0

    def sample(self, counters: PrefixCounters) -> None:
        s = counters.stats
        for source, total in (("local", s.local_hits), ("redis", s.remote_hits), ("computed", s.misses)):
            self.blocks.to(total, {"source": source})
        for reason, total in s.rejected.items():
            self.rejected.to(total, {"reason": reason})
        new = s.loads - self._loads
        for ms in s.load_ms[-new:] if new > 0 else []:
            self.load.observe(ms / 1000)
        self._loads = s.loads
        self.cached.set(counters.cached_blocks)
        t = counters.redis
        if t is not None:
            self.redis_bytes.to(t.bytes_read, {"direction": "read"})
            self.redis_bytes.to(t.bytes_written, {"direction": "written"})
            self.redis_errors.to(t.errors)
            self.dropped.to(t.dropped_writes)
            self.breaker.set(1.0 if counters.redis_breaker_open else 0.0)


class LearningMetrics:
    """Online drafter learning (``serve/trainer.py``): samples held, versions published and
    refused, training time, and τ per learning user. The user tag is bounded: only keys with
    ``learn: true`` produce it."""

    def __init__(self) -> None:
        m = _metrics()
        self.samples = m.Gauge(
            "covspec_learning_samples",
            description="served samples held per learning user",
            tag_keys=("user",),
        )
        self.versions = m.Counter(
            "covspec_learning_versions",
            description="adapter versions trained: published (better) or refused",
            tag_keys=("user", "outcome"),
        )
        self.train_s = m.Counter(
            "covspec_learning_train_seconds", description="seconds spent training and judging"
        )
        self.tau = m.Histogram(
            "covspec_learning_tau",
            description="tau (tokens per verify step) of learning users' requests",
            boundaries=TAU,
            tag_keys=("user",),
        )

    def trained(self, name: str, published: bool, seconds: float) -> None:
        self.versions.inc(1, tags={"user": name, "outcome": "published" if published else "refused"})
        self.train_s.inc(seconds)

    def held(self, name: str, samples: int) -> None:
        self.samples.set(samples, tags={"user": name})
