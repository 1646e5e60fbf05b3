"""What one decode step of the shipped tiny target costs, in drafter forwards.

Speculation on a CPU only pays off when the drafter is much cheaper than the target: a tree
verification costs 1.3-1.6x a plain decode step here, so the drafter's forwards per step must be
a small fraction of the target's. Both shipped models are loaded with our model layer and run a
single-sequence decode step after a real ShapesWorld prompt (image + system + question),
interleaved, with repeats.

    .venv/bin/python -m benchmarks.tiny_costs [--repeats 50] [--out benchmarks/results]
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks import harness
from core.forward_batch import SequenceInput, pack
from core.kv import PagedKVCache
from models.loader import LoadedModel, load_model
from models.tiny.samples import make_sample
from models.vision import splice_images

BLOCK = 16
GOAL = 8.0  # target decode step over drafter forward, at least


def decode_case(model: LoadedModel) -> tuple[harness.Case, int]:
    """A prefilled ShapesWorld prompt; the case runs one decode step (pack, forward, LM head)."""
    assert model.vision is not None and model.image_token_id is not None
    sample = make_sample(1_000_000_007, kind="describe")
    processor = model.processor()
    text = processor.apply_chat_template(sample.messages(), add_generation_prompt=True)
    enc = processor(images=sample.image(), text=text, return_tensors="pt")
    spliced = splice_images(enc["input_ids"][0], model.image_token_id, model.vision(enc))
    n = len(spliced.token_ids)
    table = tuple(range((n + BLOCK) // BLOCK + 1))
    decoder = model.decoder
    kv = PagedKVCache(decoder.kv_layout(num_blocks=len(table), block_size=BLOCK))
    prompt = SequenceInput(
        spliced.token_ids, spliced.positions, table, 0, embeds=spliced.embeds, embed_index=spliced.embed_index
    )
    decoder(pack([prompt], BLOCK), kv)
    step = SequenceInput(torch.tensor([11]), torch.tensor([n]), table, n)
    return harness.Case(run=lambda: decoder.logits(decoder(pack([step], BLOCK), kv)[-1:])), n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = harness.parser(__doc__, repeats=50).parse_args(argv)
    torch.set_num_threads(2)
    target, drafter = load_model(harness.TARGET), load_model(harness.DRAFTER)
    (t_case, t_ctx), (d_case, d_ctx) = decode_case(target), decode_case(drafter)
    cases = {"target": t_case, "drafter": d_case}
    harness.warm_up(cases, rounds=5)
    timings = harness.time_interleaved(cases, args.repeats)
    ratio = timings["target"].median_ms / timings["drafter"].median_ms
    result = {
        "machine": harness.machine_info(),
        "target_context_tokens": t_ctx,
        "drafter_context_tokens": d_ctx,
        "target_decode_step": timings["target"].as_dict(tokens=1),
        "drafter_forward": timings["drafter"].as_dict(tokens=1),
        "target_over_drafter": round(ratio, 2),
    }
    rendered = report(result)
    harness.write_report(args.out / "tiny_costs", result, rendered)
    print(rendered.markdown())
    return result


def report(result: dict[str, Any]) -> harness.Report:
    target, drafter = result["target_decode_step"], result["drafter_forward"]
    steps = [
        ("target decode step", {**target, "context": result["target_context_tokens"]}),
        ("drafter forward", {**drafter, "context": result["drafter_context_tokens"]}),
    ]
    columns = {
        "model layer call": "{name}",
        "context tokens": "{context}",
        "median ms": "{median_ms:.2f}",
        "p25-p75 ms": "{p25_ms:.2f}-{p75_ms:.2f}",
    }
    table = harness.Table.of(steps, columns)
    ratio = f"Target step / drafter forward: **{result['target_over_drafter']:.2f}x** (goal >= {GOAL:.0f}x)."
    return harness.Report([f"Medians of {len(target['samples_ms'])} interleaved repeats.", table, ratio])


if __name__ == "__main__":
    main()
