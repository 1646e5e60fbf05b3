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
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.common import machine_info
from core.prompt import Prompt
from core.sampling import SamplingParams
from kvcache import kv_codec
from models.tiny.personas import DEMO_USERS
from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.chat import chat_prompt
from serve.engine_builder import BuiltEngine, EngineOptions, build_engine
from serve.local_redis import start_redis

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
RESULTS = Path(__file__).resolve().parent / "results"
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=24, help="fresh scenes (one tenant each)")
    parser.add_argument("--policy", default="load_aware", help="draft policy of both replicas")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    redis = start_redis()
    try:
        report = run(args, redis.url)
    finally:
        redis.stop()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "prefix_cache"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    write_markdown_and_plot(report, stem)
    print(stem.with_suffix(".md").read_text())


def run(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    options = EngineOptions(policy=args.policy, redis_url=redis_url)
    a, b, c = (
        build_engine(CHECKPOINTS / "tiny-target", CHECKPOINTS / "tiny-drafter", options) for _ in "abc"
    )
    processor = a.processor
    warm = make_sample(EVAL_SEED_START + 2999)
    for built in (a, b, c):  # first-call overheads out of the way
        first_token_ms(built, chat_prompt(processor, warm.question.text, [warm.image()], warm.system))
    ms: dict[str, list[float]] = {case: [] for case in CASES}
    cached: dict[str, list[int]] = {case: [] for case in CASES}
    prompt_tokens: list[int] = []
    for i in tqdm(range(args.samples), desc="scenes", unit="scene"):
        seed, persona = EVAL_SEED_START + 3000 + i, DEMO_USERS[i % len(DEMO_USERS)]
        q0, q1, q2 = distinct_questions(seed, persona)
        tenant = f"bench-{i}"

        def prompt(s: Any) -> Prompt:
            p = chat_prompt(processor, s.question.text, [s.image()], s.system)
            return dataclasses.replace(p, tenant=tenant)  # noqa: B023 (used at once)

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
        "machine": machine_info(),
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


def write_markdown_and_plot(report: dict[str, Any], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ttft, cached, per_token = report["ttft_ms"], report["cached_tokens"], report["recompute_ms_per_token"]
    tiny_value = report["bytes_per_token"]["tiny_redis_value"]
    rows = [
        f"| {case} | {ttft[case]['median']:.1f} | {report['ratio_to_miss'][case]:.2f} | "
        f"{cached[case]['median']:.0f} |"
        for case in CASES
    ]
    bw = report["breakeven_bandwidth_MB_s"]
    md = [
        f"TTFT, {report['samples']} fresh scenes (one tenant each), policy `{report['policy']}`, prompt "
        f"{report['prompt_tokens_median']:.0f} tokens (median), block size {report['block_size']}:",
        "",
        "| prefix | TTFT median (ms) | vs miss | cached tokens |",
        "| --- | ---: | ---: | ---: |",
        *rows,
        "",
        f"Redis: fetch {report['redis']['fetch_ms_median']:.2f} ms, fetch-to-pool "
        f"{report['redis']['load_ms_median']:.2f} ms (medians), {report['redis']['errors']} errors.",
        f"Bytes per cached token: {report['bytes_per_token']['tiny_in_pool']} in the pool, "
        f"{tiny_value:.0f} as Redis values; LLaVA-1.5-7B (fp16, 32 layers x 32 KV heads x 128): "
        f"{report['llava_7b']['kv_bytes_per_token']}.",
        f"Recompute cost per cached token (miss - same-prompt local hit): "
        f"{per_token['tiny_measured']:.3f} ms "
        f"(tiny); LLaVA-7B on this CPU, scaled by FLOPs: {per_token['llava_7b_flops_scaled']:.1f} ms.",
        f"Loading beats recomputing above {bw['tiny']:.0f} MB/s for the tiny target and above "
        f"{bw['llava_7b_on_this_cpu']:.1f} MB/s for LLaVA-7B on this CPU.",
    ]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, case in enumerate(CASES):
        values = ttft[case]["samples"]
        left.boxplot(values, positions=[i], widths=0.5)
    left.set_xticks(range(len(CASES)), [c.replace(", ", "\n") for c in CASES], fontsize=8)
    left.set_ylabel("time to first token (ms)")
    left.set_title("TTFT by where the prefix KV comes from")
    bandwidth = [10 ** (k / 10) for k in range(0, 51)]  # 1 MB/s .. 100 GB/s
    tokens = report["cached_tokens"][CASES[1]]["median"]
    right.loglog(bandwidth, [tiny_value * tokens / (w * 1e3) for w in bandwidth], label="tiny: load prefix")
    right.axhline(per_token["tiny_measured"] * tokens, linestyle="--", label="tiny: recompute prefix")
    llava = report["llava_7b"]["kv_bytes_per_token"]
    right.loglog(
        bandwidth, [llava * tokens / (w * 1e3) for w in bandwidth], color="C1", label="LLaVA-7B: load"
    )
    right.axhline(
        per_token["llava_7b_flops_scaled"] * tokens,
        color="C1",
        linestyle="--",
        label="LLaVA-7B: recompute (this CPU)",
    )
    right.set_xlabel("link bandwidth (MB/s)")
    right.set_ylabel(f"ms for a {tokens:.0f}-token prefix")
    right.set_title("load vs recompute")
    right.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
