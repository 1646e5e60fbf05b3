"""``covspec train-tiny``, ``covspec shapes-sample`` and ``covspec eval-tiny``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from serve.commands.base import Command

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


def writable_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".covspec-write-test"
    probe.touch()
    probe.unlink()
    return path


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=CHECKPOINTS, help="folder for tiny-target/ and tiny-drafter/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=300, help="evaluation samples for the model cards")
    p.add_argument("--resume-target", type=Path, help="target checkpoint saved after --phases-done phases")
    p.add_argument(
        "--phases-done", type=int, default=1,
        help="target phases the resumed checkpoint has (all of them: only the drafter is trained)",
    )  # fmt: skip


def _train(args: argparse.Namespace) -> int:
    from models.tiny.pipeline import train_tiny
    from models.tiny.recipe import Recipe

    resume = None
    if args.resume_target is not None:
        phases = len(Recipe().schedule.target_phases)
        if not 1 <= args.phases_done <= phases:
            raise ValueError(f"--phases-done must be between 1 and {phases}, got {args.phases_done}")
        resume = (args.resume_target, args.phases_done)
    summary = train_tiny(writable_folder(args.out), Recipe(seed=args.seed), eval_n=args.eval_n, resume=resume)
    print(json.dumps(summary["metrics"]))
    return 0


TRAIN_TINY = Command(
    name="train-tiny",
    help="rebuild the tiny target and drafter from scratch (about 1.5 hours on 2 CPU cores)",
    add_arguments=_train_args,
    run=_train,
)


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, required=True, help="scene and question seed, 0 .. 2**31-1")
    p.add_argument("--persona", help="alice, bob, carol or dave (default: the default style)")
    p.add_argument("--kind", help="question kind (default: chosen by the seed)")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write the scene to")
    p.add_argument("--json", action="store_true", help="print question, answer and system prompt as JSON")


def _sample(args: argparse.Namespace) -> int:
    from models.tiny.samples import make_sample

    sample = make_sample(args.seed, args.persona, args.kind)
    if args.out.parent and not args.out.parent.is_dir():
        raise ValueError(f"cannot write {args.out}: folder {args.out.parent} does not exist")
    try:
        sample.image().save(args.out, format="PNG")
    except OSError as e:
        raise ValueError(f"cannot write {args.out}: {e.strerror or e}") from e
    info = sample.as_json()
    print(json.dumps(info) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


SHAPES_SAMPLE = Command(
    name="shapes-sample",
    help="write one ShapesWorld scene as PNG and print its question, answer and system prompt",
    add_arguments=_sample_args,
    run=_sample,
)


def _eval_args(p: argparse.ArgumentParser) -> None:
    from models.tiny.samples import EVAL_SEED_START

    p.add_argument("--model", type=Path, default=CHECKPOINTS / "tiny-target", help="target checkpoint folder")
    p.add_argument("--drafter", type=Path, help="also report drafter-target greedy token agreement")
    p.add_argument(
        "--seed", type=int, default=EVAL_SEED_START, help="first seed (training never used >= 1e9)"
    )
    p.add_argument("--n", type=int, default=200, help="number of samples")
    p.add_argument("--persona", help="answer style to evaluate (default: the default style)")
    p.add_argument("--json", action="store_true")


def _eval(args: argparse.Namespace) -> int:
    from models.tiny.evaluate import evaluate
    from models.tiny.personas import get_persona
    from models.tiny.world import check_seed

    check_seed(args.seed)
    check_seed(args.seed + args.n - 1)
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    get_persona(args.persona)
    report = evaluate(args.model, args.seed, args.n, args.drafter, args.persona).as_dict()
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


EVAL_TINY = Command(
    name="eval-tiny",
    help="greedy accuracy of a tiny VLM on fresh ShapesWorld samples (and drafter agreement)",
    add_arguments=_eval_args,
    run=_eval,
)
