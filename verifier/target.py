"""The target model as a :class:`core.protocols.Verifier`: every request's items in one forward.

Each item becomes one packed sequence: its missing tokens (prompt chunk or last emitted token),
then its draft tree. Tree nodes sit at position ``root + depth`` (the root's position, which
under M-RoPE trails its KV index) and attend to the cached
context, the item's own tokens and their ancestors; siblings share positions. One ``lm_head``
call covers every row that needs logits (each emitting item's root and tree nodes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.forward_batch import SequenceInput, pack
from core.kv import PagedKVCache
from core.sampling import probs_from_logits
from core.verify import VerifyItem, VerifyOutcome
from models.loader import LoadedModel
from verifier.acceptance import Acceptance, accept_greedy, accept_sampled


def tree_item_mask(num_tokens: int, ancestors: torch.Tensor) -> torch.Tensor:
    """``[n + m, n + m]`` bool: causal over the ``n`` tokens; each of the ``m`` tree nodes sees
    all ``n`` tokens and its ancestors (``ancestors`` [m, m], self included)."""
    m = ancestors.shape[0]
    mask = torch.zeros(num_tokens + m, num_tokens + m, dtype=torch.bool)
    mask[:num_tokens, :num_tokens] = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    mask[num_tokens:, :num_tokens] = True
    mask[num_tokens:, num_tokens:] = ancestors
    return mask


def sequence_input(item: VerifyItem) -> SequenceInput:
    n = int(item.token_ids.shape[0])
    positions = (
        item.positions if item.positions is not None else torch.arange(item.num_cached, item.num_cached + n)
    )
    if item.draft is None or item.draft.tree.num_nodes == 0:
        return SequenceInput(
            item.token_ids, positions, item.block_table, item.num_cached,
            embeds=item.embeds, embed_index=item.embed_index, embed_positions=item.embed_positions,
        )  # fmt: skip
    tree = item.draft.tree
    return SequenceInput(
        token_ids=torch.cat([item.token_ids, tree.token_ids]),
        positions=torch.cat([positions, int(positions[-1]) + tree.depths()]),
        block_table=item.block_table,
        num_cached=item.num_cached,
        attention_mask=tree_item_mask(n, tree.ancestor_mask()),
        embeds=item.embeds,
        embed_index=item.embed_index,
        embed_positions=item.embed_positions,
    )


class TargetVerifier:
    """Runs the target over a paged KV pool that the scheduler's block accounting manages."""

    def __init__(self, model: LoadedModel, kv: PagedKVCache) -> None:
        self.model, self.kv = model, kv

    def verify(self, items: Sequence[VerifyItem]) -> list[VerifyOutcome]:
        if not items:
            return []
        seqs = [sequence_input(item) for item in items]
        batch = pack(seqs, self.kv.layout.block_size)
        hidden = self.model.decoder(batch, self.kv)
        rows, spans = [], []  # rows of hidden that need logits; each emitting item's slice of them
        for item, start in zip(items, batch.query_starts.tolist(), strict=False):
            if item.emits:
                root = start + int(item.token_ids.shape[0]) - 1
                spans.append((len(rows), len(rows) + item.num_draft + 1))
                rows.extend(range(root, root + item.num_draft + 1))
            else:
                spans.append((0, 0))
        logits = self.model.decoder.logits(hidden[torch.tensor(rows, dtype=torch.long)]) if rows else None
        return [
            self._decide(item, logits[a:b]) if item.emits and logits is not None else self._no_emit(item)
            for item, (a, b) in zip(items, spans, strict=True)
        ]

    def _decide(self, item: VerifyItem, logits: torch.Tensor) -> VerifyOutcome:
        """``logits`` [num_draft + 1, vocab]: row 0 for the root, row i + 1 for tree node i."""
        draft = item.draft
        if draft is None or draft.tree.num_nodes == 0:
            token = self._sample_root(item, logits[0:1])
            return VerifyOutcome(item.request_id, (token,), (), 0)
        if item.sampling.greedy:
            result: Acceptance = accept_greedy(draft.tree, logits)
        else:
            if draft.draft_probs is None or item.generator is None:
                raise ValueError(f"request {item.request_id}: sampling needs draft_probs and a generator")
            probs = probs_from_logits(logits, item.sampling)
            result = accept_sampled(draft.tree, probs, draft.draft_probs, item.generator)
        tokens = tuple(result.tokens(draft.tree))
        return VerifyOutcome(item.request_id, tokens, result.accepted, item.num_draft)

    def _sample_root(self, item: VerifyItem, logits: torch.Tensor) -> int:
        if item.sampling.greedy:
            return int(logits[0].argmax())
        probs = probs_from_logits(logits, item.sampling)[0]
        return int(torch.multinomial(probs, 1, generator=item.generator))

    @staticmethod
    def _no_emit(item: VerifyItem) -> VerifyOutcome:
        return VerifyOutcome(item.request_id, (), (), 0)
