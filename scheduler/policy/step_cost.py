"""What a decode step costs, learned from the steps themselves.

The prediction for ``b`` sampling requests with trees of (nodes, depth):

- verify: ``a * curve(tokens) + c * b + e * nodes``: the target's calibrated one-sequence
  forward curve scaled, plus what each request adds (packing, masks, acceptance) and what each
  tree node adds beyond a prompt token (ancestor masks, padded queries);
- draft: ``depth * (d + f * b)``: one drafter forward per level, plus each request's share of it
  (its inputs, its tree's bookkeeping), which the drafter's one-sequence curve does not see;
- the drafter's prefill, apart: ``p`` ms per token it encodes for a request it holds no KV for.
  Levels are fitted on steps without prefill and ``p`` on what the levels leave of the others
  (one fit of both would split a lone first step's time between them anyhow);
- the link to a drafter elsewhere: its measured time per call (round trip and transfer), added to
  the draft call whatever the tree;
- pipelined, the step waits only for what of the draft call outlasts the verifier's work for the
  other group (``StepLoad.overlap_tokens``): ``max(draft call - verify(overlap), 0)``.

The fits start from the calibrated curves, weigh relative errors (a 10 ms step counts as much
as a 50 ms one), and learn from decode steps only (a prompt chunk's cost passes its curve's
errors on to the tree nodes beside it). Where a budget rarely runs, the fits are pulled by the
loads where it runs often, so each decode step also records its time per (load bucket, budget).
A budget measured at a load is predicted at its measured mean time there (the fits only say how
it scales within the bucket), and a budget not measured there yet is corrected by the ratio of
the nearest measured one of its kind to the fits (trees err alike; plain decoding's error says
nothing of trees'). The ratio is taken against the fits as they are now, so it never goes
stale when they move.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.plan import StepReport, StepTiming
from scheduler.cost import CostModel, OnlineLinearFit
from scheduler.policy.base import BudgetKey, key_of

MIN_MEASURED_STEPS = 4  # decode steps of a budget at a load before its own time counts
CORRECTION_DECAY = 0.9  # per step of a budget at a load: corrections follow a drifting machine
PREFILL_PRIOR_TOKENS = 128  # the drafter's prefill prior: its forward cost per token at this size
VERIFY_PRIOR = (1.0, 0.0, 0.0)  # the target's curve as calibrated, nothing per request or node yet
LINK_DECAY = 0.9  # per draft call: the link estimate follows the network's recent calls


def load_bucket(num_sampling: int) -> int:
    """Requests that sample in a step -> bucket: 1, 2-3, 4-7, 8-15, ... share one."""
    return max(num_sampling, 1).bit_length()


def relative(ms: float) -> float:
    """Least-squares weight that makes errors count relative to the step (floored at 1 ms)."""
    return 1.0 / max(ms, 1.0) ** 2


@dataclass
class _Measured:
    """Decayed sums over the decode steps of one budget at one load bucket."""

    ms: float = 0.0
    requests: float = 0.0  # the steps' sampling requests (a bucket spans several counts)
    overlap: float = 0.0  # the steps' overlap tokens
    weight: float = 0.0
    steps: int = 0


@dataclass
class LinkEstimate:
    """Milliseconds a draft call spends on the link, both ways: a decayed mean of the calls'."""

    decay: float = LINK_DECAY
    _ms: float = 0.0
    _weight: float = 0.0

    def learn(self, link_ms: float) -> None:
        self._ms = self.decay * self._ms + link_ms
        self._weight = self.decay * self._weight + 1

    @property
    def ms(self) -> float:
        return self._ms / self._weight if self._weight else 0.0


class StepCostModel:
    def __init__(
        self,
        curves: CostModel,
        candidates: tuple[BudgetKey, ...],
        min_steps: int = MIN_MEASURED_STEPS,
        decay: float = CORRECTION_DECAY,
    ) -> None:
        if not 0 < decay <= 1:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        self.curves, self.candidates = curves, candidates
        self.min_steps, self.decay = min_steps, decay
        self.verify_fit = OnlineLinearFit(prior=VERIFY_PRIOR)
        self.draft_fit = OnlineLinearFit(prior=(curves.drafter(1), 0.0))  # a level: one 1-token forward
        per_token = curves.drafter(PREFILL_PRIOR_TOKENS) / PREFILL_PRIOR_TOKENS
        self.prefill_fit = OnlineLinearFit(prior=(per_token,))
        self.link = LinkEstimate()
        self._measured: dict[tuple[int, BudgetKey], _Measured] = {}

    def predicted_ms(self, b: float, key: BudgetKey, overlap_tokens: float = 0.0) -> float:
        """The fits' milliseconds of a decode step of ``b`` requests under ``key`` (no prefill),
        its draft call overlapping ``overlap_tokens`` of verification for other requests."""
        nodes, depth = key
        verify = self.verify_fit.predict((self.curves.verifier(b * (1 + nodes)), b, b * nodes))
        if not nodes:
            return verify
        call = self.link.ms + self.draft_fit.predict((depth, depth * b))
        hidden = 0.0  # the verifier's work for the other group while the call is out
        if overlap_tokens:
            hidden = self.verify_fit.predict((self.curves.verifier(overlap_tokens), 0, 0))
        return verify + max(call - hidden, 0.0)

    def step_ms(self, b: int, key: BudgetKey, overlap_tokens: int = 0) -> float:
        """:meth:`predicted_ms` corrected by how such steps ran at this load."""
        correction = self.correction(b, key)
        return self.predicted_ms(b, key, overlap_tokens) * (1.0 if correction is None else correction)

    def prefill_ms(self, tokens: float) -> float:
        """What the drafter's prefill of ``tokens`` prompt tokens costs."""
        return self.prefill_fit.predict((tokens,))

    def correction(self, b: int, key: BudgetKey) -> float | None:
        """Measured / predicted time of ``key``'s decode steps at this load, else of the nearest
        candidate of its kind measured there; None where none is."""
        bucket, i = load_bucket(b), self.candidates.index(key)
        for j in sorted(range(len(self.candidates)), key=lambda j: (abs(j - i), j)):
            other = self.candidates[j]
            m = self._measured.get((bucket, other))
            if bool(other[0]) == bool(key[0]) and m is not None and m.steps >= self.min_steps:
                predicted = self.predicted_ms(m.requests / m.weight, other, m.overlap / m.weight)
                return m.ms / m.weight / predicted if predicted > 0 else None
        return None

    def measured_steps(self, b: int, key: BudgetKey) -> int:
        """Decode steps of ``key`` measured at this load."""
        m = self._measured.get((load_bucket(b), key))
        return 0 if m is None else m.steps

    def learn(self, report: StepReport, timing: StepTiming) -> None:
        b, key = report.load.num_sampling, key_of(report.budget)
        if report.load.decoding:
            self._learn_decode(b, key, report, timing)
        if key[1] and report.tree_nodes:
            self.link.learn(timing.link_ms)
            self._learn_draft(b, key[1], report, timing)

    def _learn_decode(self, b: int, key: BudgetKey, report: StepReport, timing: StepTiming) -> None:
        # the drafter's prefill is paid once per request, not per step: charged apart
        measured = max(timing.draft_ms - self.prefill_ms(report.drafter_prefill), 0.0) + timing.verify_ms
        if measured > 0:
            m = self._measured.setdefault((load_bucket(b), key), _Measured())
            m.ms = self.decay * m.ms + measured
            m.requests = self.decay * m.requests + b
            m.overlap = self.decay * m.overlap + report.load.overlap_tokens
            m.weight = self.decay * m.weight + 1
            m.steps += 1
        features = (self.curves.verifier(report.verify_tokens), b, report.tree_nodes)
        self.verify_fit.add(features, timing.verify_ms, weight=relative(timing.verify_ms))

    def _learn_draft(self, b: int, depth: int, report: StepReport, timing: StepTiming) -> None:
        levels = (depth, depth * b)
        drafter_ms = max(timing.call_ms - timing.link_ms, 0.0)  # the call off the link
        if report.drafter_prefill:  # what the levels leave of the call is the prefill's
            rest = max(drafter_ms - self.draft_fit.predict(levels), 0.0)
            self.prefill_fit.add((report.drafter_prefill,), rest, weight=relative(rest))
        else:
            self.draft_fit.add(levels, drafter_ms, weight=relative(drafter_ms))
