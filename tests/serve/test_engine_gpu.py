"""The engine on a GPU is as lossless as on the CPU: transformers' greedy answers on the same GPU.

Skipped without a CUDA GPU (``gpu`` marker); ``benchmarks/gpu.sh`` runs these on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.sampling import SamplingParams
from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.engine_builder import EngineOptions, build_engine
from tests.serve.engine_helpers import Oracle, run_checked

pytestmark = pytest.mark.gpu

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
PERSONAS = (None, "alice", "bob", "carol", "dave")


@pytest.fixture(scope="module")
def gpu_oracle() -> Oracle:
    return Oracle(CHECKPOINTS / "tiny-target", device="cuda")


@pytest.mark.parametrize(
    ("policy", "drafter_device"), [("load_aware", None), ("fixed", None), ("fixed", "cpu")]
)
def test_eight_users_speculating_on_the_gpu_get_the_targets_greedy_answers(
    gpu_oracle: Oracle, policy: str, drafter_device: str | None
) -> None:
    adapters = (("bob", CHECKPOINTS / "adapters" / "bob"),)
    options = EngineOptions(
        policy=policy, fixed_nodes=6, device="cuda", drafter_device=drafter_device, adapters=adapters
    )
    built = build_engine(CHECKPOINTS / "tiny-target", CHECKPOINTS / "tiny-drafter", options)
    samples = [make_sample(EVAL_SEED_START + 700 + i, PERSONAS[i % len(PERSONAS)]) for i in range(8)]
    prompts = [gpu_oracle.prompt(s.question.text, s.image(), s.system) for s in samples]
    params = [SamplingParams(max_tokens=40)] * len(prompts)
    users = ["bob" if i % 2 else None for i in range(len(prompts))]
    ratios = [(1.0, 0.5, 0.25)[i % 3] for i in range(len(prompts))]
    outs = run_checked(built.engine, prompts, params, ratios, users)
    for out, s in zip(outs, samples, strict=True):
        expected = gpu_oracle.greedy(s.question.text, s.image(), s.system, 40)
        assert out.token_ids == tuple(expected), f"persona {s.persona.name}, question {s.question.text!r}"
    assert sum(o.stats.accepted_tokens for o in outs) > 0


def test_plain_decoding_on_the_gpu_equals_transformers_on_the_gpu(gpu_oracle: Oracle) -> None:
    built = build_engine(CHECKPOINTS / "tiny-target", options=EngineOptions(policy="none", device="cuda"))
    s = make_sample(EVAL_SEED_START + 711, kind="describe")
    [out] = run_checked(
        built.engine,
        [gpu_oracle.prompt(s.question.text, s.image(), s.system)],
        [SamplingParams(max_tokens=48)],
    )
    assert out.token_ids == tuple(gpu_oracle.greedy(s.question.text, s.image(), s.system, 48))
