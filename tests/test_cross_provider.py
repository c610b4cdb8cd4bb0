"""Routing across vendors: fallback between providers of different kinds, and EU residency.

Every provider here is the real adapter talking HTTP to its own loopback sandbox.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from decimal import Decimal

import pytest

from policies import Policy
from providers.bfl import BFLProvider
from providers.openai import OpenAIProvider
from providers.sandbox import BFLSandbox, Fault, OpenAISandbox, StabilitySandbox, TogetherSandbox
from providers.stability import StabilityProvider
from providers.together import TogetherProvider
from router import AsyncRouter, ImageRequest, NoRouteError
from router.fetch import SafeFetcher
from tests.conftest import png


@dataclass
class Fleet:
    openai: OpenAISandbox
    openai_eu: OpenAISandbox
    stability: StabilitySandbox
    bfl: BFLSandbox
    bfl_eu: BFLSandbox
    together: TogetherSandbox

    def providers(self) -> list:
        fetcher = SafeFetcher(allow_loopback=True)
        return [
            StabilityProvider(api_key=self.stability.api_key, base_url=self.stability.base_url,
                              models=("stable-image-core",), fetcher=fetcher, poll_interval_s=0.01),
            BFLProvider(api_key=self.bfl.api_key, base_url=self.bfl.base_url,
                        region_base_urls={"eu": self.bfl_eu.base_url}, models=("flux-pro-1.1",),
                        fetcher=fetcher, poll_interval_s=0.01),
            OpenAIProvider(api_key=self.openai.api_key, base_url=self.openai.base_url,
                           region_base_urls={"eu": self.openai_eu.base_url}),
            TogetherProvider(api_key=self.together.api_key, base_url=self.together.base_url,
                             models=("black-forest-labs/FLUX.1-schnell",), fetcher=fetcher),
        ]

    def hits(self) -> dict[str, int]:
        names = ("openai", "openai_eu", "stability", "bfl", "bfl_eu", "together")
        return {name: getattr(self, name).hits() for name in names}


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    with ExitStack() as stack:
        openai = stack.enter_context(OpenAISandbox(api_key="sk-fleet-openai"))
        openai_eu = stack.enter_context(OpenAISandbox(api_key="sk-fleet-openai"))
        bfl = stack.enter_context(BFLSandbox(api_key="bfl-fleet-key"))
        bfl_eu = stack.enter_context(BFLSandbox(api_key="bfl-fleet-key"))
        stability = stack.enter_context(StabilitySandbox(api_key="sk-fleet-stability"))
        together = stack.enter_context(TogetherSandbox(api_key="tg-fleet-key"))
        yield Fleet(openai, openai_eu, stability, bfl, bfl_eu, together)


async def _sleep(_: float) -> None:
    return None


def router(fleet: Fleet, **kw: object) -> AsyncRouter:
    return AsyncRouter(fleet.providers(), ledger=":memory:", sleep=_sleep, **kw)  # type: ignore[arg-type]


async def test_fallback_across_kinds_returns_one_result_with_the_whole_trail(fleet: Fleet) -> None:
    fleet.stability.faults.push(Fault.server_error(503), times=None)
    fleet.bfl.faults.push(Fault.server_error(500), times=None)
    fleet.together.faults.push(Fault.rate_limit(retry_after=1.0))
    order = Policy(name="ordered", fallback_order=("stability", "bfl", "together", "openai"))
    async with router(fleet, policy=order, max_retries=1) as r:
        decision = r.route("a lighthouse at dusk", width=1024, height=1024)
        assert [c.provider for c in decision.chain] == ["stability", "bfl", "together", "openai"]
        result = await r.agenerate("a lighthouse at dusk", width=1024, height=1024)
    assert result.provider == "together" and result.images[0].width == 1024
    assert [(a.provider, a.error) for a in result.attempts] == [
        ("stability", "ProviderUnavailable"), ("stability", "ProviderUnavailable"),
        ("bfl", "ProviderUnavailable"), ("bfl", "ProviderUnavailable"),
        ("together", "RateLimited"), ("together", None),
    ]
    # FLUX.1-schnell on Together: 1 MP x $0.0027 x 4/4 steps
    assert result.cost.actual_usd == result.attempts[-1].cost_usd == Decimal("0.0027")
    assert sum(a.cost_usd for a in result.attempts[:-1]) == 0  # failed calls cost nothing
    assert fleet.hits() == {"openai": 0, "openai_eu": 0, "stability": 2, "bfl": 2, "bfl_eu": 0, "together": 2}


async def test_eu_residency_only_tries_eu_endpoints(fleet: Fleet) -> None:
    fleet.openai_eu.faults.push(Fault.server_error(503), times=None)
    async with router(fleet, policy="cheapest", max_retries=0) as r:
        decision = r.route("a cat", width=1024, height=1024, residency={"eu"})
        result = await r.agenerate("a cat", width=1024, height=1024, residency={"eu"})
    assert [c.provider for c in decision.chain] == ["openai", "bfl"]
    assert sorted((x.provider, x.code) for x in decision.rejections) == [("stability", "residency"),
                                                                         ("together", "residency")]
    assert result.provider == "bfl" and [a.provider for a in result.attempts] == ["openai", "bfl"]
    hits = fleet.hits()
    assert hits["bfl_eu"] >= 1 and hits["openai_eu"] == 1  # bfl: submit, poll, download
    assert hits["bfl"] == hits["openai"] == hits["stability"] == 0  # nothing left the EU


async def test_a_request_no_eu_backend_can_serve_lists_every_rejection(fleet: Fleet) -> None:
    request = ImageRequest.from_kwargs("a cat", controls=[{"kind": "pose", "image": png()}], residency={"eu"})
    async with router(fleet) as r:
        with pytest.raises(NoRouteError) as info:
            await r.agenerate(request)
    reasons = {x.provider: x.reason for x in info.value.rejections}
    assert set(reasons) == {"stability", "bfl", "openai", "together"}
    assert "control" in reasons["bfl"] and "control" in reasons["openai"]
    assert "does not do control" in reasons["stability"]  # core takes no control; the first reason is shown
    assert sum(fleet.hits().values()) == 0


async def test_a_control_request_goes_only_where_a_controlnet_exists(fleet: Fleet) -> None:
    import io

    from PIL import Image, ImageDraw

    edges = Image.new("L", (1024, 1024), 0)
    ImageDraw.Draw(edges).rectangle((200, 200, 800, 800), outline=255, width=6)
    buf = io.BytesIO()
    edges.save(buf, format="PNG")
    control_models = ("stable-image-control",)
    with StabilitySandbox(api_key="sk-fleet-stability") as stab:
        providers = fleet.providers()
        providers[0] = StabilityProvider(api_key=stab.api_key, base_url=stab.base_url, models=control_models,
                                         fetcher=SafeFetcher(allow_loopback=True), poll_interval_s=0.01)
        async with AsyncRouter(providers, ledger=":memory:", sleep=_sleep) as r:
            result = await r.agenerate("a house", controls=[{"kind": "canny", "image": buf.getvalue()}])
    assert result.provider == "stability" and stab.hits() == 1
    assert {x.provider for x in result.decision.rejections} == {"bfl", "openai", "together"}


async def test_a_refusal_and_a_paid_failure_across_kinds_end_on_the_third_with_every_cost_in_the_ledger(
    fleet: Fleet,
) -> None:
    import base64
    import json

    from router.ledger import Ledger

    fleet.stability.faults.push(Fault("invalid_request", status=422))  # this backend will not: the next may
    usage = {"input_tokens": 4, "input_tokens_details": {"text_tokens": 4, "image_tokens": 0},
             "output_tokens": 1056, "total_tokens": 1060}
    unreadable = {"created": 1, "data": [{"b64_json": base64.b64encode(b"no image").decode()}], "usage": usage}
    fleet.openai.faults.push(Fault.malformed(json.dumps(unreadable).encode()))  # a 200 OpenAI bills by its usage
    ledger = Ledger(":memory:")
    order = Policy(name="ordered", fallback_order=("stability", "openai", "together", "bfl"))
    async with AsyncRouter(fleet.providers(), ledger=ledger, sleep=_sleep, policy=order) as r:
        result = await r.agenerate("a lighthouse at dusk", width=1024, height=1024)
    openai_usd = (4 * Decimal(5) + 1056 * Decimal(30)) / Decimal(1_000_000)  # gpt-image-2 token prices
    assert [(a.provider, a.error, a.cost_usd) for a in result.attempts] == [
        ("stability", "InvalidRequestError", 0), ("openai", "MalformedResponse", openai_usd),
        ("together", None, Decimal("0.0027"))]
    assert result.provider == "together" and result.cost.actual_usd == openai_usd + Decimal("0.0027")
    assert ledger.spent() == result.cost.actual_usd
    assert fleet.hits() == {"openai": 1, "openai_eu": 0, "stability": 1, "bfl": 0, "bfl_eu": 0, "together": 1}
