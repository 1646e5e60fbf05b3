"""A few steps of the whole training recipe on micro models: losses fall, checkpoints load."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from models.tiny.pipeline import train_tiny
from models.tiny.recipe import LookupWeights, ModelSize, Recipe, Schedule, TargetPhase

MICRO = ModelSize(
    hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1,
    vision_hidden=32, vision_layers=1, vision_heads=2, patch_size=12,
)  # fmt: skip
SCHEDULE = Schedule(
    vision_steps=12, vision_batch=16, target_batch=4, turns=2,
    target_phases=(
        TargetPhase(10, 3e-3), TargetPhase(4, 1e-3, bf16=True),
        TargetPhase(4, 1e-3, bf16=True, lookup=LookupWeights(lens=1.0), focus=0.5),
    ), snapshot_every=4,
    distill_samples=8, drafter_steps=12, drafter_batch=4,
)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    recipe = Recipe(target=replace(MICRO, patch_size=8), drafter=MICRO, schedule=SCHEDULE)
    train_tiny(out, recipe, eval_n=4)
    return out


def _mean(rows: list[dict[str, float]]) -> float:
    return sum(r["loss"] for r in rows) / len(rows)


@pytest.mark.slow
def test_every_stage_loss_goes_down(trained: Path) -> None:
    losses = json.loads((trained / "tiny-train-log.json").read_text())["losses"]
    stages = {"target-vision", "drafter-vision", "target", "target-phase2", "target-phase3", "drafter"}
    assert set(losses) == stages
    for stage, rows in losses.items():
        if stage not in ("target-phase2", "target-phase3"):  # 4-step warm restarts need not improve
            assert _mean(rows[-3:]) < _mean(rows[:3]), stage


@pytest.mark.slow
def test_outputs_are_complete_checkpoints_with_cards(trained: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    for name in ("tiny-target", "tiny-drafter"):
        folder = trained / name
        assert (folder / "README.md").read_text().startswith(f"# {name}")
        AutoProcessor.from_pretrained(folder, local_files_only=True)
        AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
    assert (trained / "tiny-train-loss.png").stat().st_size > 1000
    metrics = json.loads((trained / "tiny-train-log.json").read_text())["metrics"]
    assert {"accuracy", "blank_image_accuracy", "per_kind", "agreement"} <= set(metrics)
    card = (trained / "tiny-target" / "README.md").read_text()
    assert "(bf16 autocast)" in card
    assert "lookup supervision: attention 1, value 1, lens 1; 50% of turns colour / where / exists" in card


@pytest.mark.slow
def test_a_snapshot_is_saved_every_few_steps_but_not_after_a_phases_last_step(trained: Path) -> None:
    # phase 1 (10 steps) snapshots after steps 4 and 8; phases 2 and 3 (4 steps) end on their 4th
    note = (trained / "tiny-target-snapshot" / "README.md").read_text()
    assert note.startswith("# tiny-target (in training: phase 1 of 3, step 8)")


@pytest.mark.slow
def test_resuming_after_the_first_target_phase_runs_only_the_rest(trained: Path, tmp_path: Path) -> None:
    recipe = Recipe(target=replace(MICRO, patch_size=8), drafter=MICRO, schedule=SCHEDULE)
    summary = train_tiny(tmp_path, recipe, eval_n=2, resume=(trained / "tiny-target", 1))
    losses = json.loads((tmp_path / "tiny-train-log.json").read_text())["losses"]
    assert set(losses) == {"drafter-vision", "target-phase2", "target-phase3", "drafter"}
    assert len(losses["target-phase2"]) == len(losses["target-phase3"]) == 4
    assert summary["resumed_from"]["phases_done"] == 1
