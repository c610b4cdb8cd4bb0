"""What the engine decided, and why: the ranked chain and every rejection."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from providers.base import Capabilities, Estimate, Plan

if TYPE_CHECKING:
    from policies.complexity import PromptComplexity


@dataclass(frozen=True, slots=True)
class CandidateInfo:
    """One (provider, model) pair with the facts the engine decides on (gathered without I/O)."""

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


@dataclass(frozen=True, slots=True)
class Rejection:
    """A candidate the filters removed; ``code`` is a stable keyword, ``reason`` for people.

    ``terms`` are the score terms it would have had, so a person can see what it cost them.
    """

    provider: str
    model: str
    code: str
    reason: str
    terms: dict[str, float] = field(default_factory=dict)
    estimate: Estimate | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider, "model": self.model, "code": self.code, "reason": self.reason,
            "terms": {k: round(v, 4) for k, v in self.terms.items()},
            "estimated_cost_usd": str(self.estimate.cost_usd) if self.estimate else None,
        }


@dataclass(frozen=True, slots=True)
class RankedCandidate:
    """An accepted candidate, its score and the terms that made it."""

    provider: str
    model: str
    score: float
    terms: dict[str, float]
    estimate: Estimate
    latency_source: str  # "observed" or "prior"
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "score": round(self.score, 4),
            "terms": {k: round(v, 4) for k, v in self.terms.items()},
            "estimated_cost_usd": str(self.estimate.cost_usd),
            "estimated_latency_s": round(self.estimate.latency_s, 3),
            "latency_source": self.latency_source,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """The ordered chain the router walks, and why every other candidate was left out."""

    policy: str
    task: str
    complexity: PromptComplexity
    chain: list[RankedCandidate]
    rejections: list[Rejection]
    rules_applied: list[str] = field(default_factory=list)
    quality_floor: float | None = None
    residency: frozenset[str] | None = None

    @property
    def chosen(self) -> RankedCandidate | None:
        return self.chain[0] if self.chain else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "task": self.task,
            "complexity": self.complexity.to_dict(),
            "rules_applied": list(self.rules_applied),
            "quality_floor": self.quality_floor,
            "residency": sorted(self.residency) if self.residency is not None else None,
            "chain": [c.to_dict() for c in self.chain],
            "rejections": [r.to_dict() for r in self.rejections],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def explain(self) -> str:
        """The decision for a person: the ranking with its score terms, then every rejection."""
        c = self.complexity
        f = c.features
        lines = [
            f"policy {self.policy!r}, task {self.task}",
            f"prompt complexity {c.score:.2f} ({c.tier}): subjects {f.subjects}, counts {f.counts}, "
            f"attributes {f.attributes}, relations {f.relations}, text {f.text_to_render}, "
            f"style {f.style}, words {f.words}",
        ]
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
                terms = " ".join(f"{k}={v:.2f}" for k, v in cand.terms.items())
                lines.append(
                    f"  {i}. {cand.provider}/{cand.model}  score {cand.score:.3f}  [{terms}]  "
                    f"est ${_money(cand.estimate.cost_usd)}, {cand.estimate.latency_s:.1f}s ({cand.latency_source})"
                )
                lines += [f"       adapts: {w}" for w in cand.warnings]
        else:
            lines.append("chain: empty — no candidate can serve this request")
        if self.rejections:
            lines.append("rejected:")
            for r in self.rejections:
                cost = ""
                if r.estimate is not None:
                    cost = f" (est ${_money(r.estimate.cost_usd)}, would score {sum(r.terms.values()):.3f})"
                lines.append(f"  - {r.provider}/{r.model}: [{r.code}] {r.reason}{cost}")
        return "\n".join(lines)


def _money(value: Decimal) -> str:
    return f"{value:.4f}" if value < 1 else f"{value:.2f}"
