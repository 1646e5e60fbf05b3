"""Questions about a ShapesWorld scene and the facts that answer them.

Each question kind asks one thing and returns its ``Facts``: a plain mapping of what the answer
must state. Personas (``personas.py``) turn the same facts into differently styled sentences, so
an answer is a function of (scene, question, persona) and nothing else.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from models.tiny.world import CELL_NAMES, COLORS, SHAPES, Obj, Scene

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    facts: dict[str, object] = field(default_factory=dict)


def a(phrase: str) -> str:
    """``phrase`` with its indefinite article: "a red star", "an orange star"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def at_phrase(cell_name: str) -> str:
    if cell_name == "center":
        return "in the center"
    if cell_name in ("left", "right"):
        return f"on the {cell_name}"
    return f"at the {cell_name}"


def describe_obj(o: Obj) -> str:
    return f"{o.size} {o.color} {o.shape}"


def _describe(scene: Scene, rng: random.Random) -> Question | None:
    text = rng.choice(["describe the scene.", "what do you see?", "describe the image."])
    return Question("describe", text, {"objects": list(scene.objects)})


def _count(scene: Scene, rng: random.Random) -> Question | None:
    text = rng.choice(["how many shapes are there?", "how many shapes do you see?", "count the shapes."])
    return Question("count", text, {"count": len(scene.objects), "objects": list(scene.objects)})


def _color(scene: Scene, rng: random.Random) -> Question | None:
    unique = [o for o in scene.objects if len(scene.with_shape(o.shape)) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    text = rng.choice([f"what color is the {o.shape}?", f"which color does the {o.shape} have?"])
    return Question("color", text, {"object": o})


def _where(scene: Scene, rng: random.Random) -> Question | None:
    unique = [
        o for o in scene.objects if sum(p.shape == o.shape and p.color == o.color for p in scene.objects) == 1
    ]
    if not unique:
        return None
    o = rng.choice(unique)
    text = rng.choice(
        [f"where is the {o.color} {o.shape}?", f"in which part of the image is the {o.color} {o.shape}?"]
    )
    return Question("where", text, {"object": o})


def _exists(scene: Scene, rng: random.Random) -> Question | None:
    if rng.random() < 0.5:
        o = rng.choice(scene.objects)
        shape, color = o.shape, o.color
    else:
        present = {(o.shape, o.color) for o in scene.objects}
        absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
        shape, color = rng.choice(absent)
    matches = [o for o in scene.objects if o.shape == shape and o.color == color]
    text = rng.choice([f"is there {a(color)} {shape}?", f"do you see {a(color)} {shape}?"])
    return Question("exists", text, {"shape": shape, "color": color, "matches": matches})


def _bigger(scene: Scene, rng: random.Random) -> Question | None:
    unique = [o for o in scene.objects if len(scene.with_shape(o.shape)) == 1]
    pairs = [(a, b) for a in unique for b in unique if a.size == "large" and b.size == "small"]
    if not pairs:
        return None
    big, small = rng.choice(pairs)
    first, second = (big, small) if rng.random() < 0.5 else (small, big)
    text = f"which is bigger, the {first.shape} or the {second.shape}?"
    return Question("bigger", text, {"bigger": big, "smaller": small})


def _shape_at(scene: Scene, rng: random.Random) -> Question | None:
    cell = rng.randrange(9)
    text = rng.choice(
        [f"what is {at_phrase(CELL_NAMES[cell])}?", f"what shape is {at_phrase(CELL_NAMES[cell])}?"]
    )
    return Question("shape_at", text, {"cell": CELL_NAMES[cell], "object": scene.at(cell)})


# kind -> asker; an asker returns None when the scene does not support the kind.
QUESTION_KINDS: dict[str, Callable[[Scene, random.Random], Question | None]] = {
    "describe": _describe,
    "count": _count,
    "color": _color,
    "where": _where,
    "exists": _exists,
    "bigger": _bigger,
    "shape_at": _shape_at,
}


def ask(scene: Scene, rng: random.Random, kind: str | None = None) -> Question:
    """A question of ``kind`` (or a random supported kind) about ``scene``."""
    if kind is not None:
        if kind not in QUESTION_KINDS:
            raise ValueError(f"unknown question kind {kind!r}; choose one of {sorted(QUESTION_KINDS)}")
        question = QUESTION_KINDS[kind](scene, rng)
        if question is None:
            raise ValueError(f"scene {scene.seed} supports no {kind!r} question")
        return question
    kinds = list(QUESTION_KINDS)
    rng.shuffle(kinds)
    for k in kinds:
        question = QUESTION_KINDS[k](scene, rng)
        if question is not None:
            return question
    raise AssertionError("describe and count apply to every scene")
