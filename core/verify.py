"""One request's share of a verifier forward, and what the target decided.

There is no separate prefill phase: an item brings the tokens whose target KV is missing (a
prompt chunk, or the token emitted last step) and, when it samples, an optional draft tree whose
root is the last of those tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.draft import DraftProposal
from core.sampling import SamplingParams


@dataclass(frozen=True)
class VerifyItem:
    request_id: int
    token_ids: torch.Tensor  # [n] int64, KV indices [num_cached, num_cached + n)
    num_cached: int  # target KV entries already committed for this request
    block_table: tuple[int, ...]  # reserved for num_cached + n + tree nodes entries
    sampling: SamplingParams
    emits: bool  # False for a prompt chunk that does not end the prompt (no token is chosen)
    embeds: torch.Tensor | None = None  # [m, hidden] visual embeddings inside this chunk
    embed_index: torch.Tensor | None = None  # [m] int64 rows of token_ids they replace
    embed_positions: torch.Tensor | None = None  # [m, 3] int64 their M-RoPE positions, if any
    positions: torch.Tensor | None = None  # [n] int64 RoPE positions; None: the KV indices
    draft: DraftProposal | None = None  # tree rooted at token_ids[-1]
    generator: torch.Generator | None = None  # the request's random stream (sampling only)

    def __post_init__(self) -> None:
        if self.draft is not None and not self.emits:
            raise ValueError(f"request {self.request_id}: a draft tree needs an item that emits a token")

    @property
    def num_draft(self) -> int:
        return 0 if self.draft is None else self.draft.tree.num_nodes


@dataclass(frozen=True)
class VerifyOutcome:
    request_id: int
    tokens: tuple[int, ...]  # emitted: accepted draft tokens, then the target's own; () if not emits
    accepted_nodes: tuple[int, ...]  # tree node indices whose KV is kept, root-to-leaf order
    num_draft: int  # tree nodes verified
