"""The router on shared state: two routers on one Redis stand for two processes (tests/test_state_fleet.py
runs real processes against the state itself)."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest

from policies.policy import Policy
from providers.openai import OpenAIProvider
from providers.sandbox import Fault, OpenAISandbox
from providers.sandbox.together import TogetherSandbox
from providers.together import TogetherProvider
from router import AsyncRouter, ImageRouterError
from router.fetch import SafeFetcher
from tests.redis_server import redis_server, redis_url  # noqa: F401

CACHED = Policy(name="cached", cache=True, max_retries=0)


@pytest.fixture
def together() -> Iterator[TogetherSandbox]:
    with TogetherSandbox(api_key="tg-key") as sb:
        yield sb


def _together(sb: TogetherSandbox) -> TogetherProvider:
    return TogetherProvider(api_key="tg-key", base_url=sb.origin, fetcher=SafeFetcher(allow_loopback=True))


@pytest.mark.parametrize("shared", [False, True])
async def test_the_same_seeded_request_is_served_once_then_from_the_cache(
        together: TogetherSandbox, shared: bool, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("redis_url") if shared else None
    async with AsyncRouter([_together(together)], policy=CACHED, ledger=":memory:", state=url) as a:
        second = a if not shared else AsyncRouter([_together(together)], policy=CACHED, ledger=":memory:", state=url)
        try:
            first = await a.agenerate("a red fox", width=1024, height=1024, seed=42)
            again = await second.agenerate("a red fox", width=1024, height=1024, seed=42)
        finally:
            if second is not a:
                await second.aclose()
    posts = [r for r in together.requests if r.method == "POST"]
    assert (len(posts), [t.outcome for t in again.attempts], again.cost.actual_usd) == (1, ["cache-hit"], Decimal(0))
    assert again.images[0].data == first.images[0].data and first.cost.actual_usd > 0


async def test_an_unseeded_request_never_hits(together: TogetherSandbox, redis_url: str) -> None:  # noqa: F811
    async with AsyncRouter([_together(together)], policy=CACHED, ledger=":memory:", state=redis_url) as r:
        results = [await r.agenerate("a red fox", width=1024, height=1024) for _ in range(2)]
    assert [[t.outcome for t in x.attempts] for x in results] == [["success"], ["success"]]
    assert len([q for q in together.requests if q.method == "POST"]) == 2


async def test_a_policy_without_cache_never_hits(together: TogetherSandbox) -> None:
    async with AsyncRouter([_together(together)], policy=Policy(name="plain"), ledger=":memory:") as r:
        for _ in range(2):
            await r.agenerate("a red fox", width=1024, height=1024, seed=42)
    assert len([q for q in together.requests if q.method == "POST"]) == 2


async def test_a_circuit_opened_by_one_router_is_open_for_the_other(redis_url: str) -> None:  # noqa: F811
    with OpenAISandbox(api_key="sk-down") as down:
        down.faults.push(Fault.server_error(503), times=None)
        routers = [AsyncRouter([OpenAIProvider(api_key="sk-down", base_url=down.base_url)], ledger=":memory:",
                               policy=Policy(name="once", max_retries=0), state=redis_url) for _ in range(2)]
        try:
            for i in range(6):  # the first three fail at the provider, the rest are refused without a call
                with pytest.raises(ImageRouterError):
                    await routers[i % 2].agenerate("a lighthouse", width=1024, height=1024)
            hits = down.hits()
            states = [r.breaker.state("openai") for r in routers]
        finally:
            for r in routers:
                await r.aclose()
    assert (hits, states) == (3, ["open", "open"])
