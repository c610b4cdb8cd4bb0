"""Hedged requests against a slow tail: p50 / p99 / p99.9 and the extra spend, with and without hedging.

    python benchmarks/hedging.py [--requests 2000] [--concurrency 8] [--slow-fraction 0.05] [--slow-s 0.5]

Two loopback OpenAI sandboxes stand for two accounts of one vendor (``head`` first in the chain, then
``backup``; both gpt-image-2 at 1024x1024). Before each request, with probability
``--slow-fraction``, the head's sandbox is told to hold its next answer ``--slow-s`` seconds (its
``Fault.timeout``, which answers normally after the wait): a slow tail. Each configuration runs the same
seeded sequence of slow requests:

- ``none``: no hedging (the head is waited for, however long);
- ``p95``: ``hedge: {after: p95}`` — the backup starts once the head outlasts its observed p95;
- ``50ms``: ``hedge: {after: 0.05}``.

"extra spend" is what the hedges' losers were charged (a cancelled call is charged its reservation:
the vendor may bill a call it finishes after we hang up) as a share of the whole spend. Hedging may add
at most ``max_extra_fraction`` (5 % here, and 10 %) of the spend so far, so the first requests of a run,
before any spend, are never hedged: a warm-up of 200 requests precedes the measured ones.

Nothing here leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import statistics
import sys
import time

from policies.policy import Hedge, Policy
from providers.openai import OpenAIProvider
from providers.sandbox import OpenAISandbox
from providers.sandbox._server import Fault
from router import AsyncRouter

KEY = "sk-bench-hedging-0123456789"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(head: OpenAISandbox, backup: OpenAISandbox, policy: Policy, args: argparse.Namespace,
              warmup: int) -> dict[str, float]:
    providers = [OpenAIProvider(name="head", api_key=KEY, base_url=head.base_url),
                 OpenAIProvider(name="backup", api_key=KEY, base_url=backup.base_url)]
    router = AsyncRouter(providers, ledger=":memory:", policy=policy, max_retries=0)
    rng = random.Random(7)
    latencies: list[float] = []
    lock = asyncio.Lock()
    queue = list(range(warmup + args.requests))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            async with lock:  # a slow answer for the head's next request, on the seeded schedule
                if rng.random() < args.slow_fraction:
                    head.faults.push(Fault.timeout(args.slow_s), times=1)
            t0 = time.perf_counter()
            await router.agenerate("a lighthouse at dusk", width=1024, height=1024,
                                   provider_options={"head": {"quality": "low"}, "backup": {"quality": "low"}})
            if i < args.requests:
                latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    head.faults.clear()
    spent = router.ledger.spent(period="total")
    extra = router._hedge_extra
    await router.aclose()
    return {
        "p50": percentile(latencies, 0.5) * 1e3,
        "p99": percentile(latencies, 0.99) * 1e3,
        "p999": percentile(latencies, 0.999) * 1e3,
        "mean": statistics.fmean(latencies) * 1e3,
        "extra": float(extra / spent * 100) if spent else 0.0,
        "spent": float(spent),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--slow-fraction", type=float, default=0.05)
    parser.add_argument("--slow-s", type=float, default=0.5)
    args = parser.parse_args()
    base = dict(name="bench", fallback_order=("head", "backup"), max_retries=0)
    configs = [
        ("none", Policy(**base)),  # type: ignore[arg-type]
        ("p95, cap 5 %", Policy(**base, hedge=Hedge(after="p95", max_extra_fraction=0.05))),  # type: ignore[arg-type]
        ("p95, cap 10 %", Policy(**base, hedge=Hedge(after="p95", max_extra_fraction=0.10))),  # type: ignore[arg-type]
        ("50 ms, cap 10 %", Policy(**base, hedge=Hedge(after=0.05, max_extra_fraction=0.10))),  # type: ignore[arg-type]
    ]
    print(f"# hedging: {args.requests} requests (after 200 warm-up) at concurrency {args.concurrency}; "
          f"{args.slow_fraction:.0%} of the head's answers held {args.slow_s * 1e3:.0f} ms")
    print(f"# python {platform.python_version()}; {platform.machine()}; two loopback OpenAI sandboxes")
    print("| hedging | p50 ms | p99 ms | p99.9 ms | mean ms | extra spend | spent $ |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with OpenAISandbox(api_key=KEY) as head, OpenAISandbox(api_key=KEY) as backup:
        for label, policy in configs:
            r = await run(head, backup, policy, args, warmup=200)
            print(f"| {label} | {r['p50']:.1f} | {r['p99']:.1f} | {r['p999']:.1f} | {r['mean']:.1f} | "
                  f"{r['extra']:.2f} % | {r['spent']:.4f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
