"""Who runs each step, with how many tokens and how big a tree; and what to do with the result.

There is no prefill phase: a request's next item is simply its missing tokens (the whole prompt
in chunks of at most the step's token budget, then one token per step), and an item that reaches
the end of its sequence samples and may carry a draft tree. Requests keep their arrival order:
the oldest runs first, and when KV blocks run out the newest running request is preempted (its
blocks freed, its output kept and recomputed when it is admitted again), so no request is lost.

With a prefix cache, an admitted request starts after the longest cached prefix of its prompt
(blocks shared with whoever computed them); a request whose prefix is being fetched from Redis
waits in the queue without holding anyone else up, and full prompt blocks it computes are
published for later requests.
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from core.draft import NO_DRAFT, DraftBudget, DraftRequest
from core.plan import RequestOutput, StepPlan
from core.verify import VerifyItem, VerifyOutcome
from kvcache.block_pool import BlockPool, IntegrityError
from kvcache.prefix_cache import PrefixCache
from kvcache.sequence_blocks import SequenceBlocks
from scheduler.policies import DraftPolicy, StepLoad, StepRecord
from scheduler.request import RequestState, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_tokens: int = 512  # tokens per verifier forward: chunks, last tokens and tree nodes
    max_running: int = 64  # requests holding KV at once
    max_model_len: int = 1024  # the target's context window (positions)

    def __post_init__(self) -> None:
        if self.max_batch_tokens < 1 or self.max_running < 1 or self.max_model_len < 2:
            raise ValueError(f"invalid scheduler config {self}")


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        policy: DraftPolicy,
        config: SchedulerConfig | None = None,
        on_release: Callable[[int], None] = lambda request_id: None,
        drafter_kv_used: Callable[[], float] = lambda: 0.0,
        prefix: PrefixCache | None = None,
    ) -> None:
        self.pool, self.policy, self.config = pool, policy, config or SchedulerConfig()
        self.prefix = prefix  # None: every prompt is computed in full
        self.on_release = on_release  # told when a request's KV is dropped (the drafter frees its own)
        self.drafter_kv_used = drafter_kv_used  # fraction of the drafter's KV pool in use now
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.requests: dict[int, RequestState] = {}
        self._budgets: dict[int, DraftBudget] = {}
        self._last_step: tuple[StepLoad, DraftBudget] | None = None
        self._verify_tokens = self._tree_nodes = 0  # tokens of the last verified step, its tree nodes
        self._drafter_prefill = 0  # tokens the drafter builds KV for this step (first trees)

    # -- requests -------------------------------------------------------------------------

    def add(self, req: RequestState) -> None:
        """Queue a new request; raises ``ValueError`` if it can never fit."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id} is already in use")
        total = req.num_prompt + req.sampling.max_tokens
        if total > self.config.max_model_len:
            raise ValueError(
                f"prompt ({req.num_prompt} tokens, images expanded) plus max_tokens "
                f"({req.sampling.max_tokens}) is {total}, beyond the {self.config.max_model_len}-token "
                "context window; shorten the prompt or lower max_tokens"
            )
        if -(-total // self.pool.block_size) > self.pool.num_blocks:
            raise ValueError(f"request needs {total} KV entries, more than the whole KV pool holds")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: int) -> RequestOutput | None:
        """Stop a request now; returns its final output, or None if it is unknown or finished."""
        req = self.requests.get(request_id)
        if req is None or req.status is Status.FINISHED:
            return None
        if req.status is Status.WAITING:
            self.waiting.remove(req)
        self._finish(req, "abort")
        return RequestOutput(request_id, (), True, "abort", req.stats())

    def finish(self, request_id: int, reason: str) -> None:
        """End a running or waiting request for a reason found outside (e.g. a stop string)."""
        req = self.requests.get(request_id)
        if req is not None and req.status is not Status.FINISHED:
            if req.status is Status.WAITING:
                self.waiting.remove(req)
            self._finish(req, reason)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def wait_for_fetches(self, timeout_s: float) -> None:
        """Block until a waiting request's Redis fetch is back (or ``timeout_s``): for a step
        loop with nothing else to run."""
        pending = [r.fetch.future for r in self.waiting if r.fetch is not None]
        if pending:
            first = concurrent.futures.FIRST_COMPLETED
            concurrent.futures.wait(pending, timeout=timeout_s, return_when=first)

    # -- the step -------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Running requests first (oldest first) with their trees, then admissions with what
        is left of the token budget; a tree is only drafted for an item that samples. The budget
        carries the policy's r unless the request pinned its own; the drafter applies it when it
        builds the request's KV."""
        self._budgets, self._drafter_prefill = {}, 0
        running, tokens_left = self._schedule_running()
        sampling = [(r, n) for r, n in running if n == r.num_missing]
        waiting_tokens = min(sum(r.num_missing for r in self.waiting), tokens_left)
        prefill = sum(n for _, n in running) - len(sampling) + waiting_tokens
        undrafted = tuple((r.num_tokens, r.remaining_tokens) for r, _ in sampling if not r.drafted)
        room = max(self.config.max_running - len(self.running), 0)
        joining = len(self.running) - len(sampling) + min(len(self.waiting), room)
        load = StepLoad(len(sampling), prefill, self.drafter_kv_used(), undrafted, joining)
        budget = replace(self.policy.budget(load), compression=self.policy.compression(load))
        self._last_step = (load, budget)
        drafts, tokens_left = self._attach_trees(sampling, budget, tokens_left)
        admitted, tokens_left = self._admit(tokens_left)
        more, tokens_left = self._attach_trees(
            [(r, n) for r, n in admitted if n == r.num_missing], budget, tokens_left
        )
        items = tuple(self._item(req, n, emits=n == req.num_missing) for req, n in running + admitted)
        return StepPlan(items, tuple(drafts + more))

    def update(self, plan: StepPlan, outcomes: Sequence[VerifyOutcome]) -> list[RequestOutput]:
        """Commit each request's accepted KV, append its tokens, finish what is done."""
        outputs = []
        self._verify_tokens = self._tree_nodes = 0
        for item, out in zip(plan.items, outcomes, strict=True):
            req = self.requests[item.request_id]
            n = int(item.token_ids.shape[0])
            self._verify_tokens += n + out.num_draft
            self._tree_nodes += out.num_draft
            assert req.blocks is not None
            req.blocks.commit(n + out.num_draft, [*range(n), *(n + a for a in out.accepted_nodes)])
            self._publish(req)
            if not item.emits:
                continue
            req.verify_steps += 1
            req.draft_tokens += out.num_draft
            req.accepted_tokens += len(out.accepted_nodes)
            self.policy.observe(self._budgets.get(req.request_id, NO_DRAFT), len(out.accepted_nodes))
            tokens, reason = self._truncate(req, list(out.tokens))
            req.output_ids.extend(tokens)
            if reason is not None:
                self._finish(req, reason)
            outputs.append(
                RequestOutput(req.request_id, tuple(tokens), reason is not None, reason, req.stats())
            )
        return outputs

    def record_step_time(self, draft_ms: float, verify_ms: float) -> None:
        """Tell the policy how long the step just updated took to draft and to verify."""
        if self._last_step is not None:
            load, budget = self._last_step
            record = StepRecord(
                load,
                budget,
                self._verify_tokens,
                self._tree_nodes,
                draft_ms,
                verify_ms,
                self._drafter_prefill,
            )
            self.policy.observe_step(record)

    def check_integrity(self) -> None:
        """Raise ``IntegrityError`` unless every used block belongs to a running request."""
        self.pool.check_integrity()
        held: set[int] = set()
        for req in self.running:
            if req.blocks is None or req.status is not Status.RUNNING:
                raise IntegrityError(f"running request {req.request_id} has no blocks")
            req.blocks.check_integrity()
            held.update(req.blocks.blocks)
        used = self.pool.num_blocks - self.pool.num_free_blocks
        if len(held) != used:
            raise IntegrityError(f"{used} blocks in use but running requests hold {len(held)}")
        if any(r.blocks is not None for r in self.waiting):
            raise IntegrityError("a waiting request holds blocks")

    # -- helpers --------------------------------------------------------------------------

    def _schedule_running(self) -> tuple[list[tuple[RequestState, int]], int]:
        chosen: list[tuple[RequestState, int]] = []
        tokens_left = self.config.max_batch_tokens
        for req in list(self.running):
            if req.status is not Status.RUNNING or tokens_left == 0:
                continue
            n = min(req.num_missing, tokens_left)
            if self._reserve_or_preempt(req, n):
                chosen.append((req, n))
                tokens_left -= n
        return chosen, tokens_left

    def _admit(self, tokens_left: int) -> tuple[list[tuple[RequestState, int]], int]:
        """Oldest waiting first, each from its cached prefix; one still fetching is passed over."""
        chosen: list[tuple[RequestState, int]] = []
        for req in list(self.waiting):
            if tokens_left <= 0 or len(self.running) >= self.config.max_running:
                break
            cached = self._cached_prefix(req)
            if cached is None:
                continue
            blocks = SequenceBlocks.from_cached(self.pool, cached)
            n = min(req.num_tokens - blocks.num_tokens, tokens_left)
            if not blocks.can_reserve(n):
                blocks.release()  # cached blocks go back to the index, still found next time
                break
            blocks.reserve(n)
            self.waiting.remove(req)
            if req.preemptions == 0:
                req.cached_tokens = min(blocks.num_tokens, req.num_prompt)
            req.blocks, req.status, req.published = blocks, Status.RUNNING, len(cached)
            self.running.append(req)
            chosen.append((req, n))
            tokens_left -= n
        return chosen, tokens_left

    def _cached_prefix(self, req: RequestState) -> list[int] | None:
        """Blocks (owned once more) holding the longest cached prefix of ``req``'s prompt, at
        most all but its last token (whose logits it needs); None while Redis is asked."""
        if self.prefix is None or not req.block_hashes:
            return []
        usable = self.prefix.reusable(req.block_hashes, req.num_tokens)
        if req.fetch is not None:
            if not req.fetch.future.done():
                return None
            local = self.prefix.local(usable)
            loaded = self.prefix.finish_fetch(req.fetch, len(local))
            req.fetch = None
            return local + loaded
        if not req.fetched:
            req.fetched = True
            req.fetch = self.prefix.start_fetch(usable)
            if req.fetch is not None:
                return None
        return self.prefix.local(usable)

    def _publish(self, req: RequestState) -> None:
        """Offer the prompt blocks ``req`` completed since the last call to the prefix cache."""
        assert req.blocks is not None
        if self.prefix is not None:
            b = req.blocks
            req.published = self.prefix.publish_completed(
                b.blocks, req.block_hashes, req.published, b.num_tokens
            )

    def _attach_trees(
        self, sampling: list[tuple[RequestState, int]], budget: DraftBudget, tokens_left: int
    ) -> tuple[list[DraftRequest], int]:
        """Reserve a tree of (at most) ``budget`` after each sampling item, within the tokens left."""
        drafts = []
        for req, n in sampling:
            fitted = self._fit(req, budget, tokens_left)
            if fitted.max_nodes and req.blocks is not None and req.blocks.can_reserve(n + fitted.max_nodes):
                req.blocks.reserve(n + fitted.max_nodes)
                tokens_left -= fitted.max_nodes
                self._budgets[req.request_id] = fitted
                if not req.drafted:  # the drafter encodes everything before the tree's root first
                    self._drafter_prefill, req.drafted = self._drafter_prefill + req.num_tokens, True
                output = tuple(req.output_ids)
                drafts.append(
                    DraftRequest(req.request_id, req.prompt, output, fitted, req.sampling, req.adapter)
                )
        return drafts, tokens_left

    def _reserve_or_preempt(self, req: RequestState, n: int) -> bool:
        """Reserve ``n`` entries for ``req``, preempting the newest requests until they fit;
        False when ``req`` itself had to be preempted."""
        assert req.blocks is not None
        while not req.blocks.can_reserve(n):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        req.blocks.reserve(n)
        return True

    def _preempt(self, req: RequestState) -> None:
        assert req.blocks is not None
        req.blocks.release()
        req.blocks, req.status = None, Status.WAITING
        req.preemptions += 1
        req.fetched = req.drafted = False
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.on_release(req.request_id)

    def _fit(self, req: RequestState, budget: DraftBudget, tokens_left: int) -> DraftBudget:
        """``budget`` cut to the tokens left this step, the tokens the request may still emit
        and the context window (tree node positions run past the last token), with the
        request's own r when it pinned one."""
        depth = min(budget.max_depth, req.remaining_tokens - 1, self.config.max_model_len - req.num_tokens)
        nodes = min(budget.max_nodes, tokens_left)
        depth = min(depth, nodes)
        if depth <= 0:
            return NO_DRAFT
        ratio = budget.compression if req.compression is None else req.compression
        return DraftBudget(max_nodes=nodes, max_depth=depth, compression=ratio)

    def _item(self, req: RequestState, n: int, emits: bool) -> VerifyItem:
        assert req.blocks is not None
        chunk = req.chunk(n)
        return VerifyItem(
            request_id=req.request_id,
            token_ids=chunk.token_ids,
            num_cached=req.num_computed,
            block_table=req.blocks.block_table,
            sampling=req.sampling,
            emits=emits,
            embeds=chunk.embeds,
            embed_index=chunk.embed_index,
            generator=req.generator,
        )

    def _truncate(self, req: RequestState, tokens: list[int]) -> tuple[list[int], str | None]:
        """Cut ``tokens`` after an end-of-turn token or at max_tokens; the finish reason if done."""
        if not req.sampling.ignore_eos:
            for i, token in enumerate(tokens):
                if token in req.eos_token_ids:
                    tokens = tokens[: i + 1]
                    if len(tokens) <= req.remaining_tokens:
                        return tokens, "stop"
                    break
        if len(tokens) >= req.remaining_tokens:
            return tokens[: req.remaining_tokens], "length"
        return tokens, None

    def _finish(self, req: RequestState, reason: str) -> None:
        if req.blocks is not None:
            req.blocks.release()
            req.blocks = None
            self.on_release(req.request_id)
        if req in self.running:
            self.running.remove(req)
        req.status, req.finish_reason = Status.FINISHED, reason
