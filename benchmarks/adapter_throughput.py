"""Drafter throughput with many distinct LoRA adapters in one batch vs one adapter for all.

Sixteen ShapesWorld prompts are prefilled into the tiny drafter's paged pool; a timed case is one
drafter forward of an 8-node draft tree per request (what a depth level of tree drafting runs),
with the requests' tokens spread over k distinct rank-8 adapters on all seven projections
(k = 1, 4, 8, 16), and with no adapter at all. Nothing is committed, so every repeat runs the
same forward.

    .venv/bin/python -m benchmarks.adapter_throughput [--repeats 30]
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks import harness
from core.forward_batch import SequenceInput, pack
from core.tree import DraftTree
from drafter_pool.adapters import AdapterRegistry
from kvcache.block_pool import BlockPool
from kvcache.sequence_blocks import SequenceBlocks
from models.loader import load_model
from models.lora import LORA_MODULES, LoraAdapter, LoraWeights, module_shapes
from models.prompt_encoder import PromptEncoder

TREE = DraftTree(torch.tensor([10, 11, 12, 13, 14, 15, 16, 17]), torch.tensor([-1, -1, 0, 1, 2, 3, 4, 5]))
REQUESTS, RANK = 16, 8
DISTINCT = (1, 4, 8, 16)


def random_adapter(name: str, cfg: Any, seed: int) -> LoraAdapter:
    gen, shapes = torch.Generator().manual_seed(seed), module_shapes(cfg)
    weights = {
        (layer, m): LoraWeights(
            torch.randn(RANK, shapes[m][0], generator=gen), torch.randn(shapes[m][1], RANK, generator=gen)
        )
        for layer in range(cfg.num_layers)
        for m in LORA_MODULES
    }
    return LoraAdapter(name, weights)


def tree_inputs(model: Any, pool: BlockPool) -> list[SequenceInput]:
    """Each request's prompt prefilled; returns the tree-level input that follows it."""
    encoder, processor, seqs = PromptEncoder(model), model.processor(), []
    for sample in harness.eval_samples(harness.BATCH_SEED_OFFSET, REQUESTS):
        encoded = encoder.encode(harness.prompt_of(processor, sample))
        blocks = SequenceBlocks(pool)
        blocks.reserve(encoded.num_tokens + TREE.num_nodes)
        prefill = SequenceInput(
            encoded.token_ids, encoded.positions, blocks.block_table, 0,
            embeds=encoded.embeds, embed_index=encoded.embed_index,
        )  # fmt: skip
        model.decoder(pack([prefill], pool.block_size), pool.kv)
        n = encoded.num_tokens
        seqs.append(
            SequenceInput(TREE.token_ids, n - 1 + TREE.depths(), blocks.block_table, n, TREE.ancestor_mask())
        )
    return seqs


def main() -> None:
    args = harness.parser(__doc__, repeats=30).parse_args()
    model = load_model(harness.DRAFTER)
    pool = BlockPool(model.decoder.kv_layout(1024, 16))
    batch = pack(tree_inputs(model, pool), pool.block_size)
    registry = AdapterRegistry(model.decoder.cfg, slots=max(DISTINCT), max_rank=RANK)
    for slot in range(max(DISTINCT)):
        registry.stack.load(slot, random_adapter(f"user{slot}", model.decoder.cfg, slot))
    per_request = TREE.num_nodes

    def forward(k: int | None) -> Any:
        lora = None
        if k is not None:
            slots = torch.arange(REQUESTS) * k // REQUESTS  # k users, packed by slot as the pool does
            lora = registry.batch(slots.repeat_interleave(per_request))
        return model.decoder(batch, pool.kv, lora)

    cases = {"no adapter": harness.Case(run=lambda: forward(None))}
    cases.update({f"{k} adapters": harness.Case(run=lambda k=k: forward(k)) for k in DISTINCT})
    harness.warm_up(cases, 3)
    timing = harness.time_interleaved(cases, args.repeats)
    tokens = REQUESTS * per_request
    rows = {name: t.as_dict(tokens) for name, t in timing.items()}
    single = timing["1 adapters"].median_ms
    for k in DISTINCT:
        rows[f"{k} adapters"]["throughput_vs_one_adapter"] = single / timing[f"{k} adapters"].median_ms
    rows["no adapter"]["throughput_vs_one_adapter"] = single / timing["no adapter"].median_ms
    for name, row in rows.items():
        print(f"{name}: {row['median_ms']:.2f} ms, {row['throughput_vs_one_adapter']:.2f}x of one adapter")
    result = {
        "benchmark": "adapter_throughput",
        "requests": REQUESTS,
        "tree_nodes": TREE.num_nodes,
        "rank": RANK,
        "modules": list(LORA_MODULES),
        "machine": harness.machine_info(),
        "cases": rows,
    }
    harness.write_report(args.out / "adapter_throughput", result, report(result))


def report(result: dict[str, Any]) -> harness.Report:
    cases = result["cases"]
    intro = (
        f"One tiny-drafter forward of {result['requests']} requests x {result['tree_nodes']}-node trees, "
        f"rank-{result['rank']} LoRA on all seven projections (median of the repeats)."
    )
    columns = {
        "adapters in the batch": "{name}",
        "ms": "{median_ms:.2f}",
        "tokens/s": "{tokens_per_s:.0f}",
        "throughput vs one adapter": "{throughput_vs_one_adapter:.2f}x",
    }
    table = harness.Table.of(cases.items(), columns)
    names = list(cases)
    bars = harness.Series("median", names, [cases[n]["tokens_per_s"] for n in names])
    title = "Mixed-adapter drafter forward, tiny drafter"
    panel = harness.Panel(title, "", "drafter tokens/s (median)", [bars], kind="bar")
    return harness.Report([intro, table], harness.Plot([panel], panel_size=(5.5, 3.5)))


if __name__ == "__main__":
    main()
