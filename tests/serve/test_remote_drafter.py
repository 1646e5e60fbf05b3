"""The drafter behind a call boundary (the DrafterPool deployment's wire protocol, without Ray):
outputs stay the target's, prompts cross once per request, releases ride along, KV is freed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from core.sampling import SamplingParams
from models.tiny.samples import EVAL_SEED_START, make_sample
from serve.engine_builder import EngineOptions, build_drafter, build_engine
from serve.remote_drafter import DraftCall, DrafterPoolServer, RemoteDrafter
from tests.serve.engine_helpers import Oracle, run_checked

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


class DirectHandle:
    """A stand-in for a Ray deployment handle: ``handle.method.remote(...).result()`` calls the
    server directly, and counts the draft requests and the prompts that crossed."""

    def __init__(self, server: DrafterPoolServer) -> None:
        self.server, self.prompts_sent, self.drafts_sent = server, 0, 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.server, name)

        def remote(*args: Any) -> Any:
            if name == "propose":
                self.drafts_sent += len(args[2])
                self.prompts_sent += sum(c.prompt is not None for c in args[2])
            return SimpleNamespace(result=lambda: method(*args))

        return SimpleNamespace(remote=remote)


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle(CHECKPOINTS / "tiny-target")


def test_remote_drafter_keeps_outputs_and_sends_each_prompt_once(oracle: Oracle) -> None:
    adapters = tuple((u, CHECKPOINTS / "adapters" / u) for u in ("bob", "dave"))
    opts = EngineOptions(policy="fixed", fixed_nodes=6, adapters=adapters)
    tokenizer = oracle.processor.tokenizer
    server = DrafterPoolServer(build_drafter(CHECKPOINTS / "tiny-drafter", tokenizer, opts))
    handle = DirectHandle(server)
    built = build_engine(CHECKPOINTS / "tiny-target", None, opts, remote_drafter=RemoteDrafter(handle))
    samples = [make_sample(EVAL_SEED_START + 960 + i, ("bob", None, "dave")[i % 3]) for i in range(6)]
    prompts = [oracle.prompt(s.question.text, s.image(), s.system) for s in samples]
    users = ["bob", None, "dave", "bob", None, "dave"]
    outs = run_checked(built.engine, prompts, [SamplingParams(max_tokens=32)] * 6, adapters=users)
    for out, s in zip(outs, samples, strict=True):
        assert out.token_ids == tuple(oracle.greedy(s.question.text, s.image(), s.system, 32))
    assert sum(o.stats.accepted_tokens for o in outs) > 0
    assert handle.prompts_sent == 6 and handle.drafts_sent > 6  # once per request, not per step
    built.engine.drafter.check_integrity()  # type: ignore[union-attr]  (flushes the last releases)
    assert server.pool.num_free_blocks == server.pool.pool.num_blocks and not server._local


def test_a_request_unknown_to_the_pool_without_its_prompt_is_refused() -> None:
    server = DrafterPoolServer(pool=SimpleNamespace())
    call = DraftCall(3, None, (1,), None, SamplingParams(), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without its prompt first"):
        server.propose("engine-a", [], [call])
