"""Step policies: how big a tree each request gets, and how much of its image the drafter sees."""

from scheduler.policy.base import BudgetKey, CompressionPolicy, DraftPolicy, FixedRatio, Policy
from scheduler.policy.registry import POLICIES, PolicyOptions, make_policy

__all__ = [
    "POLICIES",
    "BudgetKey",
    "CompressionPolicy",
    "DraftPolicy",
    "FixedRatio",
    "Policy",
    "PolicyOptions",
    "make_policy",
]
