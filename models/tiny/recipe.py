"""Sizes and training schedule of the shipped tiny target and drafter.

Sized from measurements on the 2-core CPU (see the model cards): the target's decode step must
cost several drafter forwards, and the whole recipe must train in well under two hours.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    patch_size: int  # 72 px images: patch 8 -> 81 visual tokens, patch 12 -> 36

    @property
    def visual_tokens(self) -> int:
        return (72 // self.patch_size) ** 2


TARGET = ModelSize(
    hidden=384, intermediate=1024, layers=6, heads=6, kv_heads=2,
    vision_hidden=128, vision_layers=3, vision_heads=4, patch_size=8,
)  # fmt: skip
DRAFTER = ModelSize(
    hidden=64, intermediate=192, layers=2, heads=2, kv_heads=1,
    vision_hidden=64, vision_layers=2, vision_heads=2, patch_size=8,
)  # fmt: skip  # the target's patch size: transformers' assisted generation can feed it the same image


@dataclass(frozen=True)
class LookupWeights:
    """Weights of the lookup supervision's terms (``models/tiny/lookup.py``; 0 = off)."""

    attention: float = 1.0  # where one layer-0 head looks from a word naming a shape / colour
    value: float = 1.0  # what that layer's output at the word holds (a probe reads it)
    lens: float = 0.0  # ... read as output words through the model's own unembedding


LOOKUP_KINDS = ("color", "where", "exists")  # the question kinds that look an object up by content


@dataclass(frozen=True)
class TargetPhase:
    """One VLM training phase of the target: a fresh AdamW, warm-up and cosine decay."""

    steps: int
    lr: float  # peak
    bf16: bool = False  # matmuls under bfloat16 autocast (~1.5x faster steps on CPUs with avx512_bf16)
    lookup: LookupWeights | None = None  # lookup supervision added to the loss; None = off
    focus: float = 0.0  # share of turns asking a LOOKUP_KINDS question (the rest: any kind)


@dataclass(frozen=True)
class Schedule:
    vision_steps: int = 600  # per-patch cell / shape / colour / size pretraining of a vision tower
    vision_batch: int = 48
    vision_lr: float = 2e-3
    # VLM training of the target in phases, each a warm restart; on 2 cores about 51, 26 and
    # 62 minutes for the first three (bf16 steps take ~1.23 s)
    target_phases: tuple[TargetPhase, ...] = (
        TargetPhase(1500, 1.5e-3),
        TargetPhase(800, 6e-4),
        TargetPhase(3000, 5e-4, bf16=True),
        # lookup by content (colour of the X, where is the X, is there an X): one supervision
        # term per link of the lookup (why each is needed: models/tiny/lookup.py)
        TargetPhase(500, 5e-4, bf16=True, lookup=LookupWeights()),
        TargetPhase(600, 3e-4, bf16=True, lookup=LookupWeights()),
        TargetPhase(500, 3e-4, bf16=True, lookup=LookupWeights(lens=1.0)),
        TargetPhase(500, 5e-4, bf16=True, lookup=LookupWeights(lens=1.0), focus=0.75),
        TargetPhase(500, 3e-4, bf16=True, lookup=LookupWeights(lens=1.0), focus=0.5),
    )
    snapshot_every: int = 500  # target steps between in-training checkpoints (to follow progress)
    target_batch: int = 16
    turns: int = 3  # question/answer turns per training image (amortises the visual tokens)
    distill_samples: int = 6000  # default-style prompts answered by the target for the drafter
    drafter_steps: int = 4000  # (~6 min on 2 cores)
    drafter_batch: int = 32
    drafter_lr: float = 3e-3
    persona_share: float = 0.5  # fraction of target training turns in a demo user's style


@dataclass(frozen=True)
class Recipe:
    target: ModelSize = TARGET
    drafter: ModelSize = DRAFTER
    schedule: Schedule = field(default_factory=Schedule)
    seed: int = 0
