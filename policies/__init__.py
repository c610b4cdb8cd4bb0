"""Pure routing decisions: filters, scoring, prompt complexity, presets and policy files.

Nothing in this package does I/O except :func:`load_policy`, which reads the file
it is given; decisions themselves are pure functions of their inputs.
"""

from policies.decision import CandidateInfo, RankedCandidate, Rejection, RoutingDecision
from policies.engine import PolicyEngine, RoutingContext
from policies.policy import PRESETS, BudgetRule, Hedge, Policy, Rule, Weights, load_policy, resolve_policy

__all__ = [
    "PRESETS",
    "BudgetRule",
    "CandidateInfo",
    "Hedge",
    "Policy",
    "PolicyEngine",
    "RankedCandidate",
    "Rejection",
    "RoutingContext",
    "RoutingDecision",
    "Rule",
    "Weights",
    "load_policy",
    "resolve_policy",
]
