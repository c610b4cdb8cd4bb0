"""Fan out: many prompts at once through one AsyncRouter, offline against the loopback OpenAI sandbox.

    python examples/async_fanout.py [OUT_DIR] [--count 24]

Every request shares the provider's connection pool; ``asyncio.gather`` collects the
results (or the errors, with ``return_exceptions=True``), and the ledger holds the
total spend. With a real key, drop the sandbox and build ``OpenAIProvider()``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from providers.openai import OpenAIProvider
from providers.sandbox import OpenAISandbox
from router import AsyncRouter, GenerationResult

SUBJECTS = ("a lighthouse", "a red bicycle", "a fox in the snow", "a teapot", "a sailing boat", "a cactus")
STYLES = ("oil painting", "watercolor", "pencil sketch", "photo at golden hour")


async def fan_out(out_dir: Path, count: int) -> int:
    prompts = [f"{SUBJECTS[i % len(SUBJECTS)]}, {STYLES[i % len(STYLES)]}" for i in range(count)]
    with OpenAISandbox() as sandbox:  # a real HTTP server on 127.0.0.1 that speaks OpenAI's Images API
        provider = OpenAIProvider(api_key=sandbox.api_key, base_url=sandbox.base_url)
        async with AsyncRouter([provider], policy="cheapest", ledger=":memory:") as router:
            start = time.perf_counter()
            outcomes = await asyncio.gather(
                *(router.agenerate(p, width=1024, height=1024, tags={"fanout"}) for p in prompts),
                return_exceptions=True,
            )
            elapsed = time.perf_counter() - start
            spent = router.ledger.spent()
        connections = sandbox.connections

    results = [o for o in outcomes if isinstance(o, GenerationResult)]
    failures = [o for o in outcomes if not isinstance(o, GenerationResult)]
    total = sum((r.cost.actual_usd for r in results), Decimal(0))
    for i, (prompt, result) in enumerate(zip(prompts, outcomes, strict=True)):
        if isinstance(result, GenerationResult):
            path = result.images[0].save(out_dir / f"fanout-{i:02d}")
            print(f"{i:2d}. {prompt!r}: {result.provider}/{result.model} ${result.cost.actual_usd} -> {path.name}")
        else:
            print(f"{i:2d}. {prompt!r}: {type(result).__name__}: {result}")
    print(f"{len(results)} of {count} requests succeeded in {elapsed:.2f}s over {connections} connection(s)")
    print(f"total cost ${total} (ledger: ${spent})")
    return 0 if not failures else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Many prompts concurrently through one AsyncRouter.")
    parser.add_argument("out_dir", nargs="?", type=Path, help="where to write the images (default: a temp dir)")
    parser.add_argument("--count", type=int, default=24)
    args = parser.parse_args(argv)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="pixroute-fanout-"))
    return asyncio.run(fan_out(out_dir, args.count))


if __name__ == "__main__":
    sys.exit(main())
