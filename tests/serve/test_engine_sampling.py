"""Speculative sampling through the whole engine reproduces the target's own distribution.

The first two tokens of many seeded requests are counted and compared, by chi-square, with the
exact joint distribution computed from transformers' logits of the same checkpoint (temperature
1, top-k 4: sixteen outcomes). The drafter is a noisy copy of the target, so its proposals are
accepted often but not always, and both tokens pass through tree acceptance.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from core.sampling import SamplingParams
from scheduler.foresight import ProactiveGate
from serve.engine_builder import BuiltEngine, EngineOptions, build_drafter, build_engine
from serve.link import Link
from serve.remote_drafter import DrafterPoolServer, RemoteDrafter
from tests.serve.engine_helpers import Oracle
from tests.serve.pool_helpers import PoolHandle

TOP_K = 4
REQUESTS = 1200
CHI2_15_DOF_P001 = 37.7


def top_k_probs(logits: torch.Tensor) -> torch.Tensor:
    """Independent of our sampling code: softmax over the k largest logits, zero elsewhere."""
    values, index = torch.topk(logits.double(), TOP_K)
    return torch.zeros_like(logits, dtype=torch.float64).scatter(0, index, torch.softmax(values, 0))


@torch.inference_mode()
def exact_joint(oracle: Oracle, text: str) -> dict[tuple[int, int], float]:
    ids = oracle.inputs(text, None, None)["input_ids"]
    first = top_k_probs(oracle.model(input_ids=ids).logits[0, -1])
    joint = {}
    for t1 in torch.nonzero(first).flatten().tolist():
        longer = torch.cat([ids, torch.tensor([[t1]])], dim=1)
        second = top_k_probs(oracle.model(input_ids=longer).logits[0, -1])
        for t2 in torch.nonzero(second).flatten().tolist():
            joint[(t1, t2)] = float(first[t1] * second[t2])
    return joint


def _pipelined(folders: dict[str, Path], oracle: Oracle, opts: EngineOptions) -> BuiltEngine:
    """The drafter behind a jittery link, two groups in flight."""
    tokenizer = oracle.processor.tokenizer
    handle = PoolHandle(lambda: DrafterPoolServer(build_drafter(folders["noisy"], tokenizer, opts)))
    remote = RemoteDrafter(handle, Link(rtt_ms=1.0, jitter_ms=1.0))
    return build_engine(folders["target"], None, opts, remote_drafter=remote)


@pytest.mark.parametrize("layout", ["in_engine", "pipelined_pool"])
def test_speculative_sampling_matches_the_target_joint_distribution(
    folders: dict[str, Path], oracle: Oracle, layout: str
) -> None:
    text = "tell me more about the colors"
    opts = EngineOptions(policy="fixed", fixed_nodes=4)
    if layout == "in_engine":
        built = build_engine(folders["target"], folders["noisy"], opts)
    else:
        built = _pipelined(folders, oracle, opts)
        assert built.engine.pipelined
    prompt = oracle.prompt(text, None, None)
    params = [
        SamplingParams(max_tokens=3, temperature=1.0, top_k=TOP_K, seed=seed, ignore_eos=True)
        for seed in range(REQUESTS)
    ]
    outs = built.engine.generate([prompt] * REQUESTS, params)
    counts = Counter(o.token_ids[:2] for o in outs)
    assert sum(o.stats.accepted_tokens for o in outs) > REQUESTS // 4  # the tree really was used
    joint = exact_joint(oracle, text)
    assert set(counts) <= set(joint)
    chi2 = sum((counts.get(k, 0) - REQUESTS * p) ** 2 / (REQUESTS * p) for k, p in joint.items())
    assert chi2 < CHI2_15_DOF_P001, f"chi2 {chi2:.1f} over {len(joint)} outcomes"


@torch.inference_mode()
def exact_marginal(oracle: Oracle, text: str, position: int) -> dict[int, float]:
    """The target's distribution of the output token at ``position`` (0-based), every path of
    top-k tokens before it summed over."""
    ids = oracle.inputs(text, None, None)["input_ids"]
    paths = [(ids, 1.0)]
    for _ in range(position):
        longer = []
        for seq, p in paths:
            probs = top_k_probs(oracle.model(input_ids=seq).logits[0, -1])
            for t in torch.nonzero(probs).flatten().tolist():
                longer.append((torch.cat([seq, torch.tensor([[t]])], dim=1), p * float(probs[t])))
        paths = longer
    marginal: Counter[int] = Counter()
    for seq, p in paths:
        probs = top_k_probs(oracle.model(input_ids=seq).logits[0, -1])
        for t in torch.nonzero(probs).flatten().tolist():
            marginal[t] += p * float(probs[t])
    return dict(marginal)


def chi2_critical_p001(dof: int) -> float:
    """The chi-square value exceeded with probability 0.001 (Wilson-Hilferty)."""
    z = 3.0902
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


def test_tokens_from_trees_drafted_ahead_keep_the_target_distribution(
    folders: dict[str, Path], oracle: Oracle
) -> None:
    """The fourth token, after a first step whose tree's likeliest path was accepted whole, is
    verified against a tree the drafter drafted while that step was verified (proactive)."""
    text, position = "tell me more about the colors", 3
    opts = EngineOptions(policy="fixed", fixed_nodes=2, pipeline=False, proactive=True)
    built = _pipelined(folders, oracle, opts)
    assert built.engine.proactive and not built.engine.pipelined  # the drafter idles otherwise
    built.engine.gate = ProactiveGate(probe_every=0)  # every chance taken
    prompt = oracle.prompt(text, None, None)
    params = [
        SamplingParams(max_tokens=6, temperature=1.0, top_k=TOP_K, seed=seed, ignore_eos=True)
        for seed in range(REQUESTS)
    ]
    outs = built.engine.generate([prompt] * REQUESTS, params)
    assert built.engine.proactive_stats.hits > REQUESTS // 10
    counts = Counter(o.token_ids[position] for o in outs)
    exact = exact_marginal(oracle, text, position)
    assert set(counts) <= set(exact)
    common = {t for t, p in exact.items() if REQUESTS * p >= 5}  # the rest pooled in one bin
    rest = 1 - sum(exact[t] for t in common)
    observed = [counts.get(t, 0) for t in common] + [REQUESTS - sum(counts.get(t, 0) for t in common)]
    expected = [REQUESTS * exact[t] for t in common] + [REQUESTS * rest]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True) if e > 0)
    assert chi2 < chi2_critical_p001(len(common)), f"chi2 {chi2:.1f} over {len(common) + 1} bins"
