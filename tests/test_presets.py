"""The presets as tables: the chain each one orders, `cheapest` and `fastest` as exact orders, and cost and
latency scored against the candidates actually compared (min–max), not against fixed scales."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from policies import PRESETS, CandidateInfo, Policy, PolicyEngine, load_policy
from policies.complexity import ComplexityFeatures, PromptComplexity, tier_of
from policies.policy import PolicyFileError, policy_from_dict
from providers.base import Capabilities, Estimate, Plan
from router import ImageRequest
from router.geometry import SizePlan
from router.request import Task

ALL_TASKS: frozenset[Task] = frozenset({"txt2img", "img2img", "inpaint", "control"})


def cx(score: float) -> PromptComplexity:
    """A prompt complexity given outright, so these tables do not move when the scorer is recalibrated."""
    return PromptComplexity(score, tier_of(score), ComplexityFeatures())


def cand(provider: str, *, cost: str, latency: float, quality: float, model: str = "m", position: int = 0,
         regions: tuple[str, ...] = ("global",), observed: float | None = None, kind: str | None = None,
         **extra: Any) -> CandidateInfo:
    caps = Capabilities(tasks=ALL_TASKS, regions=frozenset(regions), quality=quality, max_n=4)
    return CandidateInfo(provider, kind or provider, model, caps, Plan(SizePlan(1024, 1024)),
                         Estimate(Decimal(cost), latency), observed_latency_s=observed, position=position, **extra)


def fleet() -> list[CandidateInfo]:
    """A cheap fast hosted model, a premium hosted one with an EU host, and a free local GPU."""
    return [
        cand("fastflux", cost="0.003", latency=3.0, quality=0.5, regions=("global", "us"), position=0),
        cand("premium", cost="0.04", latency=12.0, quality=0.9, regions=("global", "eu"), position=1),
        cand("local", cost="0", latency=8.0, quality=0.65, regions=("local",), position=2),
    ]


def decide(policy: Policy | str, cands: list[CandidateInfo], *, score: float = 0.1, **kw: Any) -> Any:
    pol = PRESETS[policy] if isinstance(policy, str) else policy
    request = ImageRequest.from_kwargs("a prompt", **kw)
    return PolicyEngine(pol).decide(request, cands, complexity=cx(score))


LOW, HIGH = 0.1, 0.9

PRESET_CASES = [
    # (preset, complexity score, expected chain)
    ("balanced", LOW, ["fastflux", "local", "premium"]),  # cheap and fast first
    ("balanced", HIGH, ["premium", "local", "fastflux"]),  # fit: the strong model first
    ("cheapest", LOW, ["local", "fastflux", "premium"]),  # $0 < $0.003 < $0.04
    ("cheapest", HIGH, ["local", "fastflux", "premium"]),  # an order: complexity does not move it
    ("fastest", LOW, ["fastflux", "local", "premium"]),  # 3 s < 8 s < 12 s
    ("fastest", HIGH, ["fastflux", "local", "premium"]),
    ("quality", LOW, ["premium", "local", "fastflux"]),
    ("quality", HIGH, ["premium", "local", "fastflux"]),
    ("local-first", LOW, ["local", "fastflux", "premium"]),
    ("local-first", HIGH, ["local", "premium", "fastflux"]),  # preference first, then fit
    ("private", LOW, ["local"]),  # local residency only
    ("private", HIGH, ["local"]),
]


@pytest.mark.parametrize(("preset", "score", "expected"), PRESET_CASES,
                         ids=[f"{p}-{'high' if s > 0.5 else 'low'}" for p, s, _ in PRESET_CASES])
def test_each_preset_orders_the_fleet(preset: str, score: float, expected: list[str]) -> None:
    decision = decide(preset, fleet(), score=score)
    assert [c.provider for c in decision.chain] == expected, decision.explain()
    assert decision.policy == preset and decision.order == PRESETS[preset].order


def test_presets_say_which_are_orders() -> None:
    assert {name: p.order for name, p in PRESETS.items()} == {
        "cheapest": "cost", "fastest": "latency", "balanced": "score", "quality": "score",
        "local-first": "score", "ladder": "ladder", "private": "score"}


# --- exact orders ----------------------------------------------------------------------------------------

EXACT_CASES = [
    # (name, preset, candidates in registration order, request kwargs, expected chain)
    # Measured on the weighted `cheapest`: with n=3 the $0.0081 model (3 s, quality 0.9) scored 1.236
    # against 1.217 for the $0 one (25 s), because the cost term was per image against a $0.05 scale.
    ("cheapest: $0 before $0.0081 for n=3", "cheapest",
     [cand("hosted", cost="0.0081", latency=3.0, quality=0.9, position=0),
      cand("free", cost="0", latency=25.0, quality=0.5, position=1)], {"n": 3}, ["free", "hosted"]),
    # Measured on the weighted `fastest`: 5.72 s at $0 scored 1.109, 4.0 s at $0.04 1.087.
    ("fastest: 4.0 s before 5.72 s", "fastest",
     [cand("free", cost="0", latency=5.72, quality=0.5, position=0),
      cand("quick", cost="0.04", latency=4.0, quality=0.5, position=1)], {}, ["quick", "free"]),
    ("cheapest: equal cost, then the better quality", "cheapest",
     [cand("a", cost="0.01", latency=3.0, quality=0.5, position=0),
      cand("b", cost="0.01", latency=9.0, quality=0.8, position=1)], {}, ["b", "a"]),
    ("cheapest: equal cost and quality, then registration order", "cheapest",
     [cand("b", cost="0.01", latency=9.0, quality=0.5, position=0),
      cand("a", cost="0.01", latency=3.0, quality=0.5, position=1)], {}, ["b", "a"]),
    ("cheapest: total cost, whatever the speed", "cheapest",
     [cand("slow-cheap", cost="0.002", latency=60.0, quality=0.3, position=0),
      cand("fast-dear", cost="0.0021", latency=1.0, quality=1.0, position=1)], {}, ["slow-cheap", "fast-dear"]),
    ("fastest: equal latency, then the cheaper", "fastest",
     [cand("dear", cost="0.05", latency=4.0, quality=0.9, position=0),
      cand("cheap", cost="0.01", latency=4.0, quality=0.5, position=1)], {}, ["cheap", "dear"]),
    ("fastest: observed p50 over the prior", "fastest",
     [cand("fast-prior", cost="0", latency=2.0, quality=0.5, observed=9.0, position=0),
      cand("steady", cost="0", latency=5.0, quality=0.5, position=1)], {}, ["steady", "fast-prior"]),
    # Fixed scales floored every cost above $0.05 per image and every latency above 30 s at 0: a tie,
    # broken by registration order. Min–max over the candidates compared tells them apart.
    ("balanced: $0.06 and $0.50 per image are not a tie", "balanced",
     [cand("dear", cost="0.50", latency=10.0, quality=0.7, position=0),
      cand("cheaper", cost="0.06", latency=10.0, quality=0.7, position=1)], {}, ["cheaper", "dear"]),
    ("balanced: 40 s and 90 s are not a tie", "balanced",
     [cand("slower", cost="0.02", latency=90.0, quality=0.7, position=0),
      cand("slow", cost="0.02", latency=40.0, quality=0.7, position=1)], {}, ["slow", "slower"]),
]


@pytest.mark.parametrize(("name", "preset", "cands", "kwargs", "expected"), EXACT_CASES,
                         ids=[c[0] for c in EXACT_CASES])
def test_exact_orders(name: str, preset: str, cands: list[CandidateInfo], kwargs: dict[str, Any],
                      expected: list[str]) -> None:
    decision = decide(preset, cands, score=0.5, **kwargs)
    assert [c.provider for c in decision.chain] == expected, decision.explain()


def test_cheapest_keeps_a_policy_files_preferences_ahead_of_cost() -> None:
    pol = policy_from_dict({"extends": "cheapest", "prefer": ["premium"]})
    assert pol.order == "cost"
    assert [c.provider for c in decide(pol, fleet()).chain] == ["premium", "local", "fastflux"]
    avoid = policy_from_dict({"extends": "fastest", "rules": [{"when": {}, "then": {"avoid": ["fastflux"]}}]})
    assert [c.provider for c in decide(avoid, fleet()).chain] == ["local", "premium", "fastflux"]


def test_fallback_order_comes_before_an_exact_order() -> None:
    pol = policy_from_dict({"extends": "cheapest", "fallback_order": ["premium"]})
    assert [c.provider for c in decide(pol, fleet()).chain] == ["premium", "local", "fastflux"]


# --- min–max terms ---------------------------------------------------------------------------------------

def test_cost_and_latency_terms_run_from_the_best_to_the_worst_compared() -> None:
    cands = [cand("a", cost="0", latency=2.0, quality=0.5, position=0),
             cand("b", cost="0.01", latency=6.0, quality=0.5, position=1),
             cand("c", cost="0.04", latency=10.0, quality=0.5, position=2)]
    w = PRESETS["balanced"].weights
    terms = {c.provider: c.terms for c in decide("balanced", cands).chain}
    assert {p: round(t["cost"], 6) for p, t in terms.items()} == {"a": w.cost, "b": round(w.cost * 0.75, 6), "c": 0}
    assert {p: round(t["latency"], 6) for p, t in terms.items()} == {"a": w.latency, "b": w.latency / 2, "c": 0}
    assert all(c.score == pytest.approx(sum(c.terms.values())) for c in decide("balanced", cands).chain)


def test_candidates_that_cost_the_same_all_get_the_full_cost_term() -> None:
    cands = [cand("a", cost="0.02", latency=5.0, quality=0.5, position=0),
             cand("b", cost="0.02", latency=5.0, quality=0.5, position=1)]
    w = PRESETS["balanced"].weights
    assert [(c.terms["cost"], c.terms["latency"]) for c in decide("balanced", cands).chain] == [
        (w.cost, w.latency), (w.cost, w.latency)]


def test_the_scale_is_the_accepted_candidates_only() -> None:
    accepted = [cand("a", cost="0.01", latency=4.0, quality=0.5, position=0),
                cand("b", cost="0.03", latency=8.0, quality=0.5, position=1)]
    dirt_cheap_but_us_only = cand("us", cost="0", latency=1.0, quality=0.5, regions=("us",), position=2)
    alone = decide("balanced", accepted, residency={"global"})
    beside = decide("balanced", [*accepted, dirt_cheap_but_us_only], residency={"global"})
    assert [r.code for r in beside.rejections] == ["residency"]
    assert [c.terms for c in beside.chain] == [c.terms for c in alone.chain]
    assert beside.chain[0].terms["cost"] == PRESETS["balanced"].weights.cost  # the cheapest accepted, not the $0 one
    assert beside.rejections[0].terms["cost"] == PRESETS["balanced"].weights.cost  # clamped at the best


# --- policy files ----------------------------------------------------------------------------------------

def test_order_in_a_policy_file_and_inherited_from_a_preset(tmp_path: Path) -> None:
    (tmp_path / "by-cost.yaml").write_text("extends: balanced\norder: cost\n")
    (tmp_path / "quick.toml").write_text('extends = "fastest"\nmax_chain = 2\n')
    by_cost, quick = load_policy(tmp_path / "by-cost.yaml"), load_policy(tmp_path / "quick.toml")
    assert by_cost.order == "cost" and quick.order == "latency" and quick.max_chain == 2
    assert [c.provider for c in decide(by_cost, fleet(), score=HIGH).chain] == ["local", "fastflux", "premium"]


@pytest.mark.parametrize("raw", [{"order": "random"}, {"cost_scale_usd": "0.05"}, {"latency_scale_s": 30}])
def test_unknown_orders_and_the_removed_fixed_scales_are_errors(raw: dict[str, Any]) -> None:
    with pytest.raises(PolicyFileError, match=next(iter(raw))):
        policy_from_dict({"extends": "balanced", **raw})
