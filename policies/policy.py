"""Routing policies: score weights, rules, fallback order and budgets; presets and policy files.

A policy file is YAML or TOML with the same fields as :class:`Policy`::

    name: team-default
    extends: balanced            # start from a preset
    weights: {cost: 0.5, latency: 0.2, fit: 0.6}
    rules:
      - when: {complexity_gte: 0.7}
        then: {quality_floor: high}
      - when: {has_controls: true}
        then: {prefer: [local]}
    fallback_order: [openai, local]
    order: score                 # or cost (cheapest first) / latency (fastest first)
    budgets:
      - {limit_usd: 25, period: month}
      - {limit_usd: 5, period: day, tag: team-a}
    prices:
      "openai/gpt-image-2": {image_output_per_mtok: "28.00"}
    profiles_file: calibrated.toml   # skill profiles measured by `pixroute eval --calibrate`, relative to
                                     # this file; inline `profiles:` entries win over it per model and skill
"""

from __future__ import annotations

import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from router.errors import PolicyFileError
from router.request import QualityFloor, Selection, Task


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Weights(_Strict):
    """How much each score term counts. Terms are each in [0, 1]."""

    cost: float = Field(0.4, ge=0)
    latency: float = Field(0.3, ge=0)
    fit: float = Field(1.0, ge=0)  # the model's quality meets the prompt's complexity
    quality: float = Field(0.1, ge=0)  # the model's quality, whatever the prompt
    preference: float = Field(1.0, ge=0)  # bonus for providers the policy prefers


class When(_Strict):
    """Conditions of a rule; all given ones must hold."""

    complexity_gte: float | None = None
    complexity_lt: float | None = None
    tier: Literal["low", "medium", "high"] | None = None
    task: frozenset[Task] | None = None
    has_controls: bool | None = None
    has_loras: bool | None = None
    tag: str | None = None


class Then(_Strict):
    """Effects of a rule."""

    quality_floor: QualityFloor | None = None
    prefer: tuple[str, ...] = ()
    avoid: tuple[str, ...] = ()
    residency: frozenset[str] | None = None
    max_cost_usd: Decimal | None = None
    weights: dict[str, float] | None = None


class Rule(_Strict):
    """``when`` the request matches, ``then`` adjust the decision."""

    when: When
    then: Then

    def describe(self) -> str:
        cond = ", ".join(f"{k}={v}" for k, v in self.when.model_dump(exclude_none=True).items())
        eff = ", ".join(f"{k}={v}" for k, v in self.then.model_dump(exclude_none=True, exclude_defaults=True).items())
        return f"when {cond or 'always'} → {eff}"


class BudgetRule(_Strict):
    """A spending limit the router keeps in its ledger."""

    limit_usd: Decimal = Field(ge=0)
    period: Literal["day", "month", "total"] = "month"
    tag: str | None = None


Order = Literal["score", "cost", "latency", "ladder"]


class Hedge(_Strict):
    """Hedged requests (Dean & Barroso, *The Tail at Scale*): when the chain's head has not answered
    ``after`` its p95 latency (or a number of seconds), start the next candidate too and take the
    first success; the other is cancelled. A hedge is started only while the extra spend it may add
    stays within ``max_extra_fraction`` of what the router has spent on requests so far (and within
    every budget), so hedging cannot multiply the bill."""

    after: Literal["p95"] | float = "p95"
    """``p95``: the head's observed 95th-percentile latency (no hedge until it has enough samples);
    or a fixed wait in seconds."""
    max_extra_fraction: float = Field(0.05, gt=0, le=1)
    """The most hedges may add, as a fraction of the router's spend on requests so far."""

    @field_validator("after")
    @classmethod
    def _positive(cls, value: str | float) -> str | float:
        if not isinstance(value, str) and value <= 0:
            raise ValueError("hedge.after must be 'p95' or a number of seconds above 0")
        return value


class QualityStep(BaseModel):
    """The opt-in quality post-step: ``quality: {clip: /models/clip-vit-base-patch32}`` in a policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    clip: str = Field(min_length=1)
    """A local CLIP model directory (nothing is downloaded; see :mod:`router.quality`)."""


class Policy(_Strict):
    """How the router chooses: weights, hard preferences, rules, order and budgets."""

    name: str = "custom"
    weights: Weights = Weights()
    prefer: tuple[str, ...] = ()
    deny: frozenset[str] = frozenset()
    residency: frozenset[str] | None = None
    rules: tuple[Rule, ...] = ()
    fallback_order: tuple[str, ...] = ()
    order: Order = "score"
    """How the accepted candidates are ordered (after ``fallback_order`` and ``prefer``/``avoid``):
    ``score`` by the weighted terms, ``cost`` by total estimated cost ascending (then quality),
    ``latency`` by expected latency ascending (then cost); ``ladder`` by rung — Call (hosted APIs), then Canvas
    (ComfyUI), then Code (local) — then score (see :mod:`policies.ladder`)."""
    max_chain: int = Field(4, ge=1)
    """How many of the ranked candidates the router tries; the decision lists the rest as not tried."""
    max_retries: int = Field(2, ge=0, le=10)
    fallback_on_content_policy: bool = False
    budgets: tuple[BudgetRule, ...] = ()
    prices: dict[str, dict[str, Any]] = Field(default_factory=dict)
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)  # "<kind>/<model>": {"skills": {...}}
    ladder_gpu_usd_per_day: float | None = Field(None, gt=0)
    """Under ``order: ladder``: what a day of the owned GPU costs; when the last day's requests, priced at
    the cheapest hosted candidate, cost more, Code (the local backend) comes first. None: never by volume."""
    hedge: Hedge | None = None
    retry_own_timeouts: bool = False
    """Retry a call that timed out on a backend you own (local, ComfyUI, a GPU pool) instead of falling back."""
    select: Selection | None = None
    """Best-of-n for every request under this policy (a request's own ``select`` wins)."""
    quality: QualityStep | None = None
    """Score every served image (CLIP against the prompt): on the result, in the ledger row and on the span."""
    """Opt-in hedged requests against tail latency (see :class:`Hedge`); None: one candidate at a time."""
    cache: bool = False
    """Opt-in result cache: a request with a seed, on a backend that takes seeds, is served from the router's
    result cache when the same request was served before (no call, $0; see :mod:`router.state`)."""


PRESETS: dict[str, Policy] = {
    # cheapest and fastest are orders, not scores: their weights only fill the terms explain() shows
    "cheapest": Policy(name="cheapest", order="cost", weights=Weights(cost=1.0, latency=0.1, fit=0.2, quality=0.0)),
    "fastest": Policy(name="fastest", order="latency", weights=Weights(cost=0.1, latency=1.0, fit=0.2, quality=0.0)),
    "balanced": Policy(name="balanced"),
    "quality": Policy(name="quality", weights=Weights(cost=0.05, latency=0.05, fit=0.5, quality=1.0)),
    "local-first": Policy(name="local-first", prefer=("local",)),
    # Call, then Canvas, then Code: the highest rung that still gives the control a request needs
    "ladder": Policy(name="ladder", order="ladder"),
    "private": Policy(name="private", residency=frozenset({"local"})),
}


def load_policy(path: str | Path) -> Policy:
    """Read a policy from a YAML or TOML file; ``extends: <preset>`` starts from a preset."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        raw = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (OSError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise PolicyFileError(f"{p}: cannot read policy file ({exc})") from None
    if not isinstance(raw, dict):
        raise PolicyFileError(f"{p}: a policy file holds a mapping of fields")
    return policy_from_dict(raw, source=str(p))


def policy_from_dict(raw: dict[str, Any], *, source: str = "policy") -> Policy:
    """Build a policy from plain data, starting from the preset named in ``extends``."""
    raw = dict(raw)
    base_name = raw.pop("extends", None)
    base: dict[str, Any] = {}
    if base_name is not None:
        if base_name not in PRESETS:
            raise PolicyFileError(f"{source}: extends: unknown preset {base_name!r}; use one of {', '.join(PRESETS)}")
        base = PRESETS[base_name].model_dump(exclude_defaults=True)
        if "weights" in raw and "weights" in base:
            raw["weights"] = base["weights"] | raw["weights"]
    raw.setdefault("name", Path(source).stem)
    if "profiles_file" in raw:  # measured profiles (router.calibrate), the policy's inline ones over them
        from router.profiles import profiles_from_file

        raw["profiles"] = profiles_from_file(raw.pop("profiles_file"), raw.get("profiles"), policy_source=source)
    try:
        return Policy.model_validate(base | raw)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))
        raise PolicyFileError(f"{source}: {where}") from None


def resolve_policy(policy: Policy | str | Path | None) -> Policy:
    """A Policy from a Policy, a preset name or a file path (None → balanced)."""
    if policy is None:
        return PRESETS["balanced"]
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str) and policy in PRESETS:
        return PRESETS[policy]
    if Path(policy).suffix in (".yaml", ".yml", ".toml"):
        return load_policy(policy)
    raise PolicyFileError(f"unknown policy {policy!r}: use a preset ({', '.join(PRESETS)}) or a .yaml/.toml file")
