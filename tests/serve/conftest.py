"""Random-weight target and drafters shared by the engine tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.synthetic import RandomLlavaSpec, build_random_llava
from tests.serve.engine_helpers import Oracle, noisy_copy


@pytest.fixture(scope="session")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``target`` and three drafters for it: ``unrelated`` (another random model, almost nothing
    accepted), ``noisy`` (the target with noise, partly accepted) and ``same`` (all accepted)."""
    root = tmp_path_factory.mktemp("engine")
    target = build_random_llava(root / "target", RandomLlavaSpec(seed=1))
    unrelated = RandomLlavaSpec(seed=2, hidden_size=32, num_layers=1)
    return {
        "target": target,
        "unrelated": build_random_llava(root / "unrelated", unrelated),
        "noisy": noisy_copy(target, root / "noisy", scale=0.05, seed=3),
        "same": target,
    }


@pytest.fixture(scope="session")
def oracle(folders: dict[str, Path]) -> Oracle:
    return Oracle(folders["target"])
