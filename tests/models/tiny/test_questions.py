"""Answers are a function of the scene: each is re-derived here from the question text alone."""

from __future__ import annotations

import re

import pytest

from models.tiny.personas import DEMO_USERS, PERSONAS, get_persona
from models.tiny.questions import NUMBER_WORDS, QUESTION_KINDS
from models.tiny.questions import at_phrase as at
from models.tiny.samples import make_sample
from models.tiny.world import CELL_NAMES, COLORS, SHAPES, Scene


def _expected_default(scene: Scene, kind: str, text: str) -> str | None:
    """The default-style answer, computed independently of the question's own facts."""
    shape = next((s for s in SHAPES if re.search(rf"\b{s}\b", text)), None)
    color = next((c for c in COLORS if re.search(rf"\b{c}\b", text)), None)
    if kind == "count":
        n = len(scene.objects)
        return "there is one shape." if n == 1 else f"there are {NUMBER_WORDS[n]} shapes."
    if kind == "color":
        (obj,) = [o for o in scene.objects if o.shape == shape]
        return f"the {shape} is {obj.color}."
    if kind == "exists":
        present = any(o.shape == shape and o.color == color for o in scene.objects)
        article = "an" if color and color[0] in "aeiou" else "a"
        return f"yes, there is {article} {color} {shape}." if present else f"no, there is no {color} {shape}."
    if kind == "where":
        (obj,) = [o for o in scene.objects if o.shape == shape and o.color == color]
        return obj.where
    if kind == "shape_at":
        cell = max((c for c in CELL_NAMES if c in text), key=len)
        obj = scene.at(CELL_NAMES.index(cell))
        return "nothing" if obj is None else f"{obj.size} {obj.color} {obj.shape}"
    if kind == "bigger":
        named = re.findall(r"the (\w+)", text)
        large = [o.shape for o in scene.objects if o.shape in named and o.size == "large"]
        return f"the {large[0]} is bigger."
    return None


@pytest.mark.parametrize("seed", range(300))
def test_default_answer_matches_the_scene(seed: int) -> None:
    sample = make_sample(seed)
    expected = _expected_default(sample.scene, sample.question.kind, sample.question.text)
    if sample.question.kind in ("where", "shape_at"):
        assert expected is not None and expected in sample.answer
    elif expected is not None:
        assert sample.answer == expected


def test_describe_lists_every_object_in_reading_order() -> None:
    for seed in range(200):
        sample = make_sample(seed, kind="describe")
        cursor = 0
        for o in sample.scene.objects:  # each object appears after the previous one
            cursor = sample.answer.index(f"{o.size} {o.color} {o.shape} {at(o.where)}", cursor) + 1


def test_at_least_six_question_kinds_all_occur() -> None:
    assert len(QUESTION_KINDS) >= 6
    kinds = {make_sample(seed).question.kind for seed in range(500)}
    assert kinds == set(QUESTION_KINDS)


def test_personas_answer_the_same_question_differently() -> None:
    for seed in range(50):
        answers = {make_sample(seed, p).answer for p in DEMO_USERS} | {make_sample(seed).answer}
        assert len(answers) == 5
    systems = {p.system for p in PERSONAS.values()}
    assert len(systems) == len(PERSONAS)


def test_turns_ask_different_questions_about_one_scene() -> None:
    turns = [make_sample(77, turn=t) for t in range(4)]
    assert len({t.scene for t in turns}) == 1
    assert len({t.question.text for t in turns}) > 1


def test_unknown_persona_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown persona 'eve'"):
        get_persona("eve")
