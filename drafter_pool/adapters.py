"""The drafter's named LoRA adapters: registered folders, a bounded set resident in slots.

``add`` checks an adapter completely (so a bad folder fails when it is added, with the reason)
and remembers its folder and the hash of its weights. A request pins its adapter for its lifetime
(``acquire`` / ``release``): its drafter KV was computed with those weights, so a pinned adapter
is never evicted or replaced. When a slot is needed, the least recently used unpinned adapter is
evicted; using it again reloads it from its folder, refusing files that changed since ``add``.
``remove`` of a pinned adapter retires it: no new request may use it, and its slot is freed when
the last request using it releases it.

Versions (hot swap): ``publish(name, folder, version)`` registers the folder as ``name@vN`` and
makes it what ``name`` means from then on; the version it replaces is removed as above. A request
pins what its adapter name meant when it was admitted (``resolve``), so requests in flight finish
on the weights their KV was computed with and new ones take the new version.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcache.block_pool import IntegrityError
from models.config import DecoderConfig
from models.lora import WEIGHTS_FILE, AdapterError, LoraAdapter, load_adapter
from models.multi_lora import NO_ADAPTER, LoraBatch, MultiLora


@dataclass(frozen=True)
class _Registered:
    folder: Path
    digest: str  # sha256 of the weights file when it was added
    version: int | None = None  # published version (online learning); None for a plain adapter


@dataclass
class AdapterStats:
    loads: int = 0  # adapters written into a slot (first use or reload)
    evictions: int = 0
    no_slot: int = 0  # requests drafted without their adapter: every slot was pinned
    published: int = 0  # new versions of an adapter swapped in


def weights_digest(folder: Path) -> str:
    return hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()


class AdapterRegistry:
    def __init__(
        self,
        cfg: DecoderConfig,
        slots: int = 16,
        max_rank: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",  # the drafter's
    ) -> None:
        self.cfg, self.max_rank = cfg, max_rank
        self.stack = MultiLora(cfg, slots, max_rank, dtype, device)
        self.registered: dict[str, _Registered] = {}  # by key: the name, or name@vN for a version
        self.current: dict[str, str] = {}  # adapter name -> the key it means now
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recent first
        self.pins: Counter[str] = Counter()
        self.retiring: set[str] = set()  # removed while pinned
        self.stats = AdapterStats()

    @property
    def names(self) -> list[str]:
        """Adapters a new request may use."""
        return sorted(self.current)

    def has(self, name: str) -> bool:
        return name in self.current

    def resolve(self, name: str) -> str:
        """The key a request naming ``name`` pins now (its current version)."""
        return self.current.get(name, name)

    def version(self, name: str) -> int | None:
        """The published version ``name`` means now; None for a plain adapter or an unknown one."""
        key = self.current.get(name)
        return None if key is None else self.registered[key].version

    def add(self, name: str, folder: str | Path) -> LoraAdapter:
        """Register the PEFT LoRA in ``folder`` as ``name``; ``AdapterError`` says what is wrong."""
        if name in self.current or name in self.registered:
            state = "being removed (requests still use it)" if name in self.retiring else "registered"
            raise AdapterError(f"adapter {name!r} is already {state}; remove it first or pick another name")
        adapter = self._register(name, Path(folder), name, None)
        self.current[name] = name
        return adapter

    def publish(self, name: str, folder: str | Path, version: int) -> LoraAdapter:
        """Make version ``version`` in ``folder`` what ``name`` means for new requests; the
        version it replaces goes as ``remove`` takes it (at once, or when its last user ends)."""
        old = self.current.get(name)
        if old is not None and (self.registered[old].version or 0) >= version:
            at = self.registered[old].version
            raise AdapterError(f"adapter {name!r} is at version {at}; version {version} is not newer")
        key = f"{name}@v{version}"
        adapter = self._register(key, Path(folder), name, version)
        self.current[name] = key
        if old is not None:
            self._retire(old)
        self.stats.published += 1
        return adapter

    def remove(self, name: str) -> None:
        if not self.has(name):
            raise AdapterError(f"no adapter named {name!r}; registered: {self.names}")
        self._retire(self.current.pop(name))

    def can_acquire(self, name: str) -> bool:
        key = self.resolve(name)
        usable = key in self.registered and key not in self.retiring
        return usable and (key in self.resident or self._claimable() is not None)

    def acquire(self, name: str) -> int:
        """Pin what ``name`` means now (``resolve``: release that key later) for one request and
        return its slot, loading it (and evicting the least recently used unpinned adapter) when
        it is not resident. Check ``can_acquire`` first."""
        if not self.can_acquire(name):
            raise AdapterError(f"adapter {name!r} is unknown or every slot is pinned")
        name = self.resolve(name)
        if name not in self.resident:
            self._load(name, self._evict_for_slot())
        self.resident.move_to_end(name)
        self.pins[name] += 1
        return self.resident[name]

    def release(self, name: str) -> None:
        if self.pins[name] <= 0:
            raise AdapterError(f"adapter {name!r} released more often than acquired")
        self.pins[name] -= 1
        if not self.pins[name]:
            del self.pins[name]
            if name in self.retiring:
                self._forget(name)

    def slot_of(self, name: str) -> int | None:
        return self.resident.get(name)

    def batch(self, token_slots: torch.Tensor) -> LoraBatch | None:
        """``token_slots`` [T] int64 (``NO_ADAPTER`` for base tokens) -> the forward's adapters."""
        return self.stack.batch(token_slots)

    def one_slot(self, slot: int, n: int) -> LoraBatch:
        """The adapters of ``n`` tokens that all use ``slot`` (not ``NO_ADAPTER``)."""
        return self.stack.one_slot(slot, n)

    def check_integrity(self) -> None:
        if not set(self.current.values()) <= self.registered.keys() - self.retiring:
            raise IntegrityError(f"adapter names point at keys that are gone: {self.current}")
        slots = list(self.resident.values())
        if len(set(slots)) != len(slots):
            raise IntegrityError(f"two adapters share a slot: {dict(self.resident)}")
        for name, slot in self.resident.items():
            held = self.stack.adapters[slot]
            if held is None or held.name != name:
                raise IntegrityError(f"slot {slot} should hold {name!r}, holds {held and held.name!r}")
        stray = [s for s, a in enumerate(self.stack.adapters) if a is not None and s not in slots]
        if stray:
            raise IntegrityError(f"slots {stray} hold adapters the registry does not know")
        unpinnable = [n for n, c in self.pins.items() if c <= 0 or n not in self.resident]
        if unpinnable:
            raise IntegrityError(f"pinned adapters {unpinnable} are not resident")
        if not self.retiring <= self.pins.keys():
            raise IntegrityError(f"retiring adapters {self.retiring - self.pins.keys()} have no users left")

    # -- slots ----------------------------------------------------------------------------

    def _claimable(self) -> tuple[int, str | None] | None:
        """An empty slot, else the slot of the least recently used unpinned adapter and its
        name (to evict); None when every slot is pinned."""
        taken = set(self.resident.values())
        free = next((s for s in range(self.stack.slots) if s not in taken), None)
        if free is not None:
            return free, None
        victim = next((n for n in self.resident if not self.pins[n]), None)
        return None if victim is None else (self.resident[victim], victim)

    def _evict_for_slot(self) -> int:
        claim = self._claimable()
        assert claim is not None, "can_acquire was checked"
        slot, victim = claim
        if victim is not None:
            del self.resident[victim]
            self.stack.clear(slot)
            self.stats.evictions += 1
        return slot

    def _load(self, name: str, slot: int) -> None:
        entry = self.registered[name]
        if weights_digest(entry.folder) != entry.digest:
            raise AdapterError(
                f"adapter {name!r} changed on disk since it was added ({entry.folder}); "
                "remove and add it again"
            )
        self.stack.load(slot, load_adapter(entry.folder, self.cfg, self.max_rank, name))
        self.resident[name] = slot
        self.stats.loads += 1

    def _register(self, key: str, path: Path, name: str, version: int | None) -> LoraAdapter:
        adapter = load_adapter(path, self.cfg, self.max_rank, name)
        self.registered[key] = _Registered(path, weights_digest(path), version)
        return adapter

    def _retire(self, key: str) -> None:
        if self.pins[key]:
            self.retiring.add(key)
        else:
            self._forget(key)

    def _forget(self, name: str) -> None:
        slot = self.resident.pop(name, None)
        if slot is not None:
            self.stack.clear(slot)
        self.registered.pop(name)
        self.retiring.discard(name)


__all__ = ["NO_ADAPTER", "AdapterError", "AdapterRegistry", "AdapterStats"]
