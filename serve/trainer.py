"""The ``AdapterTrainer`` deployment's body: online drafter learning beside the service.

It owns a :class:`drafter_pool.learner.OnlineLearner` over the store the engine replicas write
learning users' samples into, and runs it in a background thread at low CPU priority (``nice``)
on its own Ray CPU budget: every ``poll_s`` it trains whoever is due and publishes the versions
that beat the one in use; the drafters pick them up between steps.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

from serve.settings import ServeSettings


class TrainerServer:
    def __init__(self, settings: ServeSettings) -> None:
        import torch

        from drafter_pool.learner import LearnConfig, OnlineLearner
        from drafter_pool.samples import SampleStore
        from serve.metrics import LearningMetrics

        learning = settings.online_learning
        if settings.drafter is None or not learning.enabled:
            raise ValueError("an AdapterTrainer needs a drafter and online_learning.enabled")
        torch.set_num_threads(max(1, int(learning.trainer.num_cpus)))
        with contextlib.suppress(OSError):
            os.nice(10)  # below the engine and drafter: serving first
        config = LearnConfig(
            min_samples=learning.min_samples, holdout=learning.holdout, steps=learning.steps,
            batch=learning.batch, rank=learning.rank, lr=learning.lr, min_gain=learning.min_gain,
        )  # fmt: skip
        self.store = SampleStore(learning.dir, learning.max_samples)
        self.learner = OnlineLearner(settings.drafter, self.store, config, dict(settings.adapter_folders()))
        self.metrics, self.poll_s = LearningMetrics(), learning.poll_s
        self.outcomes: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="covspec-trainer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                for tenant, name in self.store.users():
                    self.metrics.held(name, self.store.count(tenant, name)[0])
                for outcome in self.learner.step():
                    published = outcome.published is not None
                    self.metrics.trained(outcome.name, published, outcome.seconds)
                    self.outcomes.append(
                        {
                            "user": outcome.name,
                            "version": outcome.published.version if outcome.published else None,
                            "acceptance": round(outcome.acceptance, 4),
                            "previous_acceptance": round(outcome.current_acceptance, 4),
                            "train_samples": outcome.train_samples,
                            "seconds": round(outcome.seconds, 2),
                        }
                    )
                time.sleep(self.poll_s)
        except BaseException as e:  # surfaced by check_health: Serve restarts the replica
            self.error = e

    def status(self) -> list[dict[str, Any]]:
        """Every training round so far: user, version published (None: refused), acceptance."""
        return list(self.outcomes)

    def check_health(self) -> None:
        if self.error is not None or not self._thread.is_alive():
            raise RuntimeError(f"the trainer loop died: {self.error!r}")
