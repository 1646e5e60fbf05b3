"""Our decoder over the paged pool vs transformers' full forwards on the same random checkpoints."""

from __future__ import annotations

from typing import Any

import torch

from core.forward_batch import SequenceInput, pack
from core.kv import PagedKVCache
from models.check import BLOCK_SIZE, ScrambledBlocks

TOL = 1e-4


def test_prefill_logits_match_transformers(checker: Any) -> None:
    run, diff = checker.start()
    assert len(run.prompt.input_ids) > 16  # the image really expanded into visual tokens
    assert diff <= TOL


def test_incremental_decode_through_paged_pool_matches(checker: Any) -> None:
    run, _ = checker.start()
    assert checker.decode(run, steps=8) <= TOL


def test_draft_tree_nodes_match_their_root_to_node_paths(checker: Any) -> None:
    run, _ = checker.start()
    checker.decode(run, steps=1)
    assert checker.tree_diff(run) <= TOL


def test_packed_batch_of_sequences_with_and_without_images_matches(checker: Any) -> None:
    diff, num_sequences = checker.batch_diff()
    assert num_sequences >= 4
    assert diff <= TOL


def test_chunked_prefill_packed_with_other_sequences_decoding(checker: Any) -> None:
    """A prompt fed in two chunks, each chunk in the same forward as another sequence's decode."""
    decoder = checker.model.decoder
    kv = PagedKVCache(decoder.kv_layout(num_blocks=256, block_size=BLOCK_SIZE))
    blocks = ScrambledBlocks(256, seed=7)
    long = checker.prompt("describe the scene in detail please .", image_size=(48, 40), seed=3)
    short = checker.prompt("count the shapes", image_size=None, seed=4)
    full = checker.sequence(long, blocks, len(long.input_ids))
    other = checker.sequence(short, blocks, len(short.input_ids) + 2)
    cut = full.num_new // 2 + 1  # cut inside the image tokens' span
    in_first = full.embed_index < cut  # type: ignore[operator]
    first = SequenceInput(
        full.token_ids[:cut],
        full.positions[:cut],
        full.block_table,
        0,
        embeds=full.embeds[in_first],
        embed_index=full.embed_index[in_first],  # type: ignore[index]
        embed_positions=None if full.embed_positions is None else full.embed_positions[in_first],
    )
    second = SequenceInput(
        full.token_ids[cut:],
        full.positions[cut:],
        full.block_table,
        cut,
        embeds=full.embeds[~in_first],
        embed_index=full.embed_index[~in_first] - cut,  # type: ignore[index]
        embed_positions=None if full.embed_positions is None else full.embed_positions[~in_first],
    )
    decoder(pack([other], BLOCK_SIZE), kv)
    ref_other = checker.reference_logits(short, [])
    token = int(ref_other[-1].argmax())
    n_short = len(short.input_ids)
    step = SequenceInput(torch.tensor([token]), torch.tensor([n_short]), other.block_table, n_short)
    out1 = decoder.logits(decoder(pack([first, step], BLOCK_SIZE), kv))
    out2 = decoder.logits(decoder(pack([second], BLOCK_SIZE), kv))
    ref_long = checker.reference_logits(long, [])
    assert (out1[:cut] - ref_long[:cut]).abs().max() <= TOL
    assert (out1[cut] - checker.reference_logits(short, [token])[-1]).abs().max() <= TOL
    assert (out2 - ref_long[cut:]).abs().max() <= TOL
