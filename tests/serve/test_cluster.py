"""On a two-node Ray cluster (one node with an ``edge`` resource, one with ``cloud``) the
drafter pool runs on the edge node, both engine replicas on the cloud node, they share the one
pool, and the answers are the target's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.auth import add_key
from tests.serve.engine_helpers import Oracle
from tests.serve.http_helpers import expected_text

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_node_cluster_places_the_pool_on_the_edge_and_engines_share_it(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    key = add_key(keys_file, "bob", "t-bob", "bob")
    seeds = [EVAL_SEED_START + 400 + i for i in range(12)]
    run = subprocess.run(  # its own Ray: tests in this process share another one
        [sys.executable, "-m", "tests.serve.cluster_run", str(keys_file), key, *map(str, seeds)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["placement"]["DrafterPool"] == [["edge"]]
    assert seen["placement"]["Engine"] == [["cloud"], ["cloud"]]
    assert seen["engines_served"] == 2  # requests went to both engines; both drafted through the pool
    oracle = Oracle(ROOT / "checkpoints" / "tiny-target")
    expected = [expected_text(oracle, make_sample(s, "bob", kind="describe"), 32) for s in seeds]
    assert seen["answers"] == expected
