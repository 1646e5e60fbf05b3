"""Lookup supervision: the right words, the right cells and facts, the model's real attention and states."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from models.tiny.evaluate import load_hf
from models.tiny.lookup import COLOR_NAMES, LookupLoss, WordCells, facts_of, patch_cells
from models.tiny.recipe import LOOKUP_KINDS, LookupWeights
from models.tiny.samples import make_sample
from models.tiny.train import conversation
from models.tiny.world import COLORS, SHAPES

SHIPPED = Path(__file__).resolve().parents[3] / "checkpoints" / "tiny-target"


@pytest.fixture(scope="module")
def shipped() -> tuple[Any, Any]:
    return load_hf(SHIPPED)


def _seed_with(kind: str, min_objects: int = 2) -> int:
    seed = 0
    while True:
        try:
            sample = make_sample(seed, kind=kind)
        except ValueError:
            seed += 1
            continue
        if len(sample.scene.objects) >= min_objects:
            return seed
        seed += 1


def test_patch_cells_split_a_9x9_patch_grid_into_3x3_blocks_per_cell() -> None:
    cells = patch_cells(81).view(9, 9)
    assert cells[0, :3].tolist() == [0, 0, 0] and cells[2, 2] == 0 and cells[3, 3] == 4
    assert cells[8, 8] == 8 and torch.bincount(cells.flatten()).tolist() == [9] * 9


def test_a_colour_question_supervises_the_shape_and_colour_words_of_question_and_answer(shipped) -> None:
    _, encoder = shipped
    sample = make_sample(_seed_with("color"), kind="color")
    obj = sample.question.facts["object"]
    assert sample.answer == f"the {obj.shape} is {obj.color}."
    batch = encoder.batch([[sample]])
    targets = WordCells(encoder).targets(batch, [[sample]])
    assert targets is not None
    words = [encoder.tokenizer.decode([int(batch.input_ids[0, p])]).strip() for p in targets.positions]
    assert words == [obj.shape, obj.shape, obj.color]  # "... the circle?" "the circle is purple."
    assert targets.names_shape.tolist() == [True, True, False]
    cells = [set(patch_cells(81)[mask].tolist()) for mask in targets.on_object]
    same_colour = [o for o in sample.scene.objects if o.color == obj.color]
    assert cells == [{obj.cell}, {obj.cell}, {o.cell for o in same_colour}]
    assert int(targets.on_object[0].sum()) == 9  # the 3x3 patches of one cell
    torch.testing.assert_close(targets.facts[0], facts_of([obj]))
    torch.testing.assert_close(targets.facts[2], facts_of(same_colour))


def test_facts_are_the_union_of_the_named_objects_shape_colour_and_cell() -> None:
    scene = make_sample(_seed_with("describe", min_objects=3)).scene
    a, b = scene.objects[:2]
    facts = facts_of([a, b])
    assert facts.shape == (len(SHAPES) + len(COLORS) + 9,)
    on = {i for i, v in enumerate(facts.tolist()) if v}
    expected = (
        {SHAPES.index(o.shape) for o in (a, b)}
        | {len(SHAPES) + COLOR_NAMES.index(o.color) for o in (a, b)}
        | {len(SHAPES) + len(COLORS) + o.cell for o in (a, b)}
    )
    assert on == expected


def test_an_absent_shape_or_colour_is_not_supervised(shipped) -> None:
    _, encoder = shipped
    seed = 0
    while True:  # an "is there ...?" question about an object that is not there
        sample = make_sample(seed, kind="exists")
        facts = sample.question.facts
        names_absent = {facts["shape"], facts["color"]}.isdisjoint(
            {o.shape for o in sample.scene.objects} | {o.color for o in sample.scene.objects}
        )
        if names_absent:
            break
        seed += 1
    batch = encoder.batch([[sample]])
    assert WordCells(encoder).targets(batch, [[sample]]) is None


def _forward(model: Any, batch: Any, lookup: LookupLoss, convs: Any) -> tuple[Any, torch.Tensor | None]:
    language_model = model.model.language_model
    eager = language_model.config._attn_implementation
    language_model.config._attn_implementation = "eager"
    try:
        with torch.no_grad(), lookup.capturing():
            out = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=batch.pixel_values,
                output_attentions=True,
                output_hidden_states=True,
            )
        with torch.no_grad():
            loss = lookup(batch, convs)
    finally:
        language_model.config._attn_implementation = eager
    return out, loss


@pytest.fixture(scope="module")
def three_kinds(shipped) -> tuple[Any, Any]:
    _, encoder = shipped
    convs = [[make_sample(_seed_with(kind), kind=kind)] for kind in ("color", "where", "bigger")]
    return convs, encoder.batch(convs)


def test_the_attention_term_is_minus_log_of_the_heads_real_attention_mass_on_the_named_cells(
    shipped, three_kinds
) -> None:
    model, encoder = shipped
    convs, batch = three_kinds
    lookup = LookupLoss(model, encoder, LookupWeights(attention=1.0, value=0.0), layer=0, head=1)
    out, loss = _forward(model, batch, lookup, convs)
    targets = lookup.words.targets(batch, convs)
    assert targets is not None and len(targets.rows) >= 8  # colour 3 words, where 4, bigger 3
    attention = out.attentions[0][targets.rows, 1, targets.positions]  # layer 0, head 1: [N, L]
    mass = (attention.gather(1, targets.visual) * targets.on_object).sum(-1)
    assert loss is not None
    torch.testing.assert_close(loss, -(mass + 1e-6).log().mean(), rtol=1e-4, atol=1e-5)


def test_the_value_and_lens_terms_read_layer_0s_real_output_at_the_words(shipped, three_kinds) -> None:
    model, encoder = shipped
    convs, batch = three_kinds
    value = LookupLoss(model, encoder, LookupWeights(attention=0.0, value=1.0))
    _, value_loss = _forward(model, batch, value, convs)
    lens = LookupLoss(model, encoder, LookupWeights(attention=0.0, value=0.0, lens=1.0))
    out, lens_loss = _forward(model, batch, lens, convs)
    targets = value.words.targets(batch, convs)
    assert targets is not None and value_loss is not None and lens_loss is not None
    states = out.hidden_states[1][targets.rows, targets.positions]  # after layer 0: [N, H]
    with torch.no_grad():
        probe = F.binary_cross_entropy_with_logits(value.probe(states), targets.facts)
        logits = model.lm_head(model.model.language_model.norm(states))
    torch.testing.assert_close(value_loss, probe, rtol=1e-4, atol=1e-5)
    words = lens.words
    expected = []
    for n, names_shape in enumerate(targets.names_shape.tolist()):
        tokens = words.color_tokens if names_shape else words.shape_tokens
        part = (
            targets.facts[n, len(SHAPES) : len(SHAPES) + len(COLORS)]
            if names_shape
            else targets.facts[n, : len(SHAPES)]
        )
        log_p = F.log_softmax(logits[n, tokens], -1)
        expected.append(-(log_p * part).sum() / part.sum())
    torch.testing.assert_close(lens_loss, torch.stack(expected).mean(), rtol=1e-4, atol=1e-5)


def test_the_probe_is_what_the_optimizer_trains_besides_the_model(shipped) -> None:
    model, encoder = shipped
    lookup = LookupLoss(model, encoder, LookupWeights())
    assert lookup.parameters() == list(lookup.probe.parameters())
    assert not any(p is q for p in lookup.parameters() for q in model.parameters())


def test_a_focused_conversation_asks_lookup_kinds_where_the_scene_has_them() -> None:
    rng = random.Random(0)
    convs = [conversation(seed, None, 3, rng, focus=1.0) for seed in range(40)]
    kinds = [turn.question.kind for conv in convs for turn in conv]
    assert set(kinds) <= set(LOOKUP_KINDS) | {"describe", "count", "bigger", "shape_at"}
    assert sum(k in LOOKUP_KINDS for k in kinds) >= 0.9 * len(kinds)  # only unsupported ones fall back
    unfocused = [t.question.kind for seed in range(40) for t in conversation(seed, None, 3)]
    assert sum(k in LOOKUP_KINDS for k in unfocused) < 0.7 * len(unfocused)
