"""``covspec train-adapter``: a demo user's drafter LoRA, trained on their traffic, with a card."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from serve.commands.base import Command
from serve.commands.generate import ADAPTERS, DEFAULT_DRAFTER, DEFAULT_TARGET
from serve.commands.tiny import writable_folder


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user", required=True, help="demo user: alice, bob, carol or dave")
    p.add_argument("--out", type=Path, help=f"adapter folder to write (default: {ADAPTERS}/<user>)")
    p.add_argument("--samples", type=int, default=1500, help="training prompts of the user")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--eval-n", type=int, default=100, help="fresh prompts to measure tau on")
    p.add_argument("--seed", type=int, default=0)


def _run(args: argparse.Namespace) -> int:
    from models.lora_training import LoraTrainConfig, train_lora
    from models.tiny.adapter_data import target_labelled, user_samples
    from models.tiny.cards import plot_losses
    from models.tiny.evaluate import load_hf
    from models.tiny.personas import DEMO_USERS
    from serve.adapter_eval import adapter_engine, measure_tau

    if args.user not in DEMO_USERS:
        raise ValueError(f"unknown demo user {args.user!r}; choose one of {list(DEMO_USERS)}")
    out = writable_folder(args.out or ADAPTERS / args.user)
    config = LoraTrainConfig(rank=args.rank, alpha=2 * args.rank, steps=args.steps, seed=args.seed)
    target, t_enc = load_hf(DEFAULT_TARGET)
    _, d_enc = load_hf(DEFAULT_DRAFTER)
    train = target_labelled(target, t_enc, d_enc, user_samples(args.user, args.samples, args.seed))
    result = train_lora(DEFAULT_DRAFTER, train, config, out)
    plot_losses(
        {f"adapter {args.user}": [{"step": i, "loss": v} for i, v in enumerate(result.losses)]},
        out / "loss.png",
    )

    built = adapter_engine(DEFAULT_TARGET, DEFAULT_DRAFTER, [(args.user, out)])
    evaluation = user_samples(args.user, args.eval_n, args.seed, evaluation=True)
    base, own = measure_tau(built, evaluation, None), measure_tau(built, evaluation, args.user)
    if base.outputs != own.outputs:
        raise AssertionError("the adapter changed the output: speculation is not lossless")
    summary = {
        "user": args.user, "rank": config.rank, "alpha": config.alpha, "modules": list(config.modules),
        "train_samples": len(train), "steps": config.steps, "train_seconds": result.seconds,
        "trainable_params": result.trainable_params, "final_loss": result.losses[-1],
        "eval_samples": len(evaluation), "tau_base": round(base.tau, 3), "tau_adapter": round(own.tau, 3),
        "tau_gain": round(own.tau / base.tau - 1, 3),
    }  # fmt: skip
    (out / "train_log.json").write_text(json.dumps({**summary, "losses": result.losses}, indent=1))
    (out / "README.md").write_text(card(summary))
    print(json.dumps(summary))
    return 0


def card(s: dict[str, object]) -> str:
    return f"""# Drafter adapter: {s["user"]}

A LoRA for `tiny-drafter` that learned how the target answers the demo user `{s["user"]}`
(their persona's system prompt and style). PEFT format: `PeftModel.from_pretrained(drafter, this
folder)` loads it; CoVSpec Serve applies it to this user's drafts only. The target is never
adapted, so answers are exactly the target's with or without it; only τ and speed change.

- LoRA: rank {s["rank"]}, alpha {s["alpha"]}, modules {", ".join(s["modules"])} of the language model
  ({s["trainable_params"]} parameters).
- Data: {s["train_samples"]} ShapesWorld prompts in {s["user"]}'s persona (training seeds), labelled
  with the target's own greedy answers; {s["steps"]} steps, {s["train_seconds"]} s on 2 CPU cores,
  final loss {s["final_loss"]}. Rebuild: `covspec train-adapter --user {s["user"]}`.
- τ (tokens per verify step, fixed 8-node trees, {s["eval_samples"]} fresh prompts of this user):
  base drafter **{s["tau_base"]}**, with this adapter **{s["tau_adapter"]}** ({s["tau_gain"]:+.1%}).
  Same output tokens in both runs.
"""


TRAIN_ADAPTER = Command(
    name="train-adapter",
    help="train a demo user's drafter LoRA on their traffic (target answers as labels)",
    add_arguments=_args,
    run=_run,
)
