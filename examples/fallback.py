"""Fallback: a failing provider, then success elsewhere; then every provider failing. Offline.

    python examples/fallback.py [OUT_DIR]

OpenAI's loopback sandbox is told to rate-limit once and then answer 503 to every call;
the router retries it (honouring Retry-After, then with backoff) and falls back to
Together's sandbox. The result's ``attempts`` is the whole trail. When Together fails
too, ``AllProvidersFailed`` carries the same trail.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from policies import Policy
from providers.openai import OpenAIProvider
from providers.sandbox import Fault, OpenAISandbox, TogetherSandbox
from providers.together import TogetherProvider
from router import AllProvidersFailed, AsyncRouter, Attempt
from router.fetch import SafeFetcher

ORDER = Policy(name="openai-first", fallback_order=("openai", "together"), max_retries=2)


def show(attempts: Sequence[Attempt]) -> None:
    for i, a in enumerate(attempts, 1):
        how = "ok" if a.outcome == "success" else f"{a.error} ({a.message})"
        print(f"  attempt {i}: {a.provider}/{a.model} retry {a.retry}: {how} in {a.latency_s * 1000:.0f} ms, "
              f"${a.cost_usd}")


async def run(out_dir: Path) -> int:
    with OpenAISandbox() as openai_sb, TogetherSandbox() as together_sb:
        providers = [
            OpenAIProvider(api_key=openai_sb.api_key, base_url=openai_sb.base_url),
            TogetherProvider(api_key=together_sb.api_key, base_url=together_sb.base_url,
                             models=("black-forest-labs/FLUX.1-schnell",),
                             fetcher=SafeFetcher(allow_loopback=True)),  # its images are served on 127.0.0.1
        ]
        async with AsyncRouter(providers, policy=ORDER, ledger=":memory:", backoff=(0.05, 0.2)) as router:
            openai_sb.faults.push(Fault.rate_limit(retry_after=0.1))
            openai_sb.faults.push(Fault.server_error(503), times=None)
            print("1. OpenAI rate-limits once, then answers 503")
            result = await router.agenerate("a lighthouse at dusk, oil painting", width=1024, height=1024)
            show(result.attempts)
            print(f"  served by {result.provider}/{result.model}; cost ${result.cost.actual_usd} "
                  f"(failed attempts cost nothing); wrote {result.images[0].save(out_dir / 'fallback')}")

            together_sb.faults.push(Fault.server_error(500), times=None)
            print("\n2. Together fails as well")
            try:
                await router.agenerate("a lighthouse at dusk, oil painting", width=1024, height=1024)
            except AllProvidersFailed as exc:
                show(exc.attempts)
                print(f"  AllProvidersFailed after {len(exc.attempts)} attempts")
        print(f"\nsandbox calls: openai {openai_sb.hits()}, together {together_sb.hits()}")
    return 0


def main() -> int:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="pixroute-fallback-"))
    return asyncio.run(run(out_dir))


if __name__ == "__main__":
    sys.exit(main())
