"""One router process of the fleet test (:mod:`tests.test_fleet`): an :class:`~router.AsyncRouter` on the
shared PostgreSQL ledger and Redis state, in front of the test's loopback sandboxes and ``serve`` workers.

    python -m tests.fleet_worker CONFIG_JSON

``CONFIG_JSON`` holds ``ledger`` (a ``postgresql://`` URL), ``state`` (a ``redis://`` URL), ``openai`` and
``xai`` (the sandboxes' base URLs), ``serve`` (the ``serve`` workers' origins), ``worker`` (this process's
number), ``requests`` and ``concurrency``. The process prints ``{"ready": true}``, waits for one line on
stdin (so the whole fleet starts at once), makes its requests ``concurrency`` at a time — two of every
three through its own router, the third over HTTP to a ``serve`` worker (alternating) — and prints one
JSON line: how many were served, refused by the budget, found no route (the budget and open circuits
ruling out every candidate), or failed (by error), and the images each ``serve`` worker answered.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from typing import Any

import httpx

from policies.policy import Policy
from providers.openai import OpenAIProvider
from providers.xai import XAIProvider
from router import AsyncRouter, BudgetExceeded, ImageRouterError, NoRouteError

OPENAI_KEY = "sk-fleet"
XAI_KEY = "xai-fleet"
SIZE = (1024, 1024)  # the smallest square gpt-image-2 makes; low quality: $0.0082 an image
OPTIONS = {"openai": {"quality": "low"}}
POLICY = Policy(name="fleet", fallback_order=("openai", "xai"), max_retries=1)
"""The fleet's policy; the ``serve`` workers read the same from :data:`POLICY_YAML`."""
POLICY_YAML = "name: fleet\nfallback_order: [openai, xai]\nmax_retries: 1\n"
PROVIDER_KINDS = "openai,xai"


_WHILE_FAILING = frozenset({"budget", "circuit-open"})


def _no_route(codes: list[str]) -> str | None:
    """The outcome of a request no candidate could take: ``budget`` when the budget refused every one,
    ``no-route`` when the budget and open circuits did; None for any other reason (unexpected here)."""
    if codes and all(c == "budget" for c in codes):
        return "budget"
    return "no-route" if codes and _WHILE_FAILING.issuperset(codes) else None


def _outcome(exc: ImageRouterError) -> str:
    if isinstance(exc, BudgetExceeded):
        return "budget"
    if isinstance(exc, NoRouteError):
        return _no_route([r.code for r in exc.rejections]) or f"router:NoRouteError:{exc.message}"
    return f"router:{type(exc).__name__}"


class Worker:
    def __init__(self, config: dict[str, Any]) -> None:
        self.number = int(config["worker"])
        self.serve: list[str] = list(config["serve"])
        self.router = AsyncRouter(
            [OpenAIProvider(api_key=OPENAI_KEY, base_url=config["openai"]),
             XAIProvider(api_key=XAI_KEY, base_url=config["xai"])],
            policy=POLICY, ledger=config["ledger"], state=config["state"], backoff=(0.05, 0.4))
        # uvicorn closes a connection idle for 5 s (--timeout-keep-alive, https://www.uvicorn.org/settings/#timeouts)
        # and httpx keeps one for 5 s (keepalive_expiry, https://www.python-httpx.org/advanced/resource-limits/):
        # a request sent as the server hangs up fails with ReadError. A client expiry below the server's avoids it.
        self.http = httpx.AsyncClient(timeout=120.0, limits=httpx.Limits(keepalive_expiry=1.0))
        self.outcomes: Counter[str] = Counter()
        self.served_by: Counter[str] = Counter()

    def _prompt(self, i: int) -> str:
        return f"a lighthouse at dusk, worker {self.number} request {i}"

    async def direct(self, i: int) -> None:
        try:
            await self.router.agenerate(self._prompt(i), width=SIZE[0], height=SIZE[1], provider_options=OPTIONS)
        except ImageRouterError as exc:
            self.outcomes[_outcome(exc)] += 1
        else:
            self.outcomes["served"] += 1

    async def over_http(self, i: int) -> None:
        origin = self.serve[(i // 3 + self.number) % len(self.serve)]
        body = {"prompt": self._prompt(i), "size": f"{SIZE[0]}x{SIZE[1]}", "provider_options": OPTIONS}
        answer = await self.http.post(f"{origin}/v1/images/generations", json=body)
        if answer.status_code == 200:
            self.outcomes["served"] += 1
            self.served_by[origin] += 1
            return
        error = answer.json().get("error", {})
        outcome = "budget" if error.get("code") == "budget_exceeded" else None
        if error.get("code") == "no_route":
            outcome = _no_route([r["code"] for r in error.get("rejections", [])])
        self.outcomes[outcome or f"http:{answer.status_code}:{error.get('code')}"] += 1

    async def run(self, requests: int, concurrency: int) -> None:
        pending = iter(range(requests))

        async def lane() -> None:
            for i in pending:
                await (self.over_http(i) if i % 3 == 2 else self.direct(i))

        await asyncio.gather(*(lane() for _ in range(concurrency)))

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.router.aclose()


async def main(argv: list[str]) -> None:
    config = json.loads(argv[0])
    worker = Worker(config)
    try:
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await worker.run(int(config["requests"]), int(config["concurrency"]))
    finally:
        await worker.aclose()
    print(json.dumps({"outcomes": dict(worker.outcomes), "served_by": dict(worker.served_by)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
