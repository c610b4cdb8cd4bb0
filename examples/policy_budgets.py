"""Budgets per tag and a residency rule from a policy file, offline against loopback OpenAI sandboxes.

    python examples/policy_budgets.py [OUT_DIR]

``examples/policy.yaml`` extends the balanced preset with a rule (requests tagged
``client-eu`` stay in the EU) and two daily budgets (all requests; tag ``team-a``). The
router keeps budgets in its ledger: it reserves each call's estimate before calling and
settles the bill after, so concurrent requests cannot overspend. Shown here:

1. a ``client-eu`` request served from the EU host only;
2. two ``team-a`` requests, the first one rate-limited: by the time it retries, the other
   one has spent the budget, so its reservation is refused with ``BudgetExceeded``;
3. a third ``team-a`` request, refused before any call: every candidate's estimate is over the
   budget's headroom (``BudgetExceeded``; routers before issue 5 raised ``NoRouteError`` here).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from providers.openai import OpenAIProvider
from providers.sandbox import Fault, OpenAISandbox
from router import AsyncRouter, BudgetExceeded, NoRouteError

POLICY = Path(__file__).with_name("policy.yaml")


MEDIUM = {"openai": {"quality": "medium"}}  # bounds each call's worst case (auto may pick "high")


async def run(out_dir: Path) -> int:
    with OpenAISandbox() as us, OpenAISandbox() as eu:
        openai = OpenAIProvider(api_key=us.api_key, base_url=us.base_url, region_base_urls={"eu": eu.base_url})
        async with AsyncRouter([openai], policy=POLICY, ledger=":memory:", backoff=(0.1, 0.5)) as router:
            print(f"policy {router.policy.name!r} from {POLICY.name}; budgets:")
            for budget in router.ledger.budgets():
                print(f"  {budget.name}: ${budget.limit_usd}")

            print("\n1. residency: a request tagged client-eu")
            result = await router.agenerate("a harbour at dawn", width=1024, height=1024, tags={"client-eu"})
            print(f"  rules applied: {'; '.join(result.decision.rules_applied)}")
            print(f"  served by {result.provider}/{result.model}, ${result.cost.actual_usd}; "
                  f"EU host calls {eu.hits()}, default host calls {us.hits()}")
            print(f"  wrote {result.images[0].save(out_dir / 'client-eu')}")

            print("\n2. two team-a requests; the first is rate-limited (Retry-After 1s), the second starts meanwhile")
            us.faults.push(Fault.rate_limit(retry_after=1.0))
            calls = us.hits()
            first = asyncio.create_task(
                router.agenerate("a team-a poster, version 1", width=1024, height=1024, tags={"team-a"},
                                 provider_options=MEDIUM))
            for _ in range(500):  # until the first request's call has reached the sandbox (5 s at most)
                if us.hits() != calls or first.done():
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # and its 429 has come back: its reservation is released while it waits
            second = await router.agenerate("a team-a poster, version 2", width=1024, height=1024,
                                            tags={"team-a"}, provider_options=MEDIUM)
            print(f"  request 2: served by {second.provider}, ${second.cost.actual_usd}; "
                  f"wrote {second.images[0].save(out_dir / 'team-a-2')}")
            try:
                await first
            except BudgetExceeded as exc:
                trail = ", ".join(f"{a.provider}:{a.error or a.outcome}" for a in exc.attempts)
                print(f"  request 1: BudgetExceeded: {exc.message}")
                print(f"    attempts: {trail}")

            print("\n3. a third team-a request")
            try:
                await router.agenerate("a team-a poster, version 3", width=1024, height=1024, tags={"team-a"},
                                       provider_options=MEDIUM)
            except (BudgetExceeded, NoRouteError) as exc:
                print(f"  refused before any call: {type(exc).__name__}: {exc.message}")
                decision = getattr(exc, "decision", None)
                for rejection in decision.rejections if decision is not None else ():
                    print(f"    rejected {rejection.provider}/{rejection.model}: [{rejection.code}] {rejection.reason}")
            print(f"\nspent today: team-a ${router.ledger.spent({'team-a'}, 'day')}, "
                  f"all ${router.ledger.spent(period='day')}")
    return 0


def main() -> int:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="pixroute-budgets-"))
    return asyncio.run(run(out_dir))


if __name__ == "__main__":
    sys.exit(main())
