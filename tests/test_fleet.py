"""The fleet's money must-show: 4 router processes (:mod:`tests.fleet_worker`) and 2 ``pixroute serve`` workers
share one PostgreSQL ledger and one Redis state; 1,000 requests against a $5 budget while the sandboxes answer
429s, 503s and billed failures (a 200, billed, whose image does not decode):

- what the sandboxes billed is at most $5: the bound README's "Costs and budgets" documents is what calls in
  flight were billed *beyond their reservations*, which is nothing here (the sandboxes bill at the published
  prices the reservations are made from), so the budget holds exactly;
- the ledger equals the sandboxes' bills exactly, per provider, one settled charge per billed answer;
- no reservation is left open.

A second run has the OpenAI sandbox bill 3x its published prices (``bill_multiplier``): then the budget may be
overshot, by at most what calls were billed beyond their reservations (README's bound), and the ledger still
equals the bills.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import httpx
import psycopg
import pytest

from providers.sandbox import Fault, FaultPlan, OpenAISandbox, SandboxServer, XAISandbox
from router.ledger import Budget
from router.ledger_pg import PostgresLedger
from tests.fleet_worker import OPENAI_KEY, POLICY_YAML, PROVIDER_KINDS, XAI_KEY
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)
from tests.redis_server import redis_server, redis_url  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
GENERATIONS = "/v1/images/generations"  # both sandboxes' generation route
BUDGET = Decimal("5")
ROUTERS, SERVERS = 4, 2
REQUESTS, CONCURRENCY = 1_000, 16  # per router process: 250 requests, 16 at a time


class Scheduled(FaultPlan):
    """Faults on a fixed cycle over the generation requests: request k gets ``cycle[k % len(cycle)]`` (None:
    answered as usual). Deterministic, unlike pushing faults from a timer; counts what it served."""

    def __init__(self, sandbox: SandboxServer, cycle: Sequence[Fault | None]) -> None:
        super().__init__(sandbox.fault_kinds)
        for fault in cycle:
            if fault is not None:
                self.push(fault)  # the base class's check that this vendor serves the kind
        self.clear()
        self._cycle = tuple(cycle)
        self._seen = 0
        self._count_lock = threading.Lock()
        self.served: Counter[str] = Counter()

    def take(self, path: str) -> Fault | None:
        if path != GENERATIONS:
            return None
        with self._count_lock:
            fault = self._cycle[self._seen % len(self._cycle)]
            self._seen += 1
            if fault is not None:
                self.served[fault.kind] += 1
        return fault


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Fleet:
    """The ``serve`` workers and the router processes, with their stderr kept for a failure's message."""

    def __init__(self) -> None:
        self._files = contextlib.ExitStack()
        self.procs: list[tuple[str, subprocess.Popen[str], IO[bytes]]] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        err = self._files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (closed with the fleet)
        proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True, cwd=ROOT, env=env)
        self.procs.append((name, proc, err))
        return proc

    def fail(self, name: str, why: str) -> None:
        for n, _proc, err in self.procs:
            if n == name:
                err.seek(0)
                pytest.fail(f"{name} {why}:\n{err.read().decode(errors='replace')[-4000:]}")
        pytest.fail(f"{name} {why}")

    def line(self, name: str, proc: subprocess.Popen[str]) -> dict[str, Any]:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            self.fail(name, "ended")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        for _name, proc, _err in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # uvicorn and asyncio.run both shut down cleanly on it
        for _name, proc, _err in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._files.close()


def _wait_healthy(fleet: Fleet, name: str, proc: subprocess.Popen[str], origin: str) -> None:
    for _ in range(600):  # up to 60 s on a loaded machine; no assertion on the time
        if proc.poll() is not None:
            fleet.fail(name, f"exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{origin}/healthz", timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    fleet.fail(name, "never answered /healthz")


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    f = Fleet()
    try:
        yield f
    finally:
        f.close()


@dataclass
class Run:
    """What a fleet run left: the callers' outcomes, the sandboxes' bills and the faults they served."""

    outcomes: Counter[str]
    served_by: Counter[str]
    billed: dict[str, Decimal]
    billed_answers: dict[str, int]
    faults: dict[str, dict[str, int]]


def run_fleet(ledger_url: str, state_url: str, fleet: Fleet, policy_file: Path, *, requests: int = REQUESTS,
              openai_bill_multiplier: int = 1) -> Run:
    """``requests`` from 4 router processes (a third of them through 2 ``serve`` workers) against a $5 budget,
    the sandboxes serving 429s, 503s and billed failures on a fixed cycle."""
    with PostgresLedger(ledger_url) as ledger:  # migrates the database, then the budget every process shares
        ledger.set_budget(Budget(BUDGET, "total"))
    policy_file.write_text(POLICY_YAML, encoding="utf-8")

    with OpenAISandbox(api_key=OPENAI_KEY) as openai_sb, XAISandbox(api_key=XAI_KEY) as xai_sb:
        openai_sb.bill_multiplier = openai_bill_multiplier
        openai_sb.faults = openai_faults = Scheduled(openai_sb, [
            None, None, Fault.rate_limit(retry_after=0.05), None, None, Fault.server_error(503), None, None,
            Fault("broken_image"), None])  # 200, billed, an image that does not decode
        xai_sb.faults = xai_faults = Scheduled(xai_sb, [
            None, Fault.rate_limit(retry_after=0.05), None, Fault.server_error(503), None,
            Fault.hostile_image("wrong_format_image")])  # 200, billed, a FITS file

        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEROUTER_", "OPENAI_", "XAI_"))}
        env = base_env | {"PYTHONPATH": str(ROOT)}
        serve_env = env | {
            "OPENAI_API_KEY": OPENAI_KEY, "OPENAI_BASE_URL": openai_sb.base_url,
            "XAI_API_KEY": XAI_KEY, "XAI_BASE_URL": xai_sb.base_url,
            "IMAGEROUTER_PROVIDERS": PROVIDER_KINDS, "IMAGEROUTER_STATE": state_url,
        }
        servers = []
        for i in range(SERVERS):  # `pixroute serve`, as an operator runs it
            origin = f"http://127.0.0.1:{_free_port()}"
            argv = ["-m", "router.cli", "serve", "--host", "127.0.0.1", "--port", origin.rsplit(":", 1)[1],
                    "--ledger", ledger_url, "--policy", str(policy_file), "--log-level", "warning"]
            servers.append((f"serve {i}", fleet.spawn(f"serve {i}", argv, serve_env), origin))
        routers = []
        for i in range(ROUTERS):
            config = {"ledger": ledger_url, "state": state_url, "openai": openai_sb.base_url, "xai": xai_sb.base_url,
                      "serve": [origin for _, _, origin in servers], "worker": i, "requests": requests // ROUTERS,
                      "concurrency": CONCURRENCY}
            name = f"router {i}"
            routers.append((name, fleet.spawn(name, ["-m", "tests.fleet_worker", json.dumps(config)], env)))
        for name, proc, origin in servers:
            _wait_healthy(fleet, name, proc, origin)
        for name, proc in routers:
            assert fleet.line(name, proc) == {"ready": True}
        for _name, proc in routers:  # go: the four start together
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = [fleet.line(name, proc) for name, proc in routers]
        fleet.close()  # the serve workers shut down: every write of theirs is in the database

        run = Run(Counter(), Counter(), {"openai": openai_sb.billed_usd, "xai": xai_sb.billed_usd},
                  {"openai": sum(1 for r in openai_sb.requests if r.path == GENERATIONS and r.status == 200),
                   "xai": sum(1 for r in xai_sb.requests if r.path == GENERATIONS and r.status == 200)},
                  {"openai": dict(openai_faults.served), "xai": dict(xai_faults.served)})
    for report in reports:
        run.outcomes.update(report["outcomes"])
        run.served_by.update(report["served_by"])
    return run


def _check_the_run(run: Run, requests: int = REQUESTS) -> None:
    """Every request was served, refused for the budget, found no route (the budget and open circuits ruled out
    every candidate) or failed when its chain ran out; both ``serve`` workers served images; every kind of fault
    was served."""
    assert sum(run.outcomes.values()) == requests
    # every attempt of a request rate-limited: the server answers 429 (router.server.api_error), the SDK raises
    expected = {"served", "budget", "no-route", "router:AllProvidersFailed", "http:502:all_providers_failed",
                "http:429:rate_limit_exceeded"}
    assert set(run.outcomes) <= expected, run.outcomes
    assert run.outcomes["served"] > 0 and run.outcomes["budget"] > 0, run.outcomes
    assert len(run.served_by) == SERVERS, run.served_by
    kinds = {"openai": ("rate_limit", "server_error", "broken_image"),
             "xai": ("rate_limit", "server_error", "wrong_format_image")}
    assert all(run.faults[p].get(kind, 0) > 0 for p in kinds for kind in kinds[p]), run.faults


def _check_the_ledger(ledger_url: str, run: Run) -> Decimal:
    """The ledger is the sandboxes' bill, exactly and per provider, one settled charge per billed answer, the
    billed failures among them, and nothing left open; what the sandboxes billed in all."""
    total = sum(run.billed.values(), Decimal(0))
    with PostgresLedger(ledger_url) as ledger:
        assert ledger.spent(period="total") == total
        rows = ledger.report(group_by=("provider",))
    assert {row.key["provider"]: row.usd for row in rows} == run.billed
    assert {row.key["provider"]: row.requests for row in rows} == run.billed_answers
    with psycopg.connect(ledger_url) as conn:
        failed, still_open = conn.execute(
            "SELECT COUNT(*) FILTER (WHERE state = 'settled' AND details::jsonb ? 'failed'), "
            "COUNT(*) FILTER (WHERE state = 'open') FROM imagerouter_charges").fetchone() or (0, None)
    assert failed > 0  # the billed failures were charged
    assert still_open == 0
    return total


def _overbilled(ledger_url: str) -> Decimal:
    """What settled charges were billed beyond their reservations, summed (README's overshoot bound is this
    over the calls in flight when the budget ran out: a subset)."""
    with psycopg.connect(ledger_url) as conn:
        row = conn.execute("SELECT COALESCE(SUM(GREATEST(actual_nano - reserved_nano, 0)), 0) "
                           "FROM imagerouter_charges WHERE state = 'settled'").fetchone()
    assert row is not None
    return Decimal(int(row[0])) / 10**9


def test_a_fleet_at_published_prices_never_bills_more_than_its_budget(
        pg_url: str, redis_url: str, fleet: Fleet, tmp_path: Path) -> None:  # noqa: F811
    run = run_fleet(pg_url, redis_url, fleet, tmp_path / "fleet.yaml")
    _check_the_run(run)
    assert _overbilled(pg_url) == 0  # every bill within its reservation: the documented overshoot is nothing
    assert _check_the_ledger(pg_url, run) <= BUDGET


def test_a_fleet_whose_vendor_bills_3x_its_prices_overshoots_by_at_most_the_excess_in_flight(
        pg_url: str, redis_url: str, fleet: Fleet, tmp_path: Path) -> None:  # noqa: F811
    run = run_fleet(pg_url, redis_url, fleet, tmp_path / "fleet.yaml", requests=600, openai_bill_multiplier=3)
    _check_the_run(run, requests=600)  # at 3x the budget is gone within the first 250 or so
    excess = _overbilled(pg_url)
    assert excess > 0  # the vendor did bill beyond the reservations
    assert _check_the_ledger(pg_url, run) <= BUDGET + excess
