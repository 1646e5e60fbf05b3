"""The drafter's adapter registry: errors a user can act on, LRU residency, pins, run-time changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drafter_pool.adapters import AdapterRegistry
from models.config import DecoderConfig
from models.loader import load_model
from models.lora import CONFIG_FILE, WEIGHTS_FILE, AdapterError
from tests.lora_helpers import DRAFTER, write_adapter

TARGET = DRAFTER.parent / "tiny-target"


@pytest.fixture(scope="module")
def cfg() -> DecoderConfig:
    return load_model(DRAFTER).decoder.cfg


@pytest.fixture
def folders(tmp_path: Path, cfg: DecoderConfig) -> dict[str, Path]:
    return {name: write_adapter(tmp_path / name, cfg, seed=i) for i, name in enumerate(["a", "b", "c"])}


def registry(cfg: DecoderConfig, folders: dict[str, Path], slots: int) -> AdapterRegistry:
    reg = AdapterRegistry(cfg, slots=slots, max_rank=8)
    for name, folder in folders.items():
        reg.add(name, folder)
    reg.check_integrity()
    return reg


def slot_weights(reg: AdapterRegistry, name: str) -> list[torch.Tensor]:
    """Every stacked A and B of the slot that holds ``name``."""
    slot = reg.slot_of(name)
    assert slot is not None
    return [t[slot].clone() for stack in (reg.stack.a, reg.stack.b) for t in stack.values()]


def delta(reg: AdapterRegistry, name: str) -> torch.Tensor:
    """The adapter's q/k/v delta on a fixed input, through whatever slot it sits in now."""
    slot = reg.slot_of(name)
    assert slot is not None
    x = torch.randn(3, reg.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    lora = reg.batch(torch.full((3,), slot))
    assert lora is not None
    out = torch.zeros(3, reg.stack.b[(0, "self_attn.qkv_proj")].shape[2])
    return lora.add_to(out, 0, "self_attn.qkv_proj", x)


# -- errors when adding ---------------------------------------------------------------------


def test_missing_weights_file_is_named(tmp_path: Path, cfg: DecoderConfig) -> None:
    folder = write_adapter(tmp_path / "x", cfg)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterError, match=r"no adapter_model\.safetensors"):
        AdapterRegistry(cfg).add("x", folder)


def test_missing_folder_is_named(tmp_path: Path, cfg: DecoderConfig) -> None:
    with pytest.raises(AdapterError, match="does not exist"):
        AdapterRegistry(cfg).add("x", tmp_path / "nowhere")


def test_other_peft_types_are_refused(tmp_path: Path, cfg: DecoderConfig) -> None:
    folder = write_adapter(tmp_path / "x", cfg, peft_type="IA3")
    with pytest.raises(AdapterError, match="'IA3' adapter; only LORA"):
        AdapterRegistry(cfg).add("x", folder)


def test_dora_is_refused_rather_than_misread(tmp_path: Path, cfg: DecoderConfig) -> None:
    folder = write_adapter(tmp_path / "x", cfg, use_dora=True)
    with pytest.raises(AdapterError, match="DoRA"):
        AdapterRegistry(cfg).add("x", folder)


def test_vision_tower_modules_are_unsupported(tmp_path: Path, cfg: DecoderConfig) -> None:
    key = "base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
    folder = write_adapter(tmp_path / "x", cfg, extra_keys={key: torch.zeros(4, 64)})
    with pytest.raises(AdapterError, match="unsupported target module"):
        AdapterRegistry(cfg).add("x", folder)


def test_embedding_lora_is_unsupported(tmp_path: Path, cfg: DecoderConfig) -> None:
    key = "base_model.model.model.language_model.embed_tokens.lora_embedding_A"
    folder = write_adapter(tmp_path / "x", cfg, extra_keys={key: torch.zeros(4, 10)})
    with pytest.raises(AdapterError, match="unsupported target module"):
        AdapterRegistry(cfg).add("x", folder)


def test_rank_over_the_configured_maximum_is_refused(tmp_path: Path, cfg: DecoderConfig) -> None:
    folder = write_adapter(tmp_path / "x", cfg, rank=12)
    with pytest.raises(AdapterError, match="rank 12 of q_proj exceeds the configured maximum 8"):
        AdapterRegistry(cfg, max_rank=8).add("x", folder)


def test_adapter_made_for_another_base_model_is_refused(tmp_path: Path, cfg: DecoderConfig) -> None:
    target_cfg = load_model(TARGET).decoder.cfg  # same tokenizer, other sizes
    folder = write_adapter(tmp_path / "x", target_cfg)
    with pytest.raises(AdapterError, match="made for another base model"):
        AdapterRegistry(cfg).add("x", folder)


def test_unpaired_lora_matrices_are_refused(tmp_path: Path, cfg: DecoderConfig) -> None:
    from safetensors.torch import load_file, save_file

    folder = write_adapter(tmp_path / "x", cfg)
    tensors = load_file(folder / WEIGHTS_FILE)
    save_file(
        {k: v for k, v in tensors.items() if "layers.1.self_attn.v_proj.lora_B" not in k},
        folder / WEIGHTS_FILE,
    )
    with pytest.raises(AdapterError, match="unpaired: \\['layer 1 v_proj'\\]"):
        AdapterRegistry(cfg).add("x", folder)


def test_broken_config_json_is_named(tmp_path: Path, cfg: DecoderConfig) -> None:
    folder = write_adapter(tmp_path / "x", cfg)
    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        AdapterRegistry(cfg).add("x", folder)


def test_a_name_cannot_be_added_twice(cfg: DecoderConfig, folders: dict[str, Path]) -> None:
    reg = registry(cfg, folders, slots=2)
    with pytest.raises(AdapterError, match="already registered"):
        reg.add("a", folders["b"])


# -- residency --------------------------------------------------------------------------------


def test_least_recently_used_unpinned_adapter_is_evicted(
    cfg: DecoderConfig, folders: dict[str, Path]
) -> None:
    reg = registry(cfg, folders, slots=2)
    for name in ("a", "b"):
        reg.acquire(name)
        reg.release(name)
    reg.acquire("a")  # a is now the more recent
    reg.release("a")
    reg.acquire("c")
    reg.check_integrity()
    assert reg.slot_of("b") is None and reg.slot_of("a") is not None
    assert reg.stats.evictions == 1 and reg.stats.loads == 3


def test_evicted_adapter_reloads_with_the_same_weights(cfg: DecoderConfig, folders: dict[str, Path]) -> None:
    reg = registry(cfg, folders, slots=1)
    reg.acquire("a")
    before, weights = delta(reg, "a"), slot_weights(reg, "a")
    reg.release("a")
    reg.acquire("b")  # evicts a
    reg.release("b")
    reg.acquire("a")  # reloads a
    reg.check_integrity()
    assert reg.stats.loads == 3
    assert float(before.abs().max()) > 0
    assert torch.equal(delta(reg, "a"), before)
    assert all(torch.equal(x, y) for x, y in zip(slot_weights(reg, "a"), weights, strict=True))


def test_pinned_adapters_are_never_evicted(cfg: DecoderConfig, folders: dict[str, Path]) -> None:
    reg = registry(cfg, folders, slots=2)
    reg.acquire("a")
    reg.acquire("b")
    assert not reg.can_acquire("c")
    with pytest.raises(AdapterError, match="every slot is pinned"):
        reg.acquire("c")
    assert reg.can_acquire("a")  # resident: another request may share it
    reg.release("b")
    assert reg.can_acquire("c")
    reg.acquire("c")
    reg.check_integrity()
    assert reg.slot_of("a") is not None and reg.slot_of("b") is None


def test_files_changed_on_disk_are_not_reloaded_silently(
    cfg: DecoderConfig, folders: dict[str, Path]
) -> None:
    reg = registry(cfg, folders, slots=1)
    write_adapter(folders["a"], cfg, seed=99)  # same name, other weights
    with pytest.raises(AdapterError, match="changed on disk"):
        reg.acquire("a")
    reg.check_integrity()


def test_release_without_acquire_is_an_error(cfg: DecoderConfig, folders: dict[str, Path]) -> None:
    reg = registry(cfg, folders, slots=2)
    with pytest.raises(AdapterError, match="released more often"):
        reg.release("a")


# -- adding and removing at run time ----------------------------------------------------------


def test_removing_an_idle_adapter_frees_its_slot(cfg: DecoderConfig, folders: dict[str, Path]) -> None:
    reg = registry(cfg, folders, slots=2)
    reg.acquire("a")
    reg.release("a")
    reg.remove("a")
    reg.check_integrity()
    assert not reg.has("a") and reg.slot_of("a") is None and reg.names == ["b", "c"]
    assert all(a is None for a in reg.stack.adapters)
    reg.add("a", folders["a"])  # the name is free again
    assert reg.has("a")


def test_removing_a_pinned_adapter_waits_for_its_last_user(
    cfg: DecoderConfig, folders: dict[str, Path]
) -> None:
    reg = registry(cfg, folders, slots=2)
    slot = reg.acquire("a")
    reg.remove("a")
    reg.check_integrity()
    assert not reg.has("a") and not reg.can_acquire("a")
    assert reg.slot_of("a") == slot  # the running request keeps drafting with it
    with pytest.raises(AdapterError, match="being removed"):
        reg.add("a", folders["a"])
    reg.release("a")
    reg.check_integrity()
    assert reg.slot_of("a") is None and reg.stack.adapters[slot] is None


def test_removing_an_unknown_adapter_lists_the_known_ones(
    cfg: DecoderConfig, folders: dict[str, Path]
) -> None:
    reg = registry(cfg, folders, slots=2)
    with pytest.raises(AdapterError, match="registered: \\['a', 'b', 'c'\\]"):
        reg.remove("zed")


# -- published versions (online learning's hot swap) ---------------------------------------


def test_a_published_version_is_what_new_requests_get_while_old_pins_keep_theirs(
    cfg: DecoderConfig, folders: dict[str, Path], tmp_path: Path
) -> None:
    reg = AdapterRegistry(cfg, slots=3, max_rank=8)
    reg.publish("carol", folders["a"], version=1)
    assert reg.has("carol") and reg.version("carol") == 1 and reg.resolve("carol") == "carol@v1"
    old_key, old_slot = reg.resolve("carol"), reg.acquire("carol")  # a request in flight on v1
    old_delta = delta(reg, old_key)
    reg.publish("carol", folders["b"], version=2)
    reg.check_integrity()
    assert reg.version("carol") == 2 and reg.names == ["carol"]
    assert reg.slot_of(old_key) == old_slot and torch.equal(delta(reg, old_key), old_delta)  # untouched
    new_key = reg.resolve("carol")
    reg.acquire("carol")
    assert new_key == "carol@v2" and not torch.equal(delta(reg, new_key), old_delta)
    reg.release(old_key)  # v1's last user ends: v1 is gone
    assert old_key not in reg.registered and reg.slot_of(old_key) is None
    reg.release(new_key)
    reg.check_integrity()
    assert reg.stats.published == 2


def test_an_older_or_equal_version_is_refused(cfg: DecoderConfig, folders: dict[str, Path]) -> None:
    reg = AdapterRegistry(cfg, slots=2, max_rank=8)
    reg.publish("carol", folders["a"], version=3)
    with pytest.raises(AdapterError, match="at version 3; version 3 is not newer"):
        reg.publish("carol", folders["b"], version=3)
    assert reg.version("carol") == 3
