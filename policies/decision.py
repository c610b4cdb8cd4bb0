"""What the engine decided, and why: the ranked candidates, the chain the router tries, every rejection."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from providers.base import Capabilities, Estimate, Plan

if TYPE_CHECKING:
    from policies.complexity import PromptComplexity
    from policies.skills import Profile

CHAIN_LIMIT = "not tried (chain limit)"
"""How a ranked candidate beyond ``max_chain`` is listed."""


@dataclass(frozen=True, slots=True)
class CandidateInfo:
    """One (provider, model) pair with the facts the engine decides on (gathered without I/O).

    The fields after ``position`` are derived once, when the candidate is built for a request, so the
    engine reads plain numbers: ``names`` (provider name and kind), ``cost`` (total estimated USD as a
    float), ``latency_s`` (observed p50 where known, else the provider's prior), ``worst_usd`` (what the
    call can be billed at most) and ``quality``.
    """

    provider: str
    kind: str
    model: str
    capabilities: Capabilities
    plan: Plan
    estimate: Estimate
    configuration_problem: str | None = None
    circuit_open: bool = False
    observed_latency_s: float | None = None
    position: int = 0
    profile: Profile | None = None
    """The model's per-skill profile (providers/profiles/); None: every skill at ``capabilities.quality``."""
    names: frozenset[str] = field(init=False, repr=False, compare=False)
    cost: float = field(init=False, repr=False, compare=False)
    latency_s: float = field(init=False, repr=False, compare=False)
    worst_usd: Decimal = field(init=False, repr=False, compare=False)
    quality: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        est = self.estimate
        setattr_ = object.__setattr__
        setattr_(self, "names", frozenset((self.provider, self.kind)))
        setattr_(self, "cost", float(est.cost_usd))
        setattr_(self, "latency_s", self.observed_latency_s or est.latency_s)
        setattr_(self, "worst_usd", est.worst_usd)
        setattr_(self, "quality", self.capabilities.quality if self.profile is None else self.profile.overall)


@dataclass(slots=True)
class Rejection:
    """A candidate the filters removed; ``code`` is a stable keyword, ``reason`` for people.

    ``terms`` are the score terms it would have had, so a person can see what it cost them; they are
    computed when asked for (``explain()``, ``to_dict()``), not while deciding: ``scorer`` computes them
    from ``candidate`` (the facts it was rejected on).
    """

    provider: str
    model: str
    code: str
    reason: str
    estimate: Estimate | None = None
    candidate: CandidateInfo | None = field(default=None, repr=False, compare=False)
    scorer: Callable[[CandidateInfo], dict[str, float]] | None = field(default=None, repr=False, compare=False)

    @property
    def terms(self) -> dict[str, float]:
        if self.scorer is None or self.candidate is None:
            return {}
        return self.scorer(self.candidate)

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider, "model": self.model, "code": self.code, "reason": self.reason,
            "terms": {k: round(v, 4) for k, v in self.terms.items()},
            "estimated_cost_usd": str(self.estimate.cost_usd) if self.estimate else None,
        }


@dataclass(slots=True)
class RankedCandidate:
    """An accepted candidate, its score and the terms that made it.

    ``configuration_problem`` is set only in a dry run (``route()``), for a provider ranked as if it
    were configured: ``generate()`` never calls it.
    """

    provider: str
    model: str
    score: float
    terms: dict[str, float]
    estimate: Estimate
    latency_source: str  # "observed" or "prior"
    warnings: tuple[str, ...] = ()
    configuration_problem: str | None = None
    latency_s: float | None = None
    """The latency the ranking used: the observed p50 where known, else the estimate's prior."""
    fit_note: str = ""
    """The fit term in words: the skill that decided it, and its evidence."""

    @property
    def expected_latency_s(self) -> float:
        return self.estimate.latency_s if self.latency_s is None else self.latency_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "score": round(self.score, 4),
            "terms": {k: round(v, 4) for k, v in self.terms.items()},
            "estimated_cost_usd": str(self.estimate.cost_usd),
            "estimated_latency_s": round(self.estimate.latency_s, 3),
            "expected_latency_s": round(self.expected_latency_s, 3),
            "latency_source": self.latency_source,
            "warnings": list(self.warnings),
            "configuration_problem": self.configuration_problem,
            "fit": self.fit_note,
        }


@dataclass(slots=True)
class RoutingDecision:
    """The ranking of every accepted candidate, the chain the router walks, and why the others were left out.

    ``chain`` is what the router tries, in order (at most the policy's ``max_chain``); ``beyond`` holds
    the accepted candidates ranked after it (built when first read); ``ranked`` is both. ``dry_run``:
    made by ``route()``, where providers without keys are ranked as if configured and marked.
    """

    policy: str
    task: str
    complexity: PromptComplexity
    chain: list[RankedCandidate]
    rejections: list[Rejection]
    rules_applied: list[str] = field(default_factory=list)
    quality_floor: float | None = None
    residency: frozenset[str] | None = None
    order: str = "score"
    max_chain: int | None = None
    dry_run: bool = False
    rest: Callable[[], list[RankedCandidate]] | None = field(default=None, repr=False, compare=False)
    """Builds ``beyond`` when first read (deciding does not build what no one may read)."""
    configured: Callable[[], list[RankedCandidate]] | None = field(default=None, repr=False, compare=False)
    """In a dry run with unconfigured providers ranked: builds ``configured_chain`` when first read."""
    ladder_note: str | None = None
    """Under a ladder policy, why the chain's head is below Call (the requirement that forced the step down)."""
    _built: dict[str, list[RankedCandidate]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def chosen(self) -> RankedCandidate | None:
        return self.chain[0] if self.chain else None

    @property
    def beyond(self) -> list[RankedCandidate]:
        """Accepted candidates ranked after the chain: not tried (chain limit)."""
        return self._build("beyond", self.rest)

    @property
    def ranked(self) -> list[RankedCandidate]:
        """Every accepted candidate in rank order: the chain, then the ones beyond it."""
        return [*self.chain, *self.beyond]

    @property
    def not_configured(self) -> dict[str, str]:
        """Providers a dry run ranked as if configured: name → what to set."""
        return {c.provider: c.configuration_problem for c in self.ranked if c.configuration_problem}

    @property
    def configured_chain(self) -> list[RankedCandidate]:
        """The chain ``generate()`` would walk with the configuration as it is (a dry run ranks more)."""
        return self._build("configured", self.configured) if self.configured is not None else self.chain

    def _build(self, name: str, make: Callable[[], list[RankedCandidate]] | None) -> list[RankedCandidate]:
        built = self._built.get(name)
        if built is None:
            built = self._built[name] = make() if make is not None else []
        return built

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy,
            "order": self.order,
            "task": self.task,
            "dry_run": self.dry_run,
            "complexity": self.complexity.to_dict(),
            "rules_applied": list(self.rules_applied),
            "quality_floor": self.quality_floor,
            "residency": sorted(self.residency) if self.residency is not None else None,
            "max_chain": self.max_chain,
            "chain": [c.to_dict() | {"rank": i} for i, c in enumerate(self.chain, 1)],
            "beyond": [c.to_dict() | {"rank": i, "status": CHAIN_LIMIT}
                       for i, c in enumerate(self.beyond, len(self.chain) + 1)],
            "rejections": [r.to_dict() for r in self.rejections],
        }
        if self.ladder_note is not None:
            out["ladder_note"] = self.ladder_note
        if self.dry_run:
            out["not_configured"] = self.not_configured
            out["configured_chain"] = [f"{c.provider}/{c.model}" for c in self.configured_chain]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def explain(self) -> str:
        """The decision for a person: the ranking with its score terms, then every rejection."""
        c = self.complexity
        f = c.features
        lines = []
        missing = self.not_configured
        if self.dry_run and missing:
            now = self.configured_chain
            first = (f"{now[0].provider}/{now[0].model} first" if now
                     else "no configured provider can serve this request")
            lines += [
                f"dry run: {len(missing)} provider(s) not configured ({', '.join(sorted(missing))}), ranked as if "
                "they were and marked below; generate() never calls them",
                f"with the configuration as it is now: {first}",
            ]
        lines += [
            f"policy {self.policy!r}, task {self.task}, {_ORDERS.get(self.order, self.order)}",
            f"prompt complexity {c.score:.2f} ({c.tier}): subjects {f.subjects}, counts {f.counts}, "
            f"attributes {f.attributes}, relations {f.relations}, text {f.text_to_render}, "
            f"style {f.style}, words {f.words}",
        ]
        if self.ladder_note:
            lines.append(self.ladder_note)
        if self.rules_applied:
            lines.append("rules applied:")
            lines += [f"  - {r}" for r in self.rules_applied]
        if self.quality_floor is not None:
            lines.append(f"quality floor: {self.quality_floor:.2f}")
        if self.residency is not None:
            lines.append(f"residency: {', '.join(sorted(self.residency))}")
        if self.chain:
            lines.append("chain (tried in this order):")
            for i, cand in enumerate(self.chain, 1):
                lines += _ranked_lines(i, cand)
        else:
            lines.append("chain: empty — no candidate can serve this request")
        beyond = self.beyond
        if beyond:
            lines.append(f"{CHAIN_LIMIT}, max_chain {self.max_chain}:")
            for i, cand in enumerate(beyond, len(self.chain) + 1):
                lines += _ranked_lines(i, cand)
        if self.rejections:
            lines.append("rejected:")
            for r in self.rejections:
                cost = ""
                if r.estimate is not None:
                    cost = f" (est ${_money(r.estimate.cost_usd)}, would score {sum(r.terms.values()):.3f})"
                lines.append(f"  - {r.provider}/{r.model}: [{r.code}] {r.reason}{cost}")
        return "\n".join(lines)


_ORDERS = {
    "score": "ordered by score",
    "cost": "ordered by total estimated cost (cheapest first), then quality",
    "latency": "ordered by expected latency (fastest first), then cost",
    "ladder": "ordered by rung (Call, then Canvas, then Code), then score",
}


def _ranked_lines(i: int, cand: RankedCandidate) -> list[str]:
    terms = " ".join(f"{k}={v:.2f}" for k, v in cand.terms.items())
    lines = [
        f"  {i}. {cand.provider}/{cand.model}  score {cand.score:.3f}  [{terms}]  "
        f"est ${_money(cand.estimate.cost_usd)}, {cand.expected_latency_s:.1f}s ({cand.latency_source})"
    ]
    if cand.configuration_problem:
        problem = cand.configuration_problem
        lines.append(f"       {problem if problem.startswith('not configured') else 'not configured: ' + problem}")
    if cand.fit_note:
        lines.append(f"       fit: {cand.fit_note}")
    lines += [f"       adapts: {w}" for w in cand.warnings]
    return lines


def _money(value: Decimal) -> str:
    return f"{value:.4f}" if value < 1 else f"{value:.2f}"
