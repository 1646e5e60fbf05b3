"""One ShapesWorld sample: a scene, a question about it, and a persona's answer.

Everything is a pure function of ``(seed, persona, kind)``. Training uses seeds below
``EVAL_SEED_START``; evaluation draws from at or above it, so it never sees a training scene.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

from models.tiny.personas import Persona, get_persona
from models.tiny.questions import Question, ask
from models.tiny.world import IMAGE_SIZE, Scene, check_seed, render, sample_scene

EVAL_SEED_START = 1_000_000_000


@dataclass(frozen=True)
class Sample:
    seed: int
    scene: Scene
    question: Question
    persona: Persona
    answer: str

    @property
    def system(self) -> str:
        return self.persona.system

    def image(self) -> Image.Image:
        return render(self.scene)

    def messages(self) -> list[dict[str, object]]:
        """The chat the model sees: system, then user with the image and the question."""
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question.text}]},
        ]

    def as_json(self) -> dict[str, str]:
        return {"question": self.question.text, "answer": self.answer, "system": self.system}


def make_sample(seed: int, persona: str | None = None, kind: str | None = None, turn: int = 0) -> Sample:
    """Sample ``seed``'s scene with its ``turn``-th question (turns ask about the same image)."""
    scene = sample_scene(check_seed(seed))
    question = ask(scene, random.Random(f"{seed}/{turn}"), kind)
    who = get_persona(persona)
    return Sample(seed=seed, scene=scene, question=question, persona=who, answer=who.answer(question))


def blank_image(background: tuple[int, int, int] = (128, 128, 128)) -> Image.Image:
    """A scene with nothing in it, for checking that answers depend on the image."""
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
