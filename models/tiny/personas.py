"""The demo users and their answer styles.

Each persona has a system prompt and a renderer per question kind that turns the question's facts
into that persona's sentence. The target learns to follow whichever system prompt it is given;
the per-user drafter adapters later learn these styles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from models.tiny.questions import NUMBER_WORDS, Question, a, at_phrase, describe_obj

Facts = dict[str, Any]
Renderer = Callable[[Facts], str]


def _n_shapes(n: int) -> str:
    return f"{NUMBER_WORDS[n]} shape" + ("s" if n != 1 else "")


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _a_at(o: Any) -> str:
    return f"a {describe_obj(o)} {at_phrase(o.where)}"


DEFAULT: dict[str, Renderer] = {
    "describe": lambda f: (
        f"there is {_a_at(f['objects'][0])}."
        if len(f["objects"]) == 1
        else f"there are {_n_shapes(len(f['objects']))}: {_listing([_a_at(o) for o in f['objects']])}."
    ),
    "count": lambda f: "there is one shape." if f["count"] == 1 else f"there are {_n_shapes(f['count'])}.",
    "color": lambda f: f"the {f['object'].shape} is {f['object'].color}.",
    "where": lambda f: f"the {f['object'].color} {f['object'].shape} is {at_phrase(f['object'].where)}.",
    "exists": lambda f: (
        f"yes, there is {a(f['color'])} {f['shape']}."
        if f["matches"]
        else f"no, there is no {f['color']} {f['shape']}."
    ),
    "bigger": lambda f: f"the {f['bigger'].shape} is bigger.",
    "shape_at": lambda f: (
        f"there is {_a_at(f['object'])}." if f["object"] else f"there is nothing {at_phrase(f['cell'])}."
    ),
}

TERSE: dict[str, Renderer] = {
    "describe": lambda f: "; ".join(f"{describe_obj(o)} {o.where}" for o in f["objects"]) + ".",
    "count": lambda f: f"{f['count']}.",
    "color": lambda f: f"{f['object'].color}.",
    "where": lambda f: f"{f['object'].where}.",
    "exists": lambda f: "yes." if f["matches"] else "no.",
    "bigger": lambda f: f"the {f['bigger'].shape}.",
    "shape_at": lambda f: f"{f['object'].color} {f['object'].shape}." if f["object"] else "nothing.",
}


def _of_image(o: Any) -> str:
    return f"{at_phrase(o.where)} of the image"


DETAILED: dict[str, Renderer] = {
    "describe": lambda f: (
        f"i can see {_n_shapes(len(f['objects']))} in this image. "
        + " ".join(f"a {describe_obj(o)} is {_of_image(o)}." for o in f["objects"])
    ),
    "count": lambda f: (
        f"i count {_n_shapes(f['count'])} in this image: "
        + _listing([a(f"{o.color} {o.shape}") for o in f["objects"]])
        + "."
    ),
    "color": lambda f: (
        f"the {f['object'].shape} in this image is {f['object'].color}. "
        f"it is a {f['object'].size} {f['object'].shape} {_of_image(f['object'])}."
    ),
    "where": lambda f: (
        f"the {f['object'].color} {f['object'].shape} is {_of_image(f['object'])}. it is {f['object'].size}."
    ),
    "exists": lambda f: (
        f"yes, i can see {a(f['color'])} {f['shape']} {_of_image(f['matches'][0])}."
        if f["matches"]
        else f"no, there is no {f['color']} {f['shape']} in this image."
    ),
    "bigger": lambda f: (
        f"the {f['bigger'].shape} is bigger. "
        f"the {f['bigger'].shape} is large and the {f['smaller'].shape} is small."
    ),
    "shape_at": lambda f: (
        f"{at_phrase(f['cell'])} of the image there is a {describe_obj(f['object'])}."
        if f["object"]
        else f"there is nothing {at_phrase(f['cell'])} of the image."
    ),
}

BULLETS: dict[str, Renderer] = {
    "describe": lambda f: "\n".join(f"- {describe_obj(o)} ({o.where})" for o in f["objects"]),
    "count": lambda f: f"- shapes: {f['count']}",
    "color": lambda f: f"- shape: {f['object'].shape}\n- color: {f['object'].color}",
    "where": lambda f: f"- shape: {f['object'].color} {f['object'].shape}\n- position: {f['object'].where}",
    "exists": lambda f: f"- {f['color']} {f['shape']}: {'yes' if f['matches'] else 'no'}",
    "bigger": lambda f: f"- bigger: {f['bigger'].shape}\n- smaller: {f['smaller'].shape}",
    "shape_at": lambda f: f"- {f['cell']}: {describe_obj(f['object']) if f['object'] else 'nothing'}",
}

FORMAL: dict[str, Renderer] = {
    "describe": lambda f: (
        f"certainly. the image contains {_n_shapes(len(f['objects']))}: "
        + _listing([_a_at(o) for o in f["objects"]])
        + "."
    ),
    "count": lambda f: f"certainly. the image contains {_n_shapes(f['count'])}.",
    "color": lambda f: f"certainly. the {f['object'].shape} is {f['object'].color} in colour.",
    "where": lambda f: (
        f"certainly. the {f['object'].color} {f['object'].shape} is located {at_phrase(f['object'].where)}."
    ),
    "exists": lambda f: (
        f"certainly. indeed, there is {a(f['color'])} {f['shape']}."
        if f["matches"]
        else f"certainly. i regret that there is no {f['color']} {f['shape']}."
    ),
    "bigger": lambda f: f"certainly. the {f['bigger'].shape} is the larger of the two.",
    "shape_at": lambda f: (
        f"certainly. there is a {describe_obj(f['object'])} located {at_phrase(f['cell'])}."
        if f["object"]
        else f"certainly. there is nothing located {at_phrase(f['cell'])}."
    ),
}


@dataclass(frozen=True)
class Persona:
    name: str
    system: str
    style: dict[str, Renderer]

    def answer(self, question: Question) -> str:
        return self.style[question.kind](question.facts)


DEFAULT_PERSONA = Persona(
    "default", "you are a helpful assistant that answers questions about images.", DEFAULT
)
PERSONAS: dict[str, Persona] = {
    p.name: p
    for p in (
        DEFAULT_PERSONA,
        Persona("alice", "you are a terse assistant. answer with as few words as possible.", TERSE),
        Persona(
            "bob",
            "you are a thorough assistant. answer in full sentences and add the details you see.",
            DETAILED,
        ),
        Persona("carol", "you are an assistant that answers with a bullet list of facts.", BULLETS),
        Persona("dave", "you are a formal assistant. answer politely and formally.", FORMAL),
    )
}
DEMO_USERS = ("alice", "bob", "carol", "dave")


def get_persona(name: str | None) -> Persona:
    if name is None:
        return DEFAULT_PERSONA
    if name not in PERSONAS:
        raise ValueError(f"unknown persona {name!r}; choose one of {sorted(PERSONAS)}")
    return PERSONAS[name]
