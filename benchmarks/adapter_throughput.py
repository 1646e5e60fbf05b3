"""Drafter throughput with many distinct LoRA adapters in one batch vs one adapter for all.

Sixteen ShapesWorld prompts are prefilled into the tiny drafter's paged pool; a timed case is one
drafter forward of an 8-node draft tree per request (what a depth level of tree drafting runs),
with the requests' tokens spread over k distinct rank-8 adapters on all seven projections
(k = 1, 4, 8, 16), and with no adapter at all. Nothing is committed, so every repeat runs the
same forward.

    .venv/bin/python -m benchmarks.adapter_throughput [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Case, machine_info, time_interleaved, warm_up
from core.forward_batch import SequenceInput, pack
from core.tree import DraftTree
from drafter_pool.adapters import AdapterRegistry
from kvcache.block_pool import BlockPool
from kvcache.sequence_blocks import SequenceBlocks
from models.loader import load_model
from models.lora import LORA_MODULES, LoraAdapter, LoraWeights, module_shapes
from models.prompt_encoder import PromptEncoder
from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.chat import chat_prompt

DRAFTER = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-drafter"
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
    for i in range(REQUESTS):
        s = make_sample(EVAL_SEED_START + 900 + i)
        encoded = encoder.encode(chat_prompt(processor, s.question.text, [s.image()], s.system))
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    model = load_model(DRAFTER)
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

    cases = {"no adapter": Case(run=lambda: forward(None))}
    cases.update({f"{k} adapters": Case(run=lambda k=k: forward(k)) for k in DISTINCT})
    warm_up(cases, 3)
    timing = time_interleaved(cases, args.repeats)
    tokens = REQUESTS * per_request
    rows = {name: t.as_dict(tokens) for name, t in timing.items()}
    single = timing["1 adapters"].median_ms
    for k in DISTINCT:
        rows[f"{k} adapters"]["throughput_vs_one_adapter"] = single / timing[f"{k} adapters"].median_ms
    rows["no adapter"]["throughput_vs_one_adapter"] = single / timing["no adapter"].median_ms
    for name, row in rows.items():
        print(f"{name}: {row['median_ms']:.2f} ms, {row['throughput_vs_one_adapter']:.2f}x of one adapter")
    report = {
        "benchmark": "adapter_throughput",
        "requests": REQUESTS,
        "tree_nodes": TREE.num_nodes,
        "rank": RANK,
        "modules": list(LORA_MODULES),
        "machine": machine_info(),
        "cases": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_throughput.json").write_text(json.dumps(report, indent=1))
    write_markdown_and_plot(report, args.out / "adapter_throughput")


def write_markdown_and_plot(report: dict[str, Any], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = report["cases"]
    lines = [
        f"One tiny-drafter forward of {report['requests']} requests x {report['tree_nodes']}-node trees, "
        f"rank-{report['rank']} LoRA on all seven projections (median of the repeats).",
        "",
        "| adapters in the batch | ms | tokens/s | throughput vs one adapter |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, row in cases.items():
        lines.append(
            f"| {name} | {row['median_ms']:.2f} | {row['tokens_per_s']:.0f} | "
            f"{row['throughput_vs_one_adapter']:.2f}x |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    names = list(cases)
    ax.bar(names, [cases[n]["tokens_per_s"] for n in names], color=["grey"] + ["C0"] * (len(names) - 1))
    ax.set_ylabel("drafter tokens/s (median)")
    ax.set_title("Mixed-adapter drafter forward, tiny drafter")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
