"""Trees for a step's sampling items: the policy's budget cut to what each request can use.

A tree needs room after the item's tokens: its nodes count against the step's token budget
and are reserved in the request's KV blocks (the verifier writes every node; the accepted path
is kept). Only an item that samples a token may carry a tree.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.draft import NO_DRAFT, DraftBudget, DraftRequest
from scheduler.request import RequestState


class DraftPlanner:
    def __init__(self, max_model_len: int) -> None:
        self.max_model_len = max_model_len

    def attach(
        self, sampling: Sequence[tuple[RequestState, int]], budget: DraftBudget, tokens_left: int
    ) -> tuple[list[DraftRequest], int]:
        """A draft request of (at most) ``budget`` after each ``(request, item tokens)`` whose
        tree fits the ``tokens_left`` and the request's KV; the tokens left after them."""
        drafts = []
        for req, n in sampling:
            fitted = self.fit(req, budget, tokens_left)
            if fitted.max_nodes and req.blocks is not None and req.blocks.can_reserve(n + fitted.max_nodes):
                req.blocks.reserve(n + fitted.max_nodes)
                tokens_left -= fitted.max_nodes
                output = tuple(req.output_ids)
                drafts.append(
                    DraftRequest(req.request_id, req.prompt, output, fitted, req.sampling, req.adapter)
                )
        return drafts, tokens_left

    def fit(self, req: RequestState, budget: DraftBudget, tokens_left: int) -> DraftBudget:
        """``budget`` cut to the tokens left this step, the tokens the request may still emit
        and the context window (tree node positions run past the last token), with the
        request's own r when it pinned one."""
        depth = min(budget.max_depth, req.remaining_tokens - 1, self.max_model_len - req.num_tokens)
        nodes = min(budget.max_nodes, tokens_left)
        depth = min(depth, nodes)
        if depth <= 0:
            return NO_DRAFT
        ratio = budget.compression if req.compression is None else req.compression
        return DraftBudget(max_nodes=nodes, max_depth=depth, compression=ratio)
