"""The router on a PostgreSQL ledger: ``AsyncRouter(ledger="postgresql://…")``, a budget held under 60
concurrent requests, the ledger equal to what the sandbox billed, and no reservation left open."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import psycopg

from policies.policy import Policy
from providers.openai import OpenAIProvider
from providers.sandbox import OpenAISandbox
from router import AsyncRouter, BudgetExceeded, ImageRouterError
from router.ledger import Budget
from router.ledger_pg import PostgresLedger
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)

ONE = Policy(name="openai-only", fallback_order=("openai",), max_retries=0)


async def test_a_router_on_postgres_holds_its_budget_and_matches_the_bills(pg_url: str) -> None:  # noqa: F811
    with OpenAISandbox(api_key="sk-pg") as sandbox:
        provider = OpenAIProvider(api_key=sandbox.api_key, base_url=sandbox.base_url)
        async with AsyncRouter([provider], policy=ONE, ledger=pg_url, budgets=[Budget(Decimal("1"), "day")]) as r:
            assert isinstance(r.ledger, PostgresLedger)
            outcomes = await asyncio.gather(*(r.agenerate("a red fox", width=1024, height=1024) for _ in range(60)),
                                            return_exceptions=True)
            unexpected = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, ImageRouterError)]
            assert unexpected == []
            served = sum(not isinstance(o, BaseException) for o in outcomes)
            refused = sum(isinstance(o, BudgetExceeded) for o in outcomes)
            assert served > 0 and refused > 0 and served + refused == 60
            spent = r.ledger.spent(period="day")
            assert spent == sandbox.billed_usd <= Decimal("1")
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT COUNT(*) FROM imagerouter_charges WHERE state = 'open'").fetchone()
        assert row is not None and row[0] == 0
