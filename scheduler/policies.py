"""Draft budget per step, from a registry of policies (``none``, ``fixed``, ``load_aware``).

A policy sees the step's load (how many requests sample a token, how many prompt tokens ride
along, how full the drafter's KV pool is, how many tokens the drafter would first have to encode)
and returns the tree budget every sampling request gets and the visual-token ratio r for requests
whose drafter KV is built this step; it also hears back how many tree nodes were accepted and
what the step cost (the drafter's prefill in it apart), so adaptive policies can learn both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from core.draft import NO_DRAFT, DraftBudget
from scheduler.cost import CostModel, OnlineLinearFit
from scheduler.throughput import BudgetKey, MeasuredStepTimes, MeasuredTokens, load_bucket


@dataclass(frozen=True)
class StepLoad:
    num_sampling: int  # requests that emit a token this step
    prefill_tokens: int  # prompt (or recompute) tokens of the step
    drafter_kv_used: float = 0.0  # fraction of the drafter's KV pool in use (0 without a drafter)
    # per sampling request the drafter holds no KV for yet: (tokens it would first have to
    # encode, tokens the request may still emit)
    undrafted: tuple[tuple[int, int], ...] = ()
    num_joining: int = 0  # requests still in prefill (running or admissible): they sample soon


@dataclass(frozen=True)
class StepRecord:
    """What one step was given and what it cost, for policies that learn the costs."""

    load: StepLoad
    budget: DraftBudget
    verify_tokens: int  # tokens the target forwarded: prompt chunks, last tokens, tree nodes
    tree_nodes: int  # of which draft-tree nodes
    draft_ms: float  # the drafter's proposals for the whole step (0 without trees)
    verify_ms: float  # the target's forward and acceptance
    drafter_prefill: int = 0  # tokens the drafter built KV for (requests' first trees), in draft_ms


class DraftPolicy(Protocol):
    def budget(self, load: StepLoad) -> DraftBudget:
        """The tree budget of each sampling request this step (``NO_DRAFT`` = plain decoding)."""
        ...

    def compression(self, load: StepLoad) -> float:
        """r in (0, 1] for requests whose drafter KV is built this step (their first tree, or
        the first after the drafter let their KV go); a request keeps the r its KV was built with."""
        ...

    def observe(self, budget: DraftBudget, accepted_depth: int) -> None:
        """One request's result: the tree had ``budget``; ``accepted_depth`` nodes were accepted."""
        ...

    def observe_step(self, record: StepRecord) -> None:
        """How the step scheduled with ``record.budget`` went."""
        ...


class NoDraft:
    def budget(self, load: StepLoad) -> DraftBudget:
        return NO_DRAFT

    def compression(self, load: StepLoad) -> float:
        return 1.0

    def observe(self, budget: DraftBudget, accepted_depth: int) -> None:
        pass

    def observe_step(self, record: StepRecord) -> None:
        pass


@dataclass
class FixedDraft:
    nodes: int = 8
    depth: int = 0  # 0 = as deep as the nodes allow (a chain when there is no branching)
    ratio: float = 1.0  # r for every request

    def budget(self, load: StepLoad) -> DraftBudget:
        return DraftBudget(max_nodes=self.nodes, max_depth=self.depth or self.nodes)

    def compression(self, load: StepLoad) -> float:
        return self.ratio

    def observe(self, budget: DraftBudget, accepted_depth: int) -> None:
        pass

    def observe_step(self, record: StepRecord) -> None:
        pass


class AcceptanceModel:
    """P(the node at depth d is accepted | depth d - 1 was), counted from verify results. Each
    depth's estimate is shrunk toward the rate pooled over every depth seen so far, worth
    ``weight`` observations (``prior`` before anything is seen): a depth no tree has reached yet
    is taken to accept like the others did, not at a fixed guess (with the drafter agreeing 85-90 %
    of the time, a guess of 0.7 kept a single user's trees shallow for a hundred steps)."""

    def __init__(self, max_depth: int, prior: float = 0.7, weight: float = 4.0) -> None:
        self.prior, self.weight = prior, weight
        self.hits = [0] * (max_depth + 1)
        self.tries = [0] * (max_depth + 1)

    def observe(self, depth: int, accepted: int) -> None:
        for d in range(1, min(accepted + 1, depth) + 1):
            self.tries[d] += 1
            self.hits[d] += d <= accepted

    def rate(self, depth: int, pooled: float | None = None) -> float:
        """P(accepted at ``depth`` | its parent was); ``pooled``: :meth:`pooled`, if at hand."""
        pooled = self.pooled() if pooled is None else pooled
        return (self.hits[depth] + pooled * self.weight) / (self.tries[depth] + self.weight)

    def pooled(self) -> float:
        """The acceptance rate over every depth seen (the prior before any)."""
        tries = sum(self.tries)
        return sum(self.hits) / tries if tries else self.prior

    def expected_tokens(self, depth: int) -> float:
        """Expected tokens per verify step with a tree this deep (chain estimate, bonus included)."""
        total, reach, pooled = 1.0, 1.0, self.pooled()
        for d in range(1, depth + 1):
            reach *= self.rate(d, pooled)
            total += reach
        return total


def relative(ms: float) -> float:
    """Least-squares weight that makes errors count relative to the step (floored at 1 ms)."""
    return 1.0 / max(ms, 1.0) ** 2


@dataclass
class LoadAwareDraft:
    """Pick the candidate budget with the most expected tokens per millisecond for this step:
    ``B * tau / (verify_ms + draft_ms)``, tau what each request emitted per step under that
    budget at this load (else at any load; before it has run, a chain estimate from the
    acceptance per depth of all trees) and the costs learned from the steps themselves:

    - ``verify_ms ~ a * verifier(tokens) + b * B + c * nodes``: the calibrated forward-cost
      curve of the target (one sequence) scaled, plus what each request adds (packing, masks,
      acceptance) and what each tree node adds beyond a prompt token (ancestor masks, padded
      queries: B short sequences cost more than one long one);
    - ``draft_ms ~ depth * (d + e * B) + p * prefill``: one drafter forward per level, plus each
      request's share of it (its inputs, its tree's bookkeeping), which the drafter's calibrated
      curve (one sequence of B * rows tokens) does not see, plus the tokens the drafter encodes
      for requests whose first tree this is (their vision tower and prompt). The levels are
      fitted on steps without such prefill and p on what they leave of the others: one fit of
      both would split a lone first step's time between them anyhow (a single user's first
      step taught it 4.5 ms per level, and it never drafted again).

    That last term is paid once per request, not per step, so step rates do not show it: a budget
    with trees commits every request admitted under it to its drafter prefill. Each such budget is
    therefore charged the drafter's prefill of the prompt tokens behind the tokens the step emits:
    ``p * R`` per token of a request the drafter already holds, R being the prompt tokens per
    emitted token over recent steps (an answer of 48 tokens after a 120-token prompt: 2.5); and
    for a request it does not hold yet (after plain decoding), its own prompt spread over the
    tokens it may still emit, at least R per token: switching to trees half-way through answers
    buys trees for half as many tokens per prefill. With long prompts and short answers under
    load this is what tips plain decoding ahead.

    A step with prompt tokens decides as the decode steps after it will: for its sampling
    requests and the ones still in prefill together, its prompt tokens left out (they cost the
    same whatever the trees; counted in the rate, they would make any tree look cheap). Judged on
    its sampling requests alone (fewer than the decode steps', the newcomers being in prefill),
    it picked what a lighter load taught: at 16 users, half the prompt steps drafted trees the
    decode steps had given up, paying the drafter's prefill of a dozen requests for one step
    (77-90 ms against 30-39 plain). Keeping the last decode step's budget instead failed on
    bursts: 32 newcomers at once were prefilled with the trees a lone last request had chosen.

    The fits start from the calibrated curves and follow every measured decode step (a prompt
    step's tokens would pass their curve's errors on to the tree nodes beside them: one first
    step of a single user made each node look 1.8 ms dear), weighing relative errors (a 10 ms
    step counts as much as a 50 ms one), so trees shrink as the
    batch grows as fast as this machine makes them pay. Where a budget rarely runs (a tree for
    many requests) the fits are pulled by the loads where it runs often, so each decode step also
    records its measured and predicted milliseconds per (load bucket, budget); their ratio
    corrects that budget's later predictions at that load (a tree not yet measured there borrows
    the nearest measured tree's ratio; with none, it is taken at its prediction, so it gets tried
    when the prediction says it is best). Times, not rates: a step's tokens swing with what its
    few requests happened to accept, and a correction learned from rates chased that noise (a
    single user moved between budgets of nearly equal worth). Every ``explore_every``-th
    decode step tries a neighbour of the best budget (one smaller, one larger, alternately) when
    it is predicted to be nearly as good, so the acceptance at depths next to the chosen one
    stays measured where the choice is close; trying a tree counts the drafter's prefill of the
    requests it holds no KV for, which that one step pays in full. A neighbour long measured at
    a load is tried on ever fewer of its turns there (down to one in ``explore_backoff``): at 4
    users, where (2, 2) is best and its neighbours each lose a few percent, trying one on every
    turn ran 0.949-0.963x ``fixed`` (2, 2) against 0.985-0.992x with no tries (30 interleaved
    passes each, paired), and at 16 users, where plain decoding is best, each try of a tree
    makes the drafter encode every running request's prompt.

    r follows the drafter's KV use: a request the drafter has no room for drafts nothing, so as
    its pool fills, new requests keep fewer visual tokens (fewer KV entries each, a lower tau:
    see the spec-decode ablation). The drafter's forward cost barely depends on its context on a
    CPU, so with room to spare every visual token is kept."""

    cost: CostModel  # calibrated forward curves: the fits' starting point
    # (nodes, depth); wider than deep: with nodes to spare for the runner-up where the drafter
    # hesitates, (8, 5) and (12, 6) ran 2.11x and 2.16x plain decoding for a single user with his
    # adapter against 1.97x for the chain (8, 8) and 1.77x for (6, 6) (shipped models, side by side).
    # The small ones are as deep as their nodes: (4, 4) emitted 3.2 tokens a step where (4, 3)
    # emitted 2.7 (one user, answers run past their end), and next to (2, 2) the flatter (4, 3)
    # looked hardly better, so a single user's trees climbed out of (2, 2) only slowly
    candidates: tuple[BudgetKey, ...] = ((0, 0), (2, 2), (4, 4), (6, 4), (8, 5), (12, 6), (16, 8))
    # (drafter KV use below which, r): the first row that applies wins; above all rows, the last r
    ratio_by_kv_use: tuple[tuple[float, float], ...] = ((0.5, 1.0), (0.8, 0.5), (1.0, 0.25))
    explore_every: int = 8  # decode steps between tries of a neighbouring budget (0: never)
    explore_margin: float = 0.3  # ... if it is predicted within this fraction of the best
    # a neighbour measured at a load for n decode steps past what its own correction (and a
    # tree's own tau, twice over) needs is tried on every k-th of its turns there only,
    # k = 2 ** (n // min_measured_steps), at most this (1: on every turn)
    explore_backoff: int = 8
    min_measured_steps: int = 4  # decode steps of a budget at a load before its correction counts
    min_measured_requests: int = 8  # request steps of a budget (at a load) before its own tau counts
    ratio_decay: float = 0.98  # per step, for the prompt tokens per emitted token
    measured: MeasuredStepTimes = field(default_factory=MeasuredStepTimes)
    delivered: MeasuredTokens = field(default_factory=MeasuredTokens)

    def __post_init__(self) -> None:
        self.acceptance = AcceptanceModel(max(d for _, d in self.candidates))
        self.verify_fit = OnlineLinearFit(prior=(1.0, 0.0, 0.0))
        self.draft_fit = OnlineLinearFit(prior=(self.cost.drafter(1), 0.0))  # from steps without prefill
        # ms per token the drafter encodes, from what the levels leave of steps with prefill; prior:
        # a 128-token drafter forward's cost per token (the vision tower comes on top)
        self.prefill_fit = OnlineLinearFit(prior=(self.cost.drafter(128) / 128,))
        self._decode_steps = 0
        self._turns: Counter[tuple[int, BudgetKey]] = Counter()  # (load bucket, neighbour) -> turns
        self._step_tokens = 0  # tokens this step's requests emitted (from observe)
        self._prompt_tokens = self._emitted_tokens = 0.0  # decayed sums over steps: R's terms

    def budget(self, load: StepLoad) -> DraftBudget:
        if load.prefill_tokens:  # decided as the decode steps to come (class docstring)
            load = replace(load, num_sampling=load.num_sampling + load.num_joining, num_joining=0)
        rates = {c: self._rate(load, *c) for c in self.candidates}
        best = max(self.candidates, key=rates.__getitem__)
        if not load.prefill_tokens:
            best = self._explore(load, rates, best)
        return DraftBudget(max_nodes=best[0], max_depth=best[1]) if best[0] else NO_DRAFT

    def compression(self, load: StepLoad) -> float:
        for below, ratio in self.ratio_by_kv_use:
            if load.drafter_kv_used < below:
                return ratio
        return self.ratio_by_kv_use[-1][1]

    def observe(self, budget: DraftBudget, accepted_depth: int) -> None:
        self._step_tokens += accepted_depth + 1  # the accepted nodes and the target's own token
        if budget.max_depth:
            self.acceptance.observe(budget.max_depth, accepted_depth)

    def observe_step(self, record: StepRecord) -> None:
        b, depth = record.load.num_sampling, record.budget.max_depth
        tokens, self._step_tokens = self._step_tokens, 0
        if b and depth:
            self.delivered.add(load_bucket(b), (record.budget.max_nodes, depth), tokens, b)
        self._prompt_tokens = self.ratio_decay * self._prompt_tokens + record.load.prefill_tokens
        self._emitted_tokens = self.ratio_decay * self._emitted_tokens + tokens
        # the drafter's prefill is charged per request (see _rate), not to the step it fell in
        step_ms = max(record.draft_ms - self.prefill_ms(record.drafter_prefill), 0.0) + record.verify_ms
        if b and not record.load.prefill_tokens and step_ms > 0:
            key = (record.budget.max_nodes, depth)
            self.measured.add(load_bucket(b), key, step_ms, self.step_ms(b, *key))
        if record.verify_tokens and not record.load.prefill_tokens:  # decode steps are what it predicts
            features = (self.cost.verifier(record.verify_tokens), b, record.tree_nodes)
            self.verify_fit.add(features, record.verify_ms, weight=relative(record.verify_ms))
        if depth and record.tree_nodes and record.drafter_prefill:  # the levels' fit stays clean:
            rest = max(record.draft_ms - self.draft_fit.predict((depth, depth * b)), 0.0)  # one step
            self.prefill_fit.add((record.drafter_prefill,), rest, weight=relative(rest))  # cannot split
        elif depth and record.tree_nodes:  # the drafter ran (not only for requests still in prefill)
            self.draft_fit.add((depth, depth * b), record.draft_ms, weight=relative(record.draft_ms))

    def step_ms(self, b: int, nodes: int, depth: int) -> float:
        """Predicted milliseconds of a decode step of ``b`` requests with trees of this budget
        (no drafter prefill in it)."""
        verify = self.verify_fit.predict((self.cost.verifier(b * (1 + nodes)), b, b * nodes))
        return verify + (self.draft_fit.predict((depth, depth * b)) if nodes else 0.0)

    def prefill_ms(self, tokens: float) -> float:
        """What the drafter's prefill of ``tokens`` prompt tokens costs, from its fit."""
        return self.prefill_fit.predict((tokens,))

    @property
    def prompt_per_token(self) -> float:
        """R: prompt tokens per emitted token over recent steps (0 before any token)."""
        return self._prompt_tokens / self._emitted_tokens if self._emitted_tokens else 0.0

    def tau(self, b: int, nodes: int, depth: int) -> float:
        """Expected tokens per request step with this budget at this load: as measured under it
        there, else under it at any load, else the chain estimate of its depth."""
        if not nodes:
            return 1.0
        for bucket in (load_bucket(b), None):
            measured = self.delivered.mean(bucket, (nodes, depth), self.min_measured_requests)
            if measured is not None:
                return measured
        return self.acceptance.expected_tokens(depth)

    def _rate(self, load: StepLoad, nodes: int, depth: int, lump: bool = False) -> float:
        """Tokens per millisecond at this load: the decode step's predicted time, corrected by
        how this budget's steps ran against their predictions at this load (see
        ``_correction``), plus, with trees, the drafter prefill behind the step's tokens
        (``lump``: the undrafted requests' in full, as a step that tries a tree pays it)."""
        b = max(load.num_sampling, 1)
        correction = self._correction(b, (nodes, depth))
        tau = self.tau(b, nodes, depth)
        ms = self.step_ms(b, nodes, depth) * (1.0 if correction is None else correction)
        if nodes:
            ms += self.prefill_ms(self._prefill_behind(load, tau, lump))
        return b * tau / max(ms, 1e-6)

    def _prefill_behind(self, load: StepLoad, tau: float, lump: bool) -> float:
        """Drafter prefill tokens charged to a tree step whose requests emit ``tau`` tokens each:
        R per emitted token for a request the drafter holds KV for (its share of the newcomers
        the trees commit to), and for one it does not, its own prompt spread over what it may
        still emit (at least R per token, never more than the whole prompt; ``lump``: the whole
        prompt). A request half-way through its answer under plain decoding thus pays twice what
        a newcomer pays per token: its prefill buys trees for half as many tokens."""
        r = self.prompt_per_token
        drafted = max(load.num_sampling - len(load.undrafted), 0)
        charged = r * tau * drafted
        for tokens, remaining in load.undrafted:
            charged += tokens if lump else min(tokens, tau * max(r, tokens / max(remaining, 1)))
        return charged

    def _correction(self, b: int, key: BudgetKey) -> float | None:
        """Measured / predicted step time of ``key`` at this load; for a budget not measured
        there yet, that of the nearest measured one (the predictions err alike for neighbouring
        trees: taken as they were, every untried budget looked ~30 % better than it ran and was
        tried in turn at each new load)."""
        bucket, i = load_bucket(b), self.candidates.index(key)
        by_distance = sorted(range(len(self.candidates)), key=lambda j: (abs(j - i), j))
        for j in by_distance:
            if bool(self.candidates[j][0]) == bool(key[0]):  # plain's error says nothing of trees'
                found = self.measured.correction(bucket, self.candidates[j], self.min_measured_steps)
                if found is not None:
                    return found
        return None

    def _explore(self, load: StepLoad, rates: dict[BudgetKey, float], best: BudgetKey) -> BudgetKey:
        """``best``, or on every ``explore_every``-th decode step a neighbour of it whose rate is
        within ``explore_margin`` of it (a clearly worse one teaches nothing worth its cost). A
        neighbour with trees also pays, this step, the drafter's prefill of every request it
        holds no KV for: after plain decoding under load, that is all of them."""
        self._decode_steps += 1
        if not self.explore_every or self._decode_steps % self.explore_every:
            return best
        i = self.candidates.index(best)
        neighbours = [self.candidates[j] for j in (i - 1, i + 1) if 0 <= j < len(self.candidates)]
        if not neighbours:
            return best
        pick = neighbours[(self._decode_steps // self.explore_every) % len(neighbours)]
        if self._skip_turn(max(load.num_sampling, 1), pick):
            return best
        rate = self._rate(load, *pick, lump=True) if pick[0] and load.undrafted else rates[pick]
        return pick if rate >= (1 - self.explore_margin) * rates[best] else best

    def _skip_turn(self, b: int, pick: BudgetKey) -> bool:
        """Whether this turn of ``pick`` (at ``b`` sampling requests) passes untried: the longer
        it has been measured at this load, the rarer its tries (every try is a step away from
        the best). Until its own correction counts and a tree's own tau has twice the requests it
        needs, it is tried on every turn, so a single user's trees climb as before."""
        bucket = load_bucket(b)
        turn = self._turns[(bucket, pick)]
        self._turns[(bucket, pick)] += 1
        per_step = max(self.min_measured_steps, 1)
        needed = per_step if not pick[0] else max(per_step, -(-2 * self.min_measured_requests // b))
        doublings = max(self.measured.steps(bucket, pick) - needed, 0) // per_step
        return turn % min(2 ** min(doublings, 30), max(self.explore_backoff, 1)) != 0


POLICIES: dict[str, Callable[..., Any]] = {"none": NoDraft, "fixed": FixedDraft, "load_aware": LoadAwareDraft}


def make_policy(name: str, **options: Any) -> DraftPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown draft policy {name!r}; choose one of {sorted(POLICIES)}")
    policy: DraftPolicy = POLICIES[name](**options)
    return policy
