"""τ per demo user: the user's own drafter adapter vs the base drafter vs another user's adapter.

Each user's fresh ShapesWorld prompts (their persona) are answered greedily through the engine
with fixed 8-node trees, once per drafting choice; the outputs must be identical (lossless) and
τ (tokens per verify step) shows how well the drafts fit the user.

    .venv/bin/python -m benchmarks.adapter_tau [--n 60]
"""

from __future__ import annotations

from typing import Any

from benchmarks import harness
from models.tiny.adapter_data import user_samples
from models.tiny.personas import DEMO_USERS
from serve.adapter_eval import TAU_TREE_NODES, adapter_engine, measure_tau


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--n", type=int, default=60, help="prompts per user")
    args = p.parse_args()
    missing = [u for u in DEMO_USERS if not (harness.ADAPTERS / u).is_dir()]
    if missing:
        raise SystemExit(f"no shipped adapters for {missing}; run covspec train-adapter --user NAME")
    built = adapter_engine(harness.TARGET, harness.DRAFTER, [(u, harness.ADAPTERS / u) for u in DEMO_USERS])
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
    result = {
        "benchmark": "adapter_tau",
        "prompts_per_user": args.n,
        "tree_nodes": TAU_TREE_NODES,
        "machine": harness.machine_info(),
        "users": rows,
    }
    harness.write_report(args.out / "adapter_tau", result, report(result))


def report(result: dict[str, Any]) -> harness.Report:
    users = result["users"]
    intro = (
        f"τ (tokens per verify step) on {result['prompts_per_user']} fresh prompts per demo user, "
        f"fixed {result['tree_nodes']}-node trees; outputs identical in all three runs."
    )
    columns = {
        "user": "{name}",
        "base drafter": "{tau[base]:.2f}",
        "own adapter": "{tau[own]:.2f}",
        "another user's adapter": "{tau[other]:.2f} ({other_adapter})",
        "own vs base": "{own_gain_over_base:+.1%}",
    }
    table = harness.Table.of(users.items(), columns)
    names = list(users)
    bars = [
        harness.Series(label, names, [users[u]["tau"][key] for u in names])
        for key, label in (("base", "base drafter"), ("own", "own adapter"), ("other", "other's adapter"))
    ]
    panel = harness.Panel(
        "Per-user drafter adapters, tiny models", "", "τ (tokens per verify step)", bars, kind="bar"
    )
    return harness.Report([intro, table], harness.Plot([panel], panel_size=(6, 3.5)))


if __name__ == "__main__":
    main()
