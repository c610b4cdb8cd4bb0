"""A pixroute jobs worker process for the kill test: its router reaches two OpenAI sandboxes that the test
process runs (``openai`` and ``openai-broken``) and shares the test's SQLite ledger.

    python -m tests.jobs_worker CONFIG_JSON OPENAI_URL BROKEN_URL LEDGER_PATH
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from policies.policy import Policy
from providers.openai import OpenAIProvider
from router.jobs import JobsConfig, run_worker

API_KEY = "sk-jobs-sandbox"
POLICY = Policy(name="jobs-test", max_retries=0)


def router_kwargs(openai_url: str, broken_url: str, ledger: str | Path) -> dict[str, Any]:
    """The router both the test and its workers use: one working sandbox, one that always fails."""
    return {"providers": [OpenAIProvider(api_key=API_KEY, base_url=openai_url),
                          OpenAIProvider(name="openai-broken", api_key=API_KEY, base_url=broken_url)],
            "policy": POLICY, "ledger": str(ledger)}


def main() -> int:
    config_json, openai_url, broken_url, ledger = sys.argv[1:5]
    config = JobsConfig.model_validate_json(Path(config_json).read_text())

    def factory() -> Mapping[str, Any]:
        return router_kwargs(openai_url, broken_url, ledger)

    run_worker(config, router_factory=factory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
