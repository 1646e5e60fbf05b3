"""τ per demo user: the user's own drafter adapter vs the base drafter vs another user's adapter.

Each user's fresh ShapesWorld prompts (their persona) are answered greedily through the engine
with fixed 8-node trees, once per drafting choice; the outputs must be identical (lossless) and
τ (tokens per verify step) shows how well the drafts fit the user.

    .venv/bin/python -m benchmarks.adapter_tau [--n 60]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info
from models.tiny.adapter_data import user_samples
from models.tiny.personas import DEMO_USERS
from serve.adapter_eval import TAU_TREE_NODES, adapter_engine, measure_tau
from serve.commands.generate import ADAPTERS, DEFAULT_DRAFTER, DEFAULT_TARGET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=60, help="prompts per user")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    missing = [u for u in DEMO_USERS if not (ADAPTERS / u).is_dir()]
    if missing:
        raise SystemExit(f"no shipped adapters for {missing}; run covspec train-adapter --user NAME")
    built = adapter_engine(DEFAULT_TARGET, DEFAULT_DRAFTER, [(u, ADAPTERS / u) for u in DEMO_USERS])
    rows: dict[str, Any] = {}
    for i, user in enumerate(DEMO_USERS):
        other = DEMO_USERS[(i + 1) % len(DEMO_USERS)]
        samples = user_samples(user, args.n, seed=0, evaluation=True)
        runs = {"base": measure_tau(built, samples, None), "own": measure_tau(built, samples, user)}
        runs["other"] = measure_tau(built, samples, other)
        lossless = runs["base"].outputs == runs["own"].outputs == runs["other"].outputs
        rows[user] = {
            "other_adapter": other,
            "tau": {name: round(run.tau, 3) for name, run in runs.items()},
            "own_gain_over_base": round(runs["own"].tau / runs["base"].tau - 1, 4),
            "identical_outputs": lossless,
            "output_tokens": sum(len(o) for o in runs["base"].outputs),
        }
        print(user, rows[user])
        if not lossless:
            raise SystemExit(f"{user}: outputs differ between drafting choices; speculation is not lossless")
    report = {
        "benchmark": "adapter_tau",
        "prompts_per_user": args.n,
        "tree_nodes": TAU_TREE_NODES,
        "machine": machine_info(),
        "users": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adapter_tau.json").write_text(json.dumps(report, indent=1))
    write_markdown_and_plot(report, args.out / "adapter_tau")


def write_markdown_and_plot(report: dict[str, Any], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = report["users"]
    lines = [
        f"τ (tokens per verify step) on {report['prompts_per_user']} fresh prompts per demo user, "
        f"fixed {report['tree_nodes']}-node trees; outputs identical in all three runs.",
        "",
        "| user | base drafter | own adapter | another user's adapter | own vs base |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for user, row in users.items():
        t = row["tau"]
        lines.append(
            f"| {user} | {t['base']:.2f} | {t['own']:.2f} | {t['other']:.2f} ({row['other_adapter']}) | "
            f"{row['own_gain_over_base']:+.1%} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names, width = list(users), 0.27
    for j, (key, label) in enumerate(
        [("base", "base drafter"), ("own", "own adapter"), ("other", "other's adapter")]
    ):
        xs = [i + (j - 1) * width for i in range(len(names))]
        ax.bar(xs, [users[u]["tau"][key] for u in names], width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("τ (tokens per verify step)")
    ax.set_title("Per-user drafter adapters, tiny models")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
