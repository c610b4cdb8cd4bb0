"""The examples and the overhead benchmark run offline, with no vendor key, and print what they promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_VENDOR_VARS = ("OPENAI_", "STABILITY_", "REPLICATE_", "TOGETHER_", "BFL_", "IMAGEROUTER_", "LITELLM_")


def run(script: str, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with this interpreter, no vendor keys or IMAGEROUTER_* settings in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_VENDOR_VARS)}
    env |= {"PYTHONPATH": str(ROOT), "IMAGEROUTER_LEDGER": ":memory:", "HF_HUB_OFFLINE": "1",
            "XDG_DATA_HOME": str(cwd / "xdg")}
    out = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env,
                         cwd=cwd, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def decodes(path: Path, size: tuple[int, int] = (1024, 1024)) -> bool:
    with Image.open(path) as img:
        img.load()
        return img.size == size


def test_quickstart_routes_prints_the_decision_and_writes_the_image(tmp_path: Path) -> None:
    out = run("examples/quickstart.py", str(tmp_path / "out"), cwd=tmp_path).stdout
    assert "chain (tried in this order):" in out and "openai/gpt-image-2" in out
    assert "served by openai/gpt-image-2" in out
    assert re.search(r"cost: estimated \$0\.0\d+, actual \$0\.0\d+ \(\d+ tokens", out)
    assert decodes(tmp_path / "out" / "lighthouse-0.png")


def test_async_fanout_gathers_every_result_and_totals_the_cost(tmp_path: Path) -> None:
    out = run("examples/async_fanout.py", str(tmp_path), "--count", "10", cwd=tmp_path).stdout
    assert "10 of 10 requests succeeded" in out
    total = re.search(r"total cost \$([0-9.]+) \(ledger: \$([0-9.]+)\)", out)
    assert total is not None and total[1] == total[2] and float(total[1]) > 0
    files = sorted(tmp_path.glob("fanout-*.png"))
    assert len(files) == 10 and all(decodes(f) for f in files)


def test_fallback_prints_the_trail_then_all_providers_failed(tmp_path: Path) -> None:
    out = run("examples/fallback.py", str(tmp_path), cwd=tmp_path).stdout
    first, _, second = out.partition("2. Together fails as well")
    assert "attempt 1: openai/gpt-image-2 retry 0: RateLimited" in first
    assert "attempt 2: openai/gpt-image-2 retry 1: ProviderUnavailable" in first
    assert re.search(r"attempt \d: together/black-forest-labs/FLUX.1-schnell retry 0: ok", first)
    assert "served by together/black-forest-labs/FLUX.1-schnell; cost $0.0027" in first
    assert "AllProvidersFailed after" in second and "together/black-forest-labs/FLUX.1-schnell retry" in second
    assert decodes(tmp_path / "fallback.png")


@pytest.fixture(scope="module")
def budgets_output(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    out_dir = tmp_path_factory.mktemp("budgets")
    return run("examples/policy_budgets.py", str(out_dir), cwd=out_dir).stdout, out_dir


def test_policy_budgets_reads_the_policy_file_and_refuses_over_budget(budgets_output: tuple[str, Path]) -> None:
    out, out_dir = budgets_output
    assert "day:team-a: $0.05" in out and "day:*: $5" in out
    assert "rules applied: when tag=client-eu → residency=frozenset({'eu'})" in out
    assert "request 2: served by openai" in out
    assert "request 1: BudgetExceeded: budget day:team-a ($0.05) would be exceeded" in out
    assert "attempts: openai:RateLimited, openai:BudgetExceeded" in out
    assert re.search(r"refused before any call: (BudgetExceeded|NoRouteError)", out) and "[budget]" in out
    assert "spent today: team-a $0.03" in out
    assert decodes(out_dir / "client-eu.png") and decodes(out_dir / "team-a-2.png")
    assert not (out_dir / "team-a-1.png").exists()


def test_policy_budgets_residency_rule_reaches_the_eu_host(budgets_output: tuple[str, Path]) -> None:
    assert "EU host calls 1, default host calls 0" in budgets_output[0]


def test_the_overhead_benchmark_runs_a_tiny_round(tmp_path: Path) -> None:
    out = run("benchmarks/overhead.py", "--requests", "5", "--rounds", "1", "--concurrency", "1", "--skip-litellm",
              cwd=tmp_path, timeout=60).stdout
    assert "| method | concurrency | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s |" in out
    for method in ("raw", "adapter", "router"):
        assert re.search(rf"^\| {method} \| 1 \| [0-9.]+ \|", out, re.M), out
    assert "concurrency 1: the router adds" in out and "over its own adapter" in out


def test_the_overhead_benchmark_without_the_bench_extra_says_how_to_get_it(tmp_path: Path) -> None:
    import importlib.util

    assert importlib.util.find_spec("litellm") is None  # the dev extra leaves the bench extra out
    env = {k: v for k, v in os.environ.items() if not k.startswith(_VENDOR_VARS)} | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/overhead.py"), "--requests", "1"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "LiteLLM is not installed: pip install -e '.[bench]'" in out.stderr and "--skip-litellm" in out.stderr
