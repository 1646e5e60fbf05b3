from __future__ import annotations

import pytest
import torch

from core.forward_batch import SequenceInput, pack


def test_slots_follow_the_block_table_across_block_boundaries() -> None:
    seq = SequenceInput(torch.tensor([7, 8, 9]), torch.tensor([3, 4, 5]), block_table=(5, 2), num_cached=3)
    batch = pack([seq], block_size=4)
    # KV indices 3, 4, 5 -> block 5 offset 3, block 2 offsets 0 and 1
    assert batch.slot_mapping.tolist() == [5 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1]


def test_pack_concatenates_and_offsets_embed_rows() -> None:
    a = SequenceInput(torch.tensor([1, 2]), torch.arange(2), (0,), 0)
    b = SequenceInput(
        torch.tensor([3, 4, 5]),
        torch.arange(3),
        (1,),
        0,
        embeds=torch.ones(1, 8),
        embed_index=torch.tensor([1]),
    )
    batch = pack([a, b], block_size=4)
    assert batch.token_ids.tolist() == [1, 2, 3, 4, 5]
    assert batch.query_starts.tolist() == [0, 2, 5]
    assert batch.embed_index is not None and batch.embed_index.tolist() == [3]
    assert batch.block_tables.tolist() == [[0], [1]]
    assert batch.last_token_rows().tolist() == [1, 4]


def test_block_table_too_short_is_rejected() -> None:
    seq = SequenceInput(torch.arange(5), torch.arange(5), block_table=(0,), num_cached=0)
    with pytest.raises(ValueError, match="block table has 1 blocks but 5 KV entries need 2 blocks"):
        pack([seq], block_size=4)


def test_mask_shape_must_match_new_tokens() -> None:
    with pytest.raises(ValueError, match=r"attention_mask must be \[2, 2\]"):
        SequenceInput(
            torch.arange(2), torch.arange(2), (0,), 0, attention_mask=torch.ones(3, 3, dtype=torch.bool)
        )


def test_embeds_without_index_are_rejected() -> None:
    with pytest.raises(ValueError, match="given together"):
        SequenceInput(torch.arange(2), torch.arange(2), (0,), 0, embeds=torch.ones(1, 4))


def test_host_lengths_match_the_packed_tensors() -> None:
    seqs = [
        SequenceInput(torch.tensor([1, 2]), torch.tensor([7, 8]), (3, 4), 7),
        SequenceInput(torch.tensor([3]), torch.tensor([0]), (0,), 0),
        SequenceInput(torch.tensor([4, 5, 6]), torch.tensor([4, 5, 6]), (1, 2), 4),
    ]
    batch = pack(seqs, block_size=8)
    assert batch.host_num_new == (2, 1, 3) and batch.host_num_cached == (7, 0, 4)
    assert list(batch.host_context_lens) == batch.context_lens.tolist() == [9, 1, 7]
    assert batch.num_sequences == 3
    # second sequence's slot 0 of block 0; third's KV 4..6 in block 1 (offsets 4, 5, 6)
    assert batch.slot_mapping.tolist() == [3 * 8 + 7, 4 * 8 + 0, 0, 12, 13, 14]
    assert batch.block_tables.tolist() == [[3, 4], [0, -1], [1, 2]]
