"""The shipped tiny target and drafter: complete, small, and equal in transformers and our layer."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.check import ModelChecker, load_reference
from models.loader import load_model

CHECKPOINTS = Path(__file__).resolve().parents[3] / "checkpoints"
SHIPPED = ["tiny-target", "tiny-drafter"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_matches_transformers(name: str) -> None:
    path = CHECKPOINTS / name
    model = load_model(path)
    report = ModelChecker(model, load_reference(path, model.architecture), seed=3).run(decode_steps=4)
    assert report.prefill_max_abs_diff <= 1e-4
    assert report.decode_max_abs_diff <= 1e-4
    assert report.tree_max_abs_diff <= 1e-4
    assert report.batch_max_abs_diff <= 1e-4


def test_shipped_weights_fit_the_size_budget() -> None:
    total = sum(f.stat().st_size for name in SHIPPED for f in (CHECKPOINTS / name).glob("*.safetensors"))
    assert 0 < total <= 80 * 2**20


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_has_card_processor_and_template(name: str) -> None:
    folder = CHECKPOINTS / name
    for file in ("README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json"):
        assert (folder / file).is_file(), file
    assert (folder / "chat_template.jinja").read_text().startswith("{% for message in messages %}")


def test_target_and_drafter_share_one_tokenizer() -> None:
    texts = [(CHECKPOINTS / name / "tokenizer.json").read_text() for name in SHIPPED]
    assert texts[0] == texts[1]
