"""The policy engine as tables: each filter and its reason, each rule, the chain and what lies beyond it.

Prompt complexity is given outright (``cx``) so that these tables test the engine, not the scorer's
calibration (tests/test_complexity.py covers that); the presets' own table is tests/test_presets.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from policies import PRESETS, CandidateInfo, Policy, PolicyEngine, RoutingContext, load_policy
from policies.complexity import ComplexityFeatures, PromptComplexity, tier_of
from policies.decision import CHAIN_LIMIT
from policies.policy import PolicyFileError, policy_from_dict
from providers.base import Capabilities, Estimate, Plan, Provider, ProviderResponse
from router import AsyncRouter, ImageRequest
from router.geometry import SizeRules, plan_size
from tests.conftest import png

ALL_TASKS = frozenset({"txt2img", "img2img", "inpaint", "control"})
SIMPLE, COMPLEX = 0.1, 0.9  # complexity scores of a plain and a demanding prompt


def cx(score: float) -> PromptComplexity:
    return PromptComplexity(score, tier_of(score), ComplexityFeatures())


def cand(provider: str, model: str, *, cost: str, latency: float, quality: float, kind: str | None = None,
         regions: tuple[str, ...] = ("global",), tasks: frozenset = ALL_TASKS, controls: tuple[str, ...] = (),
         loras: int = 0, max_n: int = 4, request: ImageRequest | None = None, worst: str | None = None,
         **extra: Any) -> CandidateInfo:
    caps = Capabilities(tasks=tasks, regions=frozenset(regions), quality=quality, control_kinds=frozenset(controls),
                        max_controls=len(controls), max_loras=loras, max_n=max_n,
                        sizes=SizeRules(multiple=64, max_side=2048))
    req = request or ImageRequest(prompt="x")
    size = plan_size(req.width, req.height, req.aspect_ratio, caps.sizes)
    estimate = Estimate(Decimal(cost), latency, max_cost_usd=Decimal(worst) if worst else None)
    return CandidateInfo(provider, kind or provider, model, caps, Plan(size, (size.warning,) if size.warning else ()),
                         estimate, **extra)


def fleet(request: ImageRequest | None = None) -> list[CandidateInfo]:
    """A cheap fast hosted model, a premium hosted one with an EU host, and a local GPU with ControlNet + LoRA."""
    return [
        cand("fastflux", "schnell", cost="0.003", latency=3.0, quality=0.5, regions=("global", "us"),
             request=request, position=0),
        cand("premium", "pro", cost="0.04", latency=12.0, quality=0.9, regions=("global", "eu"), request=request,
             position=1),
        cand("local", "sdxl", cost="0", latency=8.0, quality=0.65, regions=("local",),
             controls=("canny", "depth", "pose"), loras=4, request=request, position=2),
    ]


def decide(policy: Policy | str, request: ImageRequest, cands: Sequence[CandidateInfo], *, score: float = SIMPLE,
           context: RoutingContext | None = None) -> Any:
    pol = PRESETS[policy] if isinstance(policy, str) else policy
    return PolicyEngine(pol).decide(request, cands, context, complexity=cx(score))


def providers(decision: Any) -> list[str]:
    return [c.provider for c in decision.chain]


QUALITY_RULE = Policy(name="complexity-rule", rules=({"when": {"complexity_gte": 0.7},
                                                      "then": {"quality_floor": "high"}},))

CASES = [
    # (name, policy, complexity, request kwargs, expected chain of providers)
    ("simple prompt → cheap and fast first", "balanced", SIMPLE, {}, ["fastflux", "local", "premium"]),
    ("complex prompt → the strong model first", "balanced", COMPLEX, {}, ["premium", "local", "fastflux"]),
    ("complexity rule sets a high quality floor", QUALITY_RULE, COMPLEX, {}, ["premium"]),
    ("EU residency", "balanced", SIMPLE, {"residency": {"eu"}}, ["premium"]),
    ("EU or local residency", "balanced", SIMPLE, {"residency": {"eu", "local"}}, ["local", "premium"]),
    ("controls need a ControlNet", "balanced", SIMPLE, {"controls": [{"kind": "canny", "image": png()}]},
     ["local"]),
    ("LoRA needs LoRA support", "balanced", SIMPLE, {"loras": [{"ref": "style.safetensors"}]}, ["local"]),
    ("cost cap drops the dear model", "quality", COMPLEX, {"max_cost_usd": Decimal("0.01")}, ["local", "fastflux"]),
    ("latency cap", "balanced", SIMPLE, {"max_latency_s": 5}, ["fastflux"]),
    ("deny list", "balanced", SIMPLE, {"deny_providers": {"fastflux"}}, ["local", "premium"]),
    ("allow list", "balanced", SIMPLE, {"allow_providers": {"premium"}}, ["premium"]),
    ("provider pin", "balanced", SIMPLE, {"provider": "local"}, ["local"]),
    ("quality floor from the request", "balanced", SIMPLE, {"quality_floor": "medium"}, ["local", "premium"]),
    ("n above a model's limit", "balanced", SIMPLE, {"n": 6}, []),
    ("the policy's residency meets the request's", "private", SIMPLE, {"residency": {"local", "eu"}}, ["local"]),
    ("residencies that do not overlap leave nothing", "private", SIMPLE, {"residency": {"eu"}}, []),
]


@pytest.mark.parametrize(("name", "policy", "score", "kwargs", "expected"), CASES, ids=[c[0] for c in CASES])
def test_routing_table(name: str, policy: Policy | str, score: float, kwargs: dict, expected: list[str]) -> None:
    request = ImageRequest.from_kwargs("a prompt", **kwargs)
    decision = decide(policy, request, fleet(request), score=score)
    assert providers(decision) == expected, decision.explain()
    rejected = {r.provider for r in decision.rejections}
    assert rejected == {"fastflux", "premium", "local"} - set(expected)
    assert all(r.reason for r in decision.rejections)
    if not expected and "residency" in kwargs:
        assert "allows only no region (the policy's and its residency do not overlap)" in decision.explain()


# --- every filter: its code and its reason -------------------------------------------------------------------

ONE: dict[str, Any] = {"cost": "0.003", "latency": 3.0, "quality": 0.5, "regions": ("us",)}
FILTERS = [
    # (code, request kwargs, candidate overrides, policy, context, a fragment of the reason)
    ("pinned", {"provider": "other"}, {}, "balanced", None, "pins provider 'other'"),
    ("not-allowed", {"allow_providers": {"other"}}, {}, "balanced", None, "not in allow_providers (other)"),
    ("denied", {"deny_providers": {"fastflux"}}, {}, "balanced", None, "denied by the request"),
    ("denied", {}, {}, Policy(name="no-ff", deny=frozenset({"fastflux"})), None, "denied by the policy"),
    ("not-configured", {}, {"configuration_problem": "not configured: set FASTFLUX_KEY"}, "balanced", None,
     "set FASTFLUX_KEY"),
    ("capability", {"init_image": png(), "mask_image": png()}, {"tasks": frozenset({"txt2img"})}, "balanced", None,
     "does not do inpaint"),
    ("capability", {"controls": [{"kind": "canny", "image": png()}], "init_image": png()},
     {"tasks": frozenset({"txt2img", "control"}), "controls": ("canny",)}, "balanced", None,
     "does not combine control with img2img"),
    ("capability", {"controls": [{"kind": "canny", "image": png()}]}, {}, "balanced", None, "no ControlNet for canny"),
    ("capability", {"controls": [{"kind": "canny", "image": png()}]}, {"tasks": frozenset({"txt2img"})}, "balanced",
     None, "does not do control"),
    ("capability", {"controls": [{"kind": "canny", "image": png()}, {"kind": "canny", "image": png()}]},
     {"controls": ("canny",)}, "balanced", None, "takes at most 1 controls"),
    ("capability", {"loras": [{"ref": "a.safetensors"}]}, {}, "balanced", None, "takes no LoRA"),
    ("capability", {"loras": [{"ref": "a.safetensors"}, {"ref": "b.safetensors"}]}, {"loras": 1}, "balanced", None,
     "takes at most 1 LoRAs"),
    ("capability", {"n": 3}, {"max_n": 2}, "balanced", None, "makes at most 2 images per request, 3 asked"),
    ("capability", {"n": 3, "loras": [{"ref": "a.safetensors"}]}, {"max_n": 2, "loras": 1}, "balanced", None,
     "makes at most 2 images per request, 3 asked"),
    ("size", {"width": 1000, "height": 1000, "size_mode": "exact"}, {}, "balanced", None, "cannot make the exact"),
    ("strict", {"negative_prompt": "blurry", "strict": True}, {"plan_warnings": ("negative_prompt ignored",)},
     "balanced", None, "would adapt the request: negative_prompt ignored"),
    ("residency", {"residency": {"eu"}}, {}, "balanced", None, "serves regions us; the request allows only eu"),
    ("quality-floor", {"quality_floor": "high"}, {}, "balanced", None, "quality 0.50 is below the floor 0.85"),
    ("cost-cap", {"max_cost_usd": Decimal("0.001")}, {}, "balanced", None, "estimated $0.003 is over max_cost_usd"),
    ("cost-cap", {"max_cost_usd": Decimal("0.01")}, {"worst": "0.02"}, "balanced", None,
     "estimated $0.02 is over"),  # the vendor's bound, not the expected bill, is what must fit
    ("latency-cap", {"max_latency_s": 2}, {}, "balanced", None, "expected 3.0s is over max_latency_s 2.0s"),
    ("budget", {}, {}, "balanced", RoutingContext(Decimal("0.001")), "over the budget headroom $0.001"),
    ("circuit-open", {}, {"circuit_open": True}, "balanced", None, "circuit breaker"),
]


@pytest.mark.parametrize(("code", "kwargs", "overrides", "policy", "context", "fragment"), FILTERS,
                         ids=[f"{f[0]}-{f[5][:24]}" for f in FILTERS])
def test_every_filter_rejects_with_its_code_and_reason(code: str, kwargs: dict, overrides: dict,
                                                        policy: Policy | str, context: RoutingContext | None,
                                                        fragment: str) -> None:
    request = ImageRequest.from_kwargs("a prompt", **kwargs)
    overrides = dict(overrides)
    warnings = overrides.pop("plan_warnings", None)
    c = cand("fastflux", "schnell", request=request, **(ONE | overrides))
    if warnings:
        c = replace(c, plan=Plan(c.plan.size, warnings))
    decision = decide(policy, request, [c], context=context)
    assert decision.chain == [] and decision.beyond == []
    assert [r.code for r in decision.rejections] == [code]
    assert fragment in decision.rejections[0].reason
    assert f"[{code}] {decision.rejections[0].reason}" in decision.explain()


def test_the_first_reason_in_the_documented_order_is_the_one_reported() -> None:
    request = ImageRequest.from_kwargs("a prompt", provider="other", residency={"eu"}, max_cost_usd=Decimal("0"))
    c = cand("fastflux", "schnell", request=request, configuration_problem="not configured: set X", **ONE)
    assert [r.code for r in decide("balanced", request, [c]).rejections] == ["pinned"]
    request = ImageRequest.from_kwargs("a prompt", residency={"eu"}, max_cost_usd=Decimal("0"), n=9)
    assert [r.code for r in decide("balanced", request, [replace(c, configuration_problem=None)]).rejections] == [
        "capability"]


def test_a_candidate_that_passes_every_filter_is_accepted_at_every_boundary() -> None:
    """Each limit is inclusive: a candidate exactly at it stays."""
    request = ImageRequest.from_kwargs("a prompt", max_cost_usd=Decimal("0.003"), max_latency_s=3.0, n=4,
                                       quality_floor="low", residency={"us"}, allow_providers={"fastflux"},
                                       provider="fastflux")
    c = cand("fastflux", "schnell", cost="0.003", latency=3.0, quality=0.3, regions=("us",), max_n=4)
    decision = decide("balanced", request, [c], context=RoutingContext(Decimal("0.003")))
    assert providers(decision) == ["fastflux"] and decision.rejections == []


# --- rules ------------------------------------------------------------------------------------------------

RULES = [
    # (name, rule, complexity, request kwargs, expected chain, applied?)
    ("no rule", None, SIMPLE, {}, ["fastflux", "local", "premium"], False),
    ("a rule that does not match changes nothing", {"when": {"complexity_gte": 0.7}, "then": {"quality_floor": "high"}},
     SIMPLE, {}, ["fastflux", "local", "premium"], False),
    ("quality floor", {"when": {"complexity_gte": 0.7}, "then": {"quality_floor": "high"}}, COMPLEX, {}, ["premium"],
     True),
    ("prefer", {"when": {"tag": "gpu"}, "then": {"prefer": ["local"]}}, SIMPLE, {"tags": {"gpu"}},
     ["local", "fastflux", "premium"], True),
    ("avoid", {"when": {"tag": "gpu"}, "then": {"avoid": ["fastflux"]}}, SIMPLE, {"tags": {"gpu"}},
     ["local", "premium", "fastflux"], True),
    ("residency", {"when": {"tag": "client-eu"}, "then": {"residency": ["eu", "local"]}}, SIMPLE,
     {"tags": {"client-eu"}}, ["local", "premium"], True),
    ("rule cost cap", {"when": {"tier": "low"}, "then": {"max_cost_usd": "0.01"}}, SIMPLE, {}, ["local", "fastflux"],
     True),
    ("a rule cost cap of 0 is a cap", {"when": {}, "then": {"max_cost_usd": "0"}}, SIMPLE, {}, ["local"], True),
    ("the lower of the rule's and the request's caps", {"when": {}, "then": {"max_cost_usd": "0.05"}}, SIMPLE,
     {"max_cost_usd": Decimal("0.001")}, ["local"], True),
    ("rule weights", {"when": {"tier": "low"}, "then": {"weights": {"cost": 0, "latency": 0, "quality": 5}}}, SIMPLE,
     {}, ["premium", "local", "fastflux"], True),
]


@pytest.mark.parametrize(("name", "rule", "score", "kwargs", "expected", "applied"), RULES, ids=[r[0] for r in RULES])
def test_rules_table(name: str, rule: dict | None, score: float, kwargs: dict, expected: list[str],
                     applied: bool) -> None:
    policy = policy_from_dict({"extends": "balanced", "rules": [rule] if rule else []}, source="rules")
    request = ImageRequest.from_kwargs("a prompt", **kwargs)
    decision = decide(policy, request, fleet(request), score=score)
    assert providers(decision) == expected, decision.explain()
    assert bool(decision.rules_applied) == applied
    if applied:
        assert decision.rules_applied == [policy.rules[0].describe()]
        assert decision.rules_applied[0] in decision.explain()


def test_a_rule_cost_cap_is_a_cost_cap_rejection_that_names_it() -> None:
    policy = policy_from_dict({"extends": "balanced", "rules": [{"when": {}, "then": {"max_cost_usd": "0.01"}}]})
    decision = decide(policy, ImageRequest(prompt="x"), fleet())
    assert [(r.provider, r.code) for r in decision.rejections] == [("premium", "cost-cap")]
    assert "over max_cost_usd $0.01" in decision.rejections[0].reason


def test_rule_weights_show_in_the_terms() -> None:
    policy = policy_from_dict({"extends": "balanced", "rules": [{"when": {}, "then": {"weights": {"cost": 0}}}]})
    decision = decide(policy, ImageRequest(prompt="x"), fleet())
    assert {c.terms["cost"] for c in decision.chain} == {0.0}
    assert decision.chain[0].terms["latency"] == PRESETS["balanced"].weights.latency


WHEN = [
    # (condition, request kwargs, complexity, matches)
    ({"complexity_gte": 0.5}, {}, 0.5, True),
    ({"complexity_gte": 0.5}, {}, 0.49, False),
    ({"complexity_lt": 0.5}, {}, 0.49, True),
    ({"complexity_lt": 0.5}, {}, 0.5, False),
    ({"tier": "high"}, {}, COMPLEX, True),
    ({"tier": "high"}, {}, SIMPLE, False),
    ({"task": ["img2img"]}, {"init_image": png()}, SIMPLE, True),
    ({"task": ["img2img"]}, {}, SIMPLE, False),
    ({"has_controls": True}, {"controls": [{"kind": "canny", "image": png()}]}, SIMPLE, True),
    ({"has_controls": True}, {}, SIMPLE, False),
    ({"has_controls": False}, {}, SIMPLE, True),
    ({"has_loras": True}, {"loras": [{"ref": "a.safetensors"}]}, SIMPLE, True),
    ({"has_loras": True}, {}, SIMPLE, False),
    ({"tag": "team-a"}, {"tags": {"team-a"}}, SIMPLE, True),
    ({"tag": "team-a"}, {"tags": {"team-b"}}, SIMPLE, False),
    ({"tier": "low", "tag": "team-a"}, {"tags": {"team-a"}}, SIMPLE, True),
    ({"tier": "low", "tag": "team-a"}, {"tags": {"team-a"}}, COMPLEX, False),  # every condition must hold
]


@pytest.mark.parametrize(("when", "kwargs", "score", "matches"), WHEN,
                         ids=[f"{w}-{m}" for w, _, _, m in WHEN])
def test_rule_conditions(when: dict, kwargs: dict, score: float, matches: bool) -> None:
    policy = policy_from_dict({"extends": "balanced", "rules": [{"when": when, "then": {"prefer": ["premium"]}}]})
    request = ImageRequest.from_kwargs("a prompt", **kwargs)
    decision = decide(policy, request, fleet(request), score=score)
    assert bool(decision.rules_applied) == matches
    premium = next((c for c in decision.chain if c.provider == "premium"), None)
    if premium is not None:
        assert premium.terms["preference"] == (1.0 if matches else 0.0)


# --- the chain, and what lies beyond it ----------------------------------------------------------------------

def many(count: int) -> list[CandidateInfo]:
    """``count`` candidates, each a little dearer and slower than the one before."""
    return [cand(f"p{i}", "m", cost=f"0.00{i}", latency=2.0 + i, quality=0.6, position=i) for i in range(count)]


@pytest.mark.parametrize(("max_chain", "count", "chain", "beyond"), [(2, 6, 2, 4), (4, 4, 4, 0), (4, 9, 4, 5),
                                                                    (1, 1, 1, 0)])
def test_the_chain_limit_bounds_what_is_tried_and_the_rest_is_listed(max_chain: int, count: int, chain: int,
                                                                     beyond: int) -> None:
    pol = Policy(name="limited", max_chain=max_chain)
    decision = decide(pol, ImageRequest(prompt="x"), many(count))
    assert len(decision.chain) == chain and len(decision.beyond) == beyond
    assert [c.provider for c in decision.ranked] == [f"p{i}" for i in range(count)]  # every accepted one, in order
    assert decision.max_chain == max_chain
    text = decision.explain()
    data = json.loads(decision.to_json())
    assert [c["rank"] for c in data["chain"]] == list(range(1, chain + 1))
    assert [(c["provider"], c["rank"], c["status"]) for c in data["beyond"]] == [
        (f"p{i}", i + 1, CHAIN_LIMIT) for i in range(chain, count)]
    assert (f"{CHAIN_LIMIT}, max_chain {max_chain}:" in text) == bool(beyond)
    for i in range(count):
        assert f"  {i + 1}. p{i}/m  score" in text
    if beyond:
        assert text.index(CHAIN_LIMIT) > text.index(f"{chain}. p{chain - 1}/m")


def test_the_chain_limit_of_the_presets_keeps_the_whole_ranking() -> None:
    cands = many(9)
    decision = decide("balanced", ImageRequest(prompt="x"), cands)
    assert len(decision.chain) == PRESETS["balanced"].max_chain == 4
    assert {c.provider for c in decision.ranked} == {c.provider for c in cands}
    assert all(b.score <= a.score for a, b in zip(decision.ranked, decision.ranked[1:], strict=False))


def test_rejected_terms_and_the_ranking_beyond_the_chain_are_built_when_read() -> None:
    """Deciding scores the accepted candidates only; explain() fills in the rest."""
    seen: list[str] = []

    def counting_fit(c: CandidateInfo, complexity: PromptComplexity) -> float:
        seen.append(c.provider)
        return 1.0

    cands = [*many(6), cand("eu-only", "m", cost="0", latency=1, quality=0.9, regions=("eu",), position=9)]
    engine = PolicyEngine(Policy(name="two", max_chain=2), fit=counting_fit)
    decision = engine.decide(ImageRequest.from_kwargs("x", residency={"global"}), cands, complexity=cx(SIMPLE))
    assert "eu-only" not in seen and set(seen) == {f"p{i}" for i in range(6)}
    decision.explain()
    assert "eu-only" in seen
    assert decision.rejections[0].terms["fit"] == PRESETS["balanced"].weights.fit  # the replaced fit, weighted


def test_fit_is_a_replaceable_function_of_the_candidate_and_the_complexity() -> None:
    def prefers_low_quality(c: CandidateInfo, complexity: PromptComplexity) -> float:
        return 1.0 - c.quality

    engine = PolicyEngine(PRESETS["quality"], fit=prefers_low_quality)
    decision = engine.decide(ImageRequest(prompt="x"), fleet(), complexity=cx(COMPLEX))
    assert {c.provider: round(c.terms["fit"], 3) for c in decision.chain} == {
        "fastflux": 0.25, "premium": 0.05, "local": 0.175}


# --- dry runs at the engine -----------------------------------------------------------------------------------

def test_a_dry_run_ranks_unconfigured_candidates_and_marks_them() -> None:
    keyless = [replace(c, configuration_problem=f"not configured: set {c.provider.upper()}_KEY")
               if c.provider != "local" else c for c in fleet()]
    request = ImageRequest(prompt="x")
    real = decide("balanced", request, keyless)
    dry = decide("balanced", request, keyless, context=RoutingContext(assume_configured=True))
    assert providers(real) == ["local"] and {r.code for r in real.rejections} == {"not-configured"}
    assert providers(dry) == ["fastflux", "local", "premium"] and dry.rejections == [] and dry.dry_run
    assert dry.not_configured == {"fastflux": "not configured: set FASTFLUX_KEY",
                                  "premium": "not configured: set PREMIUM_KEY"}
    assert [c.provider for c in dry.configured_chain] == ["local"]  # what generate would walk
    text = dry.explain()
    assert text.splitlines()[0].startswith("dry run: 2 provider(s) not configured (fastflux, premium)")
    assert "with the configuration as it is now: local/sdxl first" in text
    assert "not configured: set PREMIUM_KEY" in text
    data = json.loads(dry.to_json())
    assert data["dry_run"] is True and data["configured_chain"] == ["local/sdxl"]
    assert [c["configuration_problem"] for c in data["chain"]] == [
        "not configured: set FASTFLUX_KEY", None, "not configured: set PREMIUM_KEY"]


def test_a_dry_runs_configured_chain_is_the_real_decisions_chain() -> None:
    """Scores are relative to the candidates compared, so the configured chain is ranked on its own."""
    cands = [replace(c, configuration_problem="not configured: set X") if c.provider == "local" else c
             for c in fleet()]
    request = ImageRequest(prompt="x")
    real = decide("balanced", request, cands)
    dry = decide("balanced", request, cands, context=RoutingContext(assume_configured=True))
    assert [(c.provider, c.score) for c in dry.configured_chain] == [(c.provider, c.score) for c in real.chain]
    assert dry.configured_chain[0].score != next(c.score for c in dry.chain if c.provider == "fastflux")


# --- the rest ------------------------------------------------------------------------------------------------

def test_budget_headroom_rejects_what_would_overspend() -> None:
    request = ImageRequest(prompt="x")
    decision = decide("balanced", request, fleet(), context=RoutingContext(Decimal("0.01")))
    # $0 against $0.003 is the whole cost scale between the two left: local's cost term outweighs fastflux's speed
    assert providers(decision) == ["local", "fastflux"]
    assert [(r.provider, r.code) for r in decision.rejections] == [("premium", "budget")]


def test_observed_latency_overrides_the_prior() -> None:
    slow = [replace(c, observed_latency_s=30.0) if c.provider == "fastflux" else c for c in fleet()]
    decision = decide("fastest", ImageRequest(prompt="x"), slow)
    assert decision.chain[0].provider == "local"
    fastflux = next(c for c in decision.chain if c.provider == "fastflux")
    assert fastflux.latency_source == "observed" and fastflux.expected_latency_s == 30.0
    assert "30.0s (observed)" in decision.explain()


def test_fallback_order_comes_before_scores() -> None:
    pol = Policy(name="ordered", fallback_order=("premium", "local"))
    decision = decide(pol, ImageRequest(prompt="x"), fleet())
    assert providers(decision) == ["premium", "local", "fastflux"]


def test_decisions_are_deterministic_and_ties_break_by_registration_order() -> None:
    twins = [cand("b", "m", cost="0.01", latency=5, quality=0.5, position=0),
             cand("a", "m", cost="0.01", latency=5, quality=0.5, position=1)]
    engine = PolicyEngine(PRESETS["balanced"])
    chains = {tuple(providers(engine.decide(ImageRequest(prompt="x"), twins, complexity=cx(SIMPLE))))
              for _ in range(20)}
    assert chains == {("b", "a")}


def test_explain_lists_terms_and_json_round_trips() -> None:
    decision = decide("balanced", ImageRequest.from_kwargs("x", residency={"eu"}), fleet(), score=COMPLEX)
    text = decision.explain()
    assert "premium/pro" in text and "cost=" in text and "fit=" in text and "[residency]" in text
    assert "dry run" not in text  # nothing unconfigured, nothing to say
    data = json.loads(decision.to_json())
    assert data["chain"][0]["provider"] == "premium" and data["order"] == "score" and data["dry_run"] is False
    assert {r["provider"] for r in data["rejections"]} == {"fastflux", "local"}
    assert all(set(r["terms"]) == {"cost", "latency", "fit", "quality", "preference"} for r in data["rejections"])


def test_policy_files_yaml_and_toml(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "extends: balanced\nweights: {cost: 0.9}\nrules:\n"
        "  - when: {complexity_gte: 0.7}\n    then: {quality_floor: high}\n"
        "fallback_order: [premium]\nbudgets:\n  - {limit_usd: 5, period: day, tag: team-a}\n")
    (tmp_path / "p.toml").write_text(
        'extends = "cheapest"\nprefer = ["local"]\n[[budgets]]\nlimit_usd = "2.50"\nperiod = "month"\n')
    y = load_policy(tmp_path / "p.yaml")
    assert y.name == "p" and y.weights.cost == 0.9 and y.weights.fit == 1.0
    assert y.rules[0].then.quality_floor == "high" and y.budgets[0].tag == "team-a"
    t = load_policy(tmp_path / "p.toml")
    assert t.prefer == ("local",) and t.budgets[0].limit_usd == Decimal("2.50") and t.weights.cost == 1.0


def test_a_bad_policy_file_names_the_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("weights: {cost: -1}\n")
    with pytest.raises(PolicyFileError, match=r"bad.yaml: weights.cost"):
        load_policy(bad)
    with pytest.raises(PolicyFileError, match="unknown preset"):
        policy_from_dict({"extends": "nope"})


# --- the facts the engine reads: gathered once per request ---------------------------------------------------

class CountingProvider(Provider):
    """A provider whose estimate() plans again, as most adapters' do; it counts every call."""

    kind = "counting"

    def __init__(self, name: str, models: Sequence[str] = ("a", "b")) -> None:
        super().__init__(name=name)
        self._models = tuple(models)
        self.calls: dict[str, int] = {"plan": 0, "capabilities": 0, "estimate": 0}

    def models(self) -> Sequence[str]:
        return self._models

    def capabilities(self, model: str) -> Capabilities:
        self.calls["capabilities"] += 1
        return Capabilities(tasks=frozenset({"txt2img"}), quality=0.5 if model == "a" else 0.8)

    def plan(self, request: ImageRequest, model: str) -> Plan:
        self.calls["plan"] += 1
        return super().plan(request, model)

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        self.calls["estimate"] += 1
        size = self.plan(request, model).size
        self.last_estimated = model  # state an estimate writes lands on the provider itself
        return Estimate(Decimal(size.width * size.height) / Decimal(10**8), 2.0)

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        raise NotImplementedError


def test_candidates_plan_each_model_once_and_leave_the_provider_as_it_was() -> None:
    one, two = CountingProvider("one"), CountingProvider("two", ("c",))
    before = (type(one), dict(vars(one)))
    router = AsyncRouter([one, two], ledger=":memory:")
    request = ImageRequest(prompt="x", width=512, height=512)
    cands = router.candidates(request)
    assert [(c.provider, c.model) for c in cands] == [("one", "a"), ("one", "b"), ("two", "c")]
    assert one.calls == {"plan": 2, "capabilities": 2, "estimate": 2}  # one of each per model, not two plans
    assert two.calls == {"plan": 1, "capabilities": 1, "estimate": 1}
    assert [c.estimate.cost_usd for c in cands] == [Decimal("0.00262144")] * 3
    assert type(one) is before[0] and one.last_estimated == "b"
    assert set(vars(one)) == set(before[1]) | {"last_estimated"}
    router.candidates(request)
    assert one.calls["plan"] == 4  # a new request plans again: nothing is kept between requests
    one.plan(request, "a")
    assert one.calls["plan"] == 5  # and outside routing the provider is called as it is
    router.route(request)
    assert one.calls["plan"] == 7  # a dry run gathers the same facts the same way


class Sealed(CountingProvider):
    """A provider class that refuses subclasses: routed as it is, without the plan memo."""

    def __init_subclass__(cls, **kw: Any) -> None:
        raise TypeError("Sealed takes no subclasses")


def test_a_provider_class_that_refuses_subclasses_is_routed_without_the_memo() -> None:
    sealed = Sealed("sealed", ("a",))
    router = AsyncRouter([sealed], ledger=":memory:")
    cands = router.candidates(ImageRequest(prompt="x", width=512, height=512))
    assert [c.estimate.cost_usd for c in cands] == [Decimal("0.00262144")]
    assert sealed.calls == {"plan": 2, "capabilities": 3, "estimate": 1}  # planned again inside estimate()


def test_a_lora_file_on_this_machine_is_never_routed_to_a_hosted_backend() -> None:
    from providers.local.provider import LocalProvider
    from providers.replicate import ReplicateProvider
    from router import Router

    local = LocalProvider({"xl": {"path": "/nowhere", "family": "sdxl"}}, device="cpu")
    router = Router([ReplicateProvider(api_token="r8-test"), local], ledger=":memory:")
    by_file = router.route("a cat", loras=[{"ref": "/srv/loras/style.safetensors", "weight": 0.7}])
    assert {c.provider for c in by_file.chain} == {"local"}
    reasons = [r.reason for r in by_file.rejections if r.provider == "replicate" and r.code == "capability"]
    assert any("is a file on this machine" in r for r in reasons)
    by_url = router.route("a cat", loras=[{"ref": "https://example.invalid/style.safetensors", "weight": 0.7}])
    assert "replicate" in {c.provider for c in by_url.chain}  # a URL the vendor fetches may go to the vendor
    router.close()


def test_embeddings_and_ip_adapters_route_only_to_backends_that_take_them() -> None:
    from providers.local.provider import LocalProvider
    from providers.openai import OpenAIProvider
    from router import Router
    from tests.conftest import png

    local = LocalProvider({"xl": {"path": "/nowhere", "family": "sdxl"},
                           "flux": {"path": "/nowhere", "family": "flux"}}, device="cpu")
    router = Router([OpenAIProvider(api_key="sk-test"), local], ledger=":memory:")
    emb = router.route("a <style> cat", embeddings=[{"ref": "/emb/style.safetensors", "token": "<style>"}])
    assert [(c.provider, c.model) for c in emb.chain] == [("local", "xl")]
    why = {(r.provider, r.model): r.reason for r in emb.rejections}
    assert why[("openai", "gpt-image-2")] == why[("local", "flux")] == "takes no textual-inversion embeddings"
    ip = router.route("a cat", ip_adapter={"ref": "/ip/ip.safetensors", "image": png(), "scale": 0.6})
    assert [(c.provider, c.model) for c in ip.chain] == [("local", "xl")]
    assert {(r.provider, r.model): r.reason for r in ip.rejections}[("local", "flux")] == "takes no IP-Adapter"
    router.close()
