"""Text-only Llama / Qwen2 checkpoints load into the same decoder and match transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.check import ModelChecker, load_reference
from models.loader import load_model
from models.synthetic import RandomLlavaSpec, build_random_causal_lm


@pytest.mark.parametrize("family,tie", [("llama", False), ("qwen2", True)])
def test_causal_lm_checkpoint_matches_transformers(family: str, tie: bool, tmp_path: Path) -> None:
    path = build_random_causal_lm(tmp_path, RandomLlavaSpec(text_family=family, tie_embeddings=tie))
    model = load_model(path)
    assert model.vision is None and model.architecture.endswith("ForCausalLM")
    report = ModelChecker(model, load_reference(path, model.architecture), seed=1).run(decode_steps=4)
    assert report.prefill_max_abs_diff <= 1e-4
    assert report.decode_max_abs_diff <= 1e-4
    assert report.tree_max_abs_diff <= 1e-4
    assert report.batch_max_abs_diff <= 1e-4
