"""What one decode step of the shipped tiny target costs, in drafter forwards.

Speculation on a CPU only pays off when the drafter is much cheaper than the target: a tree
verification costs 1.3-1.6x a plain decode step here, so the drafter's forwards per step must be
a small fraction of the target's. Both shipped models are loaded with our model layer and run a
single-sequence decode step after a real ShapesWorld prompt (image + system + question),
interleaved, with repeats.

    .venv/bin/python -m benchmarks.tiny_costs [--repeats 50] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Case, machine_info, time_interleaved, warm_up
from core.forward_batch import SequenceInput, pack
from core.kv import PagedKVCache
from models.loader import LoadedModel, load_model
from models.tiny.samples import make_sample
from models.vision import splice_images

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
BLOCK = 16


def decode_case(model: LoadedModel) -> tuple[Case, int]:
    """A prefilled ShapesWorld prompt; the case runs one decode step (pack, forward, LM head)."""
    assert model.vision is not None and model.image_token_id is not None
    sample = make_sample(1_000_000_007, kind="describe")
    processor = model.processor()
    text = processor.apply_chat_template(sample.messages(), add_generation_prompt=True)
    enc = processor(images=sample.image(), text=text, return_tensors="pt")
    spliced = splice_images(enc["input_ids"][0], model.image_token_id, model.vision(enc["pixel_values"]))
    n = len(spliced.token_ids)
    table = tuple(range((n + BLOCK) // BLOCK + 1))
    decoder = model.decoder
    kv = PagedKVCache(decoder.kv_layout(num_blocks=len(table), block_size=BLOCK))
    prompt = SequenceInput(
        spliced.token_ids, spliced.positions, table, 0, embeds=spliced.embeds, embed_index=spliced.embed_index
    )
    decoder(pack([prompt], BLOCK), kv)
    step = SequenceInput(torch.tensor([11]), torch.tensor([n]), table, n)
    return Case(run=lambda: decoder.logits(decoder(pack([step], BLOCK), kv)[-1:])), n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    target, drafter = load_model(CHECKPOINTS / "tiny-target"), load_model(CHECKPOINTS / "tiny-drafter")
    (t_case, t_ctx), (d_case, d_ctx) = decode_case(target), decode_case(drafter)
    cases = {"target": t_case, "drafter": d_case}
    warm_up(cases, rounds=5)
    timings = time_interleaved(cases, args.repeats)
    ratio = timings["target"].median_ms / timings["drafter"].median_ms
    result = {
        "machine": machine_info(),
        "target_context_tokens": t_ctx,
        "drafter_context_tokens": d_ctx,
        "target_decode_step": timings["target"].as_dict(tokens=1),
        "drafter_forward": timings["drafter"].as_dict(tokens=1),
        "target_over_drafter": round(ratio, 2),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tiny_costs.json").write_text(json.dumps(result, indent=1))
    print(
        f"target decode step {timings['target'].median_ms:.2f} ms ({t_ctx} context tokens), "
        f"drafter forward {timings['drafter'].median_ms:.2f} ms ({d_ctx}): ratio {ratio:.2f}x (goal >= 8x)"
    )
    return result


if __name__ == "__main__":
    main()
