"""What the step loop publishes for other threads (metrics, routing) to read.

The engine is touched by its loop thread only. After every step it replaces one frozen
:class:`EngineSnapshot` (a reference assignment, atomic in CPython); readers take whichever
snapshot is current and never see a half-updated engine.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from core.plan import StepReport, StepTiming
from kvcache.prefix_cache import PrefixCache, PrefixStats
from kvcache.redis_store import RedisKVStore, TierStats
from scheduler.foresight import ProactiveStats


@dataclass(frozen=True)
class StepTotals:
    """Running sums over the engine's steps (metrics take differences between two reads)."""

    steps: int = 0
    batch_requests: int = 0  # requests in each step's verifier batch
    verify_tokens: int = 0  # tokens the verifier forwards carried (chunks, last tokens, tree nodes)
    tree_nodes: int = 0
    drafter_dropped: int = 0  # requests whose drafter KV was dropped for want of room
    undrafted_steps: int = 0  # steps decoded plainly because the drafter did not answer
    draft_wait_ms: float = 0.0  # the steps waited for their trees
    draft_hidden_ms: float = 0.0  # draft calls' time the verifier spent on other groups

    def after(self, report: StepReport, timing: StepTiming, batch: int) -> StepTotals:
        """These totals with one more step of ``batch`` requests, reported as ``report``."""
        return StepTotals(
            steps=self.steps + 1,
            batch_requests=self.batch_requests + batch,
            verify_tokens=self.verify_tokens + report.verify_tokens,
            tree_nodes=self.tree_nodes + report.tree_nodes,
            drafter_dropped=self.drafter_dropped + report.drafter_dropped,
            undrafted_steps=self.undrafted_steps + report.drafter_failed,
            draft_wait_ms=self.draft_wait_ms + timing.draft_ms,
            draft_hidden_ms=self.draft_hidden_ms + timing.hidden_ms,
        )


@dataclass(frozen=True)
class PrefixCounters:
    """Copies of a prefix cache's counters and its Redis tier's."""

    cached_blocks: int  # KV blocks indexed by content
    stats: PrefixStats
    redis: TierStats | None = None
    redis_breaker_open: bool = False

    @classmethod
    def of(cls, prefix: PrefixCache) -> PrefixCounters:
        s = prefix.stats
        stats = replace(s, rejected=Counter(s.rejected), load_ms=list(s.load_ms))
        if not isinstance(prefix.remote, RedisKVStore):
            return cls(prefix.pool.num_cached_blocks, stats)
        tier = prefix.remote.stats
        redis = replace(tier, fetch_ms=list(tier.fetch_ms))
        return cls(prefix.pool.num_cached_blocks, stats, redis, prefix.remote.breaker_open)


@dataclass(frozen=True)
class EngineSnapshot:
    waiting: int = 0  # requests queued for KV
    running: int = 0  # requests holding KV
    kv_used: float = 0.0  # fraction of the target's KV blocks in use
    drafter_kv_used: float = 0.0  # fraction of the drafter's KV blocks in use
    totals: StepTotals = field(default_factory=StepTotals)
    prefix: PrefixCounters | None = None  # None without a prefix cache
    proactive: ProactiveStats = field(default_factory=ProactiveStats)  # ``scheduler.foresight``
