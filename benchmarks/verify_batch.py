"""One verifier forward for many requests' draft trees vs one forward per request.

Each of B ShapesWorld prompts is prefilled into the target's paged pool; a timed case then
verifies a draft tree for every request: ``packed`` in one ``TargetVerifier.verify`` call,
``separate`` in B calls. The headline tree has 8 nodes (two branches under the root, chains
below); smaller trees are its first 2 and 4 nodes, the sizes of ``load_aware``'s smallest budgets.
Nothing is committed, so every repeat verifies the same trees.

    .venv/bin/python -m benchmarks.verify_batch [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Case, machine_info, time_interleaved, warm_up
from core.draft import DraftProposal
from core.sampling import SamplingParams
from core.tree import DraftTree
from core.verify import VerifyItem
from kvcache.block_pool import BlockPool
from kvcache.sequence_blocks import SequenceBlocks
from models.loader import load_model
from models.prompt_encoder import PromptEncoder
from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.chat import chat_prompt
from verifier.target import TargetVerifier

TARGET = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-target"
TREE = DraftTree(torch.tensor([10, 11, 12, 13, 14, 15, 16, 17]), torch.tensor([-1, -1, 0, 1, 2, 3, 4, 5]))
BATCHES = (1, 4, 16)
TREE_SIZES = (2, 4, 8)  # the first nodes of TREE (parents come first, so each is a tree)


def first_nodes(tree: DraftTree, k: int) -> DraftTree:
    return DraftTree(tree.token_ids[:k], tree.parents[:k])


def prefilled_items(
    verifier: TargetVerifier, encoder: PromptEncoder, pool: BlockPool, n: int
) -> list[VerifyItem]:
    processor = verifier.model.processor()
    items = []
    for i in range(n):
        s = make_sample(EVAL_SEED_START + 900 + i)
        encoded = encoder.encode(chat_prompt(processor, s.question.text, [s.image()], s.system))
        blocks = SequenceBlocks(pool)
        blocks.reserve(encoded.num_tokens + TREE.num_nodes)
        prefill = VerifyItem(
            i, encoded.token_ids[:-1], 0, blocks.block_table, SamplingParams(), emits=False,
            embeds=encoded.embeds, embed_index=encoded.embed_index,
        )  # fmt: skip
        verifier.verify([prefill])
        blocks.commit(encoded.num_tokens - 1, range(encoded.num_tokens - 1))
        blocks.reserve(1 + TREE.num_nodes)
        items.append(
            VerifyItem(
                i,
                encoded.token_ids[-1:],
                encoded.num_tokens - 1,
                blocks.block_table,
                SamplingParams(),
                emits=True,
                draft=DraftProposal(i, TREE),
            )
        )
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--device", default="cpu", help="where the target runs: cpu, cuda or cuda:N")
    args = parser.parse_args()
    model = load_model(TARGET, device=args.device)
    pool = BlockPool(model.decoder.kv_layout(1024, 16))
    verifier, encoder = TargetVerifier(model, pool.kv), PromptEncoder(model)
    items = prefilled_items(verifier, encoder, pool, max(BATCHES))
    by_tree: dict[str, dict[str, Any]] = {}  # tree nodes -> "B" -> timings
    for nodes in TREE_SIZES:
        tree = first_nodes(TREE, nodes)
        sized = [replace(item, draft=DraftProposal(item.request_id, tree)) for item in items]
        by_tree[str(nodes)] = {str(b): time_batch(verifier, sized[:b], nodes, args.repeats) for b in BATCHES}
    rows = by_tree[str(TREE.num_nodes)]
    report = {
        "benchmark": "verify_batch",
        "tree_nodes": TREE.num_nodes,
        "machine": machine_info(model.decoder.device),
        "batches": rows,
        "by_tree_nodes": by_tree,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "verify_batch.json").write_text(json.dumps(report, indent=1))
    write_markdown_and_plot(report, args.out / "verify_batch")


def time_batch(verifier: TargetVerifier, batch: list[VerifyItem], nodes: int, repeats: int) -> dict[str, Any]:
    """Medians of verifying ``batch`` in one call and in one call per item."""
    cases = {
        "packed": Case(run=lambda: verifier.verify(batch)),
        "separate": Case(run=lambda: [verifier.verify([item]) for item in batch]),
    }
    warm_up(cases, 2)
    timing = time_interleaved(cases, repeats)
    row: dict[str, Any] = {name: t.as_dict(len(batch) * (1 + nodes)) for name, t in timing.items()}
    row["packed_throughput_over_separate"] = timing["separate"].median_ms / timing["packed"].median_ms
    print(
        f"{nodes}-node trees, B={len(batch)}: packed {timing['packed'].median_ms:.1f} ms, "
        f"separate {timing['separate'].median_ms:.1f} ms"
    )
    return row


def write_markdown_and_plot(report: dict[str, Any], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = report["machine"].get("gpu")
    where = f"the tiny target on {gpu}" if gpu else "the tiny target"
    lines = [
        f"Verifying an {report['tree_nodes']}-node tree per request on {where}: "
        "one packed forward vs one forward per request (median ms).",
        "",
        "| requests | packed ms | separate ms | packed throughput / separate |",
        "| ---: | ---: | ---: | ---: |",
    ]
    batches = report["batches"]
    for b, row in batches.items():
        lines.append(
            f"| {b} | {row['packed']['median_ms']:.1f} | {row['separate']['median_ms']:.1f} | "
            f"{row['packed_throughput_over_separate']:.2f}x |"
        )
    by_tree = report.get("by_tree_nodes", {})
    if by_tree:
        sizes = list(by_tree)
        lines += [
            "",
            "Packed throughput / separate by tree size (the first nodes of the same tree; "
            "rows per request = nodes + 1).",
            "",
            "| requests | " + " | ".join(f"{n}-node trees" for n in sizes) + " |",
            "| ---: | " + " | ".join("---:" for _ in sizes) + " |",
        ]
        for b in batches:
            cells = [f"{by_tree[n][b]['packed_throughput_over_separate']:.2f}x" for n in sizes]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2 if by_tree else 1, figsize=(10 if by_tree else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    xs = [int(b) for b in batches]
    ax.plot(xs, [batches[b]["packed"]["median_ms"] for b in batches], "o-", label="one packed forward")
    ax.plot(xs, [batches[b]["separate"]["median_ms"] for b in batches], "s-", label="separate forwards")
    ax.set_xlabel("requests verified")
    ax.set_ylabel("ms (median)")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.set_title(f"{report['tree_nodes']}-node trees, {where}")
    if by_tree:
        ax = axes[0][1]
        for n, row in by_tree.items():
            ratios = [row[b]["packed_throughput_over_separate"] for b in batches]
            ax.plot(xs, ratios, "o-", label=f"{n}-node trees")
        ax.axhline(4.0, color="grey", linestyle=":", label="goal at 16 requests")
        ax.set_xlabel("requests verified")
        ax.set_ylabel("packed throughput / separate")
        ax.set_xscale("log", base=2)
        ax.legend()
        ax.set_title("Batching gain by tree size")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
