"""A random Qwen2-VL target with a smaller Qwen2-VL drafter, served as the real Ray Serve
application beside the tiny one, over HTTP with the official openai client: the answer equals
transformers' greedy generate, streamed and not, for images of different shapes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from models.random_checkpoints import build_random_vlm
from models.synthetic import RandomLlavaSpec
from serve.auth import add_key
from serve.settings import DeploymentSettings
from tests.serve.conftest import RayApp
from tests.serve.engine_helpers import Oracle, random_image
from tests.serve.http_helpers import data_url


@dataclass(frozen=True)
class FamilyApp:
    url: str
    key: str
    oracle: Oracle


@pytest.fixture(scope="module")
def qwen_app(ray_app: RayApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FamilyApp]:
    from ray import serve

    from serve.deployments import build_app

    root = tmp_path_factory.mktemp("qwen-app")
    target = build_random_vlm(root / "target", "qwen2-vl", RandomLlavaSpec(seed=1))
    small = RandomLlavaSpec(seed=2, hidden_size=32, num_heads=2, num_kv_heads=1, num_layers=1)
    drafter = build_random_vlm(root / "drafter", "qwen2-vl", small)
    keys_file = root / "keys.yaml"
    key = add_key(keys_file, "erin", "t-erin")
    tiny = DeploymentSettings(num_cpus=0.05)  # the session's CPUs already belong to the tiny apps
    settings = ray_app.settings.model_copy(
        update={
            "target": target, "drafter": drafter, "adapters_dir": None, "keys_file": keys_file,
            "model_name": "qwen2-vl-random", "policy": "fixed", "engine": tiny, "gateway": tiny,
        }
    )  # fmt: skip
    serve.run(build_app(settings.model_dump(mode="json")), name="covspec-qwen", route_prefix="/qwen")
    try:
        yield FamilyApp(f"{ray_app.url}/qwen", key, Oracle(target))
    finally:
        serve.delete("covspec-qwen")


def test_served_qwen2_vl_pair_answers_like_transformers_streaming_and_not(qwen_app: FamilyApp) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{qwen_app.url}/v1", api_key=qwen_app.key, max_retries=0, timeout=120)
    for seed in (3, 4):  # two image shapes: two grids, two position layouts
        image = random_image(seed)
        content = [
            {"type": "image_url", "image_url": {"url": data_url(image)}},
            {"type": "text", "text": "what is it"},
        ]
        messages = [{"role": "user", "content": content}]
        whole = client.chat.completions.create(
            model="qwen2-vl-random", messages=messages, temperature=0, max_tokens=16
        )  # type: ignore[call-overload]
        stream = client.chat.completions.create(
            model="qwen2-vl-random", messages=messages, temperature=0, max_tokens=16, stream=True
        )  # type: ignore[call-overload]
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        ids = qwen_app.oracle.greedy("what is it", image, None, 16)
        expected = qwen_app.oracle.processor.tokenizer.decode(ids, skip_special_tokens=True)
        assert whole.choices[0].message.content == streamed == expected
        assert whole.model_extra["covspec"]["draft_tokens"] > 0  # the Qwen2-VL drafter drafted
