"""The policy engine: filter candidates with recorded reasons, rank the rest, cut the chain.

Score terms, each in [0, 1] before its weight:

- ``cost``: 1 for the cheapest of the candidates compared (the accepted ones), 0 for the dearest,
  linear between (min–max over total estimated cost; 1 for all when they cost the same);
- ``latency``: the same over expected latency (observed p50 where known, else the provider's prior);
- ``fit``: how well the model suits the prompt's complexity (:func:`fit_term`, replaceable per engine);
- ``quality``: the model's quality tier itself;
- ``preference``: +1 for a provider the policy (or a matching rule) prefers, -1 to avoid.

Order: the policy's ``fallback_order`` first (when it names the provider), then by the policy's
``order``: ``score`` (the weighted sum, highest first); ``cost`` (preferred before neutral before
avoided, then total estimated cost ascending, then quality); ``latency`` (the same tiers, then expected
latency ascending, then cost, then quality). Ties break by registration order, provider and model.
Every accepted candidate is ranked; the chain the router tries is the first ``max_chain`` of them.

``PolicyEngine.decide`` is a pure function of the request, the candidates' facts and the routing
context: no I/O, deterministic. Rejected candidates' terms, and the ranked candidates beyond the chain,
are built only when read (``explain()``, ``to_dict()``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Any

from policies.complexity import PromptComplexity, score_prompt
from policies.decision import CandidateInfo, RankedCandidate, Rejection, RoutingDecision
from policies.ladder import code_first, rung_of, step_down_note
from policies.policy import Policy, Rule, Weights
from policies.skills import describe_fit
from policies.skills import fit as skill_fit
from policies.skills import needs as skill_needs
from router.request import QUALITY_FLOORS, ImageRequest

FIT_PENALTY = 3.0
"""Each 0.1 of model quality below the prompt's complexity costs 0.3 of the fit term."""

FitFunction = Callable[[CandidateInfo, PromptComplexity], float]
"""The ``fit`` term before its weight: how well a candidate suits a prompt, in [0, 1]."""


def quality_fit(cand: CandidateInfo, complexity: PromptComplexity) -> float:
    """1 when the model's quality reaches the prompt's complexity score, minus ``FIT_PENALTY`` × the shortfall
    (the fit of a model with no profile, and of any model when skills are not asked about)."""
    shortfall = complexity.score - cand.quality
    return 1.0 if shortfall <= 0 else max(0.0, 1.0 - FIT_PENALTY * shortfall)


def fit_term(cand: CandidateInfo, complexity: PromptComplexity) -> float:
    """The model's skills against what the prompt needs (:func:`policies.skills.fit`) where the model has a
    profile; else :func:`quality_fit`."""
    if cand.profile is None:
        return quality_fit(cand, complexity)
    return skill_fit(skill_needs(complexity.features), cand.profile).score


def fit_note(cand: CandidateInfo, complexity: PromptComplexity) -> str:
    """:func:`fit_term` in words for ``explain()``: the skill that decided, with its evidence."""
    if cand.profile is None:
        return ""
    need = skill_needs(complexity.features)
    return describe_fit(skill_fit(need, cand.profile), need, cand.profile)


@dataclass(frozen=True, slots=True)
class RoutingContext:
    """What the router knows beyond the request: budget headroom for the request's tags, providers
    that offer no model at all (reported as rejections so ``explain()`` lists them), and whether this
    is a dry run that ranks providers without keys as if they were configured (``assume_configured``)."""

    budget_headroom_usd: Decimal | None = None
    unavailable: tuple[Rejection, ...] = ()
    assume_configured: bool = False
    requests_last_day: int | None = None
    """Requests the ledger recorded in the last 24 hours (read only for a ladder policy with a GPU rate)."""


_NO_CONTEXT = RoutingContext()


@dataclass(slots=True)
class _Effective:
    """The policy after the rules that match this request."""

    weights: Weights
    prefer: frozenset[str]
    avoid: frozenset[str]
    residency: frozenset[str] | None
    quality_floor: float | None
    max_cost_usd: Decimal | None
    applied: list[str] = field(default_factory=list)


class _Scoring:
    """One decision's scale: the terms of any candidate against the candidates compared."""

    __slots__ = ("avoid", "cmin", "complexity", "cspan", "fit", "lmin", "lspan", "max_chain", "prefer", "w")

    def __init__(self, eff: _Effective, complexity: PromptComplexity, fit: FitFunction,
                 compared: Sequence[CandidateInfo], max_chain: int) -> None:
        self.w = eff.weights
        self.complexity = complexity
        self.fit = fit
        self.prefer = eff.prefer
        self.avoid = eff.avoid
        self.max_chain = max_chain
        costs = [c.cost for c in compared] or [0.0]
        lats = [c.latency_s for c in compared] or [0.0]
        self.cmin, self.lmin = min(costs), min(lats)
        self.cspan, self.lspan = max(costs) - self.cmin, max(lats) - self.lmin

    def preference(self, cand: CandidateInfo) -> int:
        names = cand.names
        return (not self.prefer.isdisjoint(names)) - (not self.avoid.isdisjoint(names))

    def terms(self, cand: CandidateInfo) -> dict[str, float]:
        """Each weighted term (a rejected candidate outside the compared range is clamped to [0, 1])."""
        w, cspan, lspan = self.w, self.cspan, self.lspan
        ct = 1.0 if cspan <= 0 else min(1.0, max(0.0, 1.0 - (cand.cost - self.cmin) / cspan))
        lt = 1.0 if lspan <= 0 else min(1.0, max(0.0, 1.0 - (cand.latency_s - self.lmin) / lspan))
        return {
            "cost": w.cost * ct,
            "latency": w.latency * lt,
            "fit": w.fit * self.fit(cand, self.complexity),
            "quality": w.quality * cand.quality,
            "preference": w.preference * (self.preference(cand) if self.prefer or self.avoid else 0),
        }

    def scores(self, accepted: Sequence[CandidateInfo]) -> list[float]:
        """The weighted sum of each accepted candidate's terms (the same arithmetic as :meth:`terms`, inlined:
        accepted candidates lie within the scale, so no clamping)."""
        w = self.w
        wc, wl, wf, wq, wp = w.cost, w.latency, w.fit, w.quality, w.preference
        cmin, cspan, lmin, lspan = self.cmin, self.cspan, self.lmin, self.lspan
        fit, complexity = self.fit, self.complexity
        if self.prefer or self.avoid:
            preference = self.preference
            return [wc * (1.0 if cspan <= 0 else 1.0 - (c.cost - cmin) / cspan)
                    + wl * (1.0 if lspan <= 0 else 1.0 - (c.latency_s - lmin) / lspan)
                    + wf * fit(c, complexity) + wq * c.quality + wp * preference(c) for c in accepted]
        # without preferences the term is 0.0 for all, and x + 0.0 == x: left out
        return [wc * (1.0 if cspan <= 0 else 1.0 - (c.cost - cmin) / cspan)
                + wl * (1.0 if lspan <= 0 else 1.0 - (c.latency_s - lmin) / lspan)
                + wf * fit(c, complexity) + wq * c.quality for c in accepted]

    def ranked(self, cand: CandidateInfo) -> RankedCandidate:
        terms = self.terms(cand)
        return RankedCandidate(  # positional: this runs for every candidate in the chain
            cand.provider, cand.model, sum(terms.values()), terms, cand.estimate,
            "prior" if cand.observed_latency_s is None else "observed", cand.plan.warnings,
            cand.configuration_problem, cand.latency_s, fit_note(cand, self.complexity),
        )

    def rest(self, order: list[CandidateInfo]) -> list[RankedCandidate]:
        return [self.ranked(c) for c in order[self.max_chain:]]


class PolicyEngine:
    """Decides where a request goes under one policy.

    ``fit`` computes the fit term of a candidate for a prompt's complexity (default :func:`fit_term`).
    """

    def __init__(self, policy: Policy, *, fit: FitFunction = fit_term) -> None:
        self.policy = policy
        self.fit = fit
        self._explicit = {name: i for i, name in enumerate(policy.fallback_order)}

    def decide(
        self,
        request: ImageRequest,
        candidates: Sequence[CandidateInfo],
        context: RoutingContext | None = None,
        complexity: PromptComplexity | None = None,
    ) -> RoutingDecision:
        context = context or _NO_CONTEXT
        complexity = complexity or score_prompt(request.prompt)
        eff = self._effective(request, complexity)
        task = request.task  # a property that works its answer out: read once
        accepted, rejected = self._screen(request, task, candidates, eff, context)
        pol = self.policy
        scoring = _Scoring(eff, complexity, self.fit, accepted or [c for c, _ in rejected], pol.max_chain)
        volume = self._volume(accepted, context) if pol.order == "ladder" else None
        order = self._order(accepted, scoring, code_first=volume is not None) if accepted else []
        configured = None
        if context.assume_configured and any(c.configuration_problem for c in accepted):
            configured = partial(self._configured_chain, [c for c in accepted if not c.configuration_problem],
                                 eff, complexity)
        terms = scoring.terms
        rejections = [Rejection(c.provider, c.model, code, reason, c.estimate, c, terms)
                      for c, (code, reason) in rejected]
        rejections.extend(context.unavailable)
        return RoutingDecision(
            policy=pol.name,
            task=task,
            complexity=complexity,
            chain=[scoring.ranked(c) for c in order[: pol.max_chain]],
            rejections=rejections,
            rules_applied=eff.applied,
            quality_floor=eff.quality_floor,
            residency=eff.residency,
            order=pol.order,
            max_chain=pol.max_chain,
            dry_run=context.assume_configured,
            rest=partial(scoring.rest, order) if len(order) > pol.max_chain else None,
            configured=configured,
            ladder_note=step_down_note(order[0].kind, ((c.kind, f"{c.provider}/{c.model}", code, reason)
                                                       for c, (code, reason) in rejected), volume=volume)
            if pol.order == "ladder" and order else None,
        )

    def _volume(self, accepted: list[CandidateInfo], context: RoutingContext) -> str | None:
        """Why Code comes first by volume under a ladder policy, or None."""
        rate = self.policy.ladder_gpu_usd_per_day
        calls = [c.cost for c in accepted if rung_of(c.kind) == "call"]
        cheapest = min(calls) if calls else None
        if not code_first(context.requests_last_day, cheapest, rate):
            return None
        return (f"{context.requests_last_day:,} requests in the last day at ${cheapest:.4f} (the cheapest hosted "
                f"candidate) cost more than the GPU's ${rate:,.2f} a day")

    def _configured_chain(self, accepted: list[CandidateInfo], eff: _Effective,
                          complexity: PromptComplexity) -> list[RankedCandidate]:
        """The chain without the unconfigured candidates a dry run ranked: what ``generate()`` would walk."""
        scoring = _Scoring(eff, complexity, self.fit, accepted, self.policy.max_chain)
        return [scoring.ranked(c) for c in self._order(accepted, scoring)[: self.policy.max_chain]] if accepted else []

    # --- rules -----------------------------------------------------------------------

    def _effective(self, request: ImageRequest, complexity: PromptComplexity) -> _Effective:
        pol = self.policy
        cons = request.constraints
        floor = QUALITY_FLOORS[cons.quality_floor] if cons.quality_floor else None
        eff = _Effective(
            weights=pol.weights, prefer=frozenset(pol.prefer), avoid=frozenset(),
            residency=_intersect(pol.residency, cons.residency), quality_floor=floor, max_cost_usd=cons.max_cost_usd,
        )
        for rule in pol.rules:
            if not _matches(rule, request, complexity):
                continue
            then = rule.then
            if then.quality_floor:
                eff.quality_floor = max(eff.quality_floor or 0.0, QUALITY_FLOORS[then.quality_floor])
            eff.prefer |= frozenset(then.prefer)
            eff.avoid |= frozenset(then.avoid)
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

    def _screen(
        self, request: ImageRequest, task: str, candidates: Sequence[CandidateInfo], eff: _Effective,
        context: RoutingContext,
    ) -> tuple[list[CandidateInfo], list[tuple[CandidateInfo, tuple[str, str]]]]:
        """Accepted candidates, and rejected ones with the first reason, in the order reasons are reported:
        pinned, not-allowed, denied, not-configured, capability/size/strict, residency, quality-floor,
        cost-cap, latency-cap, budget, circuit-open."""
        cons = request.constraints
        n = request.n
        pinned = request.provider
        allow = cons.allow_providers
        deny = cons.deny_providers | self.policy.deny
        residency, floor, cap = eff.residency, eff.quality_floor, eff.max_cost_usd
        max_latency = cons.max_latency_s
        headroom = context.budget_headroom_usd
        assume_configured = context.assume_configured
        # what only _capability_gap checks
        rare = bool(request.controls or request.loras or request.size_mode == "exact" or cons.strict
                    or task == "control" or request.embeddings or request.ip_adapter is not None)
        accepted: list[CandidateInfo] = []
        rejected: list[tuple[CandidateInfo, tuple[str, str]]] = []
        why: tuple[str, str] | None
        for cand in candidates:
            caps = cand.capabilities
            names = cand.names
            if pinned and pinned not in names:
                why = "pinned", f"request pins provider {pinned!r}"
            elif allow is not None and allow.isdisjoint(names):
                why = "not-allowed", f"not in allow_providers ({', '.join(sorted(allow))})"
            elif deny and not deny.isdisjoint(names):
                denied = names & deny
                by = "request" if denied & cons.deny_providers else "policy"
                why = "denied", f"{', '.join(sorted(denied))} is denied by the {by}"
            elif cand.configuration_problem and not assume_configured:
                why = "not-configured", cand.configuration_problem
            elif rare and (gap := _capability_gap(request, task, cand)) is not None:
                why = gap
            elif cand.plan.size.out_of_range is not None:  # in any size mode: adapting would lose what was asked
                why = "size", f"cannot make that size: {cand.plan.size.out_of_range}"
            elif task not in caps.tasks:
                why = "capability", f"does not do {task}"
            elif n > caps.max_n:
                why = "capability", f"makes at most {caps.max_n} images per request, {n} asked"
            elif residency is not None and residency.isdisjoint(caps.regions):
                allowed = ", ".join(sorted(residency)) or "no region (the policy's and its residency do not overlap)"
                serves = ", ".join(sorted(caps.regions))
                why = "residency", f"serves regions {serves}; the request allows only {allowed}"
            elif floor is not None and cand.quality < floor:
                why = "quality-floor", f"quality {cand.quality:.2f} is below the floor {floor:.2f}"
            elif cap is not None and cand.worst_usd > cap:  # the most the call can be billed, where bounded
                why = "cost-cap", f"estimated ${cand.worst_usd} is over max_cost_usd ${cap}"
            elif max_latency is not None and cand.latency_s > max_latency:
                why = "latency-cap", f"expected {cand.latency_s:.1f}s is over max_latency_s {max_latency}s"
            elif headroom is not None and cand.worst_usd > headroom:
                why = "budget", f"estimated ${cand.worst_usd} is over the budget headroom ${headroom}"
            elif cand.circuit_open:
                why = "circuit-open", "recent consecutive failures opened its circuit breaker; cooling down"
            else:
                accepted.append(cand)
                continue
            rejected.append((cand, why))
        return accepted, rejected

    # --- ranking ---------------------------------------------------------------------

    def _order(self, accepted: list[CandidateInfo], scoring: _Scoring, *, code_first: bool = False
               ) -> list[CandidateInfo]:
        """Every accepted candidate in rank order."""
        explicit = self._explicit
        tail = len(explicit)

        def first(c: CandidateInfo) -> int:
            return min((explicit[name] for name in c.names if name in explicit), default=tail)

        mode = self.policy.order
        tiers = bool(scoring.prefer or scoring.avoid)
        keys: list[tuple[Any, ...]]
        if mode == "cost":
            keys = [(first(c) if explicit else 0, -scoring.preference(c) if tiers else 0, c.cost, -c.quality,
                     c.position, c.provider, c.model, i) for i, c in enumerate(accepted)]
        elif mode == "latency":
            keys = [(first(c) if explicit else 0, -scoring.preference(c) if tiers else 0, c.latency_s, c.cost,
                     -c.quality, c.position, c.provider, c.model, i) for i, c in enumerate(accepted)]
        elif mode == "ladder":
            scores = scoring.scores(accepted)
            rank = {"code": -1, "call": 0, "canvas": 1} if code_first else {"call": 0, "canvas": 1, "code": 2}
            keys = [(first(c) if explicit else 0, -scoring.preference(c) if tiers else 0, rank[rung_of(c.kind)],
                     -scores[i], c.position, c.provider, c.model, i) for i, c in enumerate(accepted)]
        elif explicit:
            scores = scoring.scores(accepted)
            keys = [(first(c), -scores[i], c.position, c.provider, c.model, i) for i, c in enumerate(accepted)]
        else:
            scores = scoring.scores(accepted)
            keys = [(-scores[i], c.position, c.provider, c.model, i) for i, c in enumerate(accepted)]
        keys.sort()
        return [accepted[k[-1]] for k in keys]


def _capability_gap(request: ImageRequest, task: str, cand: CandidateInfo) -> tuple[str, str] | None:
    """The first thing ``cand``'s model cannot do that the request (of ``task``) asks for, or None."""
    caps = cand.capabilities
    if task not in caps.tasks:
        return "capability", f"does not do {task}"
    if task == "control":
        base_task = ("inpaint" if request.mask_image is not None
                     else "img2img" if request.init_image is not None else None)
        if base_task and base_task not in caps.tasks:
            return "capability", f"does not combine control with {base_task}"
    if request.controls:
        missing = {c.kind for c in request.controls} - caps.control_kinds
        if missing:
            return "capability", f"no ControlNet for {', '.join(sorted(missing))}"
        if len(request.controls) > caps.max_controls:
            return "capability", f"takes at most {caps.max_controls} controls, the request has {len(request.controls)}"
    if request.loras and len(request.loras) > caps.max_loras:
        return "capability", "takes no LoRA" if not caps.max_loras else f"takes at most {caps.max_loras} LoRAs"
    if request.n > caps.max_n:
        return "capability", f"makes at most {caps.max_n} images per request, {request.n} asked"
    if request.embeddings and not caps.embeddings:
        return "capability", "takes no textual-inversion embeddings"
    if request.ip_adapter is not None and not caps.ip_adapter:
        return "capability", "takes no IP-Adapter"
    if "local" not in caps.regions and (files := [lora.ref for lora in request.loras if lora.is_file]):
        return "capability", f"LoRA {files[0]!r} is a file on this machine; only a backend running here loads it"
    if request.size_mode == "exact" and not cand.plan.size.exact:
        return "size", f"cannot make the exact size asked ({cand.plan.size.warning})"
    if request.constraints.strict and cand.plan.warnings:
        return "strict", "would adapt the request: " + "; ".join(cand.plan.warnings)
    return None


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
