"""``covspec generate`` as a process: lossless JSON output on the shipped models, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.random_checkpoints import build_random_vlm
from models.synthetic import RandomLlavaSpec
from models.tiny.samples import make_sample
from tests.serve.engine_helpers import Oracle, random_image

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
SAMPLE = make_sample(1_000_000_321, kind="describe")


def _covspec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", "generate", *args],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    SAMPLE.image().save(path)
    return path


def test_generate_json_equals_transformers_greedy_with_and_without_speculation(scene: Path) -> None:
    base = ["--image", str(scene), "--prompt", SAMPLE.question.text, "--system", SAMPLE.system, "--json"]
    spec = json.loads(_covspec(*base).stdout)
    plain = json.loads(_covspec(*base, "--no-spec").stdout)
    adapted = json.loads(_covspec(*base, "--adapter", "bob").stdout)  # another user's: drafts differ only
    oracle = Oracle(CHECKPOINTS / "tiny-target")
    expected = oracle.greedy(SAMPLE.question.text, SAMPLE.image(), SAMPLE.system, 64)
    assert spec["token_ids"] == plain["token_ids"] == adapted["token_ids"] == expected
    prompt_ids = oracle.inputs(SAMPLE.question.text, SAMPLE.image(), SAMPLE.system)["input_ids"][0].tolist()
    assert spec["prompt_token_ids"] == prompt_ids
    assert spec["stats"]["draft_tokens"] > 0 and plain["stats"]["draft_tokens"] == 0
    assert spec["stats"]["tau"] == pytest.approx(len(expected) / spec["stats"]["verify_steps"], abs=1e-3)
    assert set(spec["stats"]) >= {
        "ttft_s",
        "time_s",
        "tokens_per_s",
        "decode_tokens_per_s",
        "accepted_tokens",
    }


@pytest.mark.parametrize("family", ["llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl"])
def test_generate_on_a_family_pair_equals_transformers_greedy_with_and_without_speculation(
    family: str, tmp_path: Path
) -> None:
    target = build_random_vlm(tmp_path / "target", family, RandomLlavaSpec(seed=1))
    small = RandomLlavaSpec(seed=2, hidden_size=32, num_heads=2, num_kv_heads=1, num_layers=1)
    drafter = build_random_vlm(tmp_path / "drafter", family, small)
    image = random_image(7)
    image.save(tmp_path / "image.png")
    base = ["--model", str(target), "--image", str(tmp_path / "image.png"), "--prompt", "what is it"]
    base += ["--max-tokens", "12", "--json"]
    spec = json.loads(_covspec(*base, "--drafter", str(drafter), "--policy", "fixed").stdout)
    plain = json.loads(_covspec(*base, "--no-spec").stdout)
    expected = Oracle(target).greedy("what is it", image, None, 12)
    assert spec["token_ids"] == plain["token_ids"] == expected
    assert spec["stats"]["draft_tokens"] > 0 and plain["stats"]["draft_tokens"] == 0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--max-tokens", "5000"], "context window"),
        (["--compression", "0"], "compression must be in (0, 1]"),
        (["--adapter", "nobody"], "no adapter 'nobody': not a folder, and the shipped adapters are"),
    ],
)
def test_generate_bad_settings_fail_with_one_line(scene: Path, extra: list[str], message: str) -> None:
    result = _covspec("--image", str(scene), "--prompt", "hi", *extra)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_generate_missing_or_unreadable_image_fails_with_one_line(tmp_path: Path) -> None:
    missing = _covspec("--image", str(tmp_path / "nope.png"), "--prompt", "hi")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    not_image = _covspec("--image", str(text), "--prompt", "hi")
    assert missing.returncode == not_image.returncode == 2
    assert "does not exist" in missing.stderr
    assert "not an image" in not_image.stderr


def test_generate_refuses_a_drafter_with_another_tokenizer(scene: Path, folders: dict[str, Path]) -> None:
    result = _covspec("--image", str(scene), "--prompt", "hi", "--drafter", str(folders["target"]))
    assert result.returncode == 2
    assert "different tokenizer" in result.stderr


def test_generate_adapter_without_a_drafter_fails_with_one_line(scene: Path) -> None:
    result = _covspec("--image", str(scene), "--prompt", "hi", "--adapter", str(scene.parent), "--no-spec")
    assert result.returncode == 2
    assert "--adapter needs a drafter" in result.stderr and len(result.stderr.strip().splitlines()) == 1
