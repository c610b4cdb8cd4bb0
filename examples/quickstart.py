"""Quickstart: one routed generation, offline, against the loopback OpenAI sandbox.

    python examples/quickstart.py

With a real key you would drop the sandbox and write ``Router.from_env()`` (it reads
OPENAI_API_KEY) or just call ``router.generate(...)``. Everything else is the same.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from providers.openai import OpenAIProvider
from providers.sandbox import OpenAISandbox
from router import Constraints, ImageRequest, Router


def main(out_dir: Path) -> int:
    with OpenAISandbox() as sandbox:  # a real HTTP server on 127.0.0.1 that speaks OpenAI's Images API
        openai = OpenAIProvider(api_key=sandbox.api_key, base_url=sandbox.base_url)
        with Router([openai], policy="balanced", ledger=":memory:") as router:
            request = ImageRequest(
                prompt="a lighthouse at dusk, oil painting",
                negative_prompt="blurry, low quality",
                width=1024,
                height=1024,
                seed=7,
                # OpenAI bills tokens: with quality "auto" it may choose "high" (~$0.125 at 1024x1024), so the
                # router would reserve that worst case; naming the quality bounds the call at ~$0.032.
                provider_options={"openai": {"quality": "medium"}},
                constraints=Constraints(max_cost_usd="0.10"),
                tags={"quickstart"},
            )
            print(router.route(request).explain())
            result = router.generate(request)

    print()
    print(f"served by {result.provider}/{result.model} in {result.latency.total_s:.2f}s")
    print(f"cost: estimated ${result.cost.estimated_usd}, actual ${result.cost.actual_usd} "
          f"({result.cost.quantity} {result.cost.unit}, price table {result.cost.price_table_version})")
    for warning in result.warnings:
        print(f"warning: {warning}")
    for path in result.save(out_dir, stem="lighthouse"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="pixroute-"))
    sys.exit(main(target))
