"""What a replica holds for requests: the numbers that come back to zero when no request is in
flight, unless something leaks. Read from another thread than the one that changes them, so a
reading taken under load is approximate; at rest it is exact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from drafter_pool.adapters import AdapterRegistry
    from drafter_pool.pool import DrafterPool
    from scheduler.engine import Engine


@dataclass(frozen=True)
class Holdings:
    requests: int  # requests with state here: queued or running (engine), drafter states (pool)
    kv_blocks: int  # KV blocks in use; idle cached prefix blocks count as free (reclaimed on demand)
    adapter_pins: int  # requests pinning a drafter adapter (drafters only)

    @staticmethod
    def of_engine(engine: Engine) -> Holdings:
        """The target's side of an engine (its drafter, in this process or not, has its own)."""
        sched = engine.scheduler
        pool = sched.pool
        return Holdings(
            requests=len(sched.queue.waiting) + len(sched.queue.running),
            kv_blocks=pool.num_blocks - pool.num_free_blocks,
            adapter_pins=0,
        )

    @staticmethod
    def of_drafter(pool: DrafterPool) -> Holdings:
        return Holdings(
            requests=len(pool.states),
            kv_blocks=pool.pool.num_blocks - pool.pool.num_free_blocks,
            adapter_pins=_pins(pool.adapters),
        )


def _pins(adapters: AdapterRegistry | None) -> int:
    return 0 if adapters is None else sum(dict(adapters.pins).values())  # a copy: pins change meanwhile
