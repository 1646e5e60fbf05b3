"""Lookup supervision: teach the target to find an object by what a word names, and say it.

A language model trained on ShapesWorld answers alone learns to look visual tokens up by grid cell
("what is at the top left?") but not by content ("what color is the circle?"): it settles on the
colours present anywhere in the image, about half right with 2-3 objects, and neither more steps,
more such questions nor a perfect vision tower moved it off that plateau: at the answer's colour
token no head attends to the named shape's cell more than to the other objects' cells. Three
auxiliary terms break the plateau, one per link of the lookup, each on every word after the
image that names a shape or a colour present in the scene (in the questions and in the answers):

- ``attention``: head ``head`` of layer ``layer`` looks at the visual tokens of the cells holding
  such an object (``-log`` of its attention mass there);
- ``value``: that layer's output at the word holds what is there: a linear probe (trained with
  the model, thrown away after) reads the named objects' shapes, colours and cells from it;
- ``lens``: the same output, read through the model's own final norm and tied unembedding,
  names the colours of the objects a shape word names (the shapes, for a colour word), so that a
  later head copying the word's state carries words the output layer already reads.

Each term is needed (probes on 150 colour questions): attention alone teaches the head to look
(0.97 of its mass on the named cell), but the word's state does not carry the colour (a probe
after layer 0 reads it 0.29 of the time); with the value term the probe reads it 0.99 of the
time, yet the answer position still reads the image, not the word. The lens term, with phases
where most turns ask colour / where / exists questions, makes colour answers follow the word
(the recipe's phases 4-8; the target's accuracy per question kind is in its model card).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from models.synthetic import IMAGE_TOKEN
from models.tiny.data import Batch, ChatEncoder
from models.tiny.recipe import LookupWeights
from models.tiny.samples import Sample
from models.tiny.world import COLORS, SHAPES, Obj, Scene

CELLS = 9
COLOR_NAMES = tuple(COLORS)  # COLORS maps a name to its RGB


@dataclass(frozen=True)
class LookupTargets:
    rows: torch.Tensor  # [N] int64: batch row of each supervised word
    positions: torch.Tensor  # [N] int64: its position in the row
    visual: torch.Tensor  # [N, V] int64: positions of that row's visual tokens
    on_object: torch.Tensor  # [N, V] bool: visual tokens in a cell holding what the word names
    facts: torch.Tensor  # [N, shapes + colours + cells] float: 1 for each named object's properties
    names_shape: torch.Tensor  # [N] bool: the word is a shape word (else a colour word)


def patch_cells(visual_tokens: int) -> torch.Tensor:
    """``[V]`` int64: the 3x3 grid cell of each visual token (row-major patches)."""
    grid = round(visual_tokens**0.5)
    return torch.tensor([(r * 3 // grid) * 3 + c * 3 // grid for r in range(grid) for c in range(grid)])


def facts_of(objects: Sequence[Obj]) -> torch.Tensor:
    """``[shapes + colours + cells]``: the union of the objects' shape, colour and cell one-hots."""
    out = torch.zeros(len(SHAPES) + len(COLORS) + CELLS)
    for o in objects:
        out[SHAPES.index(o.shape)] = 1
        out[len(SHAPES) + COLOR_NAMES.index(o.color)] = 1
        out[len(SHAPES) + len(COLORS) + o.cell] = 1
    return out


class WordCells:
    """Which objects of a scene a token names (a shape or a colour word), and where they are."""

    def __init__(self, encoder: ChatEncoder) -> None:
        def token(word: str) -> int:
            ids = encoder.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(
                    f"{word!r} is not one token of this tokenizer; lookup supervision needs it to be"
                )
            return int(ids[0])

        self.shape_tokens = [token(s) for s in SHAPES]
        self.color_tokens = [token(c) for c in COLOR_NAMES]
        self.shapes = dict(zip(self.shape_tokens, SHAPES, strict=True))
        self.colors = dict(zip(self.color_tokens, COLOR_NAMES, strict=True))
        self.image_token = int(encoder.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        self.cells = patch_cells(encoder.visual_tokens)

    def named(self, token: int, scene: Scene) -> list[Obj]:
        if token in self.shapes:
            return [o for o in scene.objects if o.shape == self.shapes[token]]
        if token in self.colors:
            return [o for o in scene.objects if o.color == self.colors[token]]
        return []

    def targets(self, batch: Batch, conversations: Sequence[Sequence[Sample]]) -> LookupTargets | None:
        """Every word after the image (questions and answers) naming a shape or colour in the scene."""
        rows, positions, visual, on_object, facts, names_shape = [], [], [], [], [], []
        for row, conv in enumerate(conversations):
            ids = batch.input_ids[row].tolist()
            image = [i for i, t in enumerate(ids) if t == self.image_token]
            if len(image) != len(self.cells):
                raise ValueError(f"row {row} has {len(image)} visual tokens, expected {len(self.cells)}")
            for pos in range(image[-1] + 1, int(batch.attention_mask[row].sum())):
                objects = self.named(ids[pos], conv[0].scene)
                if objects:
                    rows.append(row)
                    positions.append(pos)
                    visual.append(image)
                    on_object.append(torch.isin(self.cells, torch.tensor([o.cell for o in objects])))
                    facts.append(facts_of(objects))
                    names_shape.append(ids[pos] in self.shapes)
        if not rows:
            return None
        return LookupTargets(
            torch.tensor(rows),
            torch.tensor(positions),
            torch.tensor(visual),
            torch.stack(on_object),
            torch.stack(facts),
            torch.tensor(names_shape),
        )


class LookupLoss:
    """The weighted sum of the three terms for the forward just run under ``capturing()``,
    computed from what layer ``layer`` of the language model saw and returned (any attention
    implementation). ``parameters()`` are the value probe's, to train with the model."""

    def __init__(
        self, model: Any, encoder: ChatEncoder, weights: LookupWeights, layer: int = 0, head: int = 0
    ) -> None:
        language_model = model.model.language_model
        self.layer, self.attn, self.norm = (
            language_model.layers[layer],
            language_model.layers[layer].self_attn,
            language_model.norm,
        )
        self.unembed = model.lm_head
        self.weights, self.head = weights, head
        self.words = WordCells(encoder)
        hidden = language_model.config.hidden_size
        self.probe = torch.nn.Linear(hidden, len(SHAPES) + len(COLORS) + CELLS)
        self._captured: dict[str, Any] = {}

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.probe.parameters())

    @contextmanager
    def capturing(self) -> Iterator[None]:
        def keep_inputs(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._captured["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
            self._captured["rope"] = kwargs["position_embeddings"]

        def keep_output(module: Any, args: tuple[Any, ...], output: Any) -> None:
            self._captured["output"] = output[0] if isinstance(output, tuple) else output

        handles = [
            self.attn.register_forward_pre_hook(keep_inputs, with_kwargs=True),
            self.layer.register_forward_hook(keep_output),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def __call__(self, batch: Batch, conversations: Sequence[Sequence[Sample]]) -> torch.Tensor | None:
        """The loss; None when no word after the image names anything in the scenes."""
        captured, self._captured = self._captured, {}
        targets = self.words.targets(batch, conversations)
        if targets is None:
            return None
        terms = {
            "attention": lambda: self.attention_term(captured, targets),
            "value": lambda: self.value_term(captured["output"], targets),
            "lens": lambda: self.lens_term(captured["output"], targets),
        }
        loss = torch.zeros(())
        for name, term in terms.items():
            weight = getattr(self.weights, name)
            if weight:
                loss = loss + weight * term()
        return loss

    def attention_term(self, captured: dict[str, Any], targets: LookupTargets) -> torch.Tensor:
        """``-log`` of the attention mass head ``head`` puts on the named objects' visual tokens."""
        hidden, (cos, sin) = captured["hidden"], captured["rope"]
        attn, d = self.attn, self.attn.head_dim
        kv_head = self.head // attn.num_key_value_groups
        cos, sin = (t.expand(len(hidden), -1, -1) for t in (cos, sin))  # [B, L, d]
        k = attn.k_proj(hidden)[..., kv_head * d : (kv_head + 1) * d][:, None]  # [B, 1 head, L, d]
        k = apply_rotary_pos_emb(k, k, cos, sin)[1][:, 0]
        at = targets.rows, targets.positions
        q = attn.q_proj(hidden[at])[:, self.head * d : (self.head + 1) * d][:, None, None]  # [N, 1, 1, d]
        q = apply_rotary_pos_emb(q, q, cos[at][:, None], sin[at][:, None])[0][:, 0, 0]
        scores = torch.einsum("nd,nld->nl", q, k[targets.rows]) * attn.scaling  # [N, L]
        future = torch.arange(scores.shape[1])[None] > targets.positions[:, None]
        probs = scores.float().masked_fill(future, float("-inf")).softmax(-1)
        mass = (probs.gather(1, targets.visual) * targets.on_object).sum(-1)
        return -(mass + 1e-6).log().mean()

    def value_term(self, output: torch.Tensor, targets: LookupTargets) -> torch.Tensor:
        """Binary cross-entropy of the probe's reading of the named objects' properties."""
        states = output[targets.rows, targets.positions].float()  # [N, H]
        with torch.autocast("cpu", enabled=False):
            return F.binary_cross_entropy_with_logits(self.probe(states), targets.facts)

    def lens_term(self, output: torch.Tensor, targets: LookupTargets) -> torch.Tensor:
        """Cross-entropy of the unembedded state over the colour words (shape words, for a colour
        word) against the named objects' colours (shapes), spread evenly over several."""
        with torch.autocast("cpu", enabled=False):
            states = self.norm(output[targets.rows, targets.positions].float())  # [N, H]
            logits = states @ self.unembed.weight.float().T  # [N, vocab]
        n_shapes = len(SHAPES)
        colours = targets.facts[:, n_shapes : n_shapes + len(COLORS)]
        shapes = targets.facts[:, :n_shapes]

        def cross_entropy(tokens: list[int], wanted: torch.Tensor) -> torch.Tensor:
            log_p = F.log_softmax(logits[:, tokens], -1)
            return -(log_p * wanted / wanted.sum(-1, keepdim=True)).sum(-1)

        per_word = torch.where(
            targets.names_shape,
            cross_entropy(self.words.color_tokens, colours),
            cross_entropy(self.words.shape_tokens, shapes),
        )
        return per_word.mean()
