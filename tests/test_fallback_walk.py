"""The walk down the chain when a backend hangs: no retry that cannot finish, its other models skipped,
and candidates beyond the chain limit standing in for the skipped ones."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from decimal import Decimal

import pytest

from policies.policy import Policy
from providers.base import Billing, Capabilities, Estimate, Provider, ProviderResponse
from router import AllProvidersFailed, ImageRequest, ProviderTimeout
from router.result import GeneratedImage
from tests.conftest import make_router, png

D = Decimal


class Backend(Provider):
    """``models`` priced 0.01, 0.02, ... in order; hangs (never answers) when ``hang`` is set."""

    kind = "backend"

    def __init__(self, name: str, models: Sequence[str], *, base: str = "0.01", hang: bool = False) -> None:
        super().__init__(name=name)
        self._models, self._base, self.hang = list(models), D(base), hang
        self.calls: list[str] = []

    def models(self) -> Sequence[str]:
        return self._models

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(tasks=frozenset({"txt2img"}))

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        return Estimate(self._base * (self._models.index(model) + 1), 1.0)

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        self.calls.append(model)
        if self.hang:
            await asyncio.Event().wait()
        image = GeneratedImage(png(), "image/png", 64, 64)
        return ProviderResponse([image], model, Billing(self.estimate(request, model).cost_usd, "image", D(1)))


CHEAPEST = Policy(name="cheapest-4", order="cost", max_chain=4)


async def test_a_hanging_backend_that_fills_the_chain_falls_back_beyond_it() -> None:
    hanging = Backend("hanging", ["a", "b", "c", "d"], hang=True)  # the whole chain of four
    other = Backend("other", ["x"], base="0.50")  # fifth: beyond the chain limit
    router = make_router(hanging, other, policy=CHEAPEST, attempt_timeout_s=0.05, deadline_s=30)
    decision = router.route("a cat")
    assert [c.provider for c in decision.chain] == ["hanging"] * 4 and decision.beyond[0].provider == "other"
    result = await router.agenerate("a cat")
    assert result.provider == "other"
    trail = [(a.provider, a.model, a.outcome, a.error) for a in result.attempts]
    assert trail[0][:3] == ("hanging", "a", "error") and trail[-1] == ("other", "x", "success", None)
    assert {(p, m, o) for p, m, o, _ in trail[1:-1]} >= {("hanging", m, "skipped") for m in "bcd"}
    assert set(hanging.calls) == {"a"}  # its other models were not called: it timed out in this request
    await router.aclose()


async def test_a_timeout_is_not_retried_when_a_whole_attempt_no_longer_fits_the_deadline() -> None:
    hanging = Backend("hanging", ["a"], hang=True)
    backup = Backend("backup", ["x"], base="0.50")
    router = make_router(hanging, backup, policy=CHEAPEST, attempt_timeout_s=0.2, deadline_s=0.3)
    result = await router.agenerate("a cat")
    assert result.provider == "backup" and hanging.calls == ["a"]  # retrying would have met the deadline
    await router.aclose()


async def test_a_timeout_is_retried_when_the_deadline_leaves_room() -> None:
    hanging = Backend("hanging", ["a"], hang=True)
    router = make_router(hanging, policy=CHEAPEST, attempt_timeout_s=0.02, deadline_s=30, max_retries=2)
    with pytest.raises((AllProvidersFailed, ProviderTimeout)):  # every call timed out
        await router.agenerate("a cat")
    assert hanging.calls == ["a", "a", "a"]
    await router.aclose()
