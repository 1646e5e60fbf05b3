"""One verifier forward for many requests' draft trees vs one forward per request.

Each of B ShapesWorld prompts is prefilled into the target's paged pool; a timed case then
verifies a draft tree for every request: ``packed`` in one ``TargetVerifier.verify`` call,
``separate`` in B calls. The headline tree has 8 nodes (two branches under the root, chains
below); smaller trees are its first 2 and 4 nodes, the sizes of ``load_aware``'s smallest budgets.
Nothing is committed, so every repeat verifies the same trees.

    .venv/bin/python -m benchmarks.verify_batch [--repeats 20]
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from benchmarks import harness
from core.draft import DraftProposal
from core.sampling import SamplingParams
from core.tree import DraftTree
from core.verify import VerifyItem
from kvcache.block_pool import BlockPool
from kvcache.sequence_blocks import SequenceBlocks
from models.loader import load_model
from models.prompt_encoder import PromptEncoder
from verifier.target import TargetVerifier

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
    for i, sample in enumerate(harness.eval_samples(harness.BATCH_SEED_OFFSET, n)):
        encoded = encoder.encode(harness.prompt_of(processor, sample))
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
    args = harness.parser(__doc__, repeats=20, device=True).parse_args()
    model = load_model(harness.TARGET, device=args.device)
    pool = BlockPool(model.decoder.kv_layout(1024, 16))
    verifier, encoder = TargetVerifier(model, pool.kv), PromptEncoder(model)
    items = prefilled_items(verifier, encoder, pool, max(BATCHES))
    by_tree: dict[str, dict[str, Any]] = {}  # tree nodes -> "B" -> timings
    for nodes in TREE_SIZES:
        tree = first_nodes(TREE, nodes)
        sized = [replace(item, draft=DraftProposal(item.request_id, tree)) for item in items]
        by_tree[str(nodes)] = {str(b): time_batch(verifier, sized[:b], nodes, args.repeats) for b in BATCHES}
    rows = by_tree[str(TREE.num_nodes)]
    result = {
        "benchmark": "verify_batch",
        "tree_nodes": TREE.num_nodes,
        "machine": harness.machine_info(model.decoder.device),
        "batches": rows,
        "by_tree_nodes": by_tree,
    }
    harness.write_report(args.out / "verify_batch", result, report(result))


def time_batch(verifier: TargetVerifier, batch: list[VerifyItem], nodes: int, repeats: int) -> dict[str, Any]:
    """Medians of verifying ``batch`` in one call and in one call per item."""
    cases = {
        "packed": harness.Case(run=lambda: verifier.verify(batch)),
        "separate": harness.Case(run=lambda: [verifier.verify([item]) for item in batch]),
    }
    harness.warm_up(cases, 2)
    timing = harness.time_interleaved(cases, repeats)
    row: dict[str, Any] = {name: t.as_dict(len(batch) * (1 + nodes)) for name, t in timing.items()}
    row["packed_throughput_over_separate"] = timing["separate"].median_ms / timing["packed"].median_ms
    print(
        f"{nodes}-node trees, B={len(batch)}: packed {timing['packed'].median_ms:.1f} ms, "
        f"separate {timing['separate'].median_ms:.1f} ms"
    )
    return row


def report(result: dict[str, Any]) -> harness.Report:
    gpu = result["machine"].get("gpu")
    where = f"the tiny target on {gpu}" if gpu else "the tiny target"
    batches, by_tree = result["batches"], result.get("by_tree_nodes", {})
    intro = (
        f"Verifying an {result['tree_nodes']}-node tree per request on {where}: "
        "one packed forward vs one forward per request (median ms)."
    )
    columns = {
        "requests": "{name}",
        "packed ms": "{packed[median_ms]:.1f}",
        "separate ms": "{separate[median_ms]:.1f}",
        "packed throughput / separate": "{packed_throughput_over_separate:.2f}x",
    }
    table = harness.Table.of(batches.items(), columns, align="rrrr")
    xs = [int(b) for b in batches]
    times = harness.Panel(
        f"{result['tree_nodes']}-node trees, {where}",
        "requests verified",
        "ms (median)",
        [
            harness.Series("one packed forward", xs, [batches[b]["packed"]["median_ms"] for b in batches]),
            harness.Series(
                "separate forwards", xs, [batches[b]["separate"]["median_ms"] for b in batches], "s-"
            ),
        ],
        xscale="log2",
    )
    if not by_tree:
        return harness.Report([intro, table], harness.Plot([times]))
    sizes = list(by_tree)
    by_size = harness.Table(
        ["requests", *(f"{n}-node trees" for n in sizes)],
        [[b, *(f"{by_tree[n][b]['packed_throughput_over_separate']:.2f}x" for n in sizes)] for b in batches],
        align="r" * (len(sizes) + 1),
    )
    gains = [
        harness.Series(f"{n}-node trees", xs, [row[b]["packed_throughput_over_separate"] for b in batches])
        for n, row in by_tree.items()
    ]
    gains.append(harness.Series("goal at 16 requests", xs, [4.0] * len(xs), ":", color="grey"))
    gain = harness.Panel(
        "Batching gain by tree size",
        "requests verified",
        "packed throughput / separate",
        gains,
        xscale="log2",
    )
    note = (
        "Packed throughput / separate by tree size (the first nodes of the same tree; "
        "rows per request = nodes + 1)."
    )
    return harness.Report([intro, table, note, by_size], harness.Plot([times, gain]))


if __name__ == "__main__":
    main()
