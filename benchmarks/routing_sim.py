"""A routing simulation: GenEval requests with mixed tasks and constraints, routed by every preset.

    python benchmarks/routing_sim.py [--requests 10000] [--router-requests 2000] [--seed 7] [--out FILE]

What runs, in two passes over the same seeded requests:

1. **Engine pass** (all ``--requests``): for each request the candidates are built once by the real
   ``AsyncRouter.candidates`` over the fleet (every registered provider, real plan/estimate/capabilities/
   profiles), then each preset's ``PolicyEngine.decide`` ranks them. Per preset: the cost of its first
   choice against always-premium, text-skill violations, constraint violations of every chain entry, and
   requests refused although a candidate met every constraint.
2. **Router pass** (the first ``--router-requests``): the real ``AsyncRouter.agenerate`` — retries,
   backoff, fallback, circuit breaker, ledger — over in-process fake providers, on an event loop whose
   clock is simulated (``VirtualLoop``: time jumps to the next timer when nothing is ready, so a 10 s
   generation costs no wall time). Requests arrive as a Poisson stream. Each preset is run healthy, then
   with the provider it served most requests from 100 % down (``error``: every call fails with a 503
   after 0.3 s; ``hang``: every call hangs until the router's attempt timeout).

The fakes are the real provider classes (``providers/``, built through the registry with fake keys and
every base URL on 127.0.0.1) with ``generate`` replaced: it sleeps a simulated latency (lognormal, median
the provider's own latency estimate, sigma ``SIGMA``), fails ``TRANSIENT`` of calls with a 503 when
healthy, and bills the provider's own cost estimate. Nothing opens a socket.

Definitions (also written into the report):

- *always-premium*: for each request, of the candidates that meet every hard constraint of the request
  under that preset, the one with the highest overall quality (the profile's ``overall``), ties to the best
  skill fit for the prompt (``policies.skills.fit``), then to the cheaper: the cheapest way to always buy
  the top quality tier. Costs are the providers' estimates (``Estimate.cost_usd``).
- *text floor*: a request needs text when the simulation added text to render to its prompt (ground
  truth, not the scorer's guess); its floor is the level ``policies.skills.needs`` asks for text: 0.85,
  0.90 for two or more strings. A *skill violation* is a first choice whose profile's text skill is below
  the floor while a candidate meeting every constraint reached it; *unavoidable* when none did.
- *constraint violation*: any chain entry (engine pass) or served model (router pass) that cannot do the
  task, lacks a control kind or enough control/LoRA slots, makes fewer images than asked, cannot make the size
  asked (outside its range), serves none of the allowed regions, or whose worst-case cost
  (``Estimate.worst_usd``) exceeds the request's ``max_cost_usd`` or its budget headroom; in the router pass
  also a bill above ``max_cost_usd``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import math
import os
import platform
import random
import selectors
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from policies import PRESETS, Policy, PolicyEngine, RoutingContext
from policies.complexity import score_prompt
from policies.decision import CandidateInfo
from policies.skills import fit as skill_fit
from policies.skills import needs as skill_needs
from providers.base import Billing, Provider, ProviderResponse
from providers.registry import available_providers, load_provider_class
from router.errors import ImageRouterError, ProviderUnavailable
from router.request import ControlInput, ImageRequest, LoraRef
from router.result import GeneratedImage
from router.router import AsyncRouter

ROOT = Path(__file__).resolve().parents[1]
GENEVAL = ROOT / "tests" / "data" / "geneval" / "evaluation_metadata.jsonl"  # vendored (MIT)
LOOPBACK = "http://127.0.0.1:9"
"""Every fake provider's base URL (the discard port): nothing calls it, and nothing could leave the machine."""

GOAL_SAVING = 0.60  # balanced: at least 60 % cheaper than always-premium
GOAL_SUCCESS = 0.999  # with one provider 100 % down
GOAL_P99_RATIO = 1.5  # p99 latency with one provider down / healthy
SIGMA = 0.25  # lognormal spread of simulated latency around the provider's estimate
TRANSIENT = 0.01  # share of healthy calls that fail with a 503
DOWN_ERROR_S = 0.3  # how long a call to the downed provider takes to fail
ARRIVALS_PER_S = 2.0  # Poisson arrival rate of the router pass (simulated time)

# --- the fleet ---------------------------------------------------------------------------------

LOCAL_CATALOG = {
    "models": {
        "sd15": {
            "path": "/models/sd15",
            "family": "sd15",
            "controlnets": {
                "canny": "/models/cn-sd15-canny",
                "depth": "/models/cn-sd15-depth",
                "pose": "/models/cn-sd15-openpose",
            },
        },
        "sdxl": {
            "path": "/models/sdxl",
            "family": "sdxl",
            "controlnets": {"canny": "/models/cn-sdxl-canny", "depth": "/models/cn-sdxl-depth"},
        },
        "flux": {"path": "/models/flux-dev", "family": "flux"},
    }
}


def provider_config(kind: str, gpu_usd_per_hour: float) -> dict[str, Any] | None:
    """Constructor arguments for a registered provider kind: fake keys, every URL on loopback (None: unknown)."""
    if kind == "openai":
        from providers.openai import REGIONS

        return {"api_key": "sk-sim", "base_url": LOOPBACK, "region_base_urls": dict.fromkeys(REGIONS, LOOPBACK)}
    if kind == "bfl":
        from providers.bfl import REGION_HOSTS

        return {"api_key": "sim", "base_url": LOOPBACK, "region_base_urls": dict.fromkeys(REGION_HOSTS, LOOPBACK)}
    if kind in ("stability", "together"):
        return {"api_key": "sim", "base_url": LOOPBACK}
    if kind == "replicate":
        return {"api_token": "r8_sim", "base_url": LOOPBACK}
    if kind == "local":
        return {"catalog": LOCAL_CATALOG, "usd_per_gpu_hour": gpu_usd_per_hour}
    return None


DownMode = Literal["error", "hang"]
DOWN_MODES: dict[str, DownMode] = {"error": "error", "hang": "hang"}
"""How the downed provider fails: a 503 after ``DOWN_ERROR_S``, or no answer until the attempt timeout."""


@dataclass
class Faults:
    """The simulated behaviour of every fake provider: latency, transient 503s, one provider down."""

    seed: int
    down: str | None = None
    mode: DownMode = "error"
    calls: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    def draw(self, key: str, provider: str, model: str, prior_s: float) -> tuple[str, float]:
        """(outcome, seconds) for the next call of ``model`` on ``provider`` for request ``key`` (seeded per call,
        so the healthy and the failure run draw the same latency for the same call)."""
        self.calls[key, provider, model] += 1
        if provider == self.down:
            return self.mode, DOWN_ERROR_S
        rng = random.Random(f"{self.seed}:{key}:{provider}:{model}:{self.calls[key, provider, model]}")
        if rng.random() < TRANSIENT:
            return "error", rng.uniform(0.2, 1.0)
        return "ok", prior_s * math.exp(rng.gauss(0.0, SIGMA))


def _png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 90, 60)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png(64)
"""What the fakes return (the router never decodes it)."""
PHOTO = _png(1024)
"""The init, mask and control image of every request that takes one: a 1024x1024 PNG (its header is read)."""


class _Simulated:
    """Put before a real provider class: ``generate`` simulated, everything else (plan, estimate,
    capabilities, prices, profiles) the provider's own. Configured as if its key were valid."""

    faults: Faults

    def configuration_problem(self) -> str | None:
        return None

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        provider: Provider = self  # type: ignore[assignment]
        estimate = provider.estimate(request, model)
        outcome, seconds = self.faults.draw(request.idempotency_key or "", provider.name, model, estimate.latency_s)
        if outcome == "hang":
            await asyncio.sleep(1e9)  # the router's attempt timeout ends it
        await asyncio.sleep(seconds)
        if outcome == "error":
            raise ProviderUnavailable("simulated 503", provider=provider.name, status_code=503)
        size = provider.plan(request, model).size
        image = GeneratedImage(PNG, "image/png", size.width, size.height, seed=request.seed)
        return ProviderResponse(
            [image] * request.n, model, Billing(estimate.cost_usd, estimate.unit or "image", estimate.quantity)
        )


def build_fleet(faults: Faults, gpu_usd_per_hour: float) -> tuple[list[Provider], list[str]]:
    """One fake of every registered provider kind, and the kinds left out (no known configuration)."""
    fleet: list[Provider] = []
    skipped: list[str] = []
    for kind in available_providers():
        config = provider_config(kind, gpu_usd_per_hour)
        if config is None:
            skipped.append(kind)
            continue
        cls = load_provider_class(kind)
        sim_cls = type(f"Simulated{cls.__name__}", (_Simulated, cls), {"__module__": __name__})
        provider = sim_cls(**config)
        provider.faults = faults
        fleet.append(provider)
    return fleet, skipped


# --- requests ----------------------------------------------------------------------------------

TEXT_ONE = (
    ' with a sign that says "OPEN"',
    ' under a neon sign reading "BAR"',
    ', on a poster with the words "SUMMER SALE"',
    ' beside a book titled "Night Garden"',
    ' with a logo that spells "ACME"',
    ', with a caption saying "hello world"',
)
TEXT_TWO = (
    ' with a sign that says "OPEN" and a banner reading "SALE"',
    ' under a neon sign reading "BAR" next to a poster that says "LIVE MUSIC"',
)
MIX = {"txt2img": 0.55, "edit": 0.15, "inpaint": 0.10, "control": 0.10, "lora": 0.10}
RESIDENCY = (
    (None, 0.84),
    (frozenset({"eu"}), 0.06),
    (frozenset({"us"}), 0.03),
    (frozenset({"local"}), 0.04),
    (frozenset({"eu", "local"}), 0.03),
)
COST_CAPS = (Decimal("0.005"), Decimal("0.01"), Decimal("0.02"), Decimal("0.04"), Decimal("0.08"))
HEADROOMS = (Decimal("0.005"), Decimal("0.01"), Decimal("0.03"), Decimal("0.1"))
CONTROL_KINDS = (("canny", 0.5), ("depth", 0.35), ("pose", 0.15))
RATIOS = ("16:9", "3:2", "9:16", "4:3")


@dataclass(frozen=True)
class SimRequest:
    """One simulated request and its ground truth."""

    index: int
    mix: str
    request: ImageRequest
    text_strings: int  # strings of text the prompt asks to render (0: none)
    count_need: float  # the counting level policies.skills asks for the GenEval count (0: no count of 2+)
    headroom: Decimal | None  # budget headroom for its tag (engine pass only)

    @property
    def text_floor(self) -> float:
        return 0.0 if not self.text_strings else 0.90 if self.text_strings > 1 else 0.85


def load_geneval(path: Path = GENEVAL) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _pick(rng: random.Random, weighted: Sequence[tuple[Any, float]]) -> Any:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


def draw_requests(n: int, seed: int, rows: Sequence[dict[str, Any]]) -> list[SimRequest]:
    """``n`` requests drawn (seeded) from the GenEval rows with the task, text and constraint mixes above."""
    rng = random.Random(seed)
    out: list[SimRequest] = []
    for i in range(n):
        row = rng.choice(rows)
        mix = _pick(rng, list(MIX.items()))
        prompt = row["prompt"]
        strings = 0
        if rng.random() < 0.20:
            two = rng.random() < 0.25
            prompt += rng.choice(TEXT_TWO if two else TEXT_ONE)
            strings = 2 if two else 1
        kw: dict[str, Any] = {"prompt": prompt, "idempotency_key": f"sim-{i}"}
        if rng.random() < 0.25:
            kw["aspect_ratio"] = rng.choice(RATIOS)
        if rng.random() < 0.05:
            kw["n"] = 2
        if rng.random() < 0.3:
            kw["seed"] = rng.randrange(2**31)
        if mix == "edit":
            kw |= {"init_image": PHOTO, "strength": 0.6}
        elif mix == "inpaint":
            kw |= {"init_image": PHOTO, "mask_image": PHOTO}
        elif mix == "control":
            kw["controls"] = (ControlInput(kind=_pick(rng, CONTROL_KINDS), image=PHOTO),)
            if rng.random() < 0.25:
                kw["init_image"] = PHOTO  # control on an image (img2img): fewer backends combine the two
        elif mix == "lora":
            loras = [LoraRef(ref="sim/watercolor-style", weight=0.8)]
            if rng.random() < 0.15:
                loras.append(LoraRef(ref="sim/film-grain", weight=0.5))
            kw["loras"] = tuple(loras)
        constraints: dict[str, Any] = {}
        residency = _pick(rng, RESIDENCY)
        if residency is not None:
            constraints["residency"] = residency
        if rng.random() < 0.12:
            constraints["max_cost_usd"] = rng.choice(COST_CAPS)
        headroom = None
        if rng.random() < 0.08:
            headroom = rng.choice(HEADROOMS)
            kw["tags"] = {"team-budget"}
        if constraints:
            kw["constraints"] = constraints
        counts = [obj.get("count", 1) for obj in row["include"]]
        count_need = 0.80 if row["tag"] == "counting" and max(counts) >= 2 else 0.0
        out.append(SimRequest(i, mix, ImageRequest(**kw), strings, count_need, headroom))
    return out


# --- constraints, premium, skills --------------------------------------------------------------


def residency_for(request: ImageRequest, policy: Policy) -> frozenset[str] | None:
    """The regions allowed: the request's and the policy's, intersected."""
    a, b = request.constraints.residency, policy.residency
    return b if a is None else a if b is None else a & b


def violation(
    cand: CandidateInfo, request: ImageRequest, residency: frozenset[str] | None, headroom: Decimal | None
) -> str | None:
    """The first hard constraint ``cand`` breaks for ``request`` (an independent check, not the engine's), or None."""
    caps = cand.capabilities
    task = request.task
    if task not in caps.tasks:
        return f"task {task}"
    if task == "control" and request.init_image is not None:
        base = "inpaint" if request.mask_image is not None else "img2img"
        if base not in caps.tasks:
            return f"control with {base}"
    kinds = {c.kind for c in request.controls}
    if not kinds <= caps.control_kinds:
        return "control kind"
    if len(request.controls) > caps.max_controls:
        return "control count"
    if len(request.loras) > caps.max_loras:
        return "lora"
    if request.n > caps.max_n:
        return "n"
    if getattr(cand.plan.size, "out_of_range", None):
        return "size"
    if residency is not None and residency.isdisjoint(caps.regions):
        return "residency"
    cap = request.constraints.max_cost_usd
    if cap is not None and cand.worst_usd > cap:
        return "cost cap"
    if headroom is not None and cand.worst_usd > headroom:
        return "budget"
    return None


CHECKS = (
    "task",
    "control with",
    "control kind",
    "control count",
    "lora",
    "n",
    "size",
    "residency",
    "cost cap",
    "budget",
)
"""The checks of :func:`violation`, in its order."""


def _blocking(
    cands: Sequence[CandidateInfo], request: ImageRequest, residency: frozenset[str] | None, headroom: Decimal | None
) -> str:
    """For a request nothing can serve: the latest check (in :data:`CHECKS` order) that any candidate failed,
    i.e. the constraint that removed the last candidates able to do the rest."""
    reasons = [violation(c, request, residency, headroom) or "" for c in cands]
    rank = {check: i for i, check in enumerate(CHECKS)}
    found = [next((k for k in CHECKS if r.startswith(k)), r) for r in reasons]
    return max(found, key=lambda k: rank.get(k, -1), default="no candidates")


def text_skill(cand: CandidateInfo) -> float:
    return cand.quality if cand.profile is None else cand.profile.skills["text"]


def count_skill(cand: CandidateInfo) -> float:
    return cand.quality if cand.profile is None else cand.profile.skills["counting"]


def premium(eligible: Sequence[CandidateInfo], need: Any) -> CandidateInfo:
    """Always-premium: the highest overall quality, then the best skill fit, then the cheaper."""

    def key(c: CandidateInfo) -> tuple[float, float, float]:
        fit = skill_fit(need, c.profile).score if c.profile is not None else 1.0
        return (c.quality, fit, -c.cost)

    return max(eligible, key=key)


# --- engine pass -------------------------------------------------------------------------------


@dataclass
class EngineStats:
    """One preset over every request of the engine pass."""

    requests: int = 0
    routed: int = 0
    no_route: int = 0
    false_refusals: int = 0  # refused although a candidate met every constraint
    cost: Decimal = Decimal(0)
    premium_cost: Decimal = Decimal(0)
    text_requests: int = 0
    text_violations: int = 0
    text_unavoidable: int = 0
    text_below_085: int = 0  # the same count at a flat floor of 0.85 (two strings included)
    text_undetected: int = 0  # text the prompt scorer did not find
    count_requests: int = 0
    count_short: int = 0  # info: a count of 2+ routed below 0.80 counting while a model meeting it was allowed
    violations: Counter[str] = field(default_factory=Counter)
    one_provider_chains: int = 0  # every chain entry on one provider although another provider was allowed
    no_route_by: Counter[str] = field(default_factory=Counter)  # the last check that removed candidates
    first_choice: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    bound_fit: Decimal = Decimal(0)  # the cheapest allowed candidate with the best skill fit, per request
    bound_text: Decimal = Decimal(0)  # the cheapest allowed candidate meeting the text floor (any, without text)

    @property
    def saving(self) -> float:
        return self.saving_at(self.cost)

    def saving_at(self, cost: Decimal) -> float:
        return 1 - float(cost / self.premium_cost) if self.premium_cost else 0.0


Servable = dict[int, dict[str, frozenset[str]]]
"""Request index → preset → the providers with a candidate meeting every constraint the router pass applies
(the engine pass's budget headroom is not applied there: no ledger budget is set)."""


def engine_pass(
    requests: Sequence[SimRequest], presets: dict[str, Policy], fleet: Sequence[Provider]
) -> tuple[dict[str, EngineStats], Servable]:
    """Every preset's decision for every request; also which providers could serve each request in the router pass."""
    router = AsyncRouter(list(fleet), policy="balanced", ledger=":memory:", tracer_provider=False)
    engines = {name: PolicyEngine(pol) for name, pol in presets.items()}
    stats = {name: EngineStats() for name in presets}
    servable: Servable = {}
    for sr in requests:
        req = sr.request
        cands = router.candidates(req, router.policy)
        complexity = score_prompt(req.prompt)
        need = skill_needs(complexity.features, req.prompt)
        by_key = {(c.provider, c.model): c for c in cands}
        fit_of = {id(c): skill_fit(need, c.profile).score if c.profile is not None else 1.0 for c in cands}
        context = RoutingContext(budget_headroom_usd=sr.headroom)
        servable[sr.index] = {}
        for name, engine in engines.items():
            pol = presets[name]
            st = stats[name]
            st.requests += 1
            residency = residency_for(req, pol)
            eligible = [c for c in cands if violation(c, req, residency, sr.headroom) is None]
            servable[sr.index][name] = frozenset(
                c.provider
                for c in (
                    eligible
                    if sr.headroom is None
                    else (c for c in cands if violation(c, req, residency, None) is None)
                )
            )
            decision = engine.decide(req, cands, context, complexity)
            if not decision.chain:
                st.no_route += 1
                st.no_route_by[_blocking(cands, req, residency, sr.headroom)] += 1
                if eligible:
                    st.false_refusals += 1
                    _example(
                        st,
                        f"#{sr.index} refused although {len(eligible)} candidates met every constraint "
                        f"(e.g. {eligible[0].provider}/{eligible[0].model}): "
                        f"{'; '.join(f'{r.provider}/{r.model}: {r.code}' for r in decision.rejections[:3])}",
                    )
                continue
            st.routed += 1
            for entry in decision.chain:
                cand = by_key[entry.provider, entry.model]
                why = violation(cand, req, residency, sr.headroom)
                if why is not None:
                    st.violations[why] += 1
                    _example(st, f"#{sr.index} ({sr.mix}) chain has {cand.provider}/{cand.model}: {why}")
            first = by_key[decision.chain[0].provider, decision.chain[0].model]
            if len({e.provider for e in decision.chain}) == 1 and any(c.provider != first.provider for c in eligible):
                st.one_provider_chains += 1
            st.first_choice[first.provider] += 1
            st.cost += first.estimate.cost_usd
            if eligible:
                st.premium_cost += premium(eligible, need).estimate.cost_usd
                top_fit = max(fit_of[id(c)] for c in eligible)
                st.bound_fit += min(c.estimate.cost_usd for c in eligible if fit_of[id(c)] >= top_fit - 1e-9)
                meets = [c for c in eligible if text_skill(c) >= sr.text_floor - 1e-9] or eligible
                st.bound_text += min(c.estimate.cost_usd for c in meets)
            else:
                st.premium_cost += first.estimate.cost_usd  # (a constraint violation, counted above)
            if sr.text_strings:
                st.text_requests += 1
                st.text_undetected += complexity.features.text_to_render == 0
                if text_skill(first) < sr.text_floor - 1e-9:
                    if any(text_skill(c) >= sr.text_floor - 1e-9 for c in eligible):
                        st.text_violations += 1
                        st.text_below_085 += text_skill(first) < 0.85 - 1e-9
                        best = max(eligible, key=text_skill)
                        _example(
                            st,
                            f"#{sr.index} text floor {sr.text_floor:.2f}: got {first.provider}/"
                            f"{first.model} (text {text_skill(first):.2f}), {best.provider}/{best.model} "
                            f"(text {text_skill(best):.2f}) was allowed; prompt {req.prompt!r}",
                        )
                    else:
                        st.text_unavoidable += 1
            if sr.count_need:
                st.count_requests += 1
                if count_skill(first) < sr.count_need - 1e-9 and any(
                    count_skill(c) >= sr.count_need - 1e-9 for c in eligible
                ):
                    st.count_short += 1
    return stats, servable


def _example(st: EngineStats | RouterStats, line: str) -> None:
    if len(st.examples) < 5:
        st.examples.append(line)


# --- router pass: a simulated clock ------------------------------------------------------------


class _VirtualSelector(selectors.DefaultSelector):
    """A selector that never waits: when the loop would sleep until its next timer, time jumps there."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready:
            return ready
        if timeout is None:  # nothing scheduled: only another thread can wake the loop
            ready = super().select(5.0)
            if not ready:
                raise RuntimeError("simulation stalled: no timer and nothing ready")
            return ready
        self.now += timeout
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on simulated time (``loop.time()``), for asyncio.sleep, timeouts and the router's clock."""

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now


@dataclass
class RouterStats:
    """One preset, one scenario, over the router pass's requests."""

    scenario: str
    down: str | None
    requests: int = 0
    served: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    attempts: int = 0
    cost: Decimal = Decimal(0)
    served_by: Counter[str] = field(default_factory=Counter)
    violations: Counter[str] = field(default_factory=Counter)
    servable: int = 0  # requests some allowed candidate off the downed provider could serve
    served_servable: int = 0
    examples: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def p(self, q: float) -> float:
        if not self.latencies:
            return math.nan
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)]

    @property
    def success(self) -> float:
        return self.served_servable / self.servable if self.servable else math.nan


async def _drive(
    router: AsyncRouter,
    requests: Sequence[SimRequest],
    stats: RouterStats,
    seed: int,
    servable: Callable[[SimRequest], bool],
) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)

    async def one(sr: SimRequest) -> None:
        ok = servable(sr)
        stats.servable += ok
        start = loop.time()
        try:
            result = await router.agenerate(sr.request)
        except ImageRouterError as exc:
            stats.failed[exc.kind] += 1
            stats.attempts += len(exc.attempts)
            if ok:
                trail = ", ".join(f"{a.provider}/{a.model} {a.error or a.outcome}" for a in exc.attempts)
                _example(stats, f"#{sr.index} ({sr.mix}) {exc.kind} after {loop.time() - start:.1f}s: {trail}")
            return
        stats.served += 1
        stats.served_servable += ok
        stats.latencies.append(result.latency.total_s)
        stats.attempts += len(result.attempts)
        stats.cost += result.cost.actual_usd
        stats.served_by[result.provider] += 1
        provider = router.providers[result.provider]
        caps = provider.capabilities(result.model)
        cand = CandidateInfo(
            result.provider,
            provider.kind,
            result.model,
            caps,
            provider.plan(sr.request, result.model),
            provider.estimate(sr.request, result.model),
        )
        why = violation(cand, sr.request, residency_for(sr.request, router.policy), None)
        cap = sr.request.constraints.max_cost_usd
        if why is None and cap is not None and result.cost.actual_usd > cap:
            why = "billed over max_cost_usd"
        if why is not None:
            stats.violations[why] += 1
            _example(stats, f"#{sr.index} ({sr.mix}) served by {result.provider}/{result.model}: {why}")

    tasks = []
    at = 0.0
    for sr in requests:
        at += rng.expovariate(ARRIVALS_PER_S)
        await asyncio.sleep(max(0.0, at - loop.time()))
        tasks.append(asyncio.create_task(one(sr)))
    await asyncio.gather(*tasks)


def router_run(
    requests: Sequence[SimRequest],
    preset: str,
    faults: Faults,
    gpu_usd_per_hour: float,
    seed: int,
    servable: Callable[[SimRequest], bool],
    scenario: str,
) -> RouterStats:
    """One run of the real router over fakes on simulated time."""
    stats = RouterStats(scenario, faults.down)
    stats.requests = len(requests)
    fleet, _ = build_fleet(faults, gpu_usd_per_hour)
    loop = VirtualLoop()
    started = time.perf_counter()
    log = logging.getLogger("imagerouter")
    level = log.level
    log.setLevel(logging.ERROR)  # failed requests are counted here, not logged
    try:
        router = AsyncRouter(
            fleet,
            policy=preset,
            ledger=":memory:",
            clock=loop.time,
            sleep=asyncio.sleep,
            rng=random.Random(seed).random,
            tracer_provider=False,
        )
        loop.run_until_complete(_drive(router, requests, stats, seed, servable))
        loop.run_until_complete(router.aclose())
    finally:
        loop.close()
        log.setLevel(level)
    stats.wall_s = time.perf_counter() - started
    return stats


# --- the whole simulation ----------------------------------------------------------------------


@dataclass
class Report:
    args: dict[str, Any]
    fleet: list[str]
    candidates: int
    skipped: list[str]
    mix: Counter[str]
    engine: dict[str, EngineStats]
    router: dict[str, list[RouterStats]]
    engine_s: float
    wall_s: float


def simulate(
    requests: int = 10_000,
    router_requests: int = 2_000,
    seed: int = 7,
    gpu_usd_per_hour: float = 2.0,
    presets: Iterable[str] | None = None,
    down_modes: Sequence[str] = ("error", "hang"),
    geneval: Path = GENEVAL,
    progress: Callable[[str], None] | None = None,
) -> Report:
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    chosen = {name: PRESETS[name] for name in (presets or PRESETS)}
    for name, pol in chosen.items():  # candidates are built once for every preset: no preset may reprice
        if pol.prices or pol.profiles:
            raise SystemExit(f"preset {name} overrides prices or profiles; the simulation builds candidates once")
    sreqs = draw_requests(requests, seed, load_geneval(geneval))
    fleet, skipped = build_fleet(Faults(seed), gpu_usd_per_hour)
    say(f"engine pass: {len(sreqs)} requests x {len(chosen)} presets over {len(fleet)} providers")
    engine, servable = engine_pass(sreqs, chosen, fleet)
    engine_s = time.perf_counter() - started
    n_cands = sum(len(p.models()) for p in fleet)
    sub = sreqs[:router_requests]
    runs: dict[str, list[RouterStats]] = {}
    for name in chosen:
        say(f"router pass: {name}, healthy")

        def allowed(sr: SimRequest, name: str = name) -> bool:
            return bool(servable[sr.index][name])

        healthy = router_run(sub, name, Faults(seed), gpu_usd_per_hour, seed, allowed, "healthy")
        runs[name] = [healthy]
        if not healthy.served_by:
            continue
        down = healthy.served_by.most_common(1)[0][0]

        def without(sr: SimRequest, name: str = name, down: str = down) -> bool:
            return bool(servable[sr.index][name] - {down})

        for mode in down_modes:
            say(f"router pass: {name}, {down} down ({mode})")
            runs[name].append(
                router_run(
                    sub,
                    name,
                    Faults(seed, down, DOWN_MODES[mode]),
                    gpu_usd_per_hour,
                    seed,
                    without,
                    f"{down} down ({mode})",
                )
            )
    args = {"requests": requests, "router_requests": len(sub), "seed": seed, "gpu_usd_per_hour": gpu_usd_per_hour}
    return Report(
        args,
        [p.name for p in fleet],
        n_cands,
        skipped,
        Counter(sr.mix for sr in sreqs),
        engine,
        runs,
        engine_s,
        time.perf_counter() - started,
    )


# --- the report --------------------------------------------------------------------------------


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _s(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.1f}"


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.3f} %"


def render(rep: Report, command: str) -> str:
    a = rep.args
    lines = [
        f"# benchmarks/routing_sim.py: a routing simulation ({date.today().isoformat()})",
        "",
        f"Command: `{command}` ({rep.wall_s:.0f} s wall on this machine, {rep.engine_s:.0f} s of it the engine pass; "
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs). "
        "Deterministic for a seed: every figure below except wall times.",
        "",
        "## Set-up",
        "",
        f"- **Requests**: {a['requests']:,} drawn with seed {a['seed']} from the 553 GenEval prompts "
        "(`tests/data/geneval`), mixed: " + ", ".join(f"{k} {v:,}" for k, v in sorted(rep.mix.items())) + ". "
        '20 % get text to render appended (a quarter of those two strings, e.g. `… with a sign that says "OPEN" '
        'and a banner reading "SALE"`); 16 % a residency (eu, us, local, eu+local); 12 % a `max_cost_usd` '
        "($0.005–0.08); 8 % a budget headroom ($0.005–0.10); 25 % an aspect ratio; 5 % n=2. Control kinds: canny, "
        "depth, pose; a quarter of control requests also carry an init image.",
        f"- **Fleet**: every registered provider ({', '.join(rep.fleet)}; {rep.candidates} provider/model "
        "candidates), the real classes with fake keys and every base URL on 127.0.0.1, `generate` replaced by a "
        "simulation (nothing opens a socket). Local: sd15 (ControlNets canny, depth, pose), sdxl (canny, depth), "
        f"flux; its GPU time priced at ${a['gpu_usd_per_hour']}/h (the provider's `usd_per_gpu_hour`; 0 would make "
        "local work free and every saving trivial)."
        + (f" Registered but left out (no known configuration): {', '.join(rep.skipped)}." if rep.skipped else ""),
        "- **Always-premium**: per request and preset, of the candidates meeting every hard constraint, the highest "
        "overall quality (profile `overall`), ties to the best skill fit for the prompt, then to the cheaper one "
        "(the cheapest way to always buy the top tier). Costs are the providers' own estimates.",
        "- **Text floor**: a request whose prompt was given text to render (ground truth) needs the text level "
        "`policies.skills.needs` asks for: 0.85, 0.90 for two strings. A *skill violation* is a first choice "
        "whose profile's text skill is below the floor while an allowed candidate reached it; *unavoidable* when "
        "no allowed candidate did (e.g. inpainting with residency local). In brackets: how many of the violations "
        "are below 0.85, i.e. would count at a flat floor of 0.85 for any text.",
        "- **Constraint violation**: a chain entry (engine) or served model (router) that cannot do the task, "
        "lacks a control kind or LoRA slots, makes fewer images than asked, cannot make the size asked (outside its "
        "range), serves none of the allowed regions, or whose worst-case cost exceeds `max_cost_usd` or the budget "
        "headroom (router: also a bill over `max_cost_usd`). Checked independently of the engine's filters. "
        "*False refusal*: no route although a candidate met every constraint.",
        "",
        f"## Cost, skills and constraints (the engine on all {a['requests']:,} requests)",
        "",
        "Each preset's `PolicyEngine.decide` over the candidates the real `AsyncRouter.candidates` builds; cost "
        "is the first choice's estimate.",
        "",
        "| preset | routed | no route | false refusals | cost | always-premium | cheaper by | goal | "
        "text prompts | text below floor (below 0.85) | goal | unavoidable | scorer missed the text | "
        "count 2+ below 0.80 (info) | one-provider chains (info) | constraint violations | goal |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, st in rep.engine.items():
        viol = sum(st.violations.values())
        saving_goal = f"≥ {GOAL_SAVING:.0%}: {_met(st.saving >= GOAL_SAVING)}" if name == "balanced" else "-"
        skill_goal = f"0: {_met(st.text_violations == 0)}" if name == "balanced" else "-"
        lines.append(
            f"| {name} | {st.routed:,} | {st.no_route:,} | {st.false_refusals} | ${st.cost:.2f} | "
            f"${st.premium_cost:.2f} | {100 * st.saving:.1f} % | {saving_goal} | {st.text_requests:,} | "
            f"{st.text_violations} ({st.text_below_085}) | {skill_goal} | {st.text_unavoidable} | "
            f"{st.text_undetected} | "
            f"{st.count_short} / {st.count_requests} | {st.one_provider_chains:,} | {viol} | "
            f"0: {_met(viol == 0 and st.false_refusals == 0)} |"
        )
    lines += [
        "",
        "What any policy could reach on the same requests and candidates (per preset, its allowed candidates), "
        "against the same always-premium cost:",
        "",
        "| preset | cost | cheaper by | cheapest with the best skill fit for each prompt | cheaper by | "
        "cheapest meeting the text floor only | cheaper by |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, st in rep.engine.items():
        fit_saving, text_saving = st.saving_at(st.bound_fit), st.saving_at(st.bound_text)
        lines.append(
            f"| {name} | ${st.cost:.2f} | {100 * st.saving:.1f} % | ${st.bound_fit:.2f} | {100 * fit_saving:.1f} % | "
            f"${st.bound_text:.2f} | {100 * text_saving:.1f} % |"
        )
    lines += ["", "No route, by the constraint that removed the last candidates able to do the rest:", ""]
    for name, st in rep.engine.items():
        lines.append(f"- {name}: " + (", ".join(f"{k} {v}" for k, v in st.no_route_by.most_common()) or "none"))
    lines += ["", "First choices by provider:", ""]
    for name, st in rep.engine.items():
        share = ", ".join(f"{p} {100 * n / max(1, st.routed):.1f} %" for p, n in st.first_choice.most_common())
        lines.append(f"- {name}: {share}")
    ex = [f"- {name}: {e}" for name, st in rep.engine.items() for e in st.examples]
    if ex:
        lines += ["", "Examples of violations and refusals (first five per preset):", "", *ex]
    sub = a["router_requests"]
    router_runs = [run for runs in rep.router.values() for run in runs]
    router_wall = sum(run.wall_s for run in router_runs)
    per_request_ms = 1000 * router_wall / max(1, sum(run.requests for run in router_runs))
    lines += [
        "",
        f"## Failure: the real router over fakes, first {sub:,} requests, simulated time",
        "",
        f"`AsyncRouter.agenerate` (retries, backoff, fallback, circuit breaker: 3 failures open it for 30 s; "
        f"max_chain 4, 2 retries) on an event loop whose clock is simulated; Poisson arrivals at "
        f"{ARRIVALS_PER_S:g}/s. A subsample, because the full router path costs milliseconds of CPU per request "
        f"({per_request_ms:.1f} ms here: {router_wall:.0f} s for {len(router_runs)} runs). "
        f"Healthy: latency lognormal around each provider's estimate (sigma {SIGMA}), {TRANSIENT:.0%} of calls a "
        f"503. Down: the provider the preset served most requests from in the healthy run fails every call "
        f"(`error`: a 503 after {DOWN_ERROR_S} s; `hang`: no answer until the router's 180 s attempt timeout). "
        "Success rate = served ÷ requests some allowed candidate off the downed provider could serve (the goal's "
        "denominator); `all` = served ÷ all requests. p50/p99 over served requests, simulated seconds.",
        "",
        "| preset | scenario | servable | success | goal ≥ 99.9 % | served / all | p50 s | p99 s | p99 ÷ healthy | "
        "goal ≤ 1.5× | calls per request | cost | failures | constraint violations |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for name, runs in rep.router.items():
        base = runs[0]
        for run in runs:
            is_down = run.down is not None
            ratio = run.p(0.99) / base.p(0.99) if base.latencies and run.latencies else math.nan
            goal_s = f"{_met(run.success >= GOAL_SUCCESS)}" if is_down and run.servable else "-"
            goal_r = f"{_met(ratio <= GOAL_P99_RATIO)}" if is_down and not math.isnan(ratio) else "-"
            fails = ", ".join(f"{k} {v}" for k, v in run.failed.most_common()) or "-"
            viol = sum(run.violations.values())
            shown = "-" if not is_down or math.isnan(ratio) else f"{ratio:.2f}×"
            calls = run.attempts / max(1, run.requests)
            lines.append(
                f"| {name} | {run.scenario} | {run.servable:,} | {_pct(run.success)} | {goal_s} | "
                f"{run.served:,} / {run.requests:,} | {_s(run.p(0.5))} | {_s(run.p(0.99))} | "
                f"{shown} | {goal_r} | {calls:.2f} | "
                f"${run.cost:.2f} | {fails} | {viol} |"
            )
    ex = [f"- {name}, {run.scenario}: {e}" for name, runs in rep.router.items() for run in runs for e in run.examples]
    if ex:
        lines += ["", "Examples of failed servable requests and violations (first five per run):", "", *ex]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests in the engine pass")
    parser.add_argument(
        "--router-requests",
        type=int,
        default=2_000,
        help="the first N of them also run through the router, healthy and with one provider down",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--gpu-usd-per-hour", type=float, default=2.0, help="price of the local provider's GPU time")
    parser.add_argument("--presets", nargs="*", choices=sorted(PRESETS), default=None)
    parser.add_argument("--down-modes", nargs="*", choices=sorted(DOWN_MODES), default=["error", "hang"])
    parser.add_argument("--geneval", type=Path, default=GENEVAL)
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    rep = simulate(
        args.requests,
        args.router_requests,
        args.seed,
        args.gpu_usd_per_hour,
        args.presets,
        args.down_modes,
        args.geneval,
        progress=lambda m: print(f"# {m}", file=sys.stderr, flush=True),
    )
    command = ".venv/bin/python benchmarks/routing_sim.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(rep, command.strip())
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
