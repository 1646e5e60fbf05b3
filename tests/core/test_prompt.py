"""Prompt validation, image digests, and EncodedPrompt chunks with their visual embeddings."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from core.prompt import EncodedPrompt, Prompt, image_digest

IMG = 99  # the image placeholder id


def _image(color: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (4, 3)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_empty_prompt_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        Prompt(token_ids=())


@pytest.mark.parametrize(("placeholders", "images"), [(2, 1), (1, 2), (0, 1), (1, 0)])
def test_placeholder_and_image_counts_must_match(placeholders: int, images: int) -> None:
    tokens = (1, *([IMG] * placeholders), 2)
    with pytest.raises(ValueError, match=f"{placeholders} image placeholders but {images} images"):
        Prompt(tokens, images=tuple(_image() for _ in range(images)), image_token_id=IMG)


def test_text_prompt_needs_no_images_or_digests() -> None:
    prompt = Prompt((5, 6, 7))
    assert prompt.images == ()
    assert prompt.digests == ()


def test_digests_are_computed_one_per_image_in_order() -> None:
    red, blue = _image((255, 0, 0)), _image((0, 0, 255))
    prompt = Prompt((1, IMG, 2, IMG), images=(red, blue), image_token_id=IMG)
    assert prompt.digests == (image_digest(red), image_digest(blue))
    assert prompt.digests[0] != prompt.digests[1]


def test_identical_pixels_give_the_same_digest() -> None:
    a, b = _image(), _image()
    assert a is not b
    assert image_digest(a) == image_digest(b)
    assert len(image_digest(a)) == 64  # SHA-256 hex


def test_one_changed_pixel_changes_the_digest() -> None:
    a, b = _image(), _image()
    b.putpixel((3, 2), (10, 20, 31))
    assert image_digest(a) != image_digest(b)


def test_same_bytes_in_another_size_or_mode_differ() -> None:
    flat, tall = _image(size=(4, 3)), _image(size=(3, 4))
    assert flat.tobytes() == tall.tobytes()
    assert image_digest(flat) != image_digest(tall)
    rgb, gray = Image.new("RGB", (4, 3), (10, 10, 10)), Image.new("L", (12, 3), 10)
    assert rgb.tobytes() == gray.tobytes()
    assert image_digest(rgb) != image_digest(gray)


def test_digests_do_not_take_part_in_equality() -> None:
    image = _image()
    computed = Prompt((IMG,), images=(image,), image_token_id=IMG)
    given = Prompt((IMG,), images=(image,), image_token_id=IMG, digests=("precomputed",))
    assert given.digests == ("precomputed",)
    assert computed == given


def _encoded() -> EncodedPrompt:
    # 10 rows; rows 2, 3, 4 and 7 are visual tokens whose embedding row is 10 * row
    index = torch.tensor([2, 3, 4, 7])
    embeds = (index * 10).float()[:, None].repeat(1, 3)
    return EncodedPrompt(torch.arange(100, 110), torch.arange(10) * 2, embeds, index)


def test_chunk_reindexes_the_embeddings_inside_it() -> None:
    chunk = _encoded().chunk(3, 8)
    assert chunk.token_ids.tolist() == [103, 104, 105, 106, 107]
    assert chunk.positions.tolist() == [6, 8, 10, 12, 14]
    assert chunk.embed_index is not None and chunk.embeds is not None
    assert chunk.embed_index.tolist() == [0, 1, 4]  # rows 3, 4, 7 of the prompt
    assert chunk.embeds[:, 0].tolist() == [30.0, 40.0, 70.0]
    assert chunk.num_tokens == 5


def test_chunk_drops_embeddings_outside_it() -> None:
    head = _encoded().chunk(0, 3)
    assert head.embed_index is not None and head.embeds is not None
    assert head.embed_index.tolist() == [2]
    assert head.embeds.tolist() == [[20.0, 20.0, 20.0]]
    tail = _encoded().chunk(4, 10)
    assert tail.embed_index is not None and tail.embeds is not None
    assert tail.embed_index.tolist() == [0, 3]
    assert tail.embeds[:, 0].tolist() == [40.0, 70.0]


def test_chunk_without_visual_rows_has_no_embeddings() -> None:
    chunk = _encoded().chunk(8, 10)
    assert chunk.token_ids.tolist() == [108, 109]
    assert chunk.embeds is None and chunk.embed_index is None
    assert _encoded().chunk(5, 7).embeds is None


def test_chunks_cover_every_embedding_exactly_once() -> None:
    encoded = _encoded()
    seen = []
    for start in range(0, 10, 3):
        chunk = encoded.chunk(start, min(start + 3, 10))
        if chunk.embed_index is not None:
            assert chunk.embeds is not None
            seen.extend(
                (start + int(i), float(e)) for i, e in zip(chunk.embed_index, chunk.embeds[:, 0], strict=True)
            )
    assert seen == [(2, 20.0), (3, 30.0), (4, 40.0), (7, 70.0)]


def test_text_only_chunk_slices_tokens_and_positions() -> None:
    encoded = EncodedPrompt(torch.arange(6), torch.arange(6) + 1, None, None)
    chunk = encoded.chunk(2, 5)
    assert chunk.token_ids.tolist() == [2, 3, 4]
    assert chunk.positions.tolist() == [3, 4, 5]
    assert chunk.embeds is None and chunk.embed_index is None
