"""``load_aware``: each step, the candidate tree budget with the most tokens per millisecond.

    rate(budget) = B * tau(budget) / (step_ms(B, budget) + prefill_ms(R * tau(budget) * B))

over the candidates, plain decoding (0, 0) included. B is the number of requests that will
decode: a step that still carries prompt tokens decides for its sampling requests and the ones
about to join them, prompt tokens left out (they cost the same whatever the trees, and would
make any tree look cheap). tau comes from :class:`TauEstimator`, step_ms from
:class:`StepCostModel`, and the last term is the drafter's prefill behind the step's tokens:
every request's prompt is encoded once by the drafter before its first tree, so a budget with
trees pays R prompt tokens of drafter prefill per token it emits (R: prompt tokens per emitted
token over recent steps). Decode steps now and then try a neighbour of the best
(:class:`Exploration`), so the estimates stay measured where the choice is close.

Nothing here depends on which loads came before: the same estimates give the same choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.draft import DraftBudget
from core.plan import StepLoad, StepReport, StepTiming
from scheduler.cost import CostModel
from scheduler.policy.base import BudgetKey, budget_of
from scheduler.policy.exploration import Exploration
from scheduler.policy.step_cost import StepCostModel
from scheduler.policy.tau import TauEstimator

# (nodes, depth). Wider than deep from 6 nodes on: with nodes to spare for the runner-up where
# the drafter hesitates, a tree accepts more than a chain of the same nodes; the small ones are
# as deep as their nodes, so a single user's trees can climb out of (2, 2) one step at a time.
CANDIDATES: tuple[BudgetKey, ...] = ((0, 0), (2, 2), (4, 4), (6, 4), (8, 5), (12, 6), (16, 8))
LOCKSTEP = StepLoad(0, 0)  # a step that is neither split nor beside other groups' steps
PROMPT_RATIO_DECAY = 0.98  # per step: R follows the prompts and answers users send now


@dataclass
class PromptRatio:
    """R: prompt tokens computed per token emitted, over recent steps."""

    decay: float = PROMPT_RATIO_DECAY
    _prompt: float = 0.0  # decayed sums
    _emitted: float = 0.0

    def learn(self, report: StepReport) -> None:
        self._prompt = self.decay * self._prompt + report.load.prefill_tokens
        self._emitted = self.decay * self._emitted + report.emitted_tokens

    @property
    def value(self) -> float:
        return self._prompt / self._emitted if self._emitted else 0.0


@dataclass
class LoadAwareDraft:
    cost: StepCostModel
    tau: TauEstimator
    exploration: Exploration = field(default_factory=Exploration)
    prompts: PromptRatio = field(default_factory=PromptRatio)
    decode_steps: int = 0  # decode steps learned from: the exploration's clock

    @property
    def candidates(self) -> tuple[BudgetKey, ...]:
        return self.cost.candidates

    def choose(self, load: StepLoad) -> DraftBudget:
        b = max(load.num_sampling + (load.num_joining if load.prefill_tokens else 0), 1)
        rates = {key: self.rate(b, key, load) for key in self.candidates}
        best = max(rates, key=rates.__getitem__)
        if load.decoding:
            best = self.exploration.pick(
                self.decode_steps + 1,
                best,
                rates,
                lambda key: self.cost.measured_steps(self.step_size(b, key, load), key),
            )
        return budget_of(best)

    @staticmethod
    def step_size(b: int, key: BudgetKey, load: StepLoad) -> int:
        """The requests a step under ``key`` verifies when ``b`` of them decode at ``load``: a
        group's with trees (pipelined), everyone's without."""
        if not key[0]:
            return b + load.num_peers
        return -(-b // load.split)

    def rate(self, b: int, key: BudgetKey, load: StepLoad = LOCKSTEP) -> float:
        """Expected tokens per millisecond of ``b`` decoding requests under ``key`` at ``load``.

        Pipelined, trees and plain decoding run differently. With trees, a step verifies one
        group while the next group's call is out (``load.overlap_tokens``; a plan made for
        ``load.split`` groups takes one step per group, each hiding behind the one before).
        Without trees there is no call to hide: every group's requests (``load.num_peers``
        more) are verified in one step."""
        size = self.step_size(b, key, load)
        if not key[0]:
            return size / max(self.cost.step_ms(size, key), 1e-6)
        tau = self.tau.tau(key)
        if load.split > 1:
            ms = load.split * self.cost.step_ms(size, key, size * (1 + key[0]))
        else:
            ms = self.cost.step_ms(b, key, load.overlap_tokens)
        ms += self.cost.prefill_ms(self.prompts.value * tau * b)
        return b * tau / max(ms, 1e-6)

    def learn(self, report: StepReport, timing: StepTiming) -> None:
        self.cost.learn(report, timing)
        self.tau.learn(report.accepted)
        self.prompts.learn(report)
        self.decode_steps += report.load.decoding


def load_aware(
    curves: CostModel,
    candidates: tuple[BudgetKey, ...] = CANDIDATES,
    exploration: Exploration | None = None,
) -> LoadAwareDraft:
    """A ``load_aware`` policy starting from the calibrated forward-cost ``curves``."""
    if candidates[0] != (0, 0) or len(set(candidates)) != len(candidates):
        raise ValueError(f"candidates must start with plain decoding (0, 0) and differ, got {candidates}")
    cost, tau = StepCostModel(curves, candidates), TauEstimator(max(d for _, d in candidates))
    return LoadAwareDraft(cost, tau, exploration or Exploration())
