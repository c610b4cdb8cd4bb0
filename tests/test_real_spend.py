"""Budgets hold on what the vendors really billed: 100 concurrent requests against a $1 budget, with
billed failures (answers billed but broken) and a vendor billing twice its published rates, in one process
and across 4 processes sharing one ledger file. The ledger equals the sandboxes' bills exactly, and the
spend never exceeds the budget plus the bound the README states."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

from router.ledger import Budget, Ledger
from tests.spend_worker import spend

BUDGET = Decimal(1)
# README, "The overshoot bound": what the calls in flight were billed beyond their reservations. With at
# most the budget reserved at once and a vendor billing 2x, that is one more budget.
BOUND = BUDGET * (2 - 1)


async def test_one_process() -> None:
    ledger = Ledger(":memory:")
    ledger.set_budget(Budget(BUDGET, "day"))
    out = await spend(ledger, requests=100, broken=5)
    billed = Decimal(out["billed"])
    assert ledger.spent(period="day") == billed  # exactly: every billed attempt, failed or not
    assert 0 < billed <= BUDGET + BOUND
    assert int(out["served"]) > 0 and int(out["broken"]) == 5  # the billed-but-broken answers were charged


def test_four_processes_sharing_one_ledger_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path) as ledger:
        ledger.set_budget(Budget(BUDGET, "day"))
    root = Path(__file__).resolve().parents[1]
    workers = [subprocess.Popen([sys.executable, "-m", "tests.spend_worker", str(path), "25", "3"], cwd=root,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    billed = sum((Decimal(o["billed"]) for o in outs), Decimal(0))
    with Ledger(path) as ledger:
        assert ledger.spent(period="day") == billed
    assert 0 < billed <= BUDGET + BOUND
    assert sum(int(o["served"]) for o in outs) > 0 and sum(int(o["broken"]) for o in outs) > 0
