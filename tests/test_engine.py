"""The policy engine as a table: each routing case and the chain it must produce."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from policies import PRESETS, CandidateInfo, Policy, PolicyEngine, RoutingContext, load_policy
from policies.policy import PolicyFileError, policy_from_dict
from providers.base import Capabilities, Estimate, Plan
from router import ImageRequest
from router.geometry import SizeRules, plan_size
from tests.conftest import png

ALL_TASKS = frozenset({"txt2img", "img2img", "inpaint", "control"})


def cand(provider: str, model: str, *, cost: str, latency: float, quality: float, kind: str | None = None,
         regions: tuple[str, ...] = ("global",), tasks: frozenset = ALL_TASKS, controls: tuple[str, ...] = (),
         loras: int = 0, max_n: int = 4, request: ImageRequest | None = None, **extra: Any) -> CandidateInfo:
    caps = Capabilities(tasks=tasks, regions=frozenset(regions), quality=quality, control_kinds=frozenset(controls),
                        max_controls=len(controls), max_loras=loras, max_n=max_n,
                        sizes=SizeRules(multiple=64, max_side=2048))
    req = request or ImageRequest(prompt="x")
    size = plan_size(req.width, req.height, req.aspect_ratio, caps.sizes)
    return CandidateInfo(provider, kind or provider, model, caps, Plan(size, (size.warning,) if size.warning else ()),
                         Estimate(Decimal(cost), latency), **extra)


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


SIMPLE = "a photo of a cat"
COMPLEX = "three red apples on a wooden table, a sign that says SALE, oil painting, in the style of Van Gogh"
QUALITY_RULE = Policy(name="complexity-rule", rules=({"when": {"complexity_gte": 0.7},
                                                      "then": {"quality_floor": "high"}},))  # type: ignore[arg-type]

CASES = [
    # (name, policy, request kwargs, expected chain of providers)
    ("simple prompt → cheap and fast first", "balanced", {"prompt": SIMPLE}, ["fastflux", "local", "premium"]),
    ("complex prompt → the strong model first", "balanced", {"prompt": COMPLEX}, ["premium", "local", "fastflux"]),
    ("complexity rule sets a high quality floor", QUALITY_RULE, {"prompt": COMPLEX}, ["premium"]),
    ("cheapest ignores complexity", "cheapest", {"prompt": COMPLEX}, ["local", "fastflux", "premium"]),
    ("fastest", "fastest", {"prompt": SIMPLE}, ["fastflux", "local", "premium"]),
    ("quality", "quality", {"prompt": SIMPLE}, ["premium", "local", "fastflux"]),
    ("local-first", "local-first", {"prompt": SIMPLE}, ["local", "fastflux", "premium"]),
    ("private keeps the request local", "private", {"prompt": COMPLEX}, ["local"]),
    ("EU residency", "balanced", {"prompt": SIMPLE, "residency": {"eu"}}, ["premium"]),
    ("EU or local residency", "balanced", {"prompt": SIMPLE, "residency": {"eu", "local"}}, ["local", "premium"]),
    ("controls need a ControlNet", "balanced", {"prompt": SIMPLE, "controls": [{"kind": "canny", "image": png()}]},
     ["local"]),
    ("LoRA needs LoRA support", "balanced", {"prompt": SIMPLE, "loras": [{"ref": "style.safetensors"}]}, ["local"]),
    ("cost cap drops the dear model", "quality", {"prompt": COMPLEX, "max_cost_usd": Decimal("0.01")},
     ["local", "fastflux"]),
    ("latency cap", "balanced", {"prompt": SIMPLE, "max_latency_s": 5}, ["fastflux"]),
    ("deny list", "balanced", {"prompt": SIMPLE, "deny_providers": {"fastflux"}}, ["local", "premium"]),
    ("allow list", "balanced", {"prompt": SIMPLE, "allow_providers": {"premium"}}, ["premium"]),
    ("provider pin", "balanced", {"prompt": SIMPLE, "provider": "local"}, ["local"]),
    ("quality floor from the request", "balanced", {"prompt": SIMPLE, "quality_floor": "medium"},
     ["local", "premium"]),
    ("n above a model's limit", "balanced", {"prompt": SIMPLE, "n": 6}, []),
]


@pytest.mark.parametrize(("name", "policy", "kwargs", "expected"), CASES, ids=[c[0] for c in CASES])
def test_routing_table(name: str, policy: Policy | str, kwargs: dict, expected: list[str]) -> None:
    prompt = kwargs.pop("prompt")
    request = ImageRequest.from_kwargs(prompt, **kwargs)
    pol = PRESETS[policy] if isinstance(policy, str) else policy
    decision = PolicyEngine(pol).decide(request, fleet(request))
    assert [c.provider for c in decision.chain] == expected, decision.explain()
    rejected = {r.provider for r in decision.rejections}
    assert rejected == {"fastflux", "premium", "local"} - set(expected)
    assert all(r.reason for r in decision.rejections)


def test_complexity_tiers_of_the_table_prompts() -> None:
    from policies.complexity import score_prompt

    assert score_prompt(SIMPLE).tier == "low"
    assert score_prompt(COMPLEX).tier == "high"


@pytest.mark.parametrize(
    ("kwargs", "extra", "code"),
    [
        ({"residency": {"eu"}}, {}, "residency"),
        ({"controls": [{"kind": "canny", "image": png()}]}, {}, "capability"),
        ({"max_cost_usd": Decimal("0.001")}, {}, "cost-cap"),
        ({}, {"configuration_problem": "not configured: set FASTFLUX_KEY"}, "not-configured"),
        ({}, {"circuit_open": True}, "circuit-open"),
        ({"deny_providers": {"fastflux"}}, {}, "denied"),
        ({"width": 1000, "height": 1000, "size_mode": "exact"}, {}, "size"),
        ({"negative_prompt": "blurry", "strict": True}, {}, "strict"),
    ],
)
def test_every_rejection_has_a_code_and_reason(kwargs: dict, extra: dict, code: str) -> None:
    request = ImageRequest.from_kwargs(SIMPLE, **kwargs)
    c = cand("fastflux", "schnell", cost="0.003", latency=3, quality=0.5, regions=("us",), request=request, **extra)
    if code == "strict":
        c = replace(c, plan=Plan(c.plan.size, ("negative_prompt ignored: fastflux/schnell does not take it",)))
    decision = PolicyEngine(PRESETS["balanced"]).decide(request, [c])
    assert decision.chain == []
    assert [r.code for r in decision.rejections] == [code]
    assert code in decision.explain() and decision.rejections[0].reason in decision.explain()


def test_budget_headroom_rejects_what_would_overspend() -> None:
    request = ImageRequest(prompt=SIMPLE)
    decision = PolicyEngine(PRESETS["balanced"]).decide(request, fleet(), RoutingContext(Decimal("0.01")))
    assert [c.provider for c in decision.chain] == ["fastflux", "local"]
    assert [(r.provider, r.code) for r in decision.rejections] == [("premium", "budget")]


def test_observed_latency_overrides_the_prior() -> None:
    request = ImageRequest(prompt=SIMPLE)
    slow = [replace(c, observed_latency_s=30.0) if c.provider == "fastflux" else c for c in fleet()]
    decision = PolicyEngine(PRESETS["fastest"]).decide(request, slow)
    assert decision.chain[0].provider == "local"
    assert {c.provider: c.latency_source for c in decision.chain}["fastflux"] == "observed"


def test_fallback_order_comes_before_scores() -> None:
    pol = Policy(name="ordered", fallback_order=("premium", "local"))
    decision = PolicyEngine(pol).decide(ImageRequest(prompt=SIMPLE), fleet())
    assert [c.provider for c in decision.chain] == ["premium", "local", "fastflux"]


def test_rule_prefers_local_for_controls_and_is_explained() -> None:
    pol = policy_from_dict({"extends": "cheapest", "rules": [
        {"when": {"has_loras": True}, "then": {"prefer": ["local"]}}]})
    request = ImageRequest(prompt=SIMPLE, loras=[{"ref": "a.safetensors", "weight": 0.5}])
    decision = PolicyEngine(pol).decide(request, fleet(request))
    assert decision.chain[0].provider == "local"
    assert "has_loras=True" in decision.explain()


def test_decisions_are_deterministic_and_ties_break_by_registration_order() -> None:
    twins = [cand("b", "m", cost="0.01", latency=5, quality=0.5, position=0),
             cand("a", "m", cost="0.01", latency=5, quality=0.5, position=1)]
    engine = PolicyEngine(PRESETS["balanced"])
    chains = {tuple(c.provider for c in engine.decide(ImageRequest(prompt=SIMPLE), twins).chain) for _ in range(20)}
    assert chains == {("b", "a")}


def test_explain_lists_terms_and_json_round_trips() -> None:
    import json

    decision = PolicyEngine(PRESETS["balanced"]).decide(ImageRequest.from_kwargs(COMPLEX, residency={"eu"}), fleet())
    text = decision.explain()
    assert "premium/pro" in text and "cost=" in text and "fit=" in text and "[residency]" in text
    data = json.loads(decision.to_json())
    assert data["chain"][0]["provider"] == "premium"
    assert {r["provider"] for r in data["rejections"]} == {"fastflux", "local"}


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
