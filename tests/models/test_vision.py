"""The image path: transformers' tower + projector, and visual-token selection with positions kept."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from models.vision import VisualTokens, splice_images


def test_image_features_equal_transformers_get_image_features(checker: Any) -> None:
    prompt = checker.prompt("what is this ?", image_size=(48, 40), seed=5)
    ours = checker.model.vision(prompt.images)
    inputs = {k: v for k, v in prompt.images.items() if k != "mm_token_type_ids"}
    with torch.inference_mode():
        ref = checker.reference.model.get_image_features(**inputs).pooler_output
    assert len(ours) == len(ref) == 1
    assert ours[0].embeds.shape == ref[0].shape
    assert (ours[0].embeds - ref[0]).abs().max() <= 1e-5


def _prompt_with_image(num_visual: int, image_id: int = 9) -> torch.Tensor:
    return torch.tensor([1, 2] + [image_id] * num_visual + [3, 4])


def test_keeping_all_visual_tokens_reproduces_the_full_prompt() -> None:
    ids = _prompt_with_image(4)
    spliced = splice_images(ids, 9, [VisualTokens.full(torch.randn(4, 8))])
    assert torch.equal(spliced.token_ids, ids)
    assert torch.equal(spliced.positions, torch.arange(8))
    assert torch.equal(spliced.embed_index, torch.tensor([2, 3, 4, 5]))


def test_kept_visual_tokens_keep_their_original_positions() -> None:
    embeds = torch.randn(6, 8)
    kept = VisualTokens.full(embeds).keep(torch.tensor([4, 1]))
    spliced = splice_images(_prompt_with_image(6), 9, [kept])
    # prompt rows: 0,1 text; 2..7 image; 8,9 text. Kept visual tokens 1 and 4 sit at rows 3 and 6.
    assert spliced.positions.tolist() == [0, 1, 3, 6, 8, 9]
    assert torch.equal(spliced.embeds, embeds[[1, 4]])
    assert spliced.embed_index.tolist() == [2, 3]


def test_two_images_are_matched_to_placeholder_runs_in_order() -> None:
    ids = torch.tensor([1, 9, 9, 2, 9, 9, 9, 3])
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    spliced = splice_images(ids, 9, [VisualTokens.full(a), VisualTokens.full(b).keep(torch.tensor([2]))])
    assert spliced.positions.tolist() == [0, 1, 2, 3, 6, 7]
    assert torch.equal(spliced.embeds, torch.cat([a, b[2:]]))


def test_placeholder_count_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="5 image placeholder tokens but the images need 4"):
        splice_images(_prompt_with_image(5), 9, [VisualTokens.full(torch.randn(4, 8))])
