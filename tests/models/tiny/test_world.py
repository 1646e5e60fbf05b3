"""ShapesWorld scenes are a pure function of the seed and follow the world's rules."""

from __future__ import annotations

import numpy as np
import pytest

from models.tiny.world import CELL_NAMES, COLORS, IMAGE_SIZE, SHAPES, SIZES, check_seed, render, sample_scene


def test_same_seed_same_scene_and_pixels() -> None:
    a, b = sample_scene(1234), sample_scene(1234)
    assert a == b
    assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))


def test_different_seeds_give_different_images() -> None:
    images = {np.asarray(render(sample_scene(s))).tobytes() for s in range(20)}
    assert len(images) == 20


@pytest.mark.parametrize("seed", range(0, 400, 7))
def test_scene_rules(seed: int) -> None:
    scene = sample_scene(seed)
    cells = [o.cell for o in scene.objects]
    assert 1 <= len(scene.objects) <= 5
    assert len(set(cells)) == len(cells) and cells == sorted(cells)
    for o in scene.objects:
        assert o.shape in SHAPES and o.color in COLORS and o.size in SIZES and o.where in CELL_NAMES


def test_world_has_the_promised_variety() -> None:
    assert len(SHAPES) >= 6 and len(COLORS) >= 8 and len(SIZES) == 2 and len(CELL_NAMES) == 9
    seen = {(o.shape, o.color) for s in range(2000) for o in sample_scene(s).objects}
    assert len(seen) == len(SHAPES) * len(COLORS)


def test_object_colour_is_visible_at_its_cell() -> None:
    """The rendered pixel at a small object's cell centre is close to the object's colour."""
    found = 0
    for seed in range(300):
        scene = sample_scene(seed)
        image = np.asarray(render(scene)).astype(int)
        for o in scene.objects:
            if o.shape in ("circle", "square", "diamond"):  # shapes that cover their centre
                cy, cx = (o.cell // 3 + 0.5) * IMAGE_SIZE / 3, (o.cell % 3 + 0.5) * IMAGE_SIZE / 3
                pixel = image[int(cy), int(cx)]
                neighbours = [p for p in scene.objects if abs(p.cell - o.cell) in (1, 3)]
                occluded = any(p.size == "large" for p in neighbours)
                if not occluded:
                    assert np.abs(pixel - np.array(COLORS[o.color])).max() < 60, (seed, o)
                    found += 1
    assert found > 100


def test_seed_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="seed must be in"):
        check_seed(-1)
    with pytest.raises(ValueError, match="seed must be in"):
        sample_scene(2**31)
