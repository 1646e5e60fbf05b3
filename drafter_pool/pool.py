"""The shared drafter as a :class:`core.protocols.Drafter`: trees for many requests at once.

Per step and for all requests together: one forward that brings each request's drafter KV up to
date (its prompt the first time, then the tokens verified since) and yields the root's
distribution, then one forward per tree depth. A level's forward carries each request's nodes
chosen so far with their ancestor mask, written after the committed KV; when the tree is done
those entries are dropped again, so the pool only ever keeps the tokens it was asked to draft
after. Those are usually verified; a proactive call (``scheduler.foresight``) asks for a tree
after a path not verified yet. Each call names every output token, so the pool keeps the KV its
request shares with the previous call and recomputes the rest: a guess that did not come true
costs only the tokens after the point where it went wrong.

A request may name a LoRA adapter (its user's); its tokens then go through that adapter in the
same forwards as everyone else's (``models.multi_lora``). A LoRA changes the drafter's KV, so KV
lives in the namespace of the adapter it was computed with: each request's blocks are private and
tagged with its adapter, which the request pins (never evicted or replaced) until the drafter
releases it. The drafter's prefix cache (a ``kvcache.PrefixCache`` of its own pool, no Redis)
keys shared prompt blocks by that adapter's weights and the compression too.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from core.draft import DraftProposal, DraftRequest
from core.forward_batch import SequenceInput, pack
from core.prompt import EncodedPrompt
from core.sampling import SamplingParams, probs_from_logits
from core.tree import ROOT, DraftTree
from drafter_pool.adapters import AdapterError, AdapterRegistry
from drafter_pool.compression import get_compressor
from drafter_pool.learner import LearnedAdapters
from drafter_pool.tree_search import TreeGrower, TreeShape
from kvcache.block_hash import prompt_block_hashes
from kvcache.block_pool import BlockPool, IntegrityError
from kvcache.prefix_cache import PrefixCache
from kvcache.sequence_blocks import SequenceBlocks
from models.loader import LoadedModel, fingerprint
from models.multi_lora import NO_ADAPTER, LoraBatch
from models.prompt_encoder import PromptEncoder
from models.threads import intra_op_threads

DRAFT_SEED_SALT = 0x5EED_D4AF  # the drafter's stream differs from the verifier's for one seed


def empty_proposal(request_id: int) -> DraftProposal:
    empty = torch.empty(0, dtype=torch.long)
    return DraftProposal(request_id, DraftTree(empty, empty.clone()))


def draft_distribution(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """``logits`` [N, vocab] -> the q each node's children come from. Sampling requests draw from
    the request's own distribution; greedy ones take the argmax (and runner-up) of the plain
    softmax, whose margins say how sure the drafter is (a one-hot would always look certain)."""
    if sampling.greedy:
        return torch.softmax(logits.float(), dim=-1)
    return probs_from_logits(logits, sampling)


@dataclass
class _Drafting:
    """A request the drafter holds KV for."""

    blocks: SequenceBlocks
    outputs: tuple[int, ...]  # output tokens whose KV is committed, as the last call named them
    next_position: int  # RoPE position of the next token
    generator: torch.Generator
    adapter: str | None = None  # the pinned LoRA its KV was computed with; None = base drafter
    slot: int = NO_ADAPTER  # that adapter's slot
    hashes: tuple[bytes, ...] = ()  # content hashes of its prompt's full blocks (prefix cache)
    published: int = 0  # leading prompt blocks already in the prefix cache


@dataclass(frozen=True)
class _Level:
    """One request's part of a depth-level forward."""

    grower: TreeGrower
    state: _Drafting
    nodes: list[int]  # forwarded nodes (frontier and ancestors), node order
    frontier: list[int]


class DrafterPool:
    def __init__(
        self,
        model: LoadedModel,
        num_blocks: int = 4096,
        block_size: int = 16,
        shape: TreeShape | None = None,
        compression: str = "salient",
        seed: int = 0,
        adapters: AdapterRegistry | None = None,
        prefix_cache: bool = True,
        threads: int | None = None,  # intra-op CPU threads of its forwards (None: the process's)
        learned: LearnedAdapters | None = None,  # versions learned online, swapped in between steps
    ) -> None:
        self.model = model
        self.learned = learned
        self.threads = threads
        self.adapters = adapters
        self.pool = BlockPool(model.decoder.kv_layout(num_blocks, block_size))
        self.compression = compression
        self.prefix = (
            PrefixCache(self.pool, fingerprint(model, self.pool.kv.layout.dtype)) if prefix_cache else None
        )
        self.encoder = PromptEncoder(model)
        self.shape = shape or TreeShape()
        self.compress = get_compressor(compression)
        self.states: dict[int, _Drafting] = {}
        self._seeds = random.Random(seed)

    def propose(
        self, requests: Sequence[DraftRequest], stop: Callable[[], bool] | None = None
    ) -> list[DraftProposal]:
        """A request the pool has no room for gets an empty tree (plain decoding this step)
        marked ``dropped``: the pool let its KV go, and prefills it again when it next gets a
        tree. A request's first tree reports the tokens encoded for it (``prefill_tokens``).
        Once ``stop`` says so (asked before each depth level), the trees end where they are."""
        if self.learned is not None and self.adapters is not None:
            self.learned.sync(self.adapters)  # between steps: pinned versions stay as they are
        with intra_op_threads(self.threads):
            return self._propose(requests, stop or (lambda: False))

    def _propose(self, requests: Sequence[DraftRequest], stop: Callable[[], bool]) -> list[DraftProposal]:
        fresh = {r.request_id for r in requests if r.request_id not in self.states}
        pending = {r.request_id: self._pending(r) for r in requests}
        ready = [r for r in requests if pending[r.request_id] is not None]
        ready.sort(key=lambda r: self.states[r.request_id].slot)  # adapter tokens packed by slot
        growers = self._catch_up(ready, [pending[r.request_id] for r in ready]) if ready else []
        levels = self._next_levels(
            [(g, self.states[r.request_id]) for g, r in zip(growers, ready, strict=True)]
        )
        while levels and not stop():
            self._forward_level(levels)
            levels = self._next_levels([(lv.grower, lv.state) for lv in levels])
        for req in ready:
            self.states[req.request_id].blocks.commit(0, ())  # drop the tree's KV
        trees = {
            r.request_id: replace(
                g.proposal(r.request_id),
                prefill_tokens=self._prefilled(r, pending, fresh),
                adapter_version=self._version(self.states[r.request_id]),
            )
            for g, r in zip(growers, ready, strict=True)
        }
        return [
            trees.get(r.request_id) or replace(empty_proposal(r.request_id), dropped=True) for r in requests
        ]

    def _version(self, state: _Drafting) -> int | None:
        """The published version of the adapter ``state`` drafts with (None: base or plain)."""
        if state.adapter is None or self.adapters is None:
            return None
        return self.adapters.registered[state.adapter].version

    @staticmethod
    def _prefilled(req: DraftRequest, pending: dict[int, SequenceInput | None], fresh: set[int]) -> int:
        """Tokens encoded for ``req`` before its tree because the pool held no KV for it."""
        seq = pending[req.request_id]
        return seq.num_new if seq is not None and req.request_id in fresh else 0

    def has_adapter(self, name: str) -> bool:
        return self.adapters is not None and self.adapters.has(name)

    def release(self, request_id: int) -> None:
        state = self.states.pop(request_id, None)
        if state is not None:
            state.blocks.release()
            if state.adapter is not None and self.adapters is not None:
                self.adapters.release(state.adapter)

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        if self.adapters is not None:
            self.adapters.check_integrity()
        for rid, state in self.states.items():
            if state.adapter is not None and (
                self.adapters is None or self.adapters.slot_of(state.adapter) != state.slot
            ):
                raise IntegrityError(f"request {rid} drafts with {state.adapter!r}, which is not in its slot")
            state.blocks.check_integrity()
            if state.blocks.capacity - state.blocks.num_tokens >= self.pool.block_size:
                raise IntegrityError(f"request {rid} holds drafter blocks past its committed KV")

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def kv_used(self) -> float:
        """Fraction of the drafter's KV blocks in use (what the draft policy's r follows)."""
        return 1 - self.pool.num_free_blocks / self.pool.num_blocks

    # -- the catch-up forward -------------------------------------------------------------

    def _catch_up(self, requests: Sequence[DraftRequest], seqs: list[SequenceInput]) -> list[TreeGrower]:
        """Write every request's missing KV; return a grower with the root's children added."""
        batch = pack(seqs, self.pool.block_size)
        lora = self._lora([self.states[r.request_id] for r in requests], seqs)
        hidden = self.model.decoder(batch, self.pool.kv, lora)
        logits = self.model.decoder.logits(hidden[batch.last_token_rows()])
        growers = []
        for req, seq, row in zip(requests, seqs, logits, strict=True):
            state = self.states[req.request_id]
            state.blocks.commit(seq.num_new, range(seq.num_new))  # frees the tree's blocks ...
            if self.prefix is not None:
                b = state.blocks
                state.published = self.prefix.publish_completed(
                    b.blocks, state.hashes, state.published, b.num_tokens
                )
            state.blocks.reserve(self._max_tree_rows(req))  # ... and takes them back for the levels
            state.outputs = req.output_ids
            state.next_position = int(seq.positions[-1]) + 1
            grower = TreeGrower(req.budget, self.shape, req.sampling, state.generator)
            grower.expand_rows([ROOT], draft_distribution(row[None], req.sampling))
            growers.append(grower)
        return growers

    def _pending(self, req: DraftRequest) -> SequenceInput | None:
        """The tokens of ``req`` that the drafter has no KV for, with room reserved for them and
        the tree's levels; None (and the request released) when the pool has no room."""
        state = self.states.get(req.request_id)
        outputs = torch.tensor(req.output_ids, dtype=torch.long)
        if state is None:
            state = self._admit(req)
            prompt = self._encode(req)
            cached = self._cached_prefix(req, prompt, state, len(outputs))
            tokens = torch.cat([prompt.token_ids[cached:], outputs])
            after = prompt.next_position  # under M-RoPE, fewer than the prompt's rows
            positions = torch.cat([prompt.positions[cached:], after + torch.arange(len(outputs))])
            rest = prompt.chunk(cached, prompt.num_tokens)
            embeds, embed_index, embed_positions = rest.embeds, rest.embed_index, rest.embed_positions
        else:
            kept = self._rewind(state, req.output_ids)
            tokens = outputs[kept:]
            positions = state.next_position + torch.arange(len(tokens))
            embeds = embed_index = embed_positions = None
        rows = len(tokens) + self._max_tree_rows(req)
        if not state.blocks.can_reserve(rows):
            self.release(req.request_id)
            return None
        state.blocks.reserve(rows)
        return SequenceInput(
            tokens, positions, state.blocks.block_table, state.blocks.num_tokens,
            embeds=embeds, embed_index=embed_index, embed_positions=embed_positions,
        )  # fmt: skip

    @staticmethod
    def _rewind(state: _Drafting, outputs: tuple[int, ...]) -> int:
        """Drop ``state``'s KV past what it shares with ``outputs`` (all but the last token at
        most: the root's distribution comes from its forward); the output tokens it keeps."""
        held = state.outputs
        if not outputs:  # its first tree grew from the prompt's last token: there is no other
            raise ValueError("a request the drafter holds is drafted after an output token, got none")
        if outputs[: len(held)] == held and len(outputs) > len(held):
            return len(held)  # the usual call: verified tokens after the ones held
        shared = next((i for i, (a, b) in enumerate(zip(held, outputs, strict=False)) if a != b), len(held))
        shared = min(shared, len(outputs) - 1)
        state.blocks.truncate(state.blocks.num_tokens - (len(held) - shared))
        state.next_position -= len(held) - shared
        state.outputs = held[:shared]
        return shared

    def _admit(self, req: DraftRequest) -> _Drafting:
        seed = req.sampling.seed
        seed = self._seeds.getrandbits(63) if seed is None else seed ^ DRAFT_SEED_SALT
        state = _Drafting(SequenceBlocks(self.pool), (), 0, torch.Generator().manual_seed(seed))
        if req.adapter is not None:
            state.adapter, state.slot = self._pin(req.adapter)
        self.states[req.request_id] = state
        return state

    def _cached_prefix(self, req: DraftRequest, prompt: EncodedPrompt, state: _Drafting, outputs: int) -> int:
        """Start ``state`` from the longest cached prefix of ``prompt``; the prompt rows it covers."""
        if self.prefix is None:
            return 0
        digest = "base"
        if state.adapter is not None and self.adapters is not None:
            digest = self.adapters.registered[state.adapter].digest
        ratio = req.budget.compression if req.budget.compression < 1 else 1.0
        kv_identity = [self.prefix.model, digest.encode(), f"{self.compression}:{ratio}".encode()]
        namespace = hashlib.sha256(b"\0".join(kv_identity)).digest()
        state.hashes = prompt_block_hashes(req.prompt, prompt, self.pool.block_size, namespace)
        cached = self.prefix.local(self.prefix.reusable(state.hashes, prompt.num_tokens + outputs))
        state.blocks, state.published = SequenceBlocks.from_cached(self.pool, cached), len(cached)
        return state.blocks.num_tokens

    def _pin(self, name: str) -> tuple[str | None, int]:
        """The adapter and slot a new request drafts with: its own, or the base drafter when the
        adapter is gone or every slot is pinned (the output is the target's either way)."""
        registry = self.adapters
        if registry is None or not registry.can_acquire(name):
            if registry is not None:
                registry.stats.no_slot += 1
            return None, NO_ADAPTER
        try:
            return registry.resolve(name), registry.acquire(name)  # the version it means now
        except AdapterError:  # its files changed on disk since it was added: counted, base drafts
            registry.stats.no_slot += 1
            return None, NO_ADAPTER

    def _lora(self, states: Sequence[_Drafting], seqs: Sequence[SequenceInput]) -> LoraBatch | None:
        if self.adapters is None or all(s.adapter is None for s in states):
            return None
        if len({s.slot for s in states}) == 1:  # one adapter for every token (a single user)
            return self.adapters.one_slot(states[0].slot, sum(seq.num_new for seq in seqs))
        slots = [torch.full((seq.num_new,), s.slot) for s, seq in zip(states, seqs, strict=True)]
        return self.adapters.batch(torch.cat(slots))

    def _encode(self, req: DraftRequest) -> EncodedPrompt:
        ratio = req.budget.compression
        select = None if ratio >= 1 else (lambda v: self.compress(v, ratio))
        return self.encoder.encode(req.prompt, select)

    def _max_tree_rows(self, req: DraftRequest) -> int:
        return self.shape.width * 2 * max(req.budget.max_depth - 1, 0)

    # -- depth levels ---------------------------------------------------------------------

    def _next_levels(self, jobs: list[tuple[TreeGrower, _Drafting]]) -> list[_Level]:
        levels = []
        for grower, state in jobs:
            frontier = grower.frontier()
            if frontier:
                levels.append(_Level(grower, state, grower.with_ancestors(frontier), frontier))
        return levels

    def _forward_level(self, levels: list[_Level]) -> None:
        seqs = [self._level_input(lv) for lv in levels]
        batch = pack(seqs, self.pool.block_size)
        hidden = self.model.decoder(batch, self.pool.kv, self._lora([lv.state for lv in levels], seqs))
        rows: list[int] = []
        for lv, start in zip(levels, batch.query_starts.tolist(), strict=False):
            place = {node: i for i, node in enumerate(lv.nodes)}
            rows.extend(start + place[node] for node in lv.frontier)
        logits = self.model.decoder.logits(hidden[torch.tensor(rows)])
        for lv, part in zip(levels, logits.split([len(lv.frontier) for lv in levels]), strict=True):
            lv.grower.expand_rows(lv.frontier, draft_distribution(part, lv.grower.sampling))

    def _level_input(self, lv: _Level) -> SequenceInput:
        sub = lv.grower.subtree(lv.nodes)
        return SequenceInput(
            token_ids=sub.token_ids,
            positions=lv.state.next_position - 1 + sub.depths(),  # the root sits at next_position - 1
            block_table=lv.state.blocks.block_table,
            num_cached=lv.state.blocks.num_tokens,
            attention_mask=sub.ancestor_mask(),
        )
