"""``covspec generate``: one image + prompt through the engine, with speculation stats."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from serve.commands.base import Command
from serve.commands.tiny import CHECKPOINTS

DEFAULT_TARGET = CHECKPOINTS / "tiny-target"
DEFAULT_DRAFTER = CHECKPOINTS / "tiny-drafter"
ADAPTERS = CHECKPOINTS / "adapters"  # shipped per-user drafter LoRAs, one PEFT folder per user


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", type=Path, required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--prompt", required=True, help="the user's text")
    p.add_argument("--system", help="system prompt (default: none)")
    p.add_argument("--model", type=Path, help=f"target checkpoint folder (default: {DEFAULT_TARGET})")
    spec = p.add_mutually_exclusive_group()
    spec.add_argument("--drafter", type=Path, help="drafter checkpoint folder (default with the tiny target)")
    spec.add_argument("--no-spec", action="store_true", help="plain decoding, no drafter")
    p.add_argument(
        "--adapter",
        help=f"draft with this user's LoRA: a name under {ADAPTERS} or a PEFT adapter folder "
        "(changes speed and tau, never the output)",
    )
    p.add_argument("--policy", default="load_aware", help="draft policy: none, fixed or load_aware")
    p.add_argument(
        "--compression",
        type=float,
        help="drafter visual tokens kept, in (0, 1] (default: the policy's choice)",
    )
    p.add_argument("--device", default="cpu", help="where the target and drafter run: cpu, cuda or cuda:N")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print text, token ids and stats as JSON")


def load_image(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise ValueError(f"image {path} does not exist or is not a file")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except UnidentifiedImageError as e:
        raise ValueError(f"{path} is not an image file that Pillow can read") from e
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def resolve_adapter(value: str) -> tuple[str, Path]:
    """``value`` as (name, folder): a folder path, or the name of a shipped adapter."""
    path = Path(value)
    if path.is_dir():
        return path.name, path
    if (ADAPTERS / value).is_dir():
        return value, ADAPTERS / value
    shipped = sorted(p.name for p in ADAPTERS.iterdir() if p.is_dir()) if ADAPTERS.is_dir() else []
    raise ValueError(f"no adapter {value!r}: not a folder, and the shipped adapters are {shipped}")


def _folders(args: argparse.Namespace) -> tuple[Path, Path | None]:
    model = args.model or DEFAULT_TARGET
    if args.no_spec:
        return model, None
    return model, args.drafter or (DEFAULT_DRAFTER if args.model is None else None)


def _run(args: argparse.Namespace) -> int:
    from core.sampling import SamplingParams
    from serve.chat import chat_prompt
    from serve.engine_builder import EngineOptions, build_engine

    sampling = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed,
    )  # fmt: skip
    image = load_image(args.image)
    model, drafter = _folders(args)
    adapter = None if args.adapter is None else resolve_adapter(args.adapter)
    if adapter is not None and drafter is None:
        raise ValueError("--adapter needs a drafter: drop --no-spec, or pass --drafter with --model")
    options = EngineOptions(
        policy=args.policy, compression=args.compression, device=args.device,
        adapters=() if adapter is None else (adapter,),
    )  # fmt: skip
    built = build_engine(model, drafter, options)
    prompt = chat_prompt(built.processor, args.prompt, [image], args.system)
    request_id = built.engine.add_request(prompt, sampling, adapter=None if adapter is None else adapter[0])
    queued = built.engine.scheduler.get(request_id)
    assert queued is not None  # it was just added
    expanded = queued.encoded.token_ids.tolist()
    done = None
    while done is None:
        done = next((o for o in built.engine.step() if o.finished and o.request_id == request_id), None)
    result = built.engine.completion(done)
    print(json.dumps(report(result, expanded)) if args.json else result.text)
    return 0


def report(result: Any, prompt_token_ids: list[int]) -> dict[str, Any]:
    s, n = result.stats, len(result.token_ids)
    after_first = result.time_s - result.ttft_s
    return {
        "text": result.text,
        "token_ids": list(result.token_ids),
        "prompt_token_ids": prompt_token_ids,
        "finish_reason": result.finish_reason,
        "stats": {
            "verify_steps": s.verify_steps,
            "draft_tokens": s.draft_tokens,
            "accepted_tokens": s.accepted_tokens,
            "tau": round(s.tau, 3),
            "ttft_s": round(result.ttft_s, 4),
            "time_s": round(result.time_s, 4),
            "tokens_per_s": round(n / result.time_s, 2) if result.time_s > 0 else None,
            "decode_tokens_per_s": round((n - 1) / after_first, 2) if n > 1 and after_first > 0 else None,
        },
    }


GENERATE = Command(
    name="generate",
    help="answer one image + prompt with the target, speculating with the drafter",
    add_arguments=_args,
    run=_run,
)
