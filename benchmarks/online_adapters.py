"""Online drafter learning: a new user's τ over their first requests while the trainer runs.

A user with no adapter ("erin", a learning key) sends carol's kind of traffic (bullet lists),
eight requests per round beside eight of alice's and bob's, who draft with their shipped
adapters. Erin's finished answers are kept as samples; a trainer process beside the engine (its
own CPU thread, ``nice`` 10, as the AdapterTrainer deployment runs) trains and publishes erin's
versions, which the engine's drafter swaps in between steps. Three runs of the same prompts on
the tiny models, fixed 8-node trees (τ depends on the drafts, not on this machine's speed):

- **learning**: the above; τ of erin's requests per window of 40. After each window erin pauses
  while the others keep sending, until the trainer has had its turn on the samples so far, so
  that τ per window measures what each window of samples teaches rather than how fast these
  2 cores train;
- **offline**: erin's prompts drafted with carol's offline-trained adapter (1500 samples,
  800 steps): the reference erin's τ should approach;
- **no trainer**: the learning run's rounds again without a trainer: the other users'
  throughput without training beside them (all rounds, and the rounds that ran while it trained).

Every answer of erin's must equal the offline run's (greedy, lossless across every swap).

    .venv/bin/python -m benchmarks.online_adapters [--requests 400] [--out benchmarks/results]
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import harness
from core.prompt import Prompt
from core.sampling import SamplingParams
from drafter_pool.learner import LearnConfig
from drafter_pool.samples import SampleStore
from models.tiny.adapter_data import user_samples
from serve.chat import chat_prompt
from serve.engine_builder import BuiltEngine, EngineOptions, build_engine

WINDOW = 40  # erin's requests per τ window
PER_ROUND = 8  # erin's requests per round, beside as many of the other users'
OTHERS_PER_ERIN = 24  # the others' prompts per one of erin's (they keep sending while she pauses)
OTHERS = ("alice", "bob")
MAX_TOKENS = 64
TREE_NODES = 8
LEARN = LearnConfig(min_samples=40, holdout=16, steps=120, batch=16)
GOAL_OF_OFFLINE, GOAL_OF_FIRST, GOAL_VERSIONS, GOAL_OTHERS = 0.8, 1.3, 2, 0.9


def _trainer(root: str, config: LearnConfig, stop: Any) -> None:
    """The trainer process: the OnlineLearner at low priority on one thread until ``stop``."""
    import torch

    from drafter_pool.learner import OnlineLearner

    os.nice(10)
    torch.set_num_threads(1)
    store = SampleStore(root)
    learner = OnlineLearner(harness.DRAFTER, store, config)
    (Path(root) / "ready").write_text("")  # a trainer already running beside the service
    log = Path(root) / "outcomes.jsonl"
    while not stop.is_set():
        for due in learner.due():
            started = time.time()
            (Path(root) / "training").write_text(str(started))
            outcome = learner.learn(*due)
            (Path(root) / "training").unlink(missing_ok=True)
            row = {
                "started": started, "ended": time.time(), "user": outcome.name,
                "version": outcome.published.version if outcome.published else None,
                "acceptance": outcome.acceptance, "previous_acceptance": outcome.current_acceptance,
                "train_samples": outcome.train_samples, "seconds": outcome.seconds,
            }  # fmt: skip
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
        time.sleep(0.5)


def _engine(learned: Path | None, versions: dict[str, Path] | None = None) -> BuiltEngine:
    """The tiny engine with alice's, bob's and carol's adapters (and ``versions``: more named
    adapters); ``learned``: online learning's store, whose versions it swaps in."""
    adapters = tuple((name, harness.ADAPTERS / name) for name in (*OTHERS, "carol"))
    adapters += tuple((versions or {}).items())
    options = EngineOptions(
        policy="fixed", fixed_nodes=TREE_NODES, adapters=adapters, learned_dir=learned, learned_poll_s=0.5
    )
    return build_engine(harness.TARGET, harness.DRAFTER, options)


def _round(built: BuiltEngine, jobs: list[tuple[Prompt, str | None, bool]]) -> list[Any]:
    """Run ``jobs`` (prompt, adapter, learn) together; their completions in order."""
    engine = built.engine
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=MAX_TOKENS), adapter=a, learn=learn)
        for p, a, learn in jobs
    ]
    done: dict[int, Any] = {}
    while len(done) < len(ids):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = engine.completion(out)
    return [done[i] for i in ids]


def _traffic(built: BuiltEngine, n: int) -> tuple[list[Prompt], list[tuple[Prompt, str]]]:
    """erin's ``n`` prompts (carol's kind, in erin's tenant) and ``OTHERS_PER_ERIN n`` of alice's
    and bob's, in turn (the others keep sending while erin pauses for the trainer)."""
    erin = [
        dataclasses.replace(
            chat_prompt(built.processor, s.question.text, [s.image()], s.system), tenant="t-erin"
        )
        for s in user_samples("carol", n, seed=11, evaluation=True)
    ]
    each = OTHERS_PER_ERIN * n // len(OTHERS)
    per_user = [user_samples(user, each, seed=12 + k, evaluation=True) for k, user in enumerate(OTHERS)]
    others = [
        (chat_prompt(built.processor, s.question.text, [s.image()], s.system), user)
        for pair in zip(*per_user, strict=True)
        for s, user in zip(pair, OTHERS, strict=True)
    ]
    return erin, others


@dataclass(frozen=True)
class Round:
    erin: tuple[int, int]  # erin's prompts [a, b) in this round (a == b: the others' only)
    others: tuple[int, int]  # the others' prompts [a, b)


def _learning_run(
    built: BuiltEngine, erin: list[Prompt], others: list[tuple[Prompt, str]], store: SampleStore, root: Path
) -> tuple[list[Round], list[dict[str, Any]]]:
    """Rounds of erin's and the others' requests. After each window of erin's, the others keep
    sending (rounds of theirs only) until the trainer has had its turn on the samples so far: as
    if erin paused while the rest of the service went on, so that erin's τ per window measures
    how much each window of samples teaches, not how fast this machine trains. Returns the
    rounds run (to replay) and their measurements."""
    schedule: list[Round] = []
    rows: list[dict[str, Any]] = []
    taken = 0  # the others' prompts used so far

    def play(rnd: Round, keep: bool) -> None:
        nonlocal taken
        schedule.append(rnd)
        rows.append(_play(built, erin, others, rnd, "erin", store if keep else None, root))
        taken = rnd.others[1]

    for start in range(0, len(erin), PER_ROUND):
        play(Round((start, start + PER_ROUND), (taken, taken + PER_ROUND)), keep=True)
        kept = store.count("t-erin", "erin")[1]
        if kept % WINDOW or start + PER_ROUND >= len(erin):  # mid-window, or erin is done
            continue
        deadline = time.monotonic() + 900
        while _attempts(root) < kept // LEARN.min_samples:
            if time.monotonic() > deadline:
                raise TimeoutError("the trainer did not take its turn within 15 minutes")
            if taken + PER_ROUND > len(others):
                raise RuntimeError(
                    "the others' prompts ran out while waiting for the trainer: raise OTHERS_PER_ERIN"
                )
            end = start + PER_ROUND
            play(Round((end, end), (taken, taken + PER_ROUND)), keep=False)
    return schedule, rows


def _attempts(root: Path) -> int:
    log = root / "outcomes.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _play(
    built: BuiltEngine,
    erin: list[Prompt],
    others: list[tuple[Prompt, str]],
    rnd: Round,
    erin_adapter: str | None,
    store: SampleStore | None,
    root: Path | None,
) -> dict[str, Any]:
    """One round: erin's stats, the others' tokens and seconds, whether the trainer trained."""
    mine_prompts = erin[rnd.erin[0] : rnd.erin[1]]
    jobs = [(p, erin_adapter, store is not None) for p in mine_prompts]
    jobs += [(p, user, False) for p, user in others[rnd.others[0] : rnd.others[1]]]
    busy = root is not None and (root / "training").exists()
    started = time.perf_counter()
    outs = _round(built, jobs)
    seconds = time.perf_counter() - started
    mine, theirs = outs[: len(mine_prompts)], outs[len(mine_prompts) :]
    if store is not None:
        for prompt, out in zip(mine_prompts, mine, strict=True):
            store.add("t-erin", "erin", prompt, out.token_ids)
    return {
        "erin_requests": len(mine),
        "erin_tokens": sum(len(o.token_ids) for o in mine),
        "erin_steps": sum(o.stats.verify_steps for o in mine),
        "erin_versions": [o.stats.adapter_version for o in mine],
        "erin_outputs": [list(o.token_ids) for o in mine],
        "other_tokens": sum(len(o.token_ids) for o in theirs),
        "seconds": seconds,
        "training": busy or (root is not None and (root / "training").exists()),
    }


def _replay(
    built: BuiltEngine,
    erin: list[Prompt],
    others: list[tuple[Prompt, str]],
    schedule: list[Round],
    adapters: list[str | None],
) -> list[dict[str, Any]]:
    """``schedule`` again, erin's requests of round ``i`` drafted with ``adapters[i]``."""
    return [_play(built, erin, others, rnd, a, None, None) for rnd, a in zip(schedule, adapters, strict=True)]


def _windows(rounds: list[dict[str, Any]]) -> list[float]:
    """τ of erin's requests per window of ``WINDOW`` of them."""
    out, tokens, steps, count = [], 0, 0, 0
    for r in rounds:
        if not r["erin_requests"]:
            continue
        tokens, steps, count = tokens + r["erin_tokens"], steps + r["erin_steps"], count + r["erin_requests"]
        if count % WINDOW == 0:
            out.append(tokens / max(1, steps))
            tokens = steps = 0
    return out


def _others_throughput(rounds: list[dict[str, Any]]) -> float | None:
    """The other users' output tokens per second of round time."""
    seconds = sum(r["seconds"] for r in rounds)
    return sum(r["other_tokens"] for r in rounds) / seconds if seconds else None


def _ratio_of(mine: float | None, theirs: float | None) -> float | None:
    return mine / theirs if mine and theirs else None


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--requests", type=int, default=400, help="erin's requests (the others send more)")
    args = p.parse_args()
    n = args.requests - args.requests % WINDOW
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "learned"
        root.mkdir()
        store = SampleStore(root)
        learning = _engine(root)
        erin, others = _traffic(learning, n)
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        trainer = ctx.Process(target=_trainer, args=(str(root), LEARN, stop), daemon=True)
        trainer.start()
        while not (root / "ready").exists() and trainer.is_alive():
            time.sleep(0.2)
        try:
            print(f"learning run: {n} of erin's requests beside alice's and bob's ...")
            schedule, learned = _learning_run(learning, erin, others, store, root)
        finally:
            stop.set()
            trainer.join(timeout=300)
        log = root / "outcomes.jsonl"
        outcomes = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        # without a trainer: erin drafts with the version she had in each round, so that only the
        # trainer's share of the CPU differs
        folders = {f"erin-v{p.version}": p.folder for p in store.versions("t-erin", "erin")}
        had = [max((v for v in r["erin_versions"] if v is not None), default=None) for r in learned]
        print(
            f"the same {len(schedule)} rounds: erin with carol's offline adapter, then without a trainer ..."
        )
        offline = _replay(_engine(None), erin, others, schedule, ["carol"] * len(schedule))
        plain = _replay(
            _engine(None, folders), erin, others, schedule, [None if v is None else f"erin-v{v}" for v in had]
        )
    lossless = [r["erin_outputs"] for r in learned] == [r["erin_outputs"] for r in offline]
    windows, reference = _windows(learned), _windows(offline)
    offline_tau = sum(r["erin_tokens"] for r in offline) / sum(r["erin_steps"] for r in offline)
    versions = [o for o in outcomes if o["version"] is not None]
    training = [i for i, r in enumerate(learned) if r["training"]]
    speeds = {
        "with_trainer": _others_throughput(learned),
        "without_trainer": _others_throughput(plain),
        "while_training": _others_throughput([learned[i] for i in training]),
        "same_rounds_without_trainer": _others_throughput([plain[i] for i in training]),
    }
    goals = {
        "last_window_vs_offline": windows[-1] / offline_tau,
        "last_window_vs_first": windows[-1] / windows[0],
        "versions": len(versions),
        "others_with_trainer_vs_without": _ratio_of(speeds["with_trainer"], speeds["without_trainer"]),
        # the rounds that ran while the trainer trained, against the same rounds without a trainer
        "others_while_training_vs_without": _ratio_of(
            speeds["while_training"], speeds["same_rounds_without_trainer"]
        ),
    }
    result = {
        "benchmark": "online_adapters",
        "requests": n,
        "window": WINDOW,
        "per_round": PER_ROUND,
        "max_tokens": MAX_TOKENS,
        "tree_nodes": TREE_NODES,
        "learn_config": dataclasses.asdict(LEARN),
        "machine": harness.machine_info(),
        "rounds": len(schedule),
        "others_only_rounds": sum(1 for r in schedule if r.erin[0] == r.erin[1]),
        "rounds_while_training": len(training),
        "tau_windows": windows,
        "tau_windows_offline_adapter": reference,
        "tau_offline_adapter": offline_tau,
        "tau_windows_without_trainer": _windows(plain),
        "outcomes": outcomes,
        "versions_published": len(versions),
        "versions_refused": len(outcomes) - len(versions),
        "others_tokens_per_s": speeds,
        "lossless": lossless,
        "goals": goals,
    }
    for key, value in goals.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    if not lossless:
        raise AssertionError("erin's answers differ from the offline run's: speculation is not lossless")
    harness.write_report(args.out / "online_adapters", result, report(result))


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def report(result: dict[str, Any]) -> harness.Report:
    g, speed, c = result["goals"], result["others_tokens_per_s"], result["learn_config"]
    intro = (
        f"A new user (no adapter, a learning key) sends carol's kind of traffic: {result['requests']} "
        f"requests, {result['per_round']} per round beside as many of alice's and bob's. The trainer "
        f"trains a version every {c['min_samples']} new samples ({c['steps']} steps) and publishes it if "
        f"its teacher-forced acceptance on the user's latest {c['holdout']} samples beats the version in "
        f"use. After each window of {result['window']}, the new user pauses while the others keep sending "
        f"until the trainer has had its turn ({result['others_only_rounds']} rounds of the others only; "
        f"{result['rounds_while_training']} of {result['rounds']} rounds ran while it trained). The same "
        f"rounds ran again with carol's offline adapter for the new user, and without a trainer (the new "
        f"user drafting with the version they had in each round: only the trainer's CPU differs). Fixed "
        f"{result['tree_nodes']}-node trees; the new user's answers are identical to the offline run's: "
        f"{result['lossless']}."
    )
    others = g["others_with_trainer_vs_without"]
    rows = [
        ("τ last window / offline adapter's τ", f"{g['last_window_vs_offline']:.2f}",
         f">= {GOAL_OF_OFFLINE}", _met(g["last_window_vs_offline"] >= GOAL_OF_OFFLINE)),
        ("τ last window / first window", f"{g['last_window_vs_first']:.2f}",
         f">= {GOAL_OF_FIRST}", _met(g["last_window_vs_first"] >= GOAL_OF_FIRST)),
        ("versions published (refused)", f"{g['versions']} ({result['versions_refused']})",
         f">= {GOAL_VERSIONS}", _met(g["versions"] >= GOAL_VERSIONS)),
        ("others' tokens/s, trainer on / off", _ratio(others),
         f">= {GOAL_OTHERS}", _met((others or 0) >= GOAL_OTHERS)),
        ("others' tokens/s while training / off", _ratio(g["others_while_training_vs_without"]), "", ""),
    ]  # fmt: skip
    table = harness.Table(["measure", "value", "goal", ""], rows, "lrrl")
    speeds = (
        f"Others' output tokens/s over all rounds: {speed['without_trainer']:.0f} without a trainer, "
        f"{speed['with_trainer']:.0f} with it; over the rounds run while it trained: "
        f"{speed['same_rounds_without_trainer'] or 0:.0f} without, {speed['while_training'] or 0:.0f} with."
    )
    xs = [(i + 1) * result["window"] for i in range(len(result["tau_windows"]))]
    series = [
        harness.Series("learning (new user)", xs, result["tau_windows"]),
        harness.Series("offline-trained adapter", xs, result["tau_windows_offline_adapter"], style="s--"),
        harness.Series(
            "the same versions, no trainer", xs, result["tau_windows_without_trainer"], style="^:"
        ),
    ]
    title = "τ of a new user's requests, per window"
    panel = harness.Panel(title, "requests so far", "τ (tokens per verify step)", series)
    return harness.Report([intro, table, speeds], harness.Plot([panel], panel_size=(6.0, 3.8)))


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


if __name__ == "__main__":
    main()
