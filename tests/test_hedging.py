"""Hedged requests: a slow head gets the next candidate raced against it, within the extra-spend cap."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import pytest

from policies.policy import Hedge, Policy, PolicyFileError, load_policy
from providers.base import Billing, Capabilities, Estimate, Provider, ProviderResponse
from router import AsyncRouter, ImageRequest
from router.errors import ProviderUnavailable
from router.result import GeneratedImage
from tests.conftest import make_router, png

D = Decimal


class Gated(Provider):
    """Answers when ``gate`` is set (at once when it is None), billing ``bill``; or fails with ``error``."""

    kind = "gated"

    def __init__(self, name: str, *, estimate: str, latency: float, gate: asyncio.Event | None = None,
                 error: Exception | None = None) -> None:
        super().__init__(name=name)
        self.gate, self.error = gate, error
        self._estimate, self._latency = D(estimate), latency
        self.calls = 0
        self.finished = 0

    def models(self) -> Sequence[str]:
        return ["m"]

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(tasks=frozenset({"txt2img"}))

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        return Estimate(self._estimate, self._latency)

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        self.finished += 1
        image = GeneratedImage(png(), "image/png", 64, 64)
        return ProviderResponse([image], model, Billing(self._estimate, "image", D(1)))


def hedged(after: str | float = 0.001, fraction: float = 1.0) -> Policy:
    # cheapest first: the head is the cheap, slow one; the backup is the dearer one
    return Policy(name="hedged", order="cost", max_retries=0, hedge=Hedge(after=after, max_extra_fraction=fraction))


async def spend(router: AsyncRouter, policy: Policy, times: int) -> None:
    """Requests that build up the spend hedges may add a fraction of (the head answers at once)."""
    for _ in range(times):
        await router.agenerate("warm", policy=policy)


async def test_a_slow_head_is_hedged_and_the_loser_is_charged() -> None:
    gate = asyncio.Event()
    gate.set()
    head = Gated("slow", estimate="0.01", latency=1, gate=gate)
    backup = Gated("quick", estimate="0.02", latency=2)
    router = make_router(head, backup, policy=hedged())
    await spend(router, router.policy, 5)  # $0.05 spent: a $0.02 hedge fits within 100 %
    gate.clear()  # the head now hangs
    result = await router.agenerate("a cat")
    assert result.provider == "quick"
    outcomes = [(a.provider, a.outcome, a.cost_usd) for a in result.attempts]
    assert outcomes == [("quick", "success", D("0.02")), ("slow", "cancelled", D("0.01"))]
    assert result.cost.actual_usd == D("0.03")  # both: the vendor may bill a call we hung up on
    assert router.ledger.spent() == D("0.08")
    assert head.calls == 6 and head.finished == 5
    await router.aclose()


async def test_no_hedge_beyond_the_extra_spend_cap() -> None:
    gate = asyncio.Event()
    head = Gated("slow", estimate="0.01", latency=1, gate=gate)
    backup = Gated("quick", estimate="0.02", latency=2)
    router = make_router(head, backup, policy=hedged(fraction=0.05))
    task = asyncio.create_task(router.agenerate("a cat"))  # nothing spent yet: 5 % of $0 allows no hedge
    await asyncio.sleep(0.05)
    assert backup.calls == 0 and not task.done()
    gate.set()
    result = await task
    assert result.provider == "slow" and backup.calls == 0 and [a.outcome for a in result.attempts] == ["success"]
    await router.aclose()


async def test_p95_waits_for_samples_before_hedging() -> None:
    gate = asyncio.Event()
    gate.set()
    head = Gated("slow", estimate="0.01", latency=1, gate=gate)
    backup = Gated("quick", estimate="0.02", latency=2)
    router = make_router(head, backup, policy=hedged(after="p95"))
    assert router.stats.p95("slow", "m") is None  # no samples yet: no hedge
    await spend(router, router.policy, 5)
    p95 = router.stats.p95("slow", "m")
    assert p95 is not None
    gate.clear()
    result = await router.agenerate("a cat")  # hedged once the head outlasts its p95
    assert result.provider == "quick" and backup.calls == 1
    await router.aclose()


async def test_when_both_raced_candidates_fail_the_chain_goes_on() -> None:
    gate = asyncio.Event()
    gate.set()
    head = Gated("slow", estimate="0.01", latency=1, gate=gate)
    backup = Gated("quick", estimate="0.02", latency=2)
    third = Gated("third", estimate="0.03", latency=3)
    router = make_router(head, backup, third, policy=hedged())
    await spend(router, router.policy, 10)
    gate.clear()
    head.error = ProviderUnavailable("down", provider="slow")
    backup.error = ProviderUnavailable("down", provider="quick")
    backup.gate = gate  # both wait, then both fail
    task = asyncio.create_task(router.agenerate("a cat"))
    while backup.calls == 0:
        await asyncio.sleep(0.001)
    gate.set()
    result = await task
    assert result.provider == "third"
    assert sorted((a.provider, a.outcome) for a in result.attempts) == [
        ("quick", "error"), ("slow", "error"), ("third", "success")]
    assert result.cost.actual_usd == D("0.03")  # failed attempts billed nothing
    await router.aclose()


async def test_a_policy_without_hedge_never_starts_a_second_call() -> None:
    gate = asyncio.Event()
    head = Gated("slow", estimate="0.01", latency=1, gate=gate)
    backup = Gated("quick", estimate="0.02", latency=2)
    router = make_router(head, backup, policy=Policy(name="plain", order="cost"))
    task = asyncio.create_task(router.agenerate("a cat"))
    await asyncio.sleep(0.05)
    gate.set()
    assert (await task).provider == "slow" and backup.calls == 0
    await router.aclose()


def test_hedge_settings_are_read_and_checked(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text("extends: balanced\nhedge: {after: p95, max_extra_fraction: 0.05}\n")
    policy = load_policy(f)
    assert policy.hedge == Hedge(after="p95", max_extra_fraction=0.05)
    f.write_text("extends: balanced\nhedge: {after: 0}\n")
    with pytest.raises(PolicyFileError, match="after"):
        load_policy(f)
    f.write_text("extends: balanced\nhedge: {after: p95, max_extra_fraction: 2}\n")
    with pytest.raises(PolicyFileError, match="max_extra_fraction"):
        load_policy(f)
