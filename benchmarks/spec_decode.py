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

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from benchmarks import harness
from benchmarks.engine_loops import answer_each
from core.sampling import SamplingParams
from drafter_pool.tree_search import TreeShape
from models.device import resolve_device
from serve.engine_builder import EngineOptions, build_engine


@dataclass
class Outcome:
    tokens: list[list[int]]
    tau: float | None = None  # tokens per verify step, over all prompts


Runner = Callable[[list[Any], SamplingParams], Outcome]


def ours(options: EngineOptions, spec: bool, adapter: str | None = None) -> Runner:
    if adapter is not None:
        options = replace(options, adapters=((adapter, harness.ADAPTERS / adapter),))
    built = build_engine(harness.TARGET, harness.DRAFTER if spec else None, options)

    def run(samples: list[Any], params: SamplingParams) -> Outcome:
        prompts = [harness.prompt_of(built.processor, s) for s in samples]
        answers = answer_each(built.engine, prompts, params, adapter)
        return Outcome([list(o) for o in answers.outputs], answers.tau)

    return run


def transformers_runner(assisted: bool, adapter: str | None = None, device: str = "cpu") -> Runner:
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

    load = AutoModelForImageTextToText.from_pretrained
    target = load(harness.TARGET, local_files_only=True, dtype=torch.float32).eval().to(device)
    assistant = load(harness.DRAFTER, local_files_only=True, dtype=torch.float32).eval() if assisted else None
    if assistant is not None and adapter is not None:
        from peft import PeftModel

        assistant = PeftModel.from_pretrained(assistant, harness.ADAPTERS / adapter)
        assistant = assistant.merge_and_unload().eval()
    assistant = None if assistant is None else assistant.to(device)
    processor = AutoProcessor.from_pretrained(harness.TARGET, local_files_only=True)

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


def contenders(base: EngineOptions, mode: str) -> dict[str, Runner]:
    if mode == "long":
        return {
            "ours_spec": ours(base, spec=True),
            "ours_spec_adapter": ours(base, spec=True, adapter=harness.LONG_USER),
            "ours_no_spec": ours(base, spec=False),
            "hf_generate": transformers_runner(assisted=False, device=base.device),
            "hf_assisted": transformers_runner(assisted=True, device=base.device),
            "hf_assisted_adapter": transformers_runner(
                assisted=True, adapter=harness.LONG_USER, device=base.device
            ),
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


def main() -> None:
    p = harness.parser(__doc__, repeats=3, device=True)
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--mode", choices=("natural", "forced", "long"), default="forced")
    p.add_argument("--only", nargs="*", help="run only these contenders")
    args = p.parse_args()
    samples = harness.single_user_samples(args.mode, args.prompts)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=args.mode == "forced")
    # prefix cache off: every pass recomputes its prompts, as transformers' generate does
    device = str(resolve_device(args.device))
    runners = contenders(EngineOptions(tree=TreeShape(), prefix_cache=False, device=device), args.mode)
    runners = {k: v for k, v in runners.items() if not args.only or k in args.only}
    outcomes: dict[str, Outcome] = {}

    def case(name: str) -> harness.Case:
        return harness.Case(run=lambda: outcomes.__setitem__(name, runners[name](samples, params)))

    timings = harness.time_interleaved({name: case(name) for name in runners}, args.repeats)
    reference = outcomes.get("hf_generate") or next(iter(outcomes.values()))
    rows = {
        name: {
            **timing.as_dict(sum(len(t) for t in outcomes[name].tokens)),
            "tau": outcomes[name].tau,
            "same_tokens_as_reference": outcomes[name].tokens == reference.tokens,
        }
        for name, timing in timings.items()
    }
    result = {
        "benchmark": "spec_decode",
        "mode": args.mode,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "mean_output_tokens": sum(len(t) for t in reference.tokens) / len(reference.tokens),
        "repeats": args.repeats,
        "machine": harness.machine_info(device),
        "headlines": headlines(rows),
        "contenders": rows,
    }
    harness.write_report(args.out / f"spec_decode_{args.mode}", result, report(result))
    print(result["headlines"])


def headlines(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Ours with speculation over each baseline, and its tau."""
    heads = {}
    for mine in ("ours_spec", "ours_spec_adapter"):
        if mine in rows:
            for other in ("ours_no_spec", "hf_generate", "hf_assisted", "hf_assisted_adapter"):
                if other in rows:
                    heads[f"{mine}_over_{other}"] = round(
                        rows[mine]["tokens_per_s"] / rows[other]["tokens_per_s"], 3
                    )
            heads[f"tau_{mine}"] = round(rows[mine]["tau"], 3)
    return heads


def report(result: dict[str, Any]) -> harness.Report:
    rows = result["contenders"]
    base = rows.get("ours_no_spec", {}).get("tokens_per_s")
    intro = (
        f"Single user, greedy, {result['prompts']} ShapesWorld prompts, mode `{result['mode']}` "
        f"(max {result['max_tokens']} new tokens, {result.get('mean_output_tokens', 0):.1f} on average), "
        f"median of {result['repeats']} interleaved repeats."
    )
    columns: dict[str, harness.Cell] = {
        "contender": "{name}",
        "tokens/s": "{tokens_per_s:.1f}",
        "vs ours no-spec": lambda _, row: f"{row['tokens_per_s'] / base:.2f}x" if base else "-",
        "tau": lambda _, row: f"{row['tau']:.2f}" if row.get("tau") else "-",
        "same tokens": lambda _, row: "yes" if row["same_tokens_as_reference"] else "NO",
    }
    table = harness.Table.of(rows.items(), columns, align="lrrrc")
    names = list(rows)
    bars = harness.Series(
        "tokens/s",
        names,
        [rows[n]["tokens_per_s"] for n in names],
        color="#4477aa",
        texts=[f"tau {rows[n]['tau']:.2f}" if rows[n].get("tau") else "" for n in names],
    )
    title = f"Speculative decoding on the tiny models ({result['mode']} mode)"
    panel = harness.Panel(title, "tokens/s (single user, greedy)", "", [bars], kind="barh")
    return harness.Report([intro, table], harness.Plot([panel], panel_size=(9, 4)))


if __name__ == "__main__":
    main()
