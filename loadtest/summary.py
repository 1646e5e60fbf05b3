"""A Markdown summary of a headless Locust run from its ``<prefix>_stats.csv``.

python -m loadtest.summary loadtest/results/run
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

UNITS = {"tokens_per_s": "tok/s", "tau": "tokens/step"}


def stats_rows(prefix: str) -> list[dict[str, str]]:
    """Every row of the run's stats table but the aggregate."""
    with Path(f"{prefix}_stats.csv").open() as f:
        return [row for row in csv.DictReader(f) if row["Name"] != "Aggregated"]


def summary(prefix: str) -> str:
    rows = stats_rows(prefix)
    lines = [
        "| type | name | requests | failures | mean | median | p95 | p99 | unit |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        unit = UNITS.get(row["Name"], "ms")
        lines.append(
            f"| {row['Type']} | {row['Name']} | {row['Request Count']} | {row['Failure Count']} | "
            f"{float(row['Average Response Time']):.2f} | "
            f"{row['Median Response Time']} | {row['95%']} | {row['99%']} | {unit} |"
        )
    return "\n".join(lines)


def failures(prefix: str) -> int:
    return sum(int(r["Failure Count"]) for r in stats_rows(prefix))


if __name__ == "__main__":
    print(summary(sys.argv[1]))
