"""Metrics: what the engine and gateway report, through a stand-in for Ray's metrics API."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from core.plan import RequestStats
from kvcache.prefix_cache import PrefixStats
from kvcache.redis_store import TierStats
from scheduler.engine import Completion
from scheduler.snapshot import EngineSnapshot, PrefixCounters, StepTotals
from serve.metrics import EngineMetrics, GatewayMetrics
from tests.serve.conftest import Recorded


def test_finished_request_feeds_latency_tau_and_speculation_counters(recorded: dict[str, Recorded]) -> None:
    m = EngineMetrics()
    stats = RequestStats(
        prompt_tokens=100, output_tokens=11, verify_steps=4, draft_tokens=20, accepted_tokens=7,
        link_bytes_up=900, link_bytes_down=300,
    )  # fmt: skip
    m.finished(Completion(1, tuple(range(11)), "x", "stop", stats, ttft_s=0.2, time_s=1.2))
    assert recorded["covspec_ttft_seconds"].values == [(0.2, {})]
    assert recorded["covspec_tpot_seconds"].values == [(pytest.approx(0.1), {})]
    assert recorded["covspec_tau"].values == [(2.75, {})]
    assert recorded["covspec_spec_draft_tokens"].values == [(20, {})]
    assert recorded["covspec_spec_accepted_tokens"].values == [(7, {})]
    assert recorded["covspec_link_bytes"].values == [(900, {"direction": "up"}), (300, {"direction": "down"})]


def test_samples_turn_running_sums_into_means_and_increments(recorded: dict[str, Recorded]) -> None:
    m = EngineMetrics()
    snapshot = EngineSnapshot(
        waiting=2, running=1, kv_used=0.25, drafter_kv_used=0.5,
        totals=StepTotals(
            steps=4, batch_requests=12, verify_tokens=400, drafter_dropped=1,
            undrafted_steps=2, draft_wait_ms=30.5, draft_hidden_ms=70.0,
        ),
    )  # fmt: skip
    adapters = SimpleNamespace(stats=SimpleNamespace(loads=3, evictions=1))
    m.sample(snapshot, adapters)
    later = StepTotals(
        steps=6, batch_requests=22, verify_tokens=500, drafter_dropped=4,
        undrafted_steps=2, draft_wait_ms=41.0, draft_hidden_ms=100.0,
    )  # fmt: skip
    adapters.stats.loads = 5
    m.sample(EngineSnapshot(waiting=2, running=1, kv_used=0.25, totals=later), adapters)
    assert recorded["covspec_verifier_batch_requests"].values == [(3.0, {}), (5.0, {})]
    assert recorded["covspec_verifier_tokens_per_step"].values == [(100.0, {}), (50.0, {})]
    assert recorded["covspec_kv_blocks_used_fraction"].values[-1] == (0.25, {})
    assert recorded["covspec_drafter_kv_blocks_used_fraction"].values == [(0.5, {}), (0.0, {})]
    assert recorded["covspec_queue_waiting"].values[-1] == (2, {})
    assert recorded["covspec_drafter_kv_dropped"].values == [(1, {}), (3, {})]
    assert recorded["covspec_adapter_loads"].values == [(3, {}), (2, {})]
    assert recorded["covspec_adapter_evictions"].values == [(1, {})]
    assert recorded["covspec_drafter_unanswered_steps"].values == [(2, {})]
    assert recorded["covspec_draft_wait_ms"].values == [(30, {}), (11, {})]
    assert recorded["covspec_draft_hidden_ms"].values == [(70, {}), (30, {})]


def test_gateway_counts_requests_by_status_and_tenant(recorded: dict[str, Recorded]) -> None:
    m = GatewayMetrics()
    m.request(200, "acme")
    m.request(401, None)
    assert recorded["covspec_requests"].values == [
        (1, {"status": "200", "tenant": "acme"}),
        (1, {"status": "401", "tenant": "unknown"}),
    ]


def test_prefix_cache_blocks_redis_traffic_and_faults_are_counted(recorded: dict[str, Recorded]) -> None:
    m = EngineMetrics()
    stats = PrefixStats(local_hits=4, remote_hits=6, misses=10, loads=2, load_ms=[20.0, 40.0])
    stats.rejected["checksum mismatch"] += 1
    tier = TierStats(bytes_read=600, bytes_written=1000, errors=2, dropped_writes=3)
    m.sample(EngineSnapshot(prefix=PrefixCounters(16, stats, tier, redis_breaker_open=True)), None)
    later = PrefixStats(local_hits=7, remote_hits=6, misses=10, loads=3, load_ms=[20.0, 40.0, 10.0])
    later.rejected["checksum mismatch"] += 1
    m.sample(EngineSnapshot(prefix=PrefixCounters(16, later, tier, redis_breaker_open=True)), None)
    assert recorded["covspec_prefix_blocks"].values == [
        (4, {"source": "local"}), (6, {"source": "redis"}), (10, {"source": "computed"}),
        (3, {"source": "local"}),
    ]  # fmt: skip
    assert recorded["covspec_prefix_load_seconds"].values == [(0.02, {}), (0.04, {}), (0.01, {})]
    assert recorded["covspec_prefix_redis_rejected"].values == [(1, {"reason": "checksum mismatch"})]
    assert recorded["covspec_prefix_redis_bytes"].values == [
        (600, {"direction": "read"}),
        (1000, {"direction": "written"}),
    ]
    assert recorded["covspec_prefix_redis_errors"].values == [(2, {})]
    assert recorded["covspec_prefix_redis_dropped_writes"].values == [(3, {})]
    assert recorded["covspec_prefix_redis_breaker_open"].values[-1] == (1.0, {})
    assert recorded["covspec_prefix_cached_blocks"].values[-1] == (16, {})
