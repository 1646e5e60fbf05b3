"""Online drafter learning: each learning user's LoRA trained on what the target answered them.

The target's output tokens are exact distillation labels for the drafter, free with every
request. :class:`OnlineLearner` watches a :class:`~drafter_pool.samples.SampleStore`; once a user
has ``min_samples`` new samples it fine-tunes that user's adapter (on from the current version,
or from zero), measures teacher-forced acceptance of the target's tokens on the user's most
recent samples, which training never saw, for the new weights and the current ones, and
publishes the new version only if it is better. :func:`sync_published` brings published
versions into a drafter's :class:`~drafter_pool.adapters.AdapterRegistry` (hot swap) and drops
the adapters of users who were forgotten.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from drafter_pool.adapters import AdapterRegistry
from drafter_pool.samples import Published, SampleStore, ServedSample
from models.lora_training import LoraSample, LoraTrainConfig, teacher_forced_acceptance, train_lora


@dataclass(frozen=True)
class LearnConfig:
    min_samples: int = 40  # new samples since a user's last attempt before training again
    holdout: int = 16  # a user's most recent samples, kept out of training to judge a version
    steps: int = 120
    batch: int = 16
    rank: int = 8
    lr: float = 2e-3
    min_gain: float = 0.0  # a version must beat the current acceptance by more than this

    def __post_init__(self) -> None:
        if min(self.min_samples, self.holdout, self.steps, self.batch, self.rank) < 1:
            raise ValueError("min_samples, holdout, steps, batch and rank must be positive")


@dataclass(frozen=True)
class LearnOutcome:
    tenant: str
    name: str
    published: Published | None  # None: the new weights were not better (refused)
    acceptance: float  # teacher-forced acceptance of the new weights on the held-out samples
    current_acceptance: float  # of the version in use (or the base drafter)
    train_samples: int
    seconds: float


class OnlineLearner:
    def __init__(
        self,
        drafter_dir: str | Path,
        store: SampleStore,
        config: LearnConfig = LearnConfig(),
        initial: Mapping[str, Path] | None = None,  # name -> adapter to start from (offline-trained)
    ) -> None:
        from models.loader import load_model
        from models.prompt_encoder import PromptEncoder

        self.drafter_dir, self.store, self.config = Path(drafter_dir), store, config
        self.initial = dict(initial or {})
        self.encoder = PromptEncoder(load_model(self.drafter_dir))  # prompts as the drafter expands them
        self._tried: dict[tuple[str, str], int] = {}  # user -> sequence number at its last attempt

    def due(self) -> list[tuple[str, str]]:
        """Users with ``min_samples`` new samples since their last attempt, enough to train."""
        out = []
        for tenant, name in self.store.users():
            kept, next_seq = self.store.count(tenant, name)
            new = next_seq - self._tried.get((tenant, name), 0)
            if new >= self.config.min_samples and kept >= self.config.holdout + self.config.batch:
                out.append((tenant, name))
        return out

    def step(self) -> list[LearnOutcome]:
        """One round: every user that is due, in turn."""
        return [self.learn(tenant, name) for tenant, name in self.due()]

    def current(self, tenant: str, name: str) -> Path | None:
        latest = self.store.latest(tenant, name)
        return latest.folder if latest is not None else self.initial.get(name)

    def learn(self, tenant: str, name: str) -> LearnOutcome:
        started = time.perf_counter()
        samples = self.store.samples(tenant, name)
        self._tried[(tenant, name)] = samples[-1].seq + 1 if samples else 0
        cut = len(samples) - self.config.holdout
        train, held = [self._lora(s) for s in samples[:cut]], [self._lora(s) for s in samples[cut:]]
        current, c = self.current(tenant, name), self.config
        out = self.store.scratch(tenant, name)
        config = LoraTrainConfig(
            rank=c.rank, alpha=2 * c.rank, steps=c.steps, batch=min(c.batch, len(train)), lr=c.lr
        )
        train_lora(self.drafter_dir, train, config, out, init_from=current, progress=False)
        new = teacher_forced_acceptance(self.drafter_dir, out, held)
        old = teacher_forced_acceptance(self.drafter_dir, current, held)
        published = None
        if new > old + c.min_gain:
            record = {
                "acceptance": round(new, 4),
                "previous_acceptance": round(old, 4),
                "train_samples": len(train),
            }
            published = self.store.publish(tenant, name, out, record)
        else:
            shutil.rmtree(out, ignore_errors=True)
        return LearnOutcome(tenant, name, published, new, old, len(train), time.perf_counter() - started)

    def _lora(self, sample: ServedSample) -> LoraSample:
        ids = self.encoder.layout(sample.prompt).token_ids.tolist()
        return LoraSample(tuple(ids), sample.answer_ids, sample.prompt.images[0])


class LearnedAdapters:
    """A drafter's view of the published versions: :func:`sync_published` at most every
    ``poll_s`` seconds, called between drafting steps by the drafter's owner."""

    def __init__(self, store: SampleStore, poll_s: float = 2.0) -> None:
        self.store, self.poll_s = store, poll_s
        self.learned: set[str] = set()
        self._last = -math.inf

    def sync(self, registry: AdapterRegistry) -> list[str]:
        now = time.monotonic()
        if now - self._last < self.poll_s:
            return []
        self._last = now
        return sync_published(registry, self.store, self.learned)


def sync_published(registry: AdapterRegistry, store: SampleStore, learned: set[str]) -> list[str]:
    """Publish into ``registry`` each user's latest version newer than the one it has, and remove
    the learned adapters (``learned``: names this function published before; updated) whose user
    was forgotten. Returns what changed, in words."""
    changes, on_disk = [], set()
    for tenant, name in store.users():
        latest = store.latest(tenant, name)
        if latest is None:
            continue
        on_disk.add(name)
        if (registry.version(name) or 0) < latest.version:
            registry.publish(name, latest.folder, latest.version)
            learned.add(name)
            changes.append(f"{name} v{latest.version}")
    for name in sorted(learned - on_disk):
        if registry.has(name):
            registry.remove(name)
        learned.discard(name)
        changes.append(f"{name} forgotten")
    return changes
