"""The network between engines (cloud) and the drafter pool (edge), modelled on one machine.

Every message of a draft call is held back by half the round trip, a random jitter and its
serialized size over the bandwidth before it is delivered, in the thread that carries the call
(never the engine's step loop). With nothing set the link adds no delay: what remains is the
real cost of the call (Ray's hop between processes, or none in one process).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    rtt_ms: float = 0.0  # round trip: each message waits half of it
    jitter_ms: float = 0.0  # each message waits a further uniform 0..jitter_ms
    bandwidth_mbps: float | None = None  # megabits per second each way; None = no transfer time

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"link delays must be >= 0: rtt {self.rtt_ms} ms, jitter {self.jitter_ms} ms")
        if self.bandwidth_mbps is not None and self.bandwidth_mbps <= 0:
            raise ValueError(f"bandwidth must be positive, got {self.bandwidth_mbps} Mbps")

    @property
    def idle(self) -> bool:
        """Adds no delay at all."""
        return self.rtt_ms == 0 and self.jitter_ms == 0 and self.bandwidth_mbps is None

    def delay_s(self, nbytes: int, rng: random.Random) -> float:
        """One message of ``nbytes`` one way: half the round trip, jitter, transfer."""
        ms = self.rtt_ms / 2 + (rng.uniform(0, self.jitter_ms) if self.jitter_ms else 0.0)
        if self.bandwidth_mbps is not None:
            ms += nbytes * 8 / (self.bandwidth_mbps * 1000)
        return ms / 1000

    def carry(self, nbytes: int, rng: random.Random) -> float:
        """Hold the calling thread for one message's delay; the seconds it waited."""
        wait = self.delay_s(nbytes, rng)
        if wait > 0:
            time.sleep(wait)
        return wait


NO_LINK = Link()
