"""Online drafter learning through the served Ray app: a user whose key has ``learn: true`` and
no adapter sends carol-style traffic; the AdapterTrainer deployment trains and publishes a first
version, the drafter swaps it in between steps, and the user's next answers name it, all exactly
the target's; ``covspec adapters forget`` removes it again."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from drafter_pool.samples import SampleStore
from models.tiny.adapter_data import user_samples
from serve.auth import add_key
from serve.settings import DeploymentSettings, OnlineLearningSettings
from tests.serve.conftest import RayApp
from tests.serve.engine_helpers import Oracle
from tests.serve.http_helpers import chat_messages, data_url, expected_text

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


@dataclass(frozen=True)
class LearningApp:
    url: str
    key: str
    store: SampleStore
    config: Path  # a Serve config YAML naming the same learning dir (for the CLI)


@pytest.fixture(scope="module")
def learning_app(ray_app: RayApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LearningApp]:
    from ray import serve

    from serve.deployments import build_app

    root = tmp_path_factory.mktemp("learning")
    keys_file = root / "keys.yaml"
    key = add_key(keys_file, "erin", "t-erin", learn=True)
    tiny = DeploymentSettings(num_cpus=0.03)  # the session's 2 CPUs: 1.9 belong to the tiny apps
    learning = OnlineLearningSettings(
        enabled=True,
        dir=root / "learned",
        min_samples=24,
        holdout=6,
        steps=60,
        batch=8,
        poll_s=0.5,
        trainer=tiny,
    )
    settings = ray_app.settings.model_copy(
        update={
            "keys_file": keys_file,
            "policy": "fixed",
            "engine": tiny,
            "gateway": tiny,
            "online_learning": learning,
        }
    )
    serve.run(build_app(settings.model_dump(mode="json")), name="covspec-learn", route_prefix="/learn")
    config = root / "config.yaml"
    app = {"applications": [{"name": "covspec", "args": {"online_learning": {"dir": str(learning.dir)}}}]}
    config.write_text(yaml.safe_dump(app))
    try:
        yield LearningApp(f"{ray_app.url}/learn", key, SampleStore(learning.dir), config)
    finally:
        serve.delete("covspec-learn")


def _ask(app: LearningApp, sample: object) -> dict[str, object]:
    body = {"messages": chat_messages(sample, data_url(sample.image())), "max_tokens": 32, "temperature": 0}  # type: ignore[attr-defined]
    r = httpx.post(
        f"{app.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {app.key}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _until(check: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_a_learning_user_gets_a_published_hot_swapped_adapter_and_can_be_forgotten(
    learning_app: LearningApp,
) -> None:
    oracle = Oracle(CHECKPOINTS / "tiny-target")
    traffic = user_samples("carol", 40, seed=3)
    for sample in traffic[:24]:  # no adapter yet: the base drafter drafts; every answer kept
        out = _ask(learning_app, sample)
        assert out["covspec"]["adapter"] is None and out["covspec"]["adapter_version"] is None  # type: ignore[index]
        assert out["choices"][0]["message"]["content"] == expected_text(oracle, sample, 32)  # type: ignore[index]
    assert learning_app.store.count("t-erin", "erin")[0] == 24
    _until(lambda: learning_app.store.latest("t-erin", "erin") is not None, timeout_s=240)
    seen: list[object] = []

    def swapped() -> bool:
        sample = traffic[24 + len(seen) % 16]
        out = _ask(learning_app, sample)
        assert out["choices"][0]["message"]["content"] == expected_text(oracle, sample, 32)  # type: ignore[index]
        seen.append(out["covspec"])
        return out["covspec"]["adapter"] == "erin"  # type: ignore[index]

    _until(swapped, timeout_s=60)
    assert seen[-1]["adapter_version"] == 1  # type: ignore[index]
    command = ["adapters", "forget", "--user", "erin", "--config", str(learning_app.config)]
    run = [sys.executable, "-m", "serve.cli", *command]
    forget = subprocess.run(run, capture_output=True, text=True, timeout=120, check=False)
    assert forget.returncode == 0, forget.stderr
    assert learning_app.store.users() == []
    _until(lambda: _ask(learning_app, traffic[0])["covspec"]["adapter"] is None, timeout_s=60)  # type: ignore[index]
