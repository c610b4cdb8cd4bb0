"""One process of the shared-state fleet tests: reads JSON commands on stdin, answers one JSON line each.

    python -m tests.state_worker REDIS_URL PREFIX OPENAI_BASE_URL TOGETHER_BASE_URL COOLDOWN_S

Calls go to the loopback sandboxes through the real provider adapters, with the state's breaker, limits and
cache used the way the router uses them (admit, call, record; cache lookup before the call, store after it).

Commands: ``{"op": "call", "n": N}`` (N concurrent calls of the down provider), ``{"op": "state"}`` (the
circuit as this process sees it), ``{"op": "take", "n": N, "rpm": R}`` (N concurrent rate-limit takes on
key ``k``), ``{"op": "generate", "seed": S|null}`` (one cached generation), ``{"op": "quit"}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from decimal import Decimal
from typing import Any

from providers.base import Provider
from providers.openai import OpenAIProvider
from providers.together import SCHNELL, TogetherProvider
from router.errors import ImageRouterError, MalformedResponse, ProviderTimeout, ProviderUnavailable
from router.fetch import SafeFetcher
from router.request import ImageRequest
from router.state import CachedResult, RouterState, cache_key, open_state

OPENAI_KEY = "sk-fleet-down"
TOGETHER_KEY = "tg-fleet-key"
_PROVIDER_FAULTS = (ProviderUnavailable, ProviderTimeout, MalformedResponse)


class Worker:
    def __init__(self, state: RouterState, down: Provider, seeded: Provider) -> None:
        self.state = state
        self.down = down
        self.seeded = seeded

    async def guarded_call(self) -> bool:
        """One call of the down provider if its circuit admits it (the router's _call protocol); whether it went."""
        breaker, name = self.state.breaker, self.down.name
        if not await breaker.abefore_call(name):
            return False
        request = ImageRequest(prompt="a lighthouse", width=1024, height=1024)
        try:
            await self.down.generate(request, self.down.models()[0], timeout_s=30.0)
        except _PROVIDER_FAULTS:
            await breaker.arecord_failure(name)
        except ImageRouterError:
            await breaker.arelease(name)
        else:
            await breaker.arecord_success(name)
        return True

    async def generate(self, seed: int | None) -> dict[str, Any]:
        """One generation through the result cache: a hit costs $0 and calls nothing."""
        request = ImageRequest(prompt="a red fox in the snow", width=1024, height=1024, seed=seed)
        key = cache_key(request, self.seeded.name, SCHNELL)
        if key is not None:
            hit = await self.state.cache.aget(key)
            if hit is not None:
                return _generated(hit.response().images[0].data, True, Decimal(0))
        response = await self.seeded.generate(request, SCHNELL, timeout_s=30.0)
        if key is not None:
            await self.state.cache.aput(key, CachedResult.from_response(self.seeded.name, response))
        return _generated(response.images[0].data, False, response.billing.cost_usd)

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "call":
            went = await asyncio.gather(*(self.guarded_call() for _ in range(int(cmd["n"]))))
            return {"called": sum(went), "refused": len(went) - sum(went)}
        if op == "state":
            await self.state.breaker.arefresh([self.down.name])
            return {"state": self.state.breaker.state(self.down.name)}
        if op == "take":
            waits = await asyncio.gather(*(self.state.limits.atake("k", int(cmd["rpm"])) for _ in range(int(cmd["n"]))))
            return {"admitted": sum(1 for w in waits if w == 0.0)}
        if op == "generate":
            return await self.generate(cmd["seed"])
        raise ValueError(f"unknown op {op!r}")


def _generated(data: bytes, hit: bool, cost: Decimal) -> dict[str, Any]:
    return {"hit": hit, "cost": str(cost), "sha256": hashlib.sha256(data).hexdigest()}


async def main(argv: list[str]) -> None:
    redis_url, prefix, openai_url, together_url, cooldown = argv
    state = open_state(redis_url, prefix=prefix, cooldown_s=float(cooldown), refresh_s=0.0)
    down = OpenAIProvider(api_key=OPENAI_KEY, base_url=openai_url)
    seeded = TogetherProvider(api_key=TOGETHER_KEY, base_url=together_url, fetcher=SafeFetcher(allow_loopback=True))
    worker = Worker(state, down, seeded)
    loop = asyncio.get_running_loop()
    try:
        print(json.dumps({"ready": True}), flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            print(json.dumps(await worker.handle(cmd)), flush=True)
    finally:
        await down.aclose()
        await seeded.aclose()
        await state.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
