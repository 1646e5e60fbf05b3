"""ShapesWorld scenes: 1-5 coloured shapes on a 3x3 grid over a textured background.

A scene is a pure function of its seed. Objects sit in distinct grid cells with a little jitter;
large objects can overlap a neighbour (occlusion), drawn in a random order.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 72  # 3 cells of 24 px; with 8 px patches, 81 visual tokens, 3x3 patches per cell
CELL = IMAGE_SIZE // 3
MAX_SEED = 2**31 - 1

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 220, 40),
    "purple": (140, 55, 190),
    "orange": (250, 140, 25),
    "pink": (250, 135, 195),
    "cyan": (50, 215, 225),
}
SIZES = {"small": 6.0, "large": 11.5}  # radius in pixels
CELL_NAMES = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
BACKGROUNDS = (
    (128, 128, 128),
    (96, 100, 108),
    (150, 140, 120),
    (110, 120, 100),
    (70, 70, 78),
    (160, 160, 165),
)


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: int  # 0..8, row-major from the top left

    @property
    def where(self) -> str:
        return CELL_NAMES[self.cell]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # in reading order (by cell)
    background: tuple[int, int, int]
    seed: int

    def at(self, cell: int) -> Obj | None:
        return next((o for o in self.objects if o.cell == cell), None)

    def with_shape(self, shape: str) -> list[Obj]:
        return [o for o in self.objects if o.shape == shape]


def check_seed(seed: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    return seed


def sample_scene(seed: int) -> Scene:
    rng = random.Random(check_seed(seed))
    cells = sorted(rng.sample(range(9), rng.randint(1, 5)))
    objects = tuple(
        Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES)), cell) for cell in cells
    )
    return Scene(objects=objects, background=rng.choice(BACKGROUNDS), seed=seed)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], phase: float) -> list[tuple[float, float]]:
        return [
            (cx + radii[i % len(radii)] * math.cos(phase + 2 * math.pi * i / n),
             cy + radii[i % len(radii)] * math.sin(phase + 2 * math.pi * i / n))
            for i in range(n)
        ]  # fmt: skip

    if shape == "triangle":
        return ring(3, [r * 1.1], -math.pi / 2)
    if shape == "star":
        return ring(10, [r * 1.15, r * 0.5], -math.pi / 2)
    if shape == "diamond":
        return ring(4, [r * 1.1], -math.pi / 2)
    if shape == "cross":
        a, b = r, r * 0.38
        pts = [
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
        ]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(f"no polygon for shape {shape!r}")


def render(scene: Scene) -> Image.Image:
    """The scene as an ``IMAGE_SIZE`` square RGB image (deterministic given the scene)."""
    rng = np.random.default_rng(scene.seed)
    base = np.array(scene.background, dtype=np.float32)
    ramp = np.linspace(-12, 12, IMAGE_SIZE, dtype=np.float32)
    gradient = ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
    noise = rng.normal(0, 7, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    pixels = np.clip(base + gradient + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    order = list(scene.objects)
    random.Random(scene.seed + 1).shuffle(order)
    for obj in order:
        cx = (obj.cell % 3 + 0.5) * CELL + rng.uniform(-2, 2)
        cy = (obj.cell // 3 + 0.5) * CELL + rng.uniform(-2, 2)
        r = SIZES[obj.size] * rng.uniform(0.95, 1.1)
        fill = tuple(int(np.clip(c + rng.normal(0, 8), 0, 255)) for c in COLORS[obj.color])
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            s = r * 0.9
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)
    return image
