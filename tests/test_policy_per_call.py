"""A policy given per call is whole (its budgets and prices apply), and the router never changes the
caller's provider objects; a cost cap of 0 is a cap."""

from __future__ import annotations

from decimal import Decimal

import pytest

from policies.policy import BudgetRule, Policy, Rule, Then, When
from providers.openai import OpenAIProvider
from providers.sandbox import OpenAISandbox
from router import AsyncRouter, BudgetExceeded, ImageRequest, NoRouteError
from router.ledger import Ledger
from router.prices import default_prices
from tests.conftest import Sleeps

# A price row that makes every gpt-image-2 call cost exactly 10x the table's token rates.
TENFOLD = {"openai/gpt-image-2": {"text_input_per_mtok": "50.00", "image_input_per_mtok": "80.00",
                                  "image_output_per_mtok": "300.00"}}


def provider(sb: OpenAISandbox) -> OpenAIProvider:
    return OpenAIProvider(api_key=sb.api_key, base_url=sb.base_url)


async def test_the_constructor_never_mutates_the_callers_providers(sandbox: OpenAISandbox) -> None:
    mine = provider(sandbox)
    before = mine.prices
    request = ImageRequest(prompt="a cat", width=1024, height=1024)
    async with AsyncRouter([mine], policy=Policy(name="pricey", prices=TENFOLD), ledger=":memory:",
                           sleep=Sleeps()) as router:
        result = await router.agenerate(request)
    assert mine.prices is before and mine.prices.version == default_prices().version
    # the call was billed at the policy's prices, ten times what the caller's own provider computes
    assert result.cost.price_table_version.endswith("+local")
    assert result.decision.chain[0].estimate.cost_usd == mine.estimate(request, "gpt-image-2").cost_usd * 10


async def test_a_per_call_policy_brings_its_prices(sandbox: OpenAISandbox) -> None:
    async with AsyncRouter([provider(sandbox)], ledger=":memory:", sleep=Sleeps()) as router:
        plain = await router.agenerate("a cat", width=1024, height=1024)
        pricey = await router.agenerate("a cat", width=1024, height=1024,
                                        policy=Policy(name="pricey", prices=TENFOLD))
        again = await router.agenerate("a cat", width=1024, height=1024)
    assert pricey.cost.actual_usd == plain.cost.actual_usd * 10
    assert again.cost.actual_usd == plain.cost.actual_usd  # the router's own policy is untouched


async def test_a_per_call_policy_brings_its_budgets(sandbox: OpenAISandbox) -> None:
    ledger = Ledger(":memory:")
    tight = Policy(name="tight", budgets=(BudgetRule(limit_usd=Decimal("0.0001"), period="day", tag="team-a"),))
    async with AsyncRouter([provider(sandbox)], ledger=ledger, sleep=Sleeps()) as router:
        with pytest.raises(BudgetExceeded):
            await router.agenerate("a cat", width=1024, height=1024, tags={"team-a"}, policy=tight)
    assert sandbox.requests == []  # refused before any call
    assert [(b.tag, b.limit_usd) for b in ledger.budgets()] == [("team-a", Decimal("0.0001"))]


async def test_a_rule_cap_never_loosens_a_zero_cap(sandbox: OpenAISandbox) -> None:
    policy = Policy(name="capped", rules=(Rule(when=When(), then=Then(max_cost_usd=Decimal(5))),))
    async with AsyncRouter([provider(sandbox)], policy=policy, ledger=":memory:", sleep=Sleeps()) as router:
        with pytest.raises(NoRouteError, match="over max_cost_usd \\$0"):
            await router.agenerate("a cat", width=1024, height=1024, max_cost_usd=0)
    assert sandbox.requests == []


def test_the_router_has_no_unread_max_retries_setting(sandbox: OpenAISandbox) -> None:
    router = AsyncRouter([provider(sandbox)], ledger=":memory:", max_retries=1)
    assert not hasattr(router, "max_retries")
