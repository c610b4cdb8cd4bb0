"""One process of the real-spend test: concurrent requests through two overbilling OpenAI sandboxes
(some answers billed but broken) against a shared ledger; prints what its sandboxes billed.

    python -m tests.spend_worker LEDGER_PATH REQUESTS BROKEN
"""

from __future__ import annotations

import asyncio
import json
import sys

from policies.policy import Policy
from providers.openai import OpenAIProvider
from providers.sandbox import Fault, OpenAISandbox
from router import AsyncRouter, ImageRouterError
from router.ledger import Ledger

ORDER = Policy(name="primary-then-backup", fallback_order=("openai", "openai-backup"), max_retries=0)


async def spend(ledger: Ledger, requests: int, broken: int, multiplier: int = 2) -> dict[str, str]:
    """Run ``requests`` concurrent generations; the first ``broken`` answers of the primary are billed but
    undecodable. Returns what each sandbox billed and how many requests were served."""
    with OpenAISandbox(api_key="sk-spend-a") as a, OpenAISandbox(api_key="sk-spend-b") as b:
        a.bill_multiplier = b.bill_multiplier = multiplier
        if broken:
            a.faults.push(Fault("broken_image"), times=broken)
        providers = [OpenAIProvider(api_key=a.api_key, base_url=a.base_url),
                     OpenAIProvider(name="openai-backup", api_key=b.api_key, base_url=b.base_url)]
        async with AsyncRouter(providers, policy=ORDER, ledger=ledger) as router:
            outcomes = await asyncio.gather(*(router.agenerate("a red fox in the snow", width=1024, height=1024)
                                              for _ in range(requests)), return_exceptions=True)
        unexpected = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, ImageRouterError)]
        if unexpected:
            raise unexpected[0]
        served = sum(not isinstance(o, BaseException) for o in outcomes)
        broken_served = sum(1 for r in a.requests if r.fault is not None and r.fault.kind == "broken_image")
        return {"billed": str(a.billed_usd + b.billed_usd), "served": str(served), "broken": str(broken_served)}


def main() -> int:
    path, requests, broken = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ledger = Ledger(path)
    try:
        print(json.dumps(asyncio.run(spend(ledger, requests, broken))))
    finally:
        ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
