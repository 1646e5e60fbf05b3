"""Markdown table and bar chart for ``benchmarks.spec_decode`` results."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown(report: dict[str, Any]) -> str:
    rows = report["contenders"]
    base = rows.get("ours_no_spec", {}).get("tokens_per_s")
    lines = [
        f"Single user, greedy, {report['prompts']} ShapesWorld prompts, mode `{report['mode']}` "
        f"(max {report['max_tokens']} new tokens, {report.get('mean_output_tokens', 0):.1f} on average), "
        f"median of {report['repeats']} interleaved repeats.",
        "",
        "| contender | tokens/s | vs ours no-spec | tau | same tokens |",
        "| --- | ---: | ---: | ---: | :---: |",
    ]
    for name, row in rows.items():
        ratio = f"{row['tokens_per_s'] / base:.2f}x" if base else "-"
        tau = f"{row['tau']:.2f}" if row.get("tau") else "-"
        same = "yes" if row["same_tokens_as_reference"] else "NO"
        lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {ratio} | {tau} | {same} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem.with_suffix(".md").write_text(markdown(report))
    rows = report["contenders"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(9, 4))
    bars = ax.barh(names, [rows[n]["tokens_per_s"] for n in names], color="#4477aa")
    for bar, name in zip(bars, names, strict=True):
        tau = rows[name].get("tau")
        if tau:
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" tau {tau:.2f}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (single user, greedy)")
    ax.set_title(f"Speculative decoding on the tiny models ({report['mode']} mode)")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)
