"""A verified tree path committed in the pool is as good as having decoded it token by token."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from core.forward_batch import SequenceInput, pack
from core.kv import PagedKVCache
from core.tree import DraftTree
from kvcache import BlockPool, SequenceBlocks


def test_committed_tree_path_kv_continues_like_plain_decoding(checker: Any) -> None:
    decoder, block_size = checker.model.decoder, 4
    pool = BlockPool(decoder.kv_layout(num_blocks=64, block_size=block_size))
    seq = SequenceBlocks(pool)
    prompt = checker.prompt("what color is the star ?", image_size=(48, 40), seed=11)
    first = checker.sequence(prompt, _NoBlocks(), 0)
    seq.reserve(first.num_new)
    decoder(pack([_with_table(first, seq)], block_size), pool.kv)
    seq.commit(first.num_new, range(first.num_new))

    # a tree whose accepted path is nodes 1 -> 4 -> 6 (not a prefix of the node order)
    tree = DraftTree(torch.tensor([5, 17, 23, 42, 61, 77, 90]), torch.tensor([-1, -1, 0, 0, 1, 2, 4]))
    n, root = seq.num_tokens, prompt.next_position - 1  # under M-RoPE the root's position < n - 1
    seq.reserve(tree.num_nodes)
    item = SequenceInput(
        tree.token_ids, root + tree.depths(), seq.block_table, n, attention_mask=tree.ancestor_mask()
    )
    decoder(pack([item], block_size), pool.kv)
    path = tree.path_to(6)
    assert path == [1, 4, 6]
    seq.commit(tree.num_nodes, path)
    pool.check_integrity()
    seq.check_integrity()

    # decode one more token on top of the committed path: must match transformers on prompt + path
    accepted = [int(tree.token_ids[i]) for i in path]
    seq.reserve(1)
    after = root + 1 + len(path)
    step = SequenceInput(torch.tensor([40]), torch.tensor([after]), seq.block_table, seq.num_tokens)
    ours = decoder.logits(decoder(pack([step], block_size), pool.kv))[0]
    ref = checker.reference_logits(prompt, [*accepted, 40])[-1]
    assert (ours - ref).abs().max() <= 1e-4


class _NoBlocks:
    def table(self, num_tokens: int) -> tuple[int, ...]:
        return ()


def _with_table(item: SequenceInput, seq: SequenceBlocks) -> SequenceInput:
    return dataclasses.replace(item, block_table=seq.block_table, num_cached=0)


def test_paged_pool_is_sized_from_the_decoder(checker: Any) -> None:
    layout = checker.model.decoder.kv_layout(num_blocks=8, block_size=16)
    kv = PagedKVCache(layout)
    cfg = checker.model.decoder.cfg
    assert kv.keys.shape == (cfg.num_layers, 8, 16, cfg.num_kv_heads, cfg.head_dim)
