"""``covspec check-model`` and ``covspec make-random-checkpoint``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from serve.commands.base import Command


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random images and draft tree")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="our weights' dtype")
    p.add_argument("--device", default="cpu", help="where ours (and, below fp32, transformers') run")
    p.add_argument("--attention", default="sdpa", help="attention backend: sdpa or flash_attn")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest allowed |logit difference| from transformers in fp32 (below fp32: or twice "
        "transformers' own difference in that dtype, when larger)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _check(args: argparse.Namespace) -> int:
    from models.check import check_model

    report = check_model(
        args.model, seed=args.seed, dtype=args.dtype, device=args.device, attention_backend=args.attention
    )
    verdicts = report.verdicts(args.tolerance)
    ok = all(within for *_, within in verdicts.values())
    if args.json:
        print(json.dumps({**report.as_dict(), "tolerance": args.tolerance, "ok": ok}))
        return 0 if ok else 1
    peer = report.peer_max_abs_diff
    for name, (ours, bound, within) in verdicts.items():
        theirs = f"  transformers {args.dtype}: {peer[name]:.3e}" if peer else ""
        verdict = "ok" if within else "FAIL"
        print(f"{name + '_max_abs_diff':<24} {ours:.3e}  (bound {bound:.1e}){theirs}  {verdict}")
    print(
        f"{report.prompt_tokens} prompt tokens, {report.decode_steps} decode steps, {report.tree_nodes} tree "
        f"nodes, {report.batch_sequences} packed sequences; {report.dtype} on {report.device}"
    )
    return 0 if ok else 1


CHECK_MODEL = Command(
    name="check-model",
    help="compare our logits with transformers' on a checkpoint (prefill, decode, tree, packed batch)",
    add_arguments=_check_args,
    run=_check,
)


def _random_args(p: argparse.ArgumentParser) -> None:
    from models.random_checkpoints import FAMILIES

    p.add_argument("--out", required=True, type=Path, help="folder to write the checkpoint into")
    p.add_argument("--family", choices=sorted(FAMILIES), default="llava", help="VLM family")
    p.add_argument(
        "--text", choices=["llama", "qwen2"], default="llama", help="language model (LLaVA families only)"
    )
    p.add_argument(
        "--vision", choices=["clip", "siglip"], default="clip", help="vision tower (LLaVA families only)"
    )
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (4 attention heads)")
    p.add_argument("--tie", action="store_true", help="tie input embeddings and LM head")
    p.add_argument("--seed", type=int, default=0)


def _random(args: argparse.Namespace) -> int:
    from models.random_checkpoints import build_random_vlm
    from models.synthetic import RandomLlavaSpec

    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"{args.out} exists and is not empty; choose a new folder")
    spec = RandomLlavaSpec(
        text_family=args.text,
        vision_family=args.vision,
        num_kv_heads=args.kv_heads,
        tie_embeddings=args.tie,
        seed=args.seed,
    )
    print(build_random_vlm(args.out, args.family, spec))
    return 0


MAKE_RANDOM_CHECKPOINT = Command(
    name="make-random-checkpoint",
    help="write a random-weight checkpoint of a supported VLM family (tokenizer, processor, weights)",
    add_arguments=_random_args,
    run=_random,
)
