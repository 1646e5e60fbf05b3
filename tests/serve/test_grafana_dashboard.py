"""The shipped Grafana dashboard queries only metrics the service records."""

from __future__ import annotations

import json
import re
from pathlib import Path

from serve.metrics import EngineMetrics, GatewayMetrics
from tests.serve.conftest import Recorded

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "covspec-serve.json"


def test_every_panel_queries_a_recorded_metric(recorded: dict[str, Recorded]) -> None:
    EngineMetrics()
    GatewayMetrics()
    names = set(recorded)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 10 and exprs
    used = {m for e in exprs for m in re.findall(r"ray_(covspec_[a-z0-9_]+)", e)}
    base = {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in used}
    assert base <= names, f"panels query metrics nobody records: {sorted(base - names)}"
    assert {"covspec_ttft_seconds", "covspec_prefix_blocks", "covspec_requests"} <= base
