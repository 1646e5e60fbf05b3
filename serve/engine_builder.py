"""Build an :class:`scheduler.engine.Engine` from checkpoint folders (the in-process wiring)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from core.draft import Answered, Drafted, DraftRequest
from core.forward_batch import SequenceInput, pack
from core.protocols import DraftClient
from drafter_pool.adapters import AdapterRegistry
from drafter_pool.learner import LearnedAdapters
from drafter_pool.pool import DrafterPool
from drafter_pool.samples import SampleStore
from drafter_pool.tree_search import TreeShape
from kvcache.block_pool import BlockPool
from kvcache.prefix_cache import PrefixCache
from kvcache.redis_store import RedisKVStore, RedisTierConfig
from models.loader import LoadedModel, fingerprint, load_model
from models.prompt_encoder import PromptEncoder
from models.threads import intra_op_threads, threads_for
from scheduler.cost import CostCurve, CostModel
from scheduler.engine import DRAFT_TIMEOUT_S, Engine
from scheduler.output import OutputProcessor
from scheduler.policy import POLICIES, Policy, PolicyOptions, make_policy
from scheduler.scheduler import Scheduler, SchedulerConfig
from verifier.target import TargetVerifier

CALIBRATION_TOKENS = (1, 8, 32, 128, 512)


@dataclass(frozen=True)
class EngineOptions:
    policy: str = "load_aware"  # none | fixed | load_aware (plain decoding without a drafter)
    fixed_nodes: int = 8  # the fixed policy's tree size (depth = nodes unless fixed_depth)
    fixed_depth: int = 0
    tree: TreeShape = field(default_factory=TreeShape)
    compression: float | None = None  # drafter visual-token ratio for every request; None = the policy's
    compression_method: str = "salient"
    max_batch_tokens: int = 512
    num_blocks: int = 2048  # target KV blocks
    drafter_blocks: int = 4096  # drafter KV blocks (a request without room drafts nothing that step)
    block_size: int = 16
    dtype: str = "fp32"
    device: str = "cpu"  # where the target runs: cpu, cuda or cuda:N (``models.device``)
    drafter_device: str | None = None  # where a drafter in this process runs; None = the target's
    seed: int = 0
    adapters: tuple[tuple[str, Path], ...] = ()  # (name, PEFT folder) of drafter LoRAs to register
    adapter_slots: int = 16  # adapters resident at once (LRU beyond that)
    max_adapter_rank: int = 16
    prefix_cache: bool = True  # reuse the KV of prompt blocks computed before (same tenant or public)
    redis_url: str | None = None  # share prefix KV through this Redis (needs prefix_cache)
    # with a drafter across a link (``remote_drafter``): two groups of requests, one verified
    # while the other's trees are drafted; a drafter in this process drafts in lockstep
    pipeline: bool = True
    # with a drafter across a link: the drafter drafts each request's next tree after the path it
    # rates likeliest while the verifier verifies the current one, where that pays
    # (``scheduler.foresight``)
    proactive: bool = True
    draft_timeout_s: float = DRAFT_TIMEOUT_S  # a draft call not answered by then: plain decoding
    learned_dir: Path | None = None  # online learning's store: its published versions are swapped in
    learned_poll_s: float = 2.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown draft policy {self.policy!r}; choose one of {sorted(POLICIES)}")


@dataclass(frozen=True)
class BuiltEngine:
    engine: Engine
    processor: Any  # the target's processor (chat template, tokenizer)
    target: LoadedModel
    drafter: LoadedModel | None
    adapters: AdapterRegistry | None  # add / remove drafter LoRAs at run time; None without a drafter
    prefix: PrefixCache | None  # the target's prefix cache (stats); None when disabled
    redis: RedisKVStore | None  # its Redis tier (stats, close); None without one


def check_same_tokenizer(target: Any, drafter: Any, drafter_dir: Path) -> None:
    """A drafter proposes target token ids: the two vocabularies (special tokens included) and
    end-of-sequence ids must be the same."""
    ours, theirs = target.get_vocab(), drafter.get_vocab()
    if ours == theirs and target.eos_token_id == drafter.eos_token_id:
        return
    differ = sorted(  # tokens only one side has (special tokens, typically) first
        (t for t in ours.keys() | theirs.keys() if ours.get(t) != theirs.get(t)),
        key=lambda t: (t in ours and t in theirs, min(ours.get(t, 1 << 40), theirs.get(t, 1 << 40))),
    )
    example = ", ".join(f"{t!r}: {ours.get(t)} vs {theirs.get(t)}" for t in differ[:3]) or (
        f"end of sequence {target.eos_token_id} vs {drafter.eos_token_id}"
    )
    raise ValueError(
        f"the drafter in {drafter_dir} uses a different tokenizer than the target ({len(theirs)} vs "
        f"{len(ours)} tokens, {len(differ)} differing; target vs drafter ids: {example}); a drafter must "
        "share the target's vocabulary and special tokens: take one of the same family (a small "
        "Qwen2-VL for a Qwen2-VL target)"
    )


def measure_cost(model: LoadedModel, pool: BlockPool, tokens: tuple[int, ...], repeats: int = 3) -> CostCurve:
    """Milliseconds of one forward at each batch size, on scratch blocks of ``pool``."""
    ms = []
    for n in tokens:
        blocks = pool.allocate(-(-n // pool.block_size))
        batch = pack(
            [SequenceInput(torch.zeros(n, dtype=torch.long), torch.arange(n), tuple(blocks), 0)],
            pool.block_size,
        )
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model.decoder.logits(model.decoder(batch, pool.kv)[-1:])
            times.append(time.perf_counter() - start)
        pool.free(blocks)
        ms.append(1000 * min(times[1:]))
    return CostCurve(tokens, tuple(ms))


class DrafterService(DraftClient, Protocol):
    """A drafter the engine can also ask for its KV use and its forward-cost curve (the drafter
    pool in this process, or the DrafterPool deployment through ``serve.remote_drafter``)."""

    def kv_used(self) -> float: ...

    def forward_cost(self, tokens: tuple[int, ...]) -> CostCurve: ...


class LocalDrafter(DrafterPool):
    """The drafter pool in this process, measuring its own forward cost."""

    def submit(self, requests: Sequence[DraftRequest], ahead: bool = False) -> Answered:
        """Drafts now, in the engine's thread: nothing else runs meanwhile (so a call ahead
        gains nothing here: the engine makes none)."""
        start = time.perf_counter()
        proposals = tuple(self.propose(requests))
        return Answered(Drafted(proposals, call_ms=1000 * (time.perf_counter() - start)))

    def forward_cost(self, tokens: tuple[int, ...]) -> CostCurve:
        with intra_op_threads(self.threads):
            return measure_cost(self.model, self.pool, tokens)


def build_engine(
    model_dir: str | Path,
    drafter_dir: str | Path | None = None,
    options: EngineOptions | None = None,
    remote_drafter: DrafterService | None = None,
) -> BuiltEngine:
    """Target (and drafter) loaded, KV pools sized, policy calibrated, all wired into an Engine.
    The drafter is the one in ``drafter_dir`` (run here) or ``remote_drafter`` (run elsewhere);
    without either the engine decodes plainly whatever the policy says."""
    opts = options or EngineOptions()
    target = load_model(model_dir, opts.dtype, device=opts.device)
    processor = target.processor()
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    pool = BlockPool(target.decoder.kv_layout(opts.num_blocks, opts.block_size))
    local = None if drafter_dir is None else build_drafter(Path(drafter_dir), tokenizer, opts)
    drafter: DrafterService | None = remote_drafter or local
    redis = RedisKVStore(RedisTierConfig(opts.redis_url)) if opts.redis_url and opts.prefix_cache else None
    prefix = None
    if opts.prefix_cache:
        prefix = PrefixCache(pool, fingerprint(target, pool.kv.layout.dtype), redis)
    text = getattr(target.hf_config, "text_config", target.hf_config)
    scheduler = Scheduler(
        pool,
        _policy(opts, target, pool, drafter),
        SchedulerConfig(
            opts.max_batch_tokens,
            max_model_len=int(text.max_position_embeddings),
            groups=2 if opts.pipeline and remote_drafter is not None else 1,
        ),
        on_release=drafter.release if drafter is not None else (lambda request_id: None),
        drafter_kv_used=drafter.kv_used if drafter is not None else (lambda: 0.0),
        prefix=prefix,
        output=OutputProcessor(lambda ids: tokenizer.decode(ids, skip_special_tokens=True)),
    )
    encoder = PromptEncoder(target, processor.image_processor if target.vision is not None else None)
    engine = Engine(
        scheduler,
        TargetVerifier(target, pool.kv),
        drafter,
        encoder.encode,
        eos_token_ids(target, tokenizer),
        seed=opts.seed,
        compression=opts.compression,
        layout=encoder.layout,
        draft_timeout_s=opts.draft_timeout_s,
        proactive=opts.proactive and remote_drafter is not None,
    )
    if local is None:
        if opts.adapters and remote_drafter is None:
            raise ValueError("drafter adapters need a drafter; pass a drafter folder or drop the adapters")
        return BuiltEngine(engine, processor, target, None, None, prefix, redis)
    return BuiltEngine(engine, processor, target, local.model, local.adapters, prefix, redis)


def build_drafter(folder: Path, tokenizer: Any, opts: EngineOptions) -> LocalDrafter:
    """The drafter in ``folder`` with ``opts.adapters`` registered; its tokenizer must be the
    target's (``tokenizer``)."""
    model = load_model(folder, opts.dtype, device=opts.drafter_device or opts.device)
    check_same_tokenizer(tokenizer, model.processor().tokenizer, folder)
    weight = model.decoder.embed_tokens.weight
    adapters = AdapterRegistry(
        model.decoder.cfg, opts.adapter_slots, opts.max_adapter_rank, weight.dtype, weight.device
    )
    for name, adapter_dir in opts.adapters:
        adapters.add(name, adapter_dir)
    learned = None
    if opts.learned_dir is not None:
        learned = LearnedAdapters(SampleStore(opts.learned_dir), opts.learned_poll_s)
    return LocalDrafter(
        model, num_blocks=opts.drafter_blocks, block_size=opts.block_size,
        shape=opts.tree, compression=opts.compression_method, seed=opts.seed, adapters=adapters,
        threads=threads_for(model.decoder), learned=learned,
    )  # fmt: skip


def _policy(
    opts: EngineOptions, target: LoadedModel, pool: BlockPool, drafter: DrafterService | None
) -> Policy:
    """The step policy ``opts.policy`` names (plain decoding without a drafter); ``load_aware``
    starts from forward-cost curves measured where each model runs, now."""

    def calibrate() -> CostModel:
        assert drafter is not None
        return CostModel(
            measure_cost(target, pool, CALIBRATION_TOKENS), drafter.forward_cost(CALIBRATION_TOKENS[:4])
        )

    if drafter is None:
        return make_policy("none")
    return make_policy(opts.policy, PolicyOptions(opts.fixed_nodes, opts.fixed_depth, cost=calibrate))


def eos_token_ids(model: LoadedModel, tokenizer: Any) -> frozenset[int]:
    """The end-of-turn ids: the generation config's, else the tokenizer's."""
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        gen = GenerationConfig.from_pretrained(model.path, local_files_only=True)
        eos = gen.eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    except OSError:
        pass
    if not ids and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
