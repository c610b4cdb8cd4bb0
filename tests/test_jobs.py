"""Jobs on a real Redis (tests/redis_server.py) with real arq workers, the OpenAI sandbox as the backend and a
loopback webhook receiver that checks every signature."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from providers.sandbox import Fault, OpenAISandbox
from router.errors import BudgetExceeded
from router.fetch import UnsafeURLError
from router.jobs import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobQueue,
    JobRecord,
    JobsConfig,
    load_result,
    sweep_results,
    verify_signature,
    worker_settings,
)
from router.ledger import Budget, Ledger
from router.router import AsyncRouter
from tests.jobs_worker import API_KEY, router_kwargs
from tests.redis_server import redis_server, redis_url  # noqa: F401

# arq's Worker.close() calls redis-py's deprecated close(); the warning is arq's, not ours
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")

SECRET = "whsec-test-0123456789"
PROMPT = "a lighthouse at dusk, oil painting"
ROOT = Path(__file__).resolve().parent.parent


# --- the webhook receiver ---------------------------------------------------------------


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    valid: bool
    answered: int

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """A loopback HTTP server taking webhook POSTs; the first ``fail_first`` deliveries are answered 503."""

    fail_first: int = 0
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def by_job(self) -> dict[str, list[Delivery]]:
        out: dict[str, list[Delivery]] = {}
        with self.lock:
            for d in self.deliveries:
                out.setdefault(d.headers.get(DELIVERY_HEADER.lower(), ""), []).append(d)
        return out


@contextlib.contextmanager
def receiving(fail_first: int = 0) -> Iterator[Receiver]:
    receiver = Receiver(fail_first=fail_first)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with receiver.lock:
                status = 503 if len(receiver.deliveries) < receiver.fail_first else 200
                receiver.deliveries.append(Delivery(
                    headers, body, verify_signature(body, headers.get(SIGNATURE_HEADER.lower()), SECRET), status))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/pixroute"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


# --- fixtures -------------------------------------------------------------------------------


@dataclass
class Setup:
    config: JobsConfig
    sandbox: OpenAISandbox
    broken: OpenAISandbox
    ledger_path: Path
    receiver: Receiver

    def router(self, **kw: Any) -> AsyncRouter:
        return AsyncRouter(**(router_kwargs(self.sandbox.base_url, self.broken.base_url, self.ledger_path) | kw))


@pytest.fixture
def setup(redis_url: str, tmp_path: Path) -> Iterator[Setup]:  # noqa: F811
    config = JobsConfig(redis_url=redis_url, results_dir=tmp_path / "results", webhook_secret=SECRET,
                        allow_loopback_webhooks=True, webhook_attempts=4, webhook_backoff=(0.05, 0.2),
                        webhook_timeout_s=1.0, job_timeout_s=3.0, poll_s=0.1, max_jobs=4)
    with (OpenAISandbox(api_key=API_KEY) as sandbox, OpenAISandbox(api_key=API_KEY) as broken,
          receiving(fail_first=0) as receiver):
        broken.faults.push(Fault.server_error(503), times=None)
        yield Setup(config, sandbox, broken, tmp_path / "ledger.sqlite3", receiver)


@contextlib.asynccontextmanager
async def queue_for(s: Setup, **router_kw: Any) -> AsyncIterator[JobQueue]:
    async with s.router(**router_kw) as router:
        queue = JobQueue(s.config, router=router)
        try:
            yield queue
        finally:
            await queue.aclose()


async def drain(s: Setup) -> None:
    """Run an arq worker in this process until the queue is empty (jobs and their webhooks)."""
    from arq.worker import Worker

    def factory() -> dict[str, Any]:
        return router_kwargs(s.sandbox.base_url, s.broken.base_url, s.ledger_path)

    worker = Worker(**(worker_settings(s.config, router_factory=factory, burst=True) | {"handle_signals": False}))
    try:
        await worker.async_run()
    finally:
        await worker.close()


def store(url: str) -> Any:
    """A Redis client on the test's database (typed loosely: redis-py's sync and async types overlap)."""
    return redis.Redis.from_url(url)


def charges(path: Path) -> list[tuple[str, str, str, int]]:
    """(request id, provider, state, nano-dollars) of every charge in the ledger file."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [(r, p, st, n) for r, p, st, n in db.execute(
            "SELECT request_id, provider, state, COALESCE(actual_nano, reserved_nano) FROM charges")]


# --- one job at a time -------------------------------------------------------------------------


async def test_a_job_returns_the_images_the_backend_made_and_is_charged_once(setup: Setup) -> None:
    async with queue_for(setup) as queue:
        job = await queue.submit(PROMPT, width=1024, height=1024, seed=3)
        assert job.state == "queued"
        await drain(setup)
        result = await job.aresult(timeout=10)
        assert job.state == "succeeded"
        assert result.provider == "openai" and len(result.images) == 1
        assert result.images[0].to_pil().size == (1024, 1024)
        assert result.cost.actual_usd == setup.sandbox.billed_usd > 0
        assert result.decision.chain[0].provider == "openai"
        # the same bytes from sync code, read back from the results directory
        again = await asyncio.to_thread(job.result, 5)
        assert again.images[0].data == result.images[0].data
    sent = [r for r in setup.sandbox.requests if r.path.endswith("/images/generations")]
    assert [r.headers.get("idempotency-key") or r.headers.get("Idempotency-Key") for r in sent] == [job.id]
    settled = [c for c in charges(setup.ledger_path) if c[2] == "settled"]
    assert [(c[0], c[3]) for c in settled] == [(result.request_id, int(result.cost.actual_usd * 10**9))]
    # the worker marked the job charged before it settled the attempt
    marked = store(setup.config.redis_url).get(f"pixroute:job:{job.id}:charged")
    assert marked is not None and json.loads(marked)["request_id"] == result.request_id


async def test_a_job_charged_by_a_worker_that_died_is_never_generated_again(setup: Setup) -> None:
    async with queue_for(setup) as queue:
        job = await queue.submit(PROMPT, width=1024, height=1024)
        # what a worker killed between settling the attempt and storing the result leaves behind
        store(setup.config.redis_url).set(
            f"pixroute:job:{job.id}:charged", json.dumps({"request_id": "ir_killed", "usd": "0.042"}))
        await drain(setup)
        with pytest.raises(JobFailed) as failed:
            await job.aresult(timeout=10)
    assert failed.value.error == "JobLost" and failed.value.cost_usd == Decimal("0.042")
    assert setup.sandbox.hits("/v1/images/generations") == 0


def test_the_configuration_comes_from_the_environment(tmp_path: Path) -> None:
    from router.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="IMAGEROUTER_JOBS_REDIS"):
        JobsConfig.from_env({})
    config = JobsConfig.from_env({"IMAGEROUTER_JOBS_REDIS": "redis://127.0.0.1:6379/2", "IMAGEROUTER_JOBS_DIR":
                                  str(tmp_path), "IMAGEROUTER_WEBHOOK_SECRET": SECRET, "IMAGEROUTER_JOBS_TTL_S": "60"})
    assert (config.redis_url, config.results_dir, config.result_ttl_s) == ("redis://127.0.0.1:6379/2", tmp_path, 60)
    assert config.webhook_secret is not None and config.webhook_secret.get_secret_value() == SECRET
    assert SECRET not in repr(config)


async def test_a_failed_job_raises_job_failed_with_the_routers_error(setup: Setup) -> None:
    async with queue_for(setup) as queue:
        job = await queue.submit(PROMPT, width=1024, height=1024, provider="openai-broken")
        await drain(setup)
        with pytest.raises(JobFailed) as failed:
            await job.aresult(timeout=10)
    assert failed.value.error == "AllProvidersFailed"
    assert job.record.cost_usd == 0 and setup.broken.hits("/v1/images/generations") == 1


async def test_webhooks_are_signed_and_retried_with_backoff_until_delivered(setup: Setup) -> None:
    setup.receiver.fail_first = 2
    async with queue_for(setup) as queue:
        job = await queue.submit(PROMPT, width=1024, height=1024, webhook_url=setup.receiver.url)
        await drain(setup)
    deliveries = setup.receiver.by_job()[job.id]
    assert [d.answered for d in deliveries] == [503, 503, 200]
    assert all(d.valid for d in deliveries)
    last = deliveries[-1]
    assert last.payload["type"] == "job.succeeded" and last.payload["job"]["status"] == "succeeded"
    assert last.headers[TIMESTAMP_HEADER.lower()] == str(last.payload["created"])
    assert last.payload["job"]["result"]["request_id"]
    assert not verify_signature(last.body + b" ", last.headers[SIGNATURE_HEADER.lower()], SECRET)
    state = store(setup.config.redis_url).get(f"pixroute:job:{job.id}:webhook")
    assert state is not None and json.loads(state) == {"status": "delivered", "attempts": 3, "http_status": 200}


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest", "http://10.0.0.7/hook", "file:///etc/passwd",
                                 "http://[::ffff:10.0.0.1]/hook"])
async def test_webhook_urls_inside_the_network_are_refused_at_submit(setup: Setup, url: str) -> None:
    async with queue_for(setup) as queue:
        with pytest.raises(UnsafeURLError):
            await queue.submit(PROMPT, width=1024, height=1024, webhook_url=url)
    assert charges(setup.ledger_path) == []
    assert store(setup.config.redis_url).keys("pixroute:job:*") == []


async def test_loopback_webhooks_need_the_operators_permission(setup: Setup) -> None:
    config = setup.config.model_copy(update={"allow_loopback_webhooks": False})
    async with setup.router() as router:
        queue = JobQueue(config, router=router)
        with pytest.raises(UnsafeURLError, match="loopback"):
            await queue.submit(PROMPT, width=1024, height=1024, webhook_url=setup.receiver.url)
        await queue.aclose()


async def test_submit_holds_the_worst_case_and_refuses_what_the_budget_cannot_cover(setup: Setup) -> None:
    async with queue_for(setup) as queue:
        decision = queue.router.route(PROMPT, width=1024, height=1024, tags={"team"}, assume_configured=False)
        worst = max(queue.router.reservation_for(c.provider, c) for c in decision.chain)
        queue.router.ledger.set_budget(Budget(worst * Decimal("2.5"), "total", "team"))
        first = await queue.submit(PROMPT, width=1024, height=1024, tags={"team"})
        second = await queue.submit(PROMPT, width=1024, height=1024, tags={"team"})
        assert queue.router.ledger.headroom(["team"]) == worst * Decimal("0.5")
        with pytest.raises(BudgetExceeded):
            await queue.submit(PROMPT, width=1024, height=1024, tags={"team"})
        await drain(setup)
        for job in (first, second):
            await job.aresult(timeout=10)
        spent = queue.router.ledger.spent(["team"], period="total")
    assert spent == setup.sandbox.billed_usd == first.record.cost_usd + second.record.cost_usd
    rows = charges(setup.ledger_path)
    holds = {(r, st) for r, _, st, _ in rows if r.startswith("job_")}
    assert holds == {(first.id, "released"), (second.id, "released")}
    assert not [row for row in rows if row[2] == "open"]


async def test_a_queued_job_cancelled_never_runs_and_gives_its_hold_back(setup: Setup) -> None:
    async with queue_for(setup) as queue:
        queue.router.ledger.set_budget(Budget(Decimal(5), "total", "team"))
        job = await queue.submit(PROMPT, width=1024, height=1024, tags={"team"}, webhook_url=setup.receiver.url)
        held = queue.router.ledger.headroom(["team"])
        assert held is not None and held < 5
        cancelled = await queue.cancel(job.id)
        assert cancelled.state == "cancelled"
        assert queue.router.ledger.headroom(["team"]) == 5
        await drain(setup)
        with pytest.raises(JobCancelled):
            await job.aresult(timeout=5)
        assert (await queue.cancel(job.id)).state == "cancelled"  # cancelling again changes nothing
    assert setup.sandbox.hits("/v1/images/generations") == 0
    [delivery] = setup.receiver.by_job()[job.id]
    assert delivery.valid and delivery.payload["type"] == "job.cancelled"


async def test_a_running_job_cancelled_is_stopped_and_ends_cancelled(setup: Setup) -> None:
    from arq.worker import Worker

    setup.sandbox.faults.push(Fault.timeout(2.0))
    async with queue_for(setup) as queue:
        job = await queue.submit(PROMPT, width=1024, height=1024)
        worker = Worker(**(worker_settings(setup.config, router_factory=lambda: router_kwargs(
            setup.sandbox.base_url, setup.broken.base_url, setup.ledger_path)) | {"handle_signals": False}))
        running = asyncio.create_task(worker.async_run())
        try:
            while (await job.refresh()).state != "running":
                await asyncio.sleep(0.05)
            while setup.sandbox.hits("/v1/images/generations") == 0:
                await asyncio.sleep(0.05)
            assert (await queue.cancel(job.id)).state == "cancelled"
            await asyncio.sleep(setup.config.poll_s * 5)  # the worker sees the cancel at its next look
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            await worker.close()
        assert (await job.refresh()).state == "cancelled"
    assert not [c for c in charges(setup.ledger_path) if c[2] == "open"]


async def test_a_job_submitted_twice_under_one_id_is_queued_once(setup: Setup) -> None:
    async with queue_for(setup) as queue:
        first = await queue.submit(PROMPT, width=1024, height=1024, job_id="order-42")
        again = await queue.submit(PROMPT, width=1024, height=1024, job_id="order-42")
        assert again.id == first.id == "order-42"
        await drain(setup)
        await first.aresult(timeout=10)
    assert setup.sandbox.hits("/v1/images/generations") == 1


async def test_results_are_swept_after_their_ttl(setup: Setup) -> None:
    async with queue_for(setup) as queue:
        job = await queue.submit(PROMPT, width=1024, height=1024)
        await drain(setup)
        await job.aresult(timeout=10)
    results = setup.config.results_dir
    assert sweep_results(results, setup.config.result_ttl_s) == 0
    assert sweep_results(results, setup.config.result_ttl_s, now=time.time() + setup.config.result_ttl_s + 1) == 1
    with pytest.raises(JobNotFound):
        load_result(results, job.id, PROMPT)


def test_pixroute_worker_runs_until_the_queue_is_empty_with_burst(redis_url: str, tmp_path: Path) -> None:  # noqa: F811
    import argparse

    from router.jobs import add_worker_arguments, worker_command

    parser = argparse.ArgumentParser()
    add_worker_arguments(parser)
    parser.add_argument("--sandbox", action="store_true")  # the CLI's shared flag
    ns = parser.parse_args(["--redis", redis_url, "--results-dir", str(tmp_path), "--burst", "--sandbox"])
    assert worker_command(ns) == 0


# --- the HTTP endpoints ------------------------------------------------------------------------


async def test_the_jobs_endpoints_submit_read_and_cancel_per_client_key(setup: Setup) -> None:
    from router.keys import ServerKeys
    from router.server import create_app
    from router.server_jobs import install_jobs

    keys = ServerKeys()
    alice, bob = keys.add("alice"), keys.add("bob")
    async with queue_for(setup) as queue:
        app = install_jobs(create_app(queue.router, keys=keys), queue)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://server") as client:
            def auth(key: str) -> dict[str, str]:
                return {"authorization": f"Bearer {key}"}

            answer = await client.post("/v1/jobs", headers=auth(alice), json={
                "prompt": PROMPT, "size": "1024x1024", "webhook_url": setup.receiver.url})
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["id"]
            assert answer.json()["status"] == "queued"
            assert (await client.get(f"/v1/jobs/{job_id}", headers=auth(bob))).status_code == 404
            assert (await client.delete(f"/v1/jobs/{job_id}", headers=auth(bob))).status_code == 404
            refused = await client.post("/v1/jobs", headers=auth(alice), json={
                "prompt": PROMPT, "webhook_url": "http://169.254.169.254/"})
            assert refused.status_code == 400
            streamed = await client.post("/v1/jobs", headers=auth(alice), json={"prompt": PROMPT, "stream": True})
            assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "stream"
            await drain(setup)
            done = (await client.get(f"/v1/jobs/{job_id}", headers=auth(alice))).json()
            assert done["status"] == "succeeded"
            result = await (await queue.get(job_id, owner="alice")).aresult(timeout=5)
            assert base64.b64decode(done["data"][0]["b64_json"]) == result.images[0].data
            assert (await client.delete(f"/v1/jobs/{job_id}", headers=auth(alice))).json()["status"] == "succeeded"
            assert (await client.get("/v1/jobs/job_unknown", headers=auth(alice))).status_code == 404
    assert setup.receiver.by_job()[job_id][0].valid


# --- the must-show: 50 jobs, a worker killed mid-run ------------------------------------------------------


def _start_worker(s: Setup, config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "tests.jobs_worker", str(config_path), s.sandbox.base_url, s.broken.base_url,
             str(s.ledger_path)], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _records(client: Any, ids: list[str]) -> list[JobRecord]:
    out = []
    for job_id in ids:
        final, current = client.mget(f"pixroute:job:{job_id}:final", f"pixroute:job:{job_id}")
        out.append(JobRecord.model_validate_json(final or current))
    return out


async def test_fifty_jobs_survive_a_worker_killed_mid_run(setup: Setup, tmp_path: Path) -> None:
    s = setup
    s.receiver.fail_first = 3  # the first deliveries are retried
    s.sandbox.faults.push(Fault.timeout(0.25), times=None)  # each generation takes a while: the kill lands mid-run
    config_path = tmp_path / "jobs.json"
    config_path.write_text(json.dumps(s.config.model_dump(mode="json") | {"webhook_secret": SECRET}))
    client = store(s.config.redis_url)
    async with queue_for(s) as queue:
        queue.router.ledger.set_budget(Budget(Decimal(100), "total", "team"))
        ids = []
        for i in range(50):
            pinned = {"provider": "openai-broken"} if i % 10 == 9 else {}
            job = await queue.submit(PROMPT, width=1024, height=1024, tags={"team"}, webhook_url=s.receiver.url,
                                     **pinned)
            ids.append(job.id)
        cancelled = {ids[i] for i in range(0, 50, 10)}
        for job_id in cancelled:
            await queue.cancel(job_id)

    first = _start_worker(s, config_path, tmp_path / "worker-1.log")
    second: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # kill when some jobs are done and several are mid-run
            states = [r.state for r in _records(client, ids)]
            if states.count("running") >= 2 and sum(st in ("succeeded", "failed") for st in states) >= 8:
                break
            await asyncio.sleep(0.02)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        killed_running = {r.id for r in _records(client, ids) if r.state == "running"}
        assert killed_running
        second = _start_worker(s, config_path, tmp_path / "worker-2.log")
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            now = _records(client, ids)
            delivered = s.receiver.by_job()
            if all(r.state in ("succeeded", "failed", "cancelled") for r in now) and all(
                    any(d.answered == 200 for d in delivered.get(job_id, [])) for job_id in ids):
                break
            await asyncio.sleep(0.1)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=30)

    records = {r.id: r for r in _records(client, ids)}
    # every job ended exactly once, as what it was
    assert {j for j, r in records.items() if r.state == "cancelled"} == cancelled
    broken = {ids[i] for i in range(9, 50, 10)}
    # (a broken backend's circuit opens after a few failures: the rest find no route)
    errors = {j: r.error.kind for j, r in records.items() if r.error is not None}
    assert all(records[j].state == "failed" and errors[j] in ("AllProvidersFailed", "NoRouteError") for j in broken)
    normal = set(ids) - cancelled - broken
    lost = {j for j in normal if records[j].state == "failed"}
    assert {j: records[j].error for j in lost if errors[j] != "JobLost"} == {}  # (shows any other)
    succeeded = {j for j in normal if records[j].state == "succeeded"}
    assert succeeded | lost == normal and len(normal) == 40
    assert any(records[j].runs >= 2 for j in killed_running)  # the killed worker's jobs were run again
    # every job's webhook arrived, signed, and every delivery of a job says the same final state
    delivered = s.receiver.by_job()
    for job_id, record in records.items():
        deliveries = delivered[job_id]
        assert all(d.valid for d in deliveries)
        assert {d.payload["job"]["status"] for d in deliveries} == {record.state}
        assert any(d.answered == 200 for d in deliveries)
    # no job charged twice: one settled charge per job that was charged, each the job's own
    rows = charges(s.ledger_path)
    settled = [(r, n) for r, _, st, n in rows if st == "settled"]
    expected = {(records[j].result or {})["request_id"] for j in succeeded} | {
        json.loads(client.get(f"pixroute:job:{j}:charged"))["request_id"] for j in lost}
    assert sorted(r for r, _ in settled) == sorted(expected)
    ledger_total = sum((Decimal(n) for _, n in settled), Decimal(0)) / 10**9
    assert ledger_total == sum(records[j].cost_usd for j in succeeded | lost)
    assert not [r for r, _, st, _ in rows if st == "open" and r.startswith("job_")]  # every hold released
    # what the ledger never saw: only the calls in flight when the worker was killed
    per_call = records[next(iter(succeeded))].cost_usd
    unrecorded = s.sandbox.billed_usd - ledger_total
    assert 0 <= unrecorded <= per_call * s.config.max_jobs
    sent = [r.headers.get("idempotency-key") for r in s.sandbox.requests if r.path.endswith("/images/generations")]
    assert max(sent.count(j) for j in normal) <= 2
    assert all(sent.count(j) <= 1 for j in normal - killed_running)
    with Ledger(s.ledger_path) as ledger:
        assert ledger.spent(["team"], period="total") == ledger_total
