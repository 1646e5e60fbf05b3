"""Time to first token with the prompt prefix (image + system prompt) computed, found in the
engine's own pool, or loaded from Redis by a replica that never saw it; and from the measured
numbers, the link bandwidth below which loading a prefix stops beating recomputing it.

Three engine replicas (A, B, C: separate KV pools and image caches, one process) share a real
redis-server started for the run. For each of N fresh ShapesWorld scenes, in its own tenant
(so nothing earlier is shared), side by side:

- miss: A answers question 0 (vision tower + whole prompt prefill, nothing cached);
- same prompt (a retry, a restarted replica, a popular request): C answers question 0 with
  every block but the last token's from Redis ("Redis hit"), then A again from its own pool
  ("local hit");
- new question about the same image and persona: B answers question 1 with the image + system
  prompt blocks from Redis, A answers question 2 with them from its pool. Their last image
  rows share a block with the question, so that block and the vision tower are computed again
  (A has the image's embeddings cached; B has not), and A's local lookup still asks Redis
  for the blocks past its own.

TTFT is wall time from handing the prompt to the engine (encoding included) to the step that
emits its first token. Each request is then aborted (its prompt blocks stay cached).

    .venv/bin/python -m benchmarks.prefix_cache [--samples 24] [--policy load_aware|none]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any

import torch
from tqdm import tqdm

from benchmarks import harness
from core.prompt import Prompt
from core.sampling import SamplingParams
from kvcache import kv_codec
from models.tiny.personas import DEMO_USERS
from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.engine_builder import BuiltEngine, EngineOptions, build_engine
from serve.local_redis import start_redis

SEED_OFFSET = 3000  # this benchmark's scenes
CASES = ("miss", "same prompt, local hit", "same prompt, Redis hit", "new question, local hit",
         "new question, Redis hit")  # fmt: skip
# LLaVA-1.5-7B's language model (Llama-2-7B): 32 layers, 32 KV heads of 128, fp16 KV, ~6.7e9
# parameters; its KV per token and forward FLOPs per token (2 x parameters) are exact arithmetic
LLAVA_7B = {"layers": 32, "kv_heads": 32, "head_dim": 128, "bytes_per_value": 2, "params": 6.74e9}


def distinct_questions(seed: int, persona: str) -> list[Any]:
    """Three samples of scene ``seed`` in ``persona``'s style with different questions."""
    found: dict[str, Any] = {}
    for turn in range(50):
        s = make_sample(seed, persona, turn=turn)
        found.setdefault(s.question.text, s)
        if len(found) == 3:
            return list(found.values())
    raise RuntimeError(f"scene {seed} has fewer than three distinct questions")


def first_token_ms(built: BuiltEngine, prompt: Prompt) -> tuple[float, int]:
    """(ms to the first emitted token, cached prompt tokens); the request is aborted after it."""
    engine = built.engine
    started = time.perf_counter()
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=32, ignore_eos=True))
    while True:
        outs = [o for o in engine.step() if o.request_id == request_id and o.new_token_ids]
        if outs:
            elapsed = 1000 * (time.perf_counter() - started)
            engine.abort(request_id)
            return elapsed, outs[0].stats.cached_tokens


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--samples", type=int, default=24, help="fresh scenes (one tenant each)")
    p.add_argument("--policy", default="load_aware", help="draft policy of both replicas")
    args = p.parse_args()
    torch.set_num_threads(2)
    redis = start_redis()
    try:
        result = run(args, redis.url)
    finally:
        redis.stop()
    rendered = report(result)
    harness.write_report(args.out / "prefix_cache", result, rendered)
    print(rendered.markdown())


def run(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    options = EngineOptions(policy=args.policy, redis_url=redis_url)
    a, b, c = (build_engine(harness.TARGET, harness.DRAFTER, options) for _ in "abc")
    processor = a.processor
    [warm] = harness.eval_samples(SEED_OFFSET - 1, 1)
    for built in (a, b, c):  # first-call overheads out of the way
        first_token_ms(built, harness.prompt_of(processor, warm))
    ms: dict[str, list[float]] = {case: [] for case in CASES}
    cached: dict[str, list[int]] = {case: [] for case in CASES}
    prompt_tokens: list[int] = []
    for i in tqdm(range(args.samples), desc="scenes", unit="scene"):
        seed, persona = EVAL_SEED_START + SEED_OFFSET + i, DEMO_USERS[i % len(DEMO_USERS)]
        q0, q1, q2 = distinct_questions(seed, persona)
        tenant = f"bench-{i}"

        def prompt(s: Any) -> Prompt:
            return dataclasses.replace(harness.prompt_of(processor, s), tenant=tenant)  # noqa: B023 (used at once)

        steps = [
            (CASES[0], a, q0),
            (CASES[2], c, q0),
            (CASES[1], a, q0),
            (CASES[4], b, q1),
            (CASES[3], a, q2),
        ]
        for case, built, sample in steps:
            t, hit = first_token_ms(built, prompt(sample))
            ms[case].append(t)
            cached[case].append(hit)
            assert built.redis is not None
            built.redis.flush()  # writes are off the hot path; the next replica must find them
        prompt_tokens.append(a.engine.encode(prompt(q0)).num_tokens)
    return summarize(a, c, ms, cached, prompt_tokens, args)


def summarize(
    a: BuiltEngine,
    reader: BuiltEngine,  # the replica whose Redis traffic is reported
    ms: dict[str, list[float]],
    cached: dict[str, list[int]],
    prompt_tokens: list[int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    assert a.prefix is not None and reader.prefix is not None and reader.redis is not None
    layout = a.engine.scheduler.pool.kv.layout
    med = {case: statistics.median(v) for case, v in ms.items()}
    cached_med = statistics.median(cached[CASES[1]])
    # recompute cost per cached token: what a local hit saves, per token it did not compute
    recompute_ms_per_token = (med["miss"] - med[CASES[1]]) / cached_med
    value = kv_codec.encode(
        kv_codec.BlockMeta(a.prefix.model, layout, bytes(32), (0, layout.block_size)),
        kv_codec.BlockKV(
            *(torch.zeros(layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim),) * 2
        ),
    )
    tiny_bytes = len(value) / layout.block_size
    lm = a.target.decoder
    tiny_params = sum(p.numel() for p in lm.parameters())
    l7 = LLAVA_7B
    llava_bytes = 2 * l7["layers"] * l7["kv_heads"] * l7["head_dim"] * l7["bytes_per_value"]
    llava_ms = recompute_ms_per_token * l7["params"] / tiny_params  # same CPU, FLOPs-scaled
    return {
        "machine": harness.machine_info(),
        "policy": args.policy,
        "samples": args.samples,
        "prompt_tokens_median": statistics.median(prompt_tokens),
        "block_size": layout.block_size,
        "ttft_ms": {case: {"median": med[case], "samples": v} for case, v in ms.items()},
        "cached_tokens": {case: {"median": statistics.median(v), "samples": v} for case, v in cached.items()},
        "ratio_to_miss": {case: med[case] / med["miss"] for case in CASES},
        "redis": {
            "bytes_read": reader.redis.stats.bytes_read,
            "fetch_ms_median": statistics.median(reader.redis.stats.fetch_ms)
            if reader.redis.stats.fetch_ms
            else None,
            "load_ms_median": statistics.median(reader.prefix.stats.load_ms)
            if reader.prefix.stats.load_ms
            else None,
            "errors": reader.redis.stats.errors,
        },
        "bytes_per_token": {"tiny_in_pool": layout.bytes_per_token(), "tiny_redis_value": tiny_bytes},
        "recompute_ms_per_token": {
            "tiny_measured": recompute_ms_per_token,
            "llava_7b_flops_scaled": llava_ms,
        },
        "breakeven_bandwidth_MB_s": {  # loading beats recomputing above this link bandwidth
            "tiny": tiny_bytes / recompute_ms_per_token / 1e3,
            "llava_7b_on_this_cpu": llava_bytes / llava_ms / 1e3,
        },
        "llava_7b": {**l7, "kv_bytes_per_token": llava_bytes},
        "tiny_lm_params": tiny_params,
    }


def report(result: dict[str, Any]) -> harness.Report:
    ttft, cached, per_token = result["ttft_ms"], result["cached_tokens"], result["recompute_ms_per_token"]
    tiny_value, llava = (
        result["bytes_per_token"]["tiny_redis_value"],
        result["llava_7b"]["kv_bytes_per_token"],
    )
    bw, redis = result["breakeven_bandwidth_MB_s"], result["redis"]
    intro = (
        f"TTFT, {result['samples']} fresh scenes (one tenant each), policy `{result['policy']}`, prompt "
        f"{result['prompt_tokens_median']:.0f} tokens (median), block size {result['block_size']}:"
    )
    by_case = [
        (
            case,
            {
                "ttft": ttft[case]["median"],
                "ratio": result["ratio_to_miss"][case],
                "cached": cached[case]["median"],
            },
        )
        for case in CASES
    ]
    columns = {
        "prefix": "{name}",
        "TTFT median (ms)": "{ttft:.1f}",
        "vs miss": "{ratio:.2f}",
        "cached tokens": "{cached:.0f}",
    }
    table = harness.Table.of(by_case, columns)
    notes = [
        f"Redis: fetch {redis['fetch_ms_median']:.2f} ms, fetch-to-pool "
        f"{redis['load_ms_median']:.2f} ms (medians), {redis['errors']} errors.",
        f"Bytes per cached token: {result['bytes_per_token']['tiny_in_pool']} in the pool, "
        f"{tiny_value:.0f} as Redis values; LLaVA-1.5-7B (fp16, 32 layers x 32 KV heads x 128): {llava}.",
        f"Recompute cost per cached token (miss - same-prompt local hit): "
        f"{per_token['tiny_measured']:.3f} ms "
        f"(tiny); LLaVA-7B on this CPU, scaled by FLOPs: {per_token['llava_7b_flops_scaled']:.1f} ms.",
        f"Loading beats recomputing above {bw['tiny']:.0f} MB/s for the tiny target and above "
        f"{bw['llava_7b_on_this_cpu']:.1f} MB/s for LLaVA-7B on this CPU.",
    ]
    boxes = [
        harness.Series(case.replace(", ", "\n"), [i], ttft[case]["samples"]) for i, case in enumerate(CASES)
    ]
    bandwidth = [10 ** (k / 10) for k in range(0, 51)]  # 1 MB/s .. 100 GB/s
    tokens = cached[CASES[1]]["median"]

    def line(label: str, ms: list[float], style: str, color: str) -> harness.Series:
        return harness.Series(label, bandwidth, ms, style, color)

    lines = [
        line("tiny: load prefix", [tiny_value * tokens / (w * 1e3) for w in bandwidth], "-", "C0"),
        line("tiny: recompute prefix", [per_token["tiny_measured"] * tokens] * len(bandwidth), "--", "C0"),
        line("LLaVA-7B: load", [llava * tokens / (w * 1e3) for w in bandwidth], "-", "C1"),
        line(
            "LLaVA-7B: recompute (this CPU)",
            [per_token["llava_7b_flops_scaled"] * tokens] * len(bandwidth),
            "--",
            "C1",
        ),
    ]
    panels = [
        harness.Panel(
            "TTFT by where the prefix KV comes from", "", "time to first token (ms)", boxes, kind="box"
        ),
        harness.Panel(
            "load vs recompute",
            "link bandwidth (MB/s)",
            f"ms for a {tokens:.0f}-token prefix",
            lines,
            xscale="log",
            yscale="log",
        ),
    ]
    return harness.Report([intro, table, "\n".join(notes)], harness.Plot(panels, panel_size=(6.5, 4.5)))


if __name__ == "__main__":
    main()
