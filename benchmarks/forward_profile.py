"""Where one forward's time goes: ours against transformers, same setup as ``forward_cost``.

For a single-sequence decode step (1 x 1) and a 16-sequence decode step (16 x 1) this times our
per-forward bookkeeping on its own (``pack``, the SDPA backend's ``prepare``), then runs
``torch.profiler`` over both implementations and groups the aten ops by role (matmuls, KV
gather, KV write, attention kernel, ...). Run: ``python -m benchmarks.forward_profile``.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import harness
from benchmarks.forward_cost import (
    BLOCK_SIZE,
    PREFIX_LEN,
    THREADS,
    Models,
    PrefixPool,
    build_models,
    hf_case,
    hf_prefill,
    ours_packed,
    pool_blocks,
    step_input,
)
from core.forward_batch import SequenceInput, pack
from core.kv import PagedKVCache

PROFILED_CALLS = 30
PROFILER_CAVEAT = (
    "Indicative only: under the profiler, transformers' `aten::cat` (DynamicCache append) varied "
    "from ~2 to ~24 ms per 16 x 1 call from run to run; trust the wall-clock medians above."
)
# Op name -> role; anything else is "other". Self CPU time is summed per role.
ROLES = {
    "aten::addmm": "matmul (linear)",
    "aten::mm": "matmul (linear)",
    "aten::bmm": "matmul (linear)",
    "aten::index": "index / gather",
    "aten::index_put_": "KV write (index_put_)",
    "aten::_index_put_impl_": "KV write (index_put_)",
    "aten::cat": "cat (HF cache append, rotary)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention kernel",
    "aten::_scaled_dot_product_attention_math": "attention kernel",
    "aten::copy_": "copy_ / to",
    "aten::mul": "elementwise",
    "aten::add": "elementwise",
    "aten::neg": "elementwise",
    "aten::silu": "elementwise",
    "aten::rsqrt": "elementwise",
    "aten::pow": "elementwise",
    "aten::mean": "elementwise",
}


@dataclass(frozen=True)
class Scenario:
    name: str
    ours: harness.Case
    hf: harness.Case
    seqs: tuple[SequenceInput, ...]


def scenario(models: Models, pool: PrefixPool, batch_size: int, gen: torch.Generator) -> Scenario:
    prefixes = torch.randint(models.vocab_size, (batch_size, PREFIX_LEN), generator=gen)
    tables = [pool.add_prefix(p, 1) for p in prefixes]
    new = torch.randint(models.vocab_size, (batch_size, 1), generator=gen)
    seqs = tuple(step_input(t, row) for t, row in zip(tables, new, strict=True))
    return Scenario(
        name=f"{batch_size} sequence(s) x 1 new token",
        ours=harness.Case(lambda: ours_packed(models.ours, pool.kv, seqs)),
        hf=hf_case(models.hf, hf_prefill(models.hf, prefixes), new),
        seqs=seqs,
    )


def gather_all_layers(kv: PagedKVCache, slots: torch.Tensor, select: bool) -> None:
    """What SDPA's ``attend`` gathers per forward: keys and values of every layer at ``slots`` [B, L].

    ``select`` uses ``index_select`` on the flattened slots instead of advanced indexing.
    """
    for layer in range(kv.layout.num_layers):
        for pool in (kv.flat_keys(layer), kv.flat_values(layer)):
            if select:
                pool.index_select(0, slots.reshape(-1)).view(*slots.shape, *pool.shape[1:])
            else:
                pool[slots]


def bookkeeping_ms(models: Models, pool: PrefixPool, sc: Scenario, repeats: int) -> dict[str, float]:
    """Medians of the whole step for both, and of parts of ours measured alone."""
    batch = pack(sc.seqs, BLOCK_SIZE)
    backend, scale = models.ours.backend, models.ours.cfg.head_dim**-0.5
    slots = backend.prepare(batch, scale).groups[0].kv_slots  # scenarios here are one group
    cases = {
        "ours step": sc.ours,
        "hf step": sc.hf,
        "ours pack": harness.Case(lambda: pack(sc.seqs, BLOCK_SIZE)),
        "ours prepare (slots + mask)": harness.Case(lambda: backend.prepare(batch, scale)),
        "ours rotary tables": harness.Case(lambda: models.ours.rotary.tables(batch.positions, torch.float32)),
        "ours KV gather, all layers (pool[slots])": harness.Case(
            lambda: gather_all_layers(pool.kv, slots, False)
        ),
        "same gather via index_select (comparison)": harness.Case(
            lambda: gather_all_layers(pool.kv, slots, True)
        ),
    }
    harness.warm_up(cases, 3)
    return {name: t.median_ms for name, t in harness.time_interleaved(cases, repeats).items()}


def op_profile(case: harness.Case) -> dict[str, float]:
    """Self CPU ms per op role per call, over ``PROFILED_CALLS`` calls."""
    harness.warm_up({"x": case}, 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(PROFILED_CALLS):
            case.run()
            case.reset()
    roles: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        roles[ROLES.get(event.key, "other")] += event.self_cpu_time_total / 1e3 / PROFILED_CALLS
    return dict(roles)


def top_ops(case: harness.Case, rows: int) -> str:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(PROFILED_CALLS):
            case.run()
            case.reset()
    return str(
        prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows)
    )


def measure(models: Models, pool: PrefixPool, sc: Scenario, repeats: int) -> dict[str, Any]:
    return {
        "name": sc.name,
        "measured_alone_ms": bookkeeping_ms(models, pool, sc, repeats),
        "op_roles_ms": {"ours": op_profile(sc.ours), "hf": op_profile(sc.hf)},
        "top_ops": {"ours": top_ops(sc.ours, 14), "hf": top_ops(sc.hf, 14)},
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = harness.parser(__doc__, repeats=20).parse_args(argv)
    torch.set_num_threads(THREADS)
    gen = torch.Generator().manual_seed(0)
    machine = harness.machine_info()
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        models = build_models(Path(tmp))
        pool = PrefixPool(models.ours, pool_blocks(), 0)
        scenarios = [measure(models, pool, scenario(models, pool, b, gen), args.repeats) for b in (1, 16)]
    result = {
        "benchmark": "forward_profile",
        "repeats": args.repeats,
        "profiled_calls": PROFILED_CALLS,
        "machine": machine,
        "scenarios": scenarios,
    }
    rendered = report(result)
    harness.write_report(args.out / "forward_profile", result, rendered)
    print(rendered.markdown())


def report(result: dict[str, Any]) -> harness.Report:
    blocks: list[str | harness.Table] = ["# Forward profile"]
    for sc in result["scenarios"]:
        ours, hf = sc["op_roles_ms"]["ours"], sc["op_roles_ms"]["hf"]
        roles = sorted(set(ours) | set(hf), key=lambda r: -max(ours.get(r, 0.0), hf.get(r, 0.0)))
        rows = [[role, f"{ours.get(role, 0.0):.3f}", f"{hf.get(role, 0.0):.3f}"] for role in roles]
        rows.append(["**sum of op self time**", f"{sum(ours.values()):.3f}", f"{sum(hf.values()):.3f}"])
        blocks += [
            f"## {sc['name']}, {PREFIX_LEN} cached tokens each",
            harness.Table(
                ["measured alone (median)", "ms"],
                [[name, f"{ms:.3f}"] for name, ms in sc["measured_alone_ms"].items()],
            ),
            f"Profiler, self CPU time per call grouped by op role ({result['profiled_calls']} calls):",
            PROFILER_CAVEAT,
            harness.Table(["role", "ours ms/call", "HF ms/call"], rows),
            f"Top ops, ours:\n```\n{sc['top_ops']['ours']}\n```",
            f"Top ops, transformers:\n```\n{sc['top_ops']['hf']}\n```",
        ]
    return harness.Report(blocks)


if __name__ == "__main__":
    main()
