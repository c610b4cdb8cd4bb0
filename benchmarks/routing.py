"""How long a routing decision takes, over real provider adapters: the engine alone, and the whole dry run.

    python benchmarks/routing.py [--rounds 7] [--calls 200]

The fleet is built from the real classes in ``providers/`` with fake keys (constructing one makes no
call; nothing here touches the network): openai, stability, replicate, together, bfl and local (a
three-model catalog) are the 6 providers; second accounts of openai, stability, together and bfl make
10. A second account is a provider like any other: the same models, a different name.

Columns, each the median over ``--rounds`` rounds of the mean of ``--calls`` calls (for ``decide`` also the
best round: on a shared machine it is the figure least disturbed by other work):

- ``decide``: ``PolicyEngine.decide`` on the candidates as the router builds them (the policy decision:
  filters, ranking, the chain; prompt complexity comes from its cache, as for a repeated prompt);
- ``candidates``: ``AsyncRouter.candidates`` (every provider's capabilities, plan and estimate);
- ``route``: ``AsyncRouter.route`` (request validation, budget headroom from an in-memory ledger,
  candidates, decision), the whole dry run.

The goal for ``decide`` is at most 50 µs at 10 providers.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

from policies import PRESETS
from policies.engine import RoutingContext
from providers.base import Provider
from providers.bfl import BFLProvider
from providers.local.provider import LocalProvider
from providers.openai import OpenAIProvider
from providers.replicate import ReplicateProvider
from providers.stability import StabilityProvider
from providers.together import TogetherProvider
from router.request import ImageRequest
from router.router import AsyncRouter

GOAL_US = 50.0
PROMPTS = {
    "simple": "a cat",
    "text+count": "a sign that says OPEN, three red apples on a table",
}
CATALOG = {"models": {
    "sd15": {"path": "/models/sd15", "family": "sd15"},
    "sdxl": {"path": "/models/sdxl", "family": "sdxl"},
    "flux": {"path": "/models/flux-dev", "family": "flux"},
}}


def fleet(count: int) -> list[Provider]:
    """6 or 10 providers from the real adapter classes, with fake keys."""
    out: list[Provider] = [
        OpenAIProvider(api_key="sk-bench"), StabilityProvider(api_key="sk-bench"),
        ReplicateProvider(api_token="r8_bench"), TogetherProvider(api_key="bench"), BFLProvider(api_key="bench"),
        LocalProvider(CATALOG),
    ]
    if count == 10:
        out += [OpenAIProvider(name="openai-2", api_key="sk-bench-2"),
                StabilityProvider(name="stability-2", api_key="sk-bench-2"),
                TogetherProvider(name="together-2", api_key="bench-2"), BFLProvider(name="bfl-2", api_key="bench-2")]
    return out


def timed_us(fn: Callable[[], object], rounds: int, calls: int) -> tuple[float, float]:
    """The median and the best over ``rounds`` of the mean time of ``calls`` calls, in microseconds."""
    for _ in range(calls // 4 + 1):
        fn()
    means = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(means), min(means)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--policy", default="balanced", choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    print(f"# routing decision time: policy {args.policy}, median of {args.rounds} rounds x {args.calls} calls")
    print(f"# python {platform.python_version()}, {platform.machine()}; goal: decide <= {GOAL_US:.0f} µs "
          "at 10 providers")
    print("| providers | prompt | candidates | accepted | chain | decide µs (median) | decide µs (best round) | "
          "goal µs | candidates() µs | route() µs |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for count in (6, 10):
        router = AsyncRouter(fleet(count), policy=args.policy, ledger=":memory:")
        policy = router.policy
        engine = router._engine(policy)
        for label, prompt in PROMPTS.items():
            request = ImageRequest(prompt=prompt)
            cands = router.candidates(request, policy)
            context = RoutingContext()
            decision = engine.decide(request, cands, context)
            decide, best = timed_us(partial(engine.decide, request, cands, context), args.rounds, args.calls)
            slow = max(1, args.calls // 10)
            build, _ = timed_us(partial(router.candidates, request, policy), args.rounds, slow)
            route, _ = timed_us(partial(router.route, prompt), args.rounds, slow)
            goal = f"{GOAL_US:.0f}" if count == 10 else "-"
            print(f"| {count} | {label} | {len(cands)} | {len(decision.ranked)} | {len(decision.chain)} | "
                  f"{decide:.1f} | {best:.1f} | {goal} | {build:.0f} | {route:.0f} |")
        router.ledger.close()

if __name__ == "__main__":
    main()
