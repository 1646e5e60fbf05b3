"""Single-user speculative decoding on the shipped tiny models, against the baselines a user has.

Contenders, each answering the same ShapesWorld prompts one after another (greedy):

- ``ours_spec``: our engine with the tiny drafter (load-aware trees);
- ``ours_no_spec``: our engine, target alone;
- ``hf_generate``: transformers ``generate`` on the target;
- ``hf_assisted``: transformers assisted generation, ``assistant_model=`` the tiny drafter;
- ablations of ours: margin gating off, branching off, fixed depth, compression r = 0.5 / 0.25.

Every contender must produce the same tokens (checked); each repeat runs all of them, rotating the
order, and the tables report medians. ``--mode forced`` generates exactly ``--max-tokens`` per
prompt (end-of-turn ignored, so answers run on into what the models never learned: a lower bound on
tau); ``--mode natural`` stops at the end of the answer (mixed question kinds, ~11 tokens);
``--mode long`` asks the demo user bob (detailed style) to describe scenes of 4-5 shapes, whose
natural answers run 50-80 tokens, and adds ours and transformers' assisted generation with bob's
drafter adapter (merged into the assistant for transformers, which takes one assistant model).

    .venv/bin/python -m benchmarks.spec_decode [--prompts 20] [--repeats 3] [--mode natural]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Case, machine_info, time_interleaved
from core.sampling import SamplingParams
from drafter_pool.tree_search import TreeShape
from models.device import resolve_device
from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.chat import chat_prompt
from serve.engine_builder import EngineOptions, build_engine

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
TARGET, DRAFTER = CHECKPOINTS / "tiny-target", CHECKPOINTS / "tiny-drafter"
LONG_USER = "bob"  # detailed answers; his adapter ships in checkpoints/adapters/bob


@dataclass
class Outcome:
    tokens: list[list[int]]
    tau: float | None = None  # tokens per verify step, over all prompts


def ours(
    options: EngineOptions, spec: bool, adapter: str | None = None
) -> Callable[[list[Any], SamplingParams], Outcome]:
    if adapter is not None:
        options = replace(options, adapters=((adapter, CHECKPOINTS / "adapters" / adapter),))
    built = build_engine(TARGET, DRAFTER if spec else None, options)

    def run(samples: list[Any], params: SamplingParams) -> Outcome:
        tokens, steps = [], 0
        for s in samples:
            prompt = chat_prompt(built.processor, s.question.text, [s.image()], s.system)
            [out] = built.engine.generate([prompt], params, adapter=adapter)
            tokens.append(list(out.token_ids))
            steps += out.stats.verify_steps
        return Outcome(tokens, sum(len(t) for t in tokens) / steps)

    return run


def transformers_runner(
    assisted: bool, adapter: str | None = None, device: str = "cpu"
) -> Callable[[list[Any], SamplingParams], Outcome]:
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    load = AutoModelForImageTextToText.from_pretrained
    target = load(TARGET, local_files_only=True, dtype=torch.float32).eval().to(device)
    assistant = load(DRAFTER, local_files_only=True, dtype=torch.float32).eval() if assisted else None
    if assistant is not None and adapter is not None:
        from peft import PeftModel

        assistant = PeftModel.from_pretrained(assistant, CHECKPOINTS / "adapters" / adapter)
        assistant = assistant.merge_and_unload().eval()
    assistant = None if assistant is None else assistant.to(device)
    processor = AutoProcessor.from_pretrained(TARGET, local_files_only=True)

    @torch.inference_mode()
    def run(samples: list[Any], params: SamplingParams) -> Outcome:
        eos = None if params.ignore_eos else processor.tokenizer.eos_token_id
        for model in (target, assistant):  # None must replace the checkpoint's default, not defer to it
            if model is not None:
                model.generation_config.eos_token_id = eos
        config = GenerationConfig(
            max_new_tokens=params.max_tokens, do_sample=False, eos_token_id=eos,
            pad_token_id=processor.tokenizer.pad_token_id,
        )  # fmt: skip
        tokens = []
        for s in samples:
            chat = processor.apply_chat_template(s.messages(), add_generation_prompt=True)
            enc = processor(images=s.image(), text=chat, return_tensors="pt").to(device)
            out = target.generate(**enc, generation_config=config, assistant_model=assistant)
            tokens.append(out[0, enc["input_ids"].shape[1] :].tolist())
        return Outcome(tokens)

    return run


def contenders(base: EngineOptions, mode: str) -> dict[str, Callable[[list[Any], SamplingParams], Outcome]]:
    if mode == "long":
        return {
            "ours_spec": ours(base, spec=True),
            "ours_spec_adapter": ours(base, spec=True, adapter=LONG_USER),
            "ours_no_spec": ours(base, spec=False),
            "hf_generate": transformers_runner(assisted=False, device=base.device),
            "hf_assisted": transformers_runner(assisted=True, device=base.device),
            "hf_assisted_adapter": transformers_runner(assisted=True, adapter=LONG_USER, device=base.device),
        }
    return {
        "ours_spec": ours(base, spec=True),
        "ours_no_spec": ours(base, spec=False),
        "hf_generate": transformers_runner(assisted=False, device=base.device),
        "hf_assisted": transformers_runner(assisted=True, device=base.device),
        "ablation_no_gating": ours(replace(base, tree=replace(base.tree, stop_margin=0.0)), spec=True),
        "ablation_no_branching": ours(replace(base, tree=replace(base.tree, branch_margin=0.0)), spec=True),
        "ablation_fixed_depth_6": ours(replace(base, policy="fixed", fixed_nodes=6), spec=True),
        "ablation_r_0.5": ours(replace(base, compression=0.5), spec=True),
        "ablation_r_0.25": ours(replace(base, compression=0.25), spec=True),
    }


def prompts(mode: str, n: int) -> list[Any]:
    """Mixed question kinds in the default style; for ``long``, bob describing 4-5 shapes."""
    if mode != "long":
        return [make_sample(EVAL_SEED_START + 500 + i) for i in range(n)]
    seeds = (EVAL_SEED_START + 500 + i for i in range(100_000))
    scenes = (make_sample(seed, LONG_USER, kind="describe") for seed in seeds)
    return [s for _, s in zip(range(n), (s for s in scenes if len(s.scene.objects) >= 4), strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--mode", choices=("natural", "forced", "long"), default="forced")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run only these contenders")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--device", default="cpu", help="where all contenders run: cpu, cuda or cuda:N")
    args = parser.parse_args()
    samples = prompts(args.mode, args.prompts)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=args.mode == "forced")
    # prefix cache off: every pass recomputes its prompts, as transformers' generate does
    device = str(resolve_device(args.device))
    runners = contenders(EngineOptions(tree=TreeShape(), prefix_cache=False, device=device), args.mode)
    runners = {k: v for k, v in runners.items() if not args.only or k in args.only}
    results: dict[str, Outcome] = {}

    def case(name: str) -> Case:
        return Case(run=lambda: results.__setitem__(name, runners[name](samples, params)))

    timings = time_interleaved({name: case(name) for name in runners}, args.repeats)
    reference = results.get("hf_generate") or next(iter(results.values()))
    report = summarize(args, timings, results, reference)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"spec_decode_{args.mode}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    from benchmarks.spec_decode_report import write_report

    write_report(report, stem)
    print(json.dumps(report["headlines"], indent=1))


def summarize(
    args: argparse.Namespace, timings: dict[str, Any], results: dict[str, Outcome], ref: Outcome
) -> dict[str, Any]:
    total = {name: sum(len(t) for t in out.tokens) for name, out in results.items()}
    rows = {}
    for name, timing in timings.items():
        rows[name] = {
            **timing.as_dict(total[name]),
            "tau": results[name].tau,
            "same_tokens_as_reference": results[name].tokens == ref.tokens,
        }
    speed = {name: row["tokens_per_s"] for name, row in rows.items()}
    heads = {}
    for ours_name in ("ours_spec", "ours_spec_adapter"):
        if ours_name in speed:
            for other in ("ours_no_spec", "hf_generate", "hf_assisted", "hf_assisted_adapter"):
                if other in speed:
                    heads[f"{ours_name}_over_{other}"] = round(speed[ours_name] / speed[other], 3)
            heads[f"tau_{ours_name}"] = round(rows[ours_name]["tau"], 3)
    return {
        "benchmark": "spec_decode",
        "mode": args.mode,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "mean_output_tokens": sum(len(t) for t in ref.tokens) / len(ref.tokens),
        "repeats": args.repeats,
        "machine": machine_info(resolve_device(args.device)),
        "headlines": heads,
        "contenders": rows,
    }


if __name__ == "__main__":
    main()
