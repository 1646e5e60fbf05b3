"""Model cards and the loss-curve plot written next to the shipped tiny checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _arch(r: dict[str, Any]) -> str:
    tokens = (72 // r["patch_size"]) ** 2
    vision = f"hidden {r['vision_hidden']}, {r['vision_layers']} layers, patch {r['patch_size']}"
    lm = f"hidden {r['hidden']}, {r['layers']} layers, {r['heads']} heads, {r['kv_heads']} KV heads"
    return (
        f"CLIP vision tower ({vision}; 72 px images, {tokens} visual tokens), LLaVA projector, "
        f"Llama language model ({lm}, MLP {r['intermediate']}, tied embeddings)"
    )


def _metrics_table(m: dict[str, Any]) -> str:
    rows = [f"| {kind} | {acc:.3f} |" for kind, acc in m["per_kind"].items()]
    return "\n".join(["| question kind | accuracy |", "| --- | ---: |", *rows])


def _phase(p: dict[str, Any]) -> str:
    extras = ["bf16 autocast"] if p["bf16"] else []
    if p.get("lookup"):
        terms = ", ".join(f"{name} {w:g}" for name, w in p["lookup"].items() if w)
        extras.append(f"lookup supervision: {terms}")
    if p.get("focus"):
        extras.append(f"{p['focus']:.0%} of turns colour / where / exists")
    return f"{p['steps']} steps at peak lr {p['lr']:g}" + (f" ({'; '.join(extras)})" if extras else "")


def target_card(summary: dict[str, Any]) -> str:
    r, m = summary["recipe"]["target"], summary["metrics"]
    minutes = summary["total_train_seconds"] / 60
    sched = summary["recipe"]["schedule"]
    phases = " then ".join(_phase(p) for p in sched["target_phases"])
    return f"""# tiny-target

The verifier VLM of CoVSpec Serve's demo: a LLaVA-format model (`LlavaForConditionalGeneration`)
trained from scratch on ShapesWorld (`models/tiny/`), rebuilt by `covspec train-tiny`.

- Architecture: {_arch(r)}.
- Parameters: {summary["target_params"] / 1e6:.2f} M, stored in fp32.
- Data: ShapesWorld scenes (1-5 of 6 shapes x 8 colours x 2 sizes on a 3x3 grid, textured
  backgrounds, some occlusion) with 7 question kinds, answered in the default style and in the
  styles of the demo users alice, bob, carol and dave (selected by the system prompt). Training
  seeds lie below 1,000,000,000; evaluation seeds at or above it.
- Training: vision tower pretrained on per-patch labels (grid cell, and the shape, colour and size
  there), then frozen; the projector and language model trained on multi-turn conversations in
  {phases}; about {minutes:.0f} minutes for the whole family on 2 CPU cores. Lookup supervision
  (`models/tiny/lookup.py`) teaches one layer-0 head to look from a word naming a shape or colour
  to the cells holding it, and that layer's output to carry what is there: without it the model
  found objects by grid cell but not by what they are. Loss curves: `../tiny-train-loss.png`,
  `../tiny-train-log.json`.

## Evaluation

Greedy answers from transformers' `generate`, exact match with the reference sentence, default
style, {m["n"]} samples with seeds {m["eval_seeds"]}.

- accuracy: **{m["accuracy"]:.3f}**
- the same questions with a blank image: {m["blank_image_accuracy"]:.3f}

{_metrics_table(m)}
"""


def drafter_card(summary: dict[str, Any]) -> str:
    r, m = summary["recipe"]["drafter"], summary["metrics"]
    return f"""# tiny-drafter

The shared drafter of CoVSpec Serve's demo: a small LLaVA-format model with the target's
tokenizer and its own, smaller vision tower, distilled on the target's own greedy answers
(self-distillation) to default-style prompts. Per-user styles are left to per-user LoRA adapters.

- Architecture: {_arch(r)}.
- Parameters: {summary["drafter_params"] / 1e6:.2f} M, stored in fp32.
- Greedy token agreement with tiny-target, teacher-forced on the target's greedy answers to
  {m["n"]} evaluation samples: **{m["agreement"]:.3f}**
"""


def plot_losses(stages: dict[str, list[dict[str, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    axes = grid[0]
    for ax, (name, rows) in zip(axes, stages.items(), strict=True):
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
