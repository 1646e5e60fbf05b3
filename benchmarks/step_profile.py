"""Where a single user's time goes, with and without speculation: the first step vs the rest.

Every request's first engine step prefills its prompt (image + system + question) on the target,
and with speculation also builds the drafter's KV and the first tree. ShapesWorld answers are
short (about 11 tokens with the default persona), so that step is a large share of the time, and
speculation can only shorten the rest. This benchmark times, per request (greedy, natural end of
turn), the prompt encoding, the first step and the later steps, for our engine with and without
the drafter, alternating the two per prompt, and derives the bound that the first step puts on
the speedup: ``total_no_spec / first_part_spec`` if every later step were free.

    .venv/bin/python -m benchmarks.step_profile [--prompts 20] [--repeats 3] [--max-tokens 64]
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmarks import harness
from core.sampling import SamplingParams
from serve.engine_builder import BuiltEngine, EngineOptions, build_engine

SEED_OFFSET = 0  # this benchmark's scenes


def profile_request(built: BuiltEngine, sample: Any, params: SamplingParams) -> dict[str, float]:
    """Milliseconds to encode the prompt, of the first step and of all later steps; tokens, steps."""
    engine = built.engine
    start = time.perf_counter()
    engine.add_request(harness.prompt_of(built.processor, sample), params)
    encoded = time.perf_counter()
    steps, first_ms, tokens = 0, 0.0, 0
    while engine.has_unfinished():
        before = time.perf_counter()
        for out in engine.step():
            tokens += len(out.new_token_ids)
            if out.finished:
                engine.completion(out)
        if steps == 0:
            first_ms = 1000 * (time.perf_counter() - before)
        steps += 1
    total_ms = 1000 * (time.perf_counter() - start)
    encode_ms = 1000 * (encoded - start)
    return {
        "encode_ms": encode_ms,
        "first_step_ms": first_ms,
        "later_steps_ms": total_ms - encode_ms - first_ms,
        "later_steps": steps - 1,
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = harness.parser(__doc__, repeats=3)
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    engines = {
        # prefix cache off: every pass recomputes its prompts
        "spec": build_engine(harness.TARGET, harness.DRAFTER, EngineOptions(prefix_cache=False)),
        "no_spec": build_engine(harness.TARGET, None, EngineOptions(policy="none", prefix_cache=False)),
    }
    samples = harness.eval_samples(SEED_OFFSET, args.prompts)
    params = SamplingParams(max_tokens=args.max_tokens)
    for built in engines.values():  # warm-up (and load_aware's first measurements)
        for s in samples[:3]:
            profile_request(built, s, params)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    for r in range(args.repeats):
        for i, s in enumerate(samples):
            order = list(engines) if (i + r) % 2 == 0 else list(engines)[::-1]
            for name in order:
                runs[name].append(profile_request(engines[name], s, params))
    rows = {name: summarize(rs, args.repeats) for name, rs in runs.items()}
    spec, plain = rows["spec"], rows["no_spec"]
    result = {
        "benchmark": "step_profile",
        "prompts": args.prompts,
        "repeats": args.repeats,
        "max_tokens": args.max_tokens,
        "machine": harness.machine_info(),
        "engines": rows,
        "speedup": round(plain["total_ms"] / spec["total_ms"], 3),
        "first_part_share_spec": round(spec["first_part_ms"] / spec["total_ms"], 3),
        "first_part_share_no_spec": round(plain["first_part_ms"] / plain["total_ms"], 3),
        "speedup_bound_if_later_steps_were_free": round(plain["total_ms"] / spec["first_part_ms"], 3),
        "speedup_if_first_step_cost_as_without_drafter": round(
            plain["total_ms"] / (plain["first_part_ms"] + spec["later_steps_ms"]), 3
        ),
    }
    rendered = report(result)
    harness.write_report(args.out / "step_profile", result, rendered)
    print(rendered.markdown())
    return result


def summarize(runs: list[dict[str, float]], repeats: int) -> dict[str, float]:
    """Per-pass sums (all prompts once), median over the repeats; per-step means."""
    per_pass = len(runs) // repeats
    passes = [runs[i * per_pass : (i + 1) * per_pass] for i in range(repeats)]

    def med(key: str) -> float:
        return statistics.median(sum(r[key] for r in p) for p in passes)

    first = med("encode_ms") + med("first_step_ms")
    later = med("later_steps_ms")
    return {
        "tokens": med("tokens"),
        "encode_ms": round(med("encode_ms"), 1),
        "first_step_ms": round(med("first_step_ms"), 1),
        "first_part_ms": round(first, 1),  # encoding + first step
        "later_steps_ms": round(later, 1),
        "later_steps": med("later_steps"),
        "ms_per_later_step": round(later / max(med("later_steps"), 1), 2),
        "total_ms": round(first + later, 1),
        "tokens_per_s": round(1000 * med("tokens") / (first + later), 1),
    }


def report(result: dict[str, Any]) -> harness.Report:
    intro = (
        f"Single user, greedy, {result['prompts']} ShapesWorld prompts (natural end of turn, at most "
        f"{result['max_tokens']} tokens), sums over the prompts, median of {result['repeats']} passes."
    )
    columns = {
        "engine": "{name}",
        "tokens": "{tokens:.0f}",
        "encode ms": "{encode_ms}",
        "first step ms": "{first_step_ms}",
        "later steps ms (steps)": "{later_steps_ms} ({later_steps:.0f})",
        "ms per later step": "{ms_per_later_step}",
        "total ms": "{total_ms}",
        "tok/s": "{tokens_per_s}",
    }
    table = harness.Table.of(result["engines"].items(), columns)
    bullets = [
        f"- speedup: **{result['speedup']}x**",
        f"- share of the time in encoding + first step: {result['first_part_share_spec']:.0%} with "
        f"speculation, {result['first_part_share_no_spec']:.0%} without",
        f"- speedup bound if every later step were free: {result['speedup_bound_if_later_steps_were_free']}x",
        f"- speedup if the first step cost what it costs without the drafter: "
        f"{result['speedup_if_first_step_cost_as_without_drafter']}x",
    ]
    return harness.Report([intro, table, "\n".join(bullets)])


if __name__ == "__main__":
    main()
