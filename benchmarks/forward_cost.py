"""What one decoder forward costs: our paged decoder against transformers, on CPU.

The model is a random-weight text-only Llama sized like the tiny target VLM's language model.
Every sequence has a 256-token prefix already in the cache; a forward then processes k new
tokens (causal) and applies the LM head to each sequence's last token.

- Curve A: one sequence, k = 1..64 (a decode step, a draft verification of k tokens).
- Curve B: B sequences x k tokens in one packed forward, against the same B sequences run as B
  separate forwards, and against transformers' batched forward over a [B, 256] DynamicCache.

Ours is timed as ``pack`` + ``Decoder.forward`` + ``Decoder.logits`` (what an engine step pays);
transformers as one ``model(...)`` call, its cache cropped back to the prefix after each call,
untimed. Run: ``python -m benchmarks.forward_cost [--quick] [--out benchmarks/results]``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks import harness
from benchmarks.forward_cost_report import BatchResult, SingleResult, report, to_json
from core.forward_batch import SequenceInput, pack
from core.kv import PagedKVCache
from models.decoder import Decoder
from models.loader import load_model
from models.synthetic import RandomLlavaSpec, build_random_causal_lm

TARGET_LM = RandomLlavaSpec(
    text_family="llama",
    hidden_size=384,
    intermediate_size=1024,
    num_layers=6,
    num_heads=6,
    num_kv_heads=2,
    vocab_size=2048,
)
PREFIX_LEN = 256
BLOCK_SIZE = 16
SINGLE_KS = (1, 2, 4, 8, 16, 32, 64)
BATCH_SIZES = (1, 4, 16)
BATCH_KS = (1, 4, 16)
THREADS = 2
WARMUP_ROUNDS = 3
REPEATS, QUICK_REPEATS = 20, 5


@dataclass(frozen=True)
class Models:
    ours: Decoder
    hf: Any  # transformers LlamaForCausalLM, same weights
    vocab_size: int


# --- models -------------------------------------------------------------------------------------


def build_models(workdir: Path) -> Models:
    from transformers import AutoModelForCausalLM

    path = build_random_causal_lm(workdir / "target_lm", TARGET_LM)
    ours = load_model(path, dtype="fp32").decoder
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    return Models(ours=ours, hf=hf, vocab_size=ours.cfg.vocab_size)


def model_info(models: Models) -> dict[str, Any]:
    cfg = models.ours.cfg
    return {
        "family": cfg.family,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": TARGET_LM.intermediate_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "ours_params": sum(p.numel() for p in models.ours.parameters()),
        "hf_params": sum(p.numel() for p in models.hf.parameters()),
        "ours_attention_backend": models.ours.backend.name,
        "hf_attn_implementation": models.hf.config._attn_implementation,
        "dtype": "fp32",
    }


# --- our decoder over the paged pool ------------------------------------------------------------


def blocks_for(num_tokens: int) -> int:
    return (num_tokens + BLOCK_SIZE - 1) // BLOCK_SIZE


class PrefixPool:
    """One paged pool holding every benchmark prefix, in blocks handed out in scrambled order."""

    def __init__(self, decoder: Decoder, num_blocks: int, seed: int) -> None:
        self.decoder = decoder
        self.kv = PagedKVCache(decoder.kv_layout(num_blocks, BLOCK_SIZE))
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()

    def add_prefix(self, tokens: torch.Tensor, max_new: int) -> tuple[int, ...]:
        """Prefill ``tokens`` [PREFIX_LEN]; return a block table with room for ``max_new`` more."""
        table = tuple(self.free.pop() for _ in range(blocks_for(PREFIX_LEN + max_new)))
        self.decoder(pack([SequenceInput(tokens, torch.arange(PREFIX_LEN), table, 0)], BLOCK_SIZE), self.kv)
        return table


def step_input(table: tuple[int, ...], new_tokens: torch.Tensor) -> SequenceInput:
    """``new_tokens`` [k] right after the cached prefix, causal; KV goes to slots past the prefix."""
    k = int(new_tokens.shape[0])
    positions = torch.arange(PREFIX_LEN, PREFIX_LEN + k)
    return SequenceInput(new_tokens, positions, table[: blocks_for(PREFIX_LEN + k)], PREFIX_LEN)


def ours_packed(decoder: Decoder, kv: PagedKVCache, seqs: Sequence[SequenceInput]) -> torch.Tensor:
    """One forward of all ``seqs``; logits [B, vocab] of each sequence's last token."""
    batch = pack(seqs, BLOCK_SIZE)
    hidden = decoder(batch, kv)
    return decoder.logits(hidden[batch.last_token_rows()])


def ours_separate(decoder: Decoder, kv: PagedKVCache, seqs: Sequence[SequenceInput]) -> torch.Tensor:
    """One forward per sequence; logits [B, vocab]."""
    return torch.cat([ours_packed(decoder, kv, [s]) for s in seqs])


# --- transformers -------------------------------------------------------------------------------


def hf_prefill(model: Any, prefixes: torch.Tensor) -> Any:
    """A DynamicCache holding ``prefixes`` [B, PREFIX_LEN] (equal lengths: no padding)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=prefixes, cache=cache, use_cache=True, logits_to_keep=1)
    return cache


def hf_case(model: Any, cache: Any, new_ids: torch.Tensor) -> harness.Case:
    """Forward ``new_ids`` [B, k] over ``cache``; reset crops the cache back to the prefix.

    In transformers 5.24 ``crop`` takes the (negative) number of tokens to remove.
    """
    k = int(new_ids.shape[1])

    def run() -> torch.Tensor:
        return model(input_ids=new_ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def reset() -> None:
        cache.crop(-k)
        if cache.get_seq_length() != PREFIX_LEN:
            raise RuntimeError(f"cache holds {cache.get_seq_length()} tokens after crop, not {PREFIX_LEN}")

    return harness.Case(run, reset)


# --- measurements -------------------------------------------------------------------------------


def logit_diff(last: dict[str, Any], a: str, b: str) -> float:
    return float((last[a].float() - last[b].float()).abs().max())


def measure_single(
    models: Models,
    pool: PrefixPool,
    table: tuple[int, ...],
    cache: Any,
    k: int,
    repeats: int,
    gen: torch.Generator,
) -> SingleResult:
    new = torch.randint(models.vocab_size, (k,), generator=gen)
    seq = step_input(table, new)
    cases = {
        "ours": harness.Case(lambda: ours_packed(models.ours, pool.kv, [seq])),
        "hf": hf_case(models.hf, cache, new[None]),
    }
    last = harness.warm_up(cases, WARMUP_ROUNDS)
    t = harness.time_interleaved(cases, repeats)
    return SingleResult(k, t["ours"], t["hf"], logit_diff(last, "ours", "hf"))


def measure_batch(
    models: Models,
    pool: PrefixPool,
    tables: Sequence[tuple[int, ...]],
    cache: Any,
    k: int,
    repeats: int,
    gen: torch.Generator,
) -> BatchResult:
    new = torch.randint(models.vocab_size, (len(tables), k), generator=gen)
    seqs = [step_input(table, row) for table, row in zip(tables, new, strict=True)]
    cases = {
        "packed": harness.Case(lambda: ours_packed(models.ours, pool.kv, seqs)),
        "separate": harness.Case(lambda: ours_separate(models.ours, pool.kv, seqs)),
        "hf": hf_case(models.hf, cache, new),
    }
    last = harness.warm_up(cases, WARMUP_ROUNDS)
    t = harness.time_interleaved(cases, repeats)
    return BatchResult(len(tables), k, t["packed"], t["separate"], t["hf"], logit_diff(last, "packed", "hf"))


def run_single_curve(
    models: Models, pool: PrefixPool, repeats: int, gen: torch.Generator, bar: tqdm
) -> list[SingleResult]:
    prefix = torch.randint(models.vocab_size, (PREFIX_LEN,), generator=gen)
    table = pool.add_prefix(prefix, max(SINGLE_KS))
    cache = hf_prefill(models.hf, prefix[None])
    results = []
    for k in SINGLE_KS:
        bar.set_description(f"single k={k}")
        results.append(measure_single(models, pool, table, cache, k, repeats, gen))
        bar.update()
    return results


def run_batch_curve(
    models: Models, pool: PrefixPool, repeats: int, gen: torch.Generator, bar: tqdm
) -> list[BatchResult]:
    prefixes = torch.randint(models.vocab_size, (max(BATCH_SIZES), PREFIX_LEN), generator=gen)
    tables = [pool.add_prefix(p, max(BATCH_KS)) for p in prefixes]
    results = []
    for b in BATCH_SIZES:
        cache = hf_prefill(models.hf, prefixes[:b])
        for k in BATCH_KS:
            bar.set_description(f"batch B={b} k={k}")
            results.append(measure_batch(models, pool, tables[:b], cache, k, repeats, gen))
            bar.update()
    return results


def pool_blocks() -> int:
    return blocks_for(PREFIX_LEN + max(SINGLE_KS)) + max(BATCH_SIZES) * blocks_for(PREFIX_LEN + max(BATCH_KS))


# --- entry point --------------------------------------------------------------------------------


def setup(repeats: int) -> dict[str, Any]:
    return {
        "prefix_len": PREFIX_LEN,
        "block_size": BLOCK_SIZE,
        "threads": THREADS,
        "repeats": repeats,
        "warmup_rounds": WARMUP_ROUNDS,
        "timed": "ours: pack + Decoder.forward + Decoder.logits(last rows); hf: model(..., logits_to_keep=1)",
        "hf_cache": "DynamicCache of the prefix, crop(-k) after each call (untimed)",
        "kv_blocks": "scrambled order",
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = harness.parser(__doc__)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_REPEATS} repeats instead of {REPEATS}")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    repeats = QUICK_REPEATS if args.quick else REPEATS
    torch.set_num_threads(THREADS)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    machine = harness.machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp))  # outside inference mode, as the engine loads its models
        with torch.inference_mode():
            pool = PrefixPool(models.ours, pool_blocks(), args.seed)
            with tqdm(total=len(SINGLE_KS) + len(BATCH_SIZES) * len(BATCH_KS), unit="config") as bar:
                single = run_single_curve(models, pool, repeats, gen, bar)
                batch = run_batch_curve(models, pool, repeats, gen, bar)
    result = to_json(single, batch, machine, model_info(models), setup(repeats))
    rendered = report(result)
    harness.write_report(args.out / "forward_cost", result, rendered)
    print(rendered.markdown())


if __name__ == "__main__":
    main()
