"""The policy engine: filter candidates with recorded reasons, score the rest, order a chain.

Score terms, each in [0, 1] before its weight:

- ``cost``: ``1 - cost per image / policy.cost_scale_usd`` (floored at 0), so a free
  backend scores 1 and one at the scale or above scores 0;
- ``latency``: ``1 - expected latency / policy.latency_scale_s`` (observed p50 where
  known, else the provider's prior), floored at 0;
- ``fit``: 1 when the model's quality reaches the prompt's complexity score, minus
  ``FIT_PENALTY`` × the shortfall;
- ``quality``: the model's quality tier itself;
- ``preference``: +1 for a provider the policy (or a matching rule) prefers, -1 to avoid.

The chain is ordered by the policy's ``fallback_order`` first (when it names the
provider), then by score, then by registration order and name.

``PolicyEngine.decide`` is a pure function of the request, the candidates' facts and
the routing context: no I/O, deterministic, microseconds per candidate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from policies.complexity import PromptComplexity, score_prompt
from policies.decision import CandidateInfo, RankedCandidate, Rejection, RoutingDecision
from policies.policy import Policy, Rule, Weights
from router.request import QUALITY_FLOORS, ImageRequest

FIT_PENALTY = 3.0
"""Each 0.1 of model quality below the prompt's complexity costs 0.3 of the fit term."""


@dataclass(frozen=True, slots=True)
class RoutingContext:
    """What the router knows beyond the request: budget headroom for the request's tags, and
    providers that offer no model at all (reported as rejections so ``explain()`` lists them)."""

    budget_headroom_usd: Decimal | None = None
    unavailable: tuple[Rejection, ...] = ()


@dataclass(slots=True)
class _Effective:
    """The policy after the rules that match this request."""

    weights: Weights
    prefer: set[str]
    avoid: set[str]
    residency: frozenset[str] | None
    quality_floor: float | None
    max_cost_usd: Decimal | None
    applied: list[str] = field(default_factory=list)


class PolicyEngine:
    """Decides where a request goes under one policy."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def decide(
        self,
        request: ImageRequest,
        candidates: Sequence[CandidateInfo],
        context: RoutingContext | None = None,
        complexity: PromptComplexity | None = None,
    ) -> RoutingDecision:
        context = context or RoutingContext()
        complexity = complexity or score_prompt(request.prompt)
        eff = self._effective(request, complexity)
        accepted: list[CandidateInfo] = []
        rejections: list[Rejection] = []
        for cand in candidates:
            reasons = list(self._rejections(request, cand, eff, context))
            if reasons:
                code, reason = reasons[0]
                terms = self._terms(cand, complexity, eff, request.n)
                rejections.append(Rejection(cand.provider, cand.model, code, reason, terms, cand.estimate))
            else:
                accepted.append(cand)
        rejections.extend(context.unavailable)
        ranked = self._rank(accepted, complexity, eff, request.n)
        return RoutingDecision(
            policy=self.policy.name,
            task=request.task,
            complexity=complexity,
            chain=ranked[: self.policy.max_chain],
            rejections=rejections,
            rules_applied=eff.applied,
            quality_floor=eff.quality_floor,
            residency=eff.residency,
        )

    # --- rules -----------------------------------------------------------------------

    def _effective(self, request: ImageRequest, complexity: PromptComplexity) -> _Effective:
        pol = self.policy
        cons = request.constraints
        floor = QUALITY_FLOORS[cons.quality_floor] if cons.quality_floor else None
        residency = _intersect(pol.residency, cons.residency)
        eff = _Effective(
            weights=pol.weights, prefer=set(pol.prefer), avoid=set(), residency=residency,
            quality_floor=floor, max_cost_usd=cons.max_cost_usd,
        )
        for rule in pol.rules:
            if not _matches(rule, request, complexity):
                continue
            then = rule.then
            if then.quality_floor:
                eff.quality_floor = max(eff.quality_floor or 0.0, QUALITY_FLOORS[then.quality_floor])
            eff.prefer |= set(then.prefer)
            eff.avoid |= set(then.avoid)
            eff.residency = _intersect(eff.residency, then.residency)
            if then.max_cost_usd is not None:
                # a cap of 0 is a cap: only None means "no cap"
                caps = [c for c in (eff.max_cost_usd, then.max_cost_usd) if c is not None]
                eff.max_cost_usd = min(caps)
            if then.weights:
                eff.weights = eff.weights.model_copy(update=then.weights)
            eff.applied.append(rule.describe())
        return eff

    # --- filters ---------------------------------------------------------------------

    def _rejections(
        self, request: ImageRequest, cand: CandidateInfo, eff: _Effective, context: RoutingContext
    ) -> Iterator[tuple[str, str]]:
        caps, cons = cand.capabilities, request.constraints
        names = {cand.provider, cand.kind}
        if request.provider and request.provider not in names:
            yield "pinned", f"request pins provider {request.provider!r}"
        if cons.allow_providers is not None and not names & cons.allow_providers:
            yield "not-allowed", f"not in allow_providers ({', '.join(sorted(cons.allow_providers))})"
        denied = names & (cons.deny_providers | self.policy.deny)
        if denied:
            by = "request" if denied & cons.deny_providers else "policy"
            yield "denied", f"{', '.join(sorted(denied))} is denied by the {by}"
        if cand.configuration_problem:
            yield "not-configured", cand.configuration_problem
        yield from _capability_gaps(request, cand)
        if eff.residency is not None and not caps.regions & eff.residency:
            yield "residency", (
                f"serves regions {', '.join(sorted(caps.regions))}; the request allows only "
                f"{', '.join(sorted(eff.residency))}"
            )
        if eff.quality_floor is not None and caps.quality < eff.quality_floor:
            yield "quality-floor", f"quality {caps.quality:.2f} is below the floor {eff.quality_floor:.2f}"
        cost = cand.estimate.worst_usd  # what the call can be billed at most, where the vendor bounds it
        if eff.max_cost_usd is not None and cost > eff.max_cost_usd:
            yield "cost-cap", f"estimated ${cost} is over max_cost_usd ${eff.max_cost_usd}"
        latency = cand.observed_latency_s or cand.estimate.latency_s
        if cons.max_latency_s is not None and latency > cons.max_latency_s:
            yield "latency-cap", f"expected {latency:.1f}s is over max_latency_s {cons.max_latency_s}s"
        if context.budget_headroom_usd is not None and cost > context.budget_headroom_usd:
            yield "budget", f"estimated ${cost} is over the budget headroom ${context.budget_headroom_usd}"
        if cand.circuit_open:
            yield "circuit-open", "recent consecutive failures opened its circuit breaker; cooling down"

    # --- scoring ---------------------------------------------------------------------

    def _terms(self, cand: CandidateInfo, complexity: PromptComplexity, eff: _Effective, n: int) -> dict[str, float]:
        w, pol = eff.weights, self.policy
        q = cand.capabilities.quality
        names = {cand.provider, cand.kind}
        per_image = float(cand.estimate.cost_usd) / n
        latency = cand.observed_latency_s or cand.estimate.latency_s
        return {
            "cost": w.cost * max(0.0, 1.0 - per_image / float(pol.cost_scale_usd)),
            "latency": w.latency * max(0.0, 1.0 - latency / pol.latency_scale_s),
            "fit": w.fit * max(0.0, 1.0 - FIT_PENALTY * max(0.0, complexity.score - q)),
            "quality": w.quality * q,
            "preference": w.preference * (bool(names & eff.prefer) - bool(names & eff.avoid)),
        }

    def _rank(
        self, accepted: list[CandidateInfo], complexity: PromptComplexity, eff: _Effective, n: int
    ) -> list[RankedCandidate]:
        order = {name: i for i, name in enumerate(self.policy.fallback_order)}
        scored = []
        for cand in accepted:
            terms = self._terms(cand, complexity, eff, n)
            ranked = RankedCandidate(
                provider=cand.provider, model=cand.model, score=sum(terms.values()), terms=terms,
                estimate=cand.estimate,
                latency_source="observed" if cand.observed_latency_s is not None else "prior",
                warnings=cand.plan.warnings,
            )
            explicit = min((order[name] for name in (cand.provider, cand.kind) if name in order), default=len(order))
            scored.append((explicit, -ranked.score, cand.position, cand.provider, cand.model, ranked))
        scored.sort(key=lambda t: t[:5])
        return [t[-1] for t in scored]


def _capability_gaps(request: ImageRequest, cand: CandidateInfo) -> Iterator[tuple[str, str]]:
    caps = cand.capabilities
    task = request.task
    base_task = "inpaint" if request.mask_image is not None else "img2img" if request.init_image is not None else None
    if task not in caps.tasks:
        yield "capability", f"does not do {task}"
    elif task == "control" and base_task and base_task not in caps.tasks:
        yield "capability", f"does not combine control with {base_task}"
    if request.controls:
        kinds = {c.kind for c in request.controls}
        missing = kinds - caps.control_kinds
        if missing:
            yield "capability", f"no ControlNet for {', '.join(sorted(missing))}"
        elif len(request.controls) > caps.max_controls:
            yield "capability", f"takes at most {caps.max_controls} controls, the request has {len(request.controls)}"
    if request.loras and len(request.loras) > caps.max_loras:
        yield "capability", (
            "takes no LoRA" if not caps.max_loras else f"takes at most {caps.max_loras} LoRAs"
        )
    if request.n > caps.max_n:
        yield "capability", f"makes at most {caps.max_n} images per request, {request.n} asked"
    if request.size_mode == "exact" and not cand.plan.size.exact:
        yield "size", f"cannot make the exact size asked ({cand.plan.size.warning})"
    if request.constraints.strict and cand.plan.warnings:
        yield "strict", "would adapt the request: " + "; ".join(cand.plan.warnings)


def _matches(rule: Rule, request: ImageRequest, complexity: PromptComplexity) -> bool:
    w = rule.when
    return not (
        (w.complexity_gte is not None and complexity.score < w.complexity_gte)
        or (w.complexity_lt is not None and complexity.score >= w.complexity_lt)
        or (w.tier is not None and complexity.tier != w.tier)
        or (w.task is not None and request.task not in w.task)
        or (w.has_controls is not None and bool(request.controls) != w.has_controls)
        or (w.has_loras is not None and bool(request.loras) != w.has_loras)
        or (w.tag is not None and w.tag not in request.tags)
    )


def _intersect(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b
