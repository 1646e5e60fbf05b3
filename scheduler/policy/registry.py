"""The one registry of step policies: a name -> a draft policy with its compression policy.

``none`` decodes plainly; ``fixed`` gives every request the same tree (and r); ``load_aware``
chooses trees by expected tokens per millisecond and r by the drafter's KV use. Its cost model
starts from forward-cost curves measured where the models run, which ``PolicyOptions.cost``
measures when (and only when) a policy needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from scheduler.cost import CostModel
from scheduler.policy.base import FixedRatio, Policy
from scheduler.policy.compression import KVPressureRatio
from scheduler.policy.fixed import FixedDraft, NoDraft
from scheduler.policy.load_aware import load_aware


@dataclass(frozen=True)
class PolicyOptions:
    fixed_nodes: int = 8  # the fixed policy's tree size
    fixed_depth: int = 0  # ... and depth (0: a chain of fixed_nodes)
    fixed_ratio: float = 1.0  # the fixed policy's r
    cost: Callable[[], CostModel] | None = None  # measures the forward-cost curves (load_aware)


def _load_aware(options: PolicyOptions) -> Policy:
    if options.cost is None:
        raise ValueError("the load_aware policy needs forward-cost curves (PolicyOptions.cost)")
    return Policy(load_aware(options.cost()), KVPressureRatio())


POLICIES: dict[str, Callable[[PolicyOptions], Policy]] = {
    "none": lambda options: Policy(NoDraft()),
    "fixed": lambda o: Policy(FixedDraft(o.fixed_nodes, o.fixed_depth), FixedRatio(o.fixed_ratio)),
    "load_aware": _load_aware,
}


def make_policy(name: str, options: PolicyOptions | None = None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown draft policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name](options or PolicyOptions())
