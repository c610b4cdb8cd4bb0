"""Jobs: long generations on a Redis queue, results on disk, signed webhooks (``pip install 'pixroute[jobs]'``).

::

    queue = JobQueue(JobsConfig(redis_url="redis://127.0.0.1:6379/0", results_dir="/srv/pixroute/results",
                                webhook_secret="whsec-…"), router=router)
    job = await queue.submit("a lighthouse at dusk", width=1024, height=1024,
                             webhook_url="https://example.com/hooks/pixroute")
    result = await job.aresult(timeout=600)          # or job.result(600) from sync code
    await queue.cancel(job.id)                       # queued or running: it ends ``cancelled``

Workers run :func:`run_worker` (``pixroute worker``); each builds its router from the environment
(:func:`router.config.router_kwargs_from_env`) or from an injected factory.

Design note — why arq. arq (https://arq-docs.helpmanual.io/) is an asyncio job queue on Redis: the worker
runs our coroutine on its own event loop, so a job is one ``await AsyncRouter.agenerate(...)`` with the
router's connection pools shared by every job of the process; nothing is wrapped in a thread. Celery, the
field's default, is sync-first (an asyncio task needs a loop per task or a bridge) and brings a broker
abstraction we do not need; Redis is already the project's shared-state engine. arq gives what exactly-once
needs: a caller-chosen job id (``enqueue_job(_job_id=...)`` enqueues nothing when the id exists), a lease per
running job (``in-progress`` key; a worker killed with ``kill -9`` loses it after arq's job timeout + 10 s
and another worker runs the job again: at-least-once), per-function timeouts and kept results. It is a small
library (≈2,000 lines) that has been stable for years; since 2025-10 it is in maintenance-only mode
(https://github.com/python-arq/arq/issues/510) and it caps redis-py below 6
(https://github.com/python-arq/arq/issues/454): arq is used only in this module, behind :class:`JobQueue`
and :func:`run_worker`, so another queue can replace it without touching callers. Jobs travel as JSON (our
``job_serializer``), never pickle: whoever can write to Redis must not be able to run code in a worker.

Exactly once, on top of at-least-once:

- **Submit.** The job record is written with ``SET NX`` under the job id, then enqueued under the same id.
  A caller-chosen ``job_id`` makes a retried submit return the first job.
- **Terminal state.** A job ends exactly once: the worker (succeeded, failed) and :meth:`JobQueue.cancel`
  race on one ``SET NX`` of ``pixroute:job:<id>:final``; whoever loses reads the winner. A re-run of a job
  whose final state is set does nothing but make sure its webhook is queued.
- **Money.** At submit the router's worst case for the request (the most any one attempt of its chain
  reserves, :meth:`AsyncRouter.reservation_for`) is checked against the ledger's headroom for its tags and
  held (a reservation whose request id is the job id); the worker releases the hold just before it calls
  :meth:`AsyncRouter.agenerate`, which reserves and settles each attempt itself. The request goes out with
  the job id as its ``idempotency_key``. The worker's ledger is wrapped so that before any attempt of a job
  is settled, ``pixroute:job:<id>:charged`` is set: a re-run that finds it (a worker died after the job was
  paid for and before its result was stored) ends the job ``failed`` (``JobLost``) instead of generating and
  paying again. A worker killed *during* a vendor call cannot settle it: the ledger never records that call
  (its reservation expires after the ledger's ``reservation_ttl_s``); a vendor that honours the idempotency
  key bills it once, one that does not may bill the re-run too.
- **Webhooks** are queued as their own arq job (id ``<job id>.webhook``, result kept for ``result_ttl_s``, so
  it is enqueued once) and delivered at least once: a receiver dedupes on ``X-Pixroute-Delivery``.

Results are written under ``results_dir/<job id>/`` (each file a temp file renamed into place, the summary
``result.json`` last) and swept after ``result_ttl_s``; the job's Redis keys expire then too. Workers and
whoever reads results (the API server, the SDK) must see the same directory and the same ledger (a shared
SQLite file on one host, PostgreSQL across hosts). A hold counts against budgets for the ledger's
``reservation_ttl_s`` (one hour by default): a job queued longer no longer holds its estimate.

Webhooks: ``POST`` of a JSON body ``{"id", "type": "job.<state>", "created", "job": {...}}`` with
``X-Pixroute-Signature: sha256=<hex HMAC-SHA256 of the body with the secret>`` (GitHub's scheme,
https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries), ``X-Pixroute-Timestamp``
(Unix seconds, also ``created`` in the signed body, so a receiver can refuse old replays) and
``X-Pixroute-Delivery``. Any answer but 2xx, or no answer, is retried with exponential backoff and jitter
(tenacity) up to ``webhook_attempts``; redirects are not followed. URLs go through the SSRF guard of
:class:`router.fetch.SafeFetcher` at submit and again at each delivery (connecting to the checked
address); loopback only with ``allow_loopback_webhooks``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from policies.complexity import score_prompt
from policies.decision import RankedCandidate, Rejection, RoutingDecision
from policies.policy import Policy
from providers.base import Estimate
from router.errors import ConfigurationError, ImageRouterError, InvalidRequestError
from router.fetch import SafeFetcher
from router.images import ImageInput
from router.ledger import Budget, LedgerBackend, Period, Reservation, SpendRow, open_ledger
from router.progress import ProgressCallback, Routed
from router.request import ImageRequest
from router.result import Attempt, Cost, GeneratedImage, GenerationResult, Latency

if TYPE_CHECKING:
    import redis
    from arq.connections import ArqRedis

    from router.router import AsyncRouter

log = logging.getLogger("imagerouter.jobs")

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
SIGNATURE_HEADER = "X-Pixroute-Signature"
TIMESTAMP_HEADER = "X-Pixroute-Timestamp"
DELIVERY_HEADER = "X-Pixroute-Delivery"
_PREFIX = "pixroute:job:"
_RUN = "pixroute_run_job"
_DELIVER = "pixroute_deliver_webhook"
_EXT = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}

__all__ = [
    "DELIVERY_HEADER", "SIGNATURE_HEADER", "TERMINAL", "TIMESTAMP_HEADER", "Job", "JobCancelled", "JobFailed",
    "JobNotFound", "JobQueue", "JobRecord", "JobSpec", "JobState", "JobsConfig", "run_worker", "sign",
    "sweep_results", "verify_signature", "worker_settings",
]


# --- errors -------------------------------------------------------------------------


class JobNotFound(InvalidRequestError):
    """No job with this id (never submitted, expired after ``result_ttl_s``, or another client's)."""


class JobFailed(ImageRouterError):
    """The job ended ``failed``; ``error`` is the kind of error that ended it (``AllProvidersFailed``,
    ``BudgetExceeded``, ``JobLost``, …) and ``cost_usd`` what it was charged."""

    def __init__(self, message: str, *, error: str, cost_usd: Decimal = Decimal(0), **kw: Any) -> None:
        super().__init__(message, **kw)
        self.error = error
        self.cost_usd = cost_usd


class JobCancelled(ImageRouterError):
    """The job was cancelled before it finished."""


# --- configuration and records ---------------------------------------------------------


class JobsConfig(BaseModel):
    """Where jobs live and how they are run and announced; the same for the API side and the workers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    redis_url: str
    results_dir: Path
    result_ttl_s: float = Field(86_400.0, gt=0, description="results and job records are kept this long")
    webhook_secret: SecretStr | None = None
    queue_name: str = "pixroute:jobs"
    allow_loopback_webhooks: bool = False
    webhook_attempts: int = Field(8, ge=1)
    webhook_backoff: tuple[float, float] = (1.0, 300.0)
    """The first retry's wait and the cap, in seconds (doubling, with jitter)."""
    webhook_timeout_s: float = Field(10.0, gt=0)
    job_timeout_s: float = Field(900.0, gt=0)
    """The longest a job's generation may run (then it fails, ``DeadlineExceeded``). arq's own timeout for
    the job is :attr:`arq_timeout_s`; a dead worker's jobs are run again that long + 10 s after they began."""
    max_jobs: int = Field(10, ge=1)
    poll_s: float = Field(0.5, gt=0)
    """How often workers look for new jobs and running jobs look for a cancel."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> JobsConfig:
        """``IMAGEROUTER_JOBS_REDIS`` (required), ``IMAGEROUTER_JOBS_DIR`` (default: ``jobs`` in the user's
        data dir), ``IMAGEROUTER_JOBS_TTL_S``, ``IMAGEROUTER_WEBHOOK_SECRET``, ``IMAGEROUTER_JOBS_QUEUE``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if env.get("IMAGEROUTER_JOBS_REDIS"):
            values["redis_url"] = env["IMAGEROUTER_JOBS_REDIS"]
        if env.get("IMAGEROUTER_JOBS_DIR"):
            values["results_dir"] = Path(env["IMAGEROUTER_JOBS_DIR"])
        else:
            import platformdirs

            values["results_dir"] = Path(platformdirs.user_data_dir("imagerouter")) / "jobs"
        if env.get("IMAGEROUTER_JOBS_TTL_S"):
            values["result_ttl_s"] = float(env["IMAGEROUTER_JOBS_TTL_S"])
        if env.get("IMAGEROUTER_WEBHOOK_SECRET"):
            values["webhook_secret"] = SecretStr(env["IMAGEROUTER_WEBHOOK_SECRET"])
        if env.get("IMAGEROUTER_JOBS_QUEUE"):
            values["queue_name"] = env["IMAGEROUTER_JOBS_QUEUE"]
        values |= overrides
        if "redis_url" not in values:
            raise ConfigurationError("jobs need a Redis server: set IMAGEROUTER_JOBS_REDIS=redis://host:port/db")
        return cls(**values)

    @property
    def arq_timeout_s(self) -> float:
        """arq's timeout for a job: the generation's limit plus room to store its result (arq drops a job it
        times out, so ours must always come first)."""
        return self.job_timeout_s + max(5.0, 0.2 * self.job_timeout_s)

    @property
    def webhook_budget_s(self) -> float:
        """The longest one webhook's delivery may take, every attempt and wait included."""
        base, cap = self.webhook_backoff
        waits = sum(min(cap, base * 2**i) + base for i in range(self.webhook_attempts - 1))
        return self.webhook_attempts * self.webhook_timeout_s + waits + 1.0


class Hold(BaseModel):
    """The ledger reservation a queued job holds (enough to release it from another process)."""

    model_config = ConfigDict(frozen=True)

    id: int
    request_id: str
    provider: str
    model: str
    amount: Decimal
    tags: tuple[str, ...]
    created: datetime

    def reservation(self) -> Reservation:
        return Reservation(self.id, self.request_id, self.provider, self.model, self.amount, self.tags, self.created)


class JobSpec(BaseModel):
    """What to run: the request (as JSON: images inline as data URLs), the policy preset or file, the webhook."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request: dict[str, Any]
    policy: str | None = None
    webhook_url: str | None = None

    def image_request(self) -> ImageRequest:
        return ImageRequest.model_validate(self.request)


class JobError(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: str
    message: str
    code: str | None = None


class JobRecord(BaseModel):
    """A job as stored: its spec, where it stands, and how it ended."""

    model_config = ConfigDict(frozen=True)

    id: str
    state: JobState
    spec: JobSpec
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    runs: int = 0
    """How many times a worker started it (more than 1: a worker died or stopped while running it)."""
    owner: str | None = None
    tags: tuple[str, ...] = ()
    hold: Hold | None = None
    cost_usd: Decimal = Decimal(0)
    result: dict[str, Any] | None = None
    """The result's summary (:meth:`GenerationResult.to_dict` without the decision) once succeeded."""
    error: JobError | None = None

    def public(self) -> dict[str, Any]:
        """The job as the API and webhooks show it."""
        return {
            "id": self.id, "object": "job", "status": self.state, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at, "runs": self.runs,
            "tags": list(self.tags), "cost_usd": str(self.cost_usd), "result": self.result,
            "error": self.error.model_dump() if self.error else None,
        }


def _key(job_id: str, part: str = "") -> str:
    return f"{_PREFIX}{job_id}{':' + part if part else ''}"


# --- the request as JSON ---------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):  # only the fields that were set: defaults are filled in again on load
        return {name: getattr(value, name) for name in value.model_fields_set}
    if isinstance(value, ImageInput):
        if value.data is None:
            return value.url
        return f"data:{value.mime or 'application/octet-stream'};base64,{base64.b64encode(value.data).decode()}"
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, Decimal | Path):
        return str(value)
    raise TypeError(f"cannot store a {type(value).__name__} in a job")


def request_to_json(request: ImageRequest) -> dict[str, Any]:
    """``request`` as plain JSON that :meth:`ImageRequest.model_validate` reads back equal."""
    return cast(dict[str, Any], json.loads(json.dumps(request, default=_json_default)))


def _policy_name(policy: Policy | str | Path | None) -> str | None:
    if policy is None or isinstance(policy, str):
        return policy
    if isinstance(policy, Path):
        return str(policy)
    from policies.policy import PRESETS

    if PRESETS.get(policy.name) is policy:
        return policy.name
    raise TypeError("a job's policy must be a preset's name or a policy file's path (workers load it by name)")


# --- results on disk --------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _summary(result: GenerationResult) -> dict[str, Any]:
    summary = result.to_dict()
    summary.pop("decision", None)
    return summary


def store_result(results_dir: Path, job_id: str, result: GenerationResult) -> None:
    """Write the images, then ``result.json`` (the commit: a directory without it holds no result)."""
    folder = results_dir / job_id
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i, img in enumerate(result.images):
        name = f"image-{i}{_EXT.get(img.mime, '.img')}"
        _write_atomic(folder / name, img.data)
        images.append({"file": name, "mime": img.mime, "width": img.width, "height": img.height, "seed": img.seed,
                       "nsfw": img.nsfw, "provenance": dict(img.provenance or {})})
    doc = result.to_dict() | {"images": images}
    _write_atomic(folder / "result.json", json.dumps(doc, default=str).encode())


def load_result(results_dir: Path, job_id: str, prompt: str) -> GenerationResult:
    """The :class:`GenerationResult` stored for ``job_id``, images read back from disk."""
    folder = results_dir / job_id
    try:
        doc = json.loads((folder / "result.json").read_bytes())
        images = [GeneratedImage(data=(folder / Path(i["file"]).name).read_bytes(), mime=i["mime"],
                                 width=i["width"], height=i["height"], seed=i["seed"], nsfw=i["nsfw"],
                                 provenance=i["provenance"] or None) for i in doc["images"]]
    except FileNotFoundError:
        raise JobNotFound(f"job {job_id}: its result is no longer stored (results are kept for the configured "
                          "result_ttl_s)", code="job_not_found") from None
    c = doc["cost"]
    return GenerationResult(
        images=images, provider=doc["provider"], model=doc["model"],
        cost=Cost(Decimal(c["estimated_usd"]), Decimal(c["actual_usd"]), c["unit"], Decimal(c["quantity"]),
                  c["price_table_version"], c["details"]),
        latency=Latency(**doc["latency"]),
        attempts=[Attempt(**(a | {"cost_usd": Decimal(a["cost_usd"])})) for a in doc["attempts"]],
        decision=_decision(doc["decision"], prompt), warnings=list(doc["warnings"]), request_id=doc["request_id"],
        provider_request_id=doc["provider_request_id"],
    )


def _decision(d: Mapping[str, Any], prompt: str) -> RoutingDecision:
    """The routing decision rebuilt from its ``to_dict()`` (terms and estimates as they were; the prompt's
    complexity scored again: a pure function of the prompt)."""
    def estimate(row: Mapping[str, Any]) -> Estimate:
        return Estimate(Decimal(row["estimated_cost_usd"]), float(row.get("estimated_latency_s") or 0.0))

    chain = [RankedCandidate(c["provider"], c["model"], c["score"], dict(c["terms"]), estimate(c), c["latency_source"],
                             tuple(c["warnings"]), c["configuration_problem"], c["expected_latency_s"], c["fit"])
             for c in d["chain"]]
    rejections = [Rejection(r["provider"], r["model"], r["code"], r["reason"],
                            estimate(r) if r.get("estimated_cost_usd") is not None else None)
                  for r in d["rejections"]]
    residency = d.get("residency")
    return RoutingDecision(policy=d["policy"], task=d["task"], complexity=score_prompt(prompt), chain=chain,
                           rejections=rejections, rules_applied=list(d["rules_applied"]),
                           quality_floor=d["quality_floor"],
                           residency=None if residency is None else frozenset(residency),
                           order=d["order"], max_chain=d["max_chain"], ladder_note=d.get("ladder_note"))


def sweep_results(results_dir: Path, ttl_s: float, *, now: float | None = None) -> int:
    """Delete the result directories older than ``ttl_s`` (by ``result.json``'s time, else the directory's);
    returns how many. Workers run it at most once a minute."""
    now = time.time() if now is None else now
    removed = 0
    if not results_dir.is_dir():
        return 0
    for folder in results_dir.iterdir():
        if not folder.is_dir() or folder.is_symlink():
            continue
        marker = folder / "result.json"
        try:
            stamp = (marker if marker.exists() else folder).stat().st_mtime
        except FileNotFoundError:
            continue
        if now - stamp > ttl_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


# --- webhooks -------------------------------------------------------------------------


def sign(body: bytes, secret: str) -> str:
    """``sha256=<hex HMAC-SHA256 of body>``, the value of :data:`SIGNATURE_HEADER`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, header: str | None, secret: str) -> bool:
    """Whether ``header`` is ``body``'s signature with ``secret`` (compared in constant time)."""
    return header is not None and hmac.compare_digest(sign(body, secret), header)


class _DeliveryFailed(Exception):
    """One webhook attempt that did not get a 2xx (retried)."""


async def _check_webhook(url: str, config: JobsConfig, resolver: Any = None) -> tuple[httpx.URL, str]:
    fetcher = SafeFetcher(allow_loopback=config.allow_loopback_webhooks,
                          **({"resolver": resolver} if resolver is not None else {}))
    return await fetcher.check(url, what="webhook_url")


async def _post_once(url: str, body: bytes, headers: Mapping[str, str], config: JobsConfig) -> int:
    """POST ``body`` to ``url``'s checked address (no second lookup, no redirects); the status answered."""
    parsed, address = await _check_webhook(url, config)
    target = parsed.copy_with(host=address)
    extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=config.webhook_timeout_s) as client:
        request = client.build_request("POST", target, content=body, extensions=extensions, headers={
            **headers, "Host": parsed.netloc.decode("ascii"), "Content-Type": "application/json",
            "User-Agent": "pixroute-webhooks"})
        try:
            response = await client.send(request)
        except httpx.HTTPError as exc:  # its text can quote the URL: only the kind is kept
            raise _DeliveryFailed(type(exc).__name__) from None
        await response.aclose()
    if not 200 <= response.status_code < 300:
        raise _DeliveryFailed(f"HTTP {response.status_code}")
    return response.status_code


async def deliver(record: JobRecord, config: JobsConfig, *, sleep: Callable[[float], Any] = asyncio.sleep,
                  clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """Send ``record``'s webhook, retrying with exponential backoff; what happened (never raises for a
    receiver's failure: the job is over either way)."""
    url = record.spec.webhook_url
    assert url is not None and config.webhook_secret is not None
    secret = config.webhook_secret.get_secret_value()
    base, cap = config.webhook_backoff
    attempts = 0
    last = ""
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(config.webhook_attempts), wait=wait_exponential_jitter(base, cap, 2, base),
            retry=retry_if_exception_type(_DeliveryFailed), sleep=sleep, reraise=True,
        ):
            with attempt:
                attempts += 1
                now = int(clock())
                body = json.dumps({"id": record.id, "type": f"job.{record.state}", "created": now,
                                   "job": record.public()}, default=str, separators=(",", ":")).encode()
                status = await _post_once(url, body, {SIGNATURE_HEADER: sign(body, secret),
                                                      TIMESTAMP_HEADER: str(now), DELIVERY_HEADER: record.id}, config)
        return {"status": "delivered", "attempts": attempts, "http_status": status}
    except _DeliveryFailed as exc:
        last = str(exc)
    except InvalidRequestError as exc:  # the URL no longer passes the SSRF guard (its name resolves inside)
        last = exc.message
    log.warning("job %s: webhook not delivered after %d attempt(s): %s", record.id, attempts, last)
    return {"status": "failed", "attempts": attempts, "last_error": last}


# --- the Redis side ------------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    return json.dumps(value, default=str).encode()


def _loads(data: bytes | str) -> Any:
    return json.loads(data)


class _Store:
    """The job keys in Redis (``pixroute:job:<id>``, ``…:final``, ``…:charged``, ``…:webhook``)."""

    def __init__(self, redis: Any, config: JobsConfig) -> None:
        self.redis = redis
        self.config = config

    @property
    def _record_ttl(self) -> int:
        return int(self.config.result_ttl_s + 86_400)  # arq lets a queued job wait a day, then the result TTL

    async def create(self, record: JobRecord) -> bool:
        return bool(await self.redis.set(_key(record.id), record.model_dump_json(), nx=True, ex=self._record_ttl))

    async def update(self, record: JobRecord) -> None:
        await self.redis.set(_key(record.id), record.model_dump_json(), ex=self._record_ttl)

    async def record(self, job_id: str) -> JobRecord | None:
        final, current = await self.redis.mget(_key(job_id, "final"), _key(job_id))
        data = final or current
        return None if data is None else JobRecord.model_validate_json(data)

    async def finish(self, record: JobRecord) -> JobRecord:
        """Set ``record`` (terminal) as the job's final state unless one is set; the final state."""
        assert record.state in TERMINAL
        ttl = int(self.config.result_ttl_s)
        if await self.redis.set(_key(record.id, "final"), record.model_dump_json(), nx=True, ex=ttl):
            await self.redis.expire(_key(record.id), ttl)
            return record
        winner = await self.redis.get(_key(record.id, "final"))
        return JobRecord.model_validate_json(winner)

    async def final(self, job_id: str) -> JobRecord | None:
        data = await self.redis.get(_key(job_id, "final"))
        return None if data is None else JobRecord.model_validate_json(data)


# --- the queue (API side) ----------------------------------------------------------------------


class Job:
    """A handle on one job: its record as last read, and its result once it succeeded."""

    def __init__(self, record: JobRecord, queue: JobQueue) -> None:
        self.record = record
        self._queue = queue

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def state(self) -> JobState:
        return self.record.state

    def __repr__(self) -> str:
        return f"Job({self.id!r}, {self.state})"

    async def refresh(self) -> Job:
        self.record = (await self._queue.get(self.id, owner=self.record.owner)).record
        return self

    async def aresult(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the job to end (at most ``timeout`` s: then TimeoutError) and return its result; raises
        :class:`JobFailed` or :class:`JobCancelled` when it did not succeed."""
        async with asyncio.timeout(timeout):
            while self.record.state not in TERMINAL:
                await asyncio.sleep(self._queue.config.poll_s)
                await self.refresh()
        return await asyncio.to_thread(_outcome, self.record, self._queue.config)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """:meth:`aresult` for sync code (a blocking Redis client; from async code use :meth:`aresult`)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("Job.result() blocks: in async code, await job.aresult()")
        import redis as redis_sync

        client = redis_sync.Redis.from_url(self._queue.config.redis_url)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self.record.state not in TERMINAL:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {self.id} is still {self.record.state} after {timeout}s")
                time.sleep(self._queue.config.poll_s)
                final, current = cast(list[Any], client.mget(_key(self.id, "final"), _key(self.id)))
                data = final or current
                if data is None:
                    raise JobNotFound(f"job {self.id} not found", code="job_not_found")
                self.record = JobRecord.model_validate_json(data)
        finally:
            client.close()
        return _outcome(self.record, self._queue.config)


def _outcome(record: JobRecord, config: JobsConfig) -> GenerationResult:
    if record.state == "succeeded":
        return load_result(config.results_dir, record.id, str(record.spec.request.get("prompt", "")))
    if record.state == "cancelled":
        raise JobCancelled(f"job {record.id} was cancelled", request_id=record.id)
    error = record.error or JobError(kind="JobFailed", message="the job failed")
    raise JobFailed(f"job {record.id} failed: {error.kind}: {error.message}", error=error.kind,
                    cost_usd=record.cost_usd, code=error.code, request_id=record.id)


class JobQueue:
    """Submit, read and cancel jobs. ``router`` prices requests and holds their budget at submit (its ledger
    must be the one the workers use); ``owner`` on each call scopes jobs to a client (the server's key)."""

    def __init__(self, config: JobsConfig, *, router: AsyncRouter, resolver: Any = None) -> None:
        self.config = config
        self.router = router
        self._resolver = resolver
        self._pool: ArqRedis | None = None
        self._lock = asyncio.Lock()

    async def _redis(self) -> ArqRedis:
        async with self._lock:
            if self._pool is None:
                from arq.connections import RedisSettings, create_pool

                self._pool = await create_pool(RedisSettings.from_dsn(self.config.redis_url),
                                               default_queue_name=self.config.queue_name,
                                               job_serializer=_dumps, job_deserializer=_loads)
            return self._pool

    async def _store(self) -> _Store:
        return _Store(await self._redis(), self.config)

    async def submit(self, request: ImageRequest | str, *, policy: Policy | str | Path | None = None,
                     webhook_url: str | None = None, tags: Iterable[str] = (), job_id: str | None = None,
                     owner: str | None = None, **kw: Any) -> Job:
        """Queue ``request`` (or a prompt and request fields as keywords); returns at once.

        Raises, holding nothing, when no backend can serve it (:class:`~router.errors.NoRouteError`), when its
        worst case does not fit the budgets of its tags (:class:`~router.errors.BudgetExceeded`), or when the
        webhook URL is refused. ``job_id``: a submit retried with the same id returns the first job.
        """
        req = await ImageRequest.afrom_kwargs(request, **kw)
        extra = frozenset(tags)
        if extra:
            req = req.model_copy_validated(tags=req.tags | extra)
        job_id = job_id or f"job_{secrets.token_hex(12)}"
        if not job_id.replace("_", "").replace("-", "").isalnum() or len(job_id) > 100:
            raise InvalidRequestError("job_id: letters, digits, '-' and '_' only, at most 100", code="invalid_value")
        req = req.model_copy_validated(idempotency_key=job_id)
        if webhook_url is not None:
            if self.config.webhook_secret is None:
                raise ConfigurationError("webhooks need a signing secret: set webhook_secret "
                                         "(IMAGEROUTER_WEBHOOK_SECRET)")
            await _check_webhook(webhook_url, self.config, self._resolver)
        as_json = await asyncio.to_thread(request_to_json, req)  # inline images: base64 of up to the image cap
        spec = JobSpec(request=as_json, policy=_policy_name(policy), webhook_url=webhook_url)
        store = await self._store()
        existing = await store.record(job_id)
        if existing is not None:
            return self._mine(existing, owner)
        hold = await self._hold(req, policy, job_id)
        record = JobRecord(id=job_id, state="queued", spec=spec, created_at=time.time(), owner=owner,
                           tags=tuple(sorted(req.tags)), hold=hold)
        if not await store.create(record):  # the same id submitted at the same moment: theirs stands
            await self._release(hold)
            return self._mine(await self._must(store, job_id), owner)
        try:
            pool = await self._redis()
            await pool.enqueue_job(_RUN, job_id, _job_id=job_id, _queue_name=self.config.queue_name)
        except BaseException:
            failed = record.model_copy(update={"state": "failed", "finished_at": time.time(), "error": JobError(
                kind="QueueUnavailable", message="the job could not be queued")})
            with contextlib.suppress(Exception):
                await store.finish(failed)
            await self._release(hold)
            raise
        return Job(record, self)

    async def _hold(self, req: ImageRequest, policy: Policy | str | Path | None, job_id: str) -> Hold | None:
        """Check the request's worst case against its budgets and hold it; None when no budget applies."""
        router = self.router
        # a thread: the decision reads the ledger's headroom, which may wait on another process's lock
        decision = await asyncio.to_thread(router.route, req, policy=policy, assume_configured=False)
        if not decision.chain:
            from router.router import _refusal

            raise _refusal(req, decision, job_id)
        worst = max(decision.chain, key=lambda c: router.reservation_for(c.provider, c))
        amount = router.reservation_for(worst.provider, worst)
        if router.ledger.watches(req.tags) is False:
            return None  # no budget applies: nothing to hold
        reservation = await asyncio.to_thread(router.ledger.reserve, request_id=job_id, provider=worst.provider,
                                              model=worst.model, amount=amount, tags=req.tags)
        return Hold(id=reservation.id, request_id=reservation.request_id, provider=reservation.provider,
                    model=reservation.model, amount=reservation.amount, tags=reservation.tags,
                    created=reservation.created)

    async def _release(self, hold: Hold | None) -> None:
        if hold is not None:
            await asyncio.to_thread(_release_hold, self.router.ledger, hold, "job not queued")

    def _mine(self, record: JobRecord, owner: str | None) -> Job:
        if record.owner != owner:
            raise JobNotFound(f"job {record.id} not found", code="job_not_found")
        return Job(record, self)

    async def _must(self, store: _Store, job_id: str) -> JobRecord:
        record = await store.record(job_id)
        if record is None:
            raise JobNotFound(f"job {job_id} not found", code="job_not_found")
        return record

    async def get(self, job_id: str, *, owner: str | None = None) -> Job:
        """The job as it stands (:class:`JobNotFound` for an unknown, expired or another owner's job)."""
        return self._mine(await self._must(await self._store(), job_id), owner)

    async def cancel(self, job_id: str, *, owner: str | None = None) -> Job:
        """Cancel a queued or running job (a running generation is stopped within ``poll_s``); a job that has
        ended is returned as it ended."""
        store = await self._store()
        record = self._mine(await self._must(store, job_id), owner).record
        if record.state in TERMINAL:
            return Job(record, self)
        ended = await store.finish(record.model_copy(update={"state": "cancelled", "finished_at": time.time()}))
        if ended.state == "cancelled" and ended.hold is not None:
            await self._release(ended.hold)  # the worker tries too; the first one releases it
        return Job(ended, self)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None


def _release_hold(ledger: LedgerBackend, hold: Hold, reason: str) -> bool:
    """Release a job's hold; False when it was released already (by the worker or a cancel)."""
    try:
        ledger.release(hold.reservation(), reason=reason)
    except ValueError:  # already released, or expired from a ledger that no longer has it
        return False
    return True


# --- the worker ----------------------------------------------------------------------------


class _Journaled:
    """The worker's ledger: every call goes to ``inner``; before an attempt of a job is settled, the job is
    marked charged in Redis (``…:charged``), so a re-run never pays for it again. Settlements always go
    through the router's ledger thread (``private`` False, ``settle_behind`` False): the mark is a blocking
    Redis call."""

    def __init__(self, inner: LedgerBackend, redis_url: str, ttl_s: float) -> None:
        import redis as redis_sync

        self.inner = inner
        self.jobs: dict[str, str] = {}  # the router's request id -> job id, for the requests running here
        self._redis: redis.Redis = redis_sync.Redis.from_url(redis_url)
        self._ttl = int(ttl_s)

    @property
    def private(self) -> bool:
        return False

    @property
    def queued(self) -> int:
        return self.inner.queued

    def set_budget(self, budget: Budget) -> None:
        self.inner.set_budget(budget)

    def remove_budget(self, period: Period, tag: str | None = None) -> None:
        self.inner.remove_budget(period, tag)

    def budgets(self) -> list[Budget]:
        return self.inner.budgets()

    def headroom(self, tags: Iterable[str] = ()) -> Decimal | None:
        return self.inner.headroom(tags)

    def watches(self, tags: Iterable[str] = ()) -> bool | None:
        return self.inner.watches(tags)

    def reserve(self, *, request_id: str, provider: str, model: str, amount: Decimal,
                tags: Iterable[str] = ()) -> Reservation:
        return self.inner.reserve(request_id=request_id, provider=provider, model=model, amount=amount, tags=tags)

    def reserve_behind(self, *, request_id: str, provider: str, model: str, amount: Decimal,
                       tags: Iterable[str] = ()) -> Reservation | None:
        return self.inner.reserve_behind(request_id=request_id, provider=provider, model=model, amount=amount,
                                         tags=tags)

    def settle(self, reservation: Reservation, actual_usd: Decimal, *, unit: str = "",
               quantity: Decimal | float | int = 0, details: Mapping[str, object] | None = None) -> None:
        job_id = self.jobs.get(reservation.request_id)
        if job_id is not None:
            self._redis.set(_key(job_id, "charged"), _dumps({"request_id": reservation.request_id,
                                                             "usd": str(actual_usd)}), ex=self._ttl)
        self.inner.settle(reservation, actual_usd, unit=unit, quantity=quantity, details=details)

    def settle_behind(self, reservation: Reservation, actual_usd: Decimal, *, unit: str = "",
                      quantity: Decimal | float | int = 0, details: Mapping[str, object] | None = None) -> bool:
        return False

    def release(self, reservation: Reservation, *, reason: str = "") -> None:
        self.inner.release(reservation, reason=reason)

    def flush(self) -> None:
        self.inner.flush()

    def spent(self, tags: Iterable[str] = (), period: Period = "month") -> Decimal:
        return self.inner.spent(tags, period)

    def report(self, *, since: datetime | None = None, until: datetime | None = None,
               group_by: Sequence[str] = ("provider",)) -> list[SpendRow]:
        return self.inner.report(since=since, until=until, group_by=group_by)

    def close(self) -> None:
        self._redis.close()
        self.inner.close()


RouterFactory = Callable[[], Mapping[str, Any]]
"""Returns :class:`~router.router.AsyncRouter`'s keyword arguments (as
:func:`router.config.router_kwargs_from_env` does)."""


class _Worker:
    """One worker process's state: its router, its Redis pool, the configuration."""

    def __init__(self, config: JobsConfig, router: AsyncRouter, journal: _Journaled, redis: ArqRedis) -> None:
        self.config = config
        self.router = router
        self.journal = journal
        self.redis = redis
        self.store = _Store(redis, config)
        self._swept = 0.0

    async def run(self, job_id: str) -> str:
        record = await self.store.record(job_id)
        if record is None:
            log.warning("job %s: no record (expired?); nothing to run", job_id)
            return "missing"
        if record.state not in TERMINAL:
            ended = await self._generate(record)
            record = ended or await self.store.final(job_id) or record  # None: a cancel won meanwhile
        elif record.hold is not None:  # ended before it ran (cancelled): its hold goes, if nobody released it
            await asyncio.to_thread(_release_hold, self.router.ledger, record.hold, record.state)
        await self._announce(record)
        await self._sweep()
        return record.state

    async def _generate(self, record: JobRecord) -> JobRecord | None:
        job_id = record.id
        if record.hold is not None:
            await asyncio.to_thread(_release_hold, self.router.ledger, record.hold, "job started")
        charged = await self.redis.get(_key(job_id, "charged"))
        if charged is not None:
            paid = _loads(charged)
            lost = record.model_copy(update={
                "state": "failed", "finished_at": time.time(), "cost_usd": Decimal(paid["usd"]),
                "error": JobError(kind="JobLost", code="job_lost", message=(
                    f"a worker stopped after this job was charged ${paid['usd']} and before its result was "
                    "stored; it is not run again, so it is never paid for twice"))})
            return await self.store.finish(lost)
        running = record.model_copy(update={"state": "running", "started_at": time.time(), "runs": record.runs + 1})
        await self.store.update(running)
        if await self.store.final(job_id) is not None:
            return None
        spec = running.spec

        def routed(event: object) -> None:
            if isinstance(event, Routed):
                self.journal.jobs[event.request_id] = job_id

        task = asyncio.create_task(self._call(spec, routed))
        try:
            outcome = await self._until_cancelled(job_id, task)
        finally:
            for request_id in [r for r, j in self.journal.jobs.items() if j == job_id]:
                self.journal.jobs.pop(request_id, None)
        if outcome is None:
            return None
        if isinstance(outcome, GenerationResult):
            await asyncio.to_thread(store_result, self.config.results_dir, job_id, outcome)
            ended = running.model_copy(update={"state": "succeeded", "finished_at": time.time(),
                                               "cost_usd": outcome.cost.actual_usd, "result": _summary(outcome)})
        else:
            ended = running.model_copy(update={
                "state": "failed", "finished_at": time.time(), "cost_usd": outcome.cost_usd,
                "error": JobError(kind=outcome.kind, message=outcome.message, code=outcome.code)})
        return await self.store.finish(ended)

    async def _call(self, spec: JobSpec, on_progress: ProgressCallback) -> GenerationResult:
        request = await asyncio.to_thread(spec.image_request)
        limit = self.config.job_timeout_s  # arq's timeout is later: there is time to store the outcome
        try:
            async with asyncio.timeout(limit):
                return await self.router.agenerate(request, policy=spec.policy, on_progress=on_progress)
        except TimeoutError:
            from router.errors import DeadlineExceeded

            raise DeadlineExceeded(f"the job ran past its {limit:.0f}s limit") from None

    async def _until_cancelled(self, job_id: str,
                               task: asyncio.Task[GenerationResult]) -> GenerationResult | ImageRouterError | None:
        """The generation's result or error; None when the job was cancelled meanwhile (the task is then
        cancelled: the router releases its reservations)."""
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.config.poll_s)
                if done:
                    break
                final = await self.store.final(job_id)
                if final is not None:
                    task.cancel()
                    await asyncio.wait({task})
                    return None
        except BaseException:  # the worker is stopping (SIGTERM, arq's timeout): arq runs the job again
            task.cancel()
            await asyncio.wait({task})
            raise
        exc = task.exception()
        if exc is None:
            return task.result()
        if isinstance(exc, ImageRouterError):
            return exc
        raise exc

    async def _announce(self, record: JobRecord) -> None:
        if record.spec.webhook_url is not None:
            await self.redis.enqueue_job(_DELIVER, record.id, _job_id=f"{record.id}.webhook",
                                         _queue_name=self.config.queue_name)

    async def deliver(self, job_id: str) -> dict[str, Any]:
        record = await self.store.final(job_id)
        if record is None or record.spec.webhook_url is None:
            return {"status": "skipped"}
        outcome = await deliver(record, self.config)
        await self.redis.set(_key(job_id, "webhook"), _dumps(outcome), ex=int(self.config.result_ttl_s))
        return outcome

    async def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept >= 60:
            self._swept = now
            await asyncio.to_thread(sweep_results, self.config.results_dir, self.config.result_ttl_s)


async def _run_job(ctx: dict[str, Any], job_id: str) -> str:
    worker: _Worker = ctx["pixroute"]
    return await worker.run(job_id)


async def _deliver_webhook(ctx: dict[str, Any], job_id: str) -> dict[str, Any]:
    worker: _Worker = ctx["pixroute"]
    return await worker.deliver(job_id)


def worker_settings(config: JobsConfig, *, router_factory: RouterFactory | None = None,
                    burst: bool = False) -> dict[str, Any]:
    """arq :class:`~arq.worker.Worker`'s keyword arguments for a pixroute worker."""
    from arq.connections import RedisSettings
    from arq.worker import func

    async def startup(ctx: dict[str, Any]) -> None:
        if router_factory is None:
            from router.config import router_kwargs_from_env

            kw = dict(router_kwargs_from_env())
        else:
            kw = dict(router_factory())
        journal = _Journaled(open_ledger(kw.pop("ledger", None)), config.redis_url, config.result_ttl_s)
        from router.router import AsyncRouter

        router = AsyncRouter(ledger=journal, **kw)
        config.results_dir.mkdir(parents=True, exist_ok=True)
        ctx["pixroute"] = _Worker(config, router, journal, ctx["redis"])

    async def shutdown(ctx: dict[str, Any]) -> None:
        worker: _Worker | None = ctx.get("pixroute")
        if worker is not None:
            await worker.router.aclose()
            await asyncio.to_thread(worker.journal.close)

    return {
        "functions": [func(_run_job, name=_RUN, timeout=config.arq_timeout_s, keep_result=0),
                      func(_deliver_webhook, name=_DELIVER, timeout=config.webhook_budget_s,
                           keep_result=config.result_ttl_s)],
        "queue_name": config.queue_name, "redis_settings": RedisSettings.from_dsn(config.redis_url),
        "on_startup": startup, "on_shutdown": shutdown, "max_jobs": config.max_jobs,
        "poll_delay": config.poll_s, "job_serializer": _dumps, "job_deserializer": _loads, "burst": burst,
        "keep_result": 0, "max_tries": 1_000, "handle_signals": True,
    }


def run_worker(config: JobsConfig | None = None, *, router_factory: RouterFactory | None = None,
               burst: bool = False) -> None:
    """Run a worker until SIGINT/SIGTERM (``burst``: until the queue is empty). A job it is running when
    stopped is run again by another worker (then it resumes where the job's state says)."""
    from arq.worker import Worker

    loop = asyncio.new_event_loop()  # the worker's own loop (arq takes the current one), closed when it stops
    asyncio.set_event_loop(loop)
    try:
        Worker(**worker_settings(config or JobsConfig.from_env(), router_factory=router_factory, burst=burst)).run()
    finally:
        asyncio.set_event_loop(None)
        loop.close()


# --- the CLI ---------------------------------------------------------------------------------


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """``pixroute worker``'s options (each also read from the environment; see :meth:`JobsConfig.from_env`)."""
    parser.add_argument("--redis", help="the queue's Redis URL (default: IMAGEROUTER_JOBS_REDIS)")
    parser.add_argument("--results-dir", help="where results are written (default: IMAGEROUTER_JOBS_DIR)")
    parser.add_argument("--max-jobs", type=int, help="jobs run at once by this worker (default: 10)")
    parser.add_argument("--job-timeout-s", type=float, help="the longest one job may run (default: 900)")
    parser.add_argument("--burst", action="store_true", help="stop once the queue is empty")


def worker_command(ns: argparse.Namespace) -> int:
    """``pixroute worker``: run a worker with the router from the environment (``--sandbox``: the sandboxes)."""
    try:
        import arq  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(f"the worker needs its extra: pip install 'pixroute[jobs]' ({exc.name} is "
                                 "missing)") from None
    overrides: dict[str, Any] = {k: v for k, v in (
        ("redis_url", ns.redis), ("results_dir", ns.results_dir), ("max_jobs", ns.max_jobs),
        ("job_timeout_s", ns.job_timeout_s)) if v is not None}
    factory: RouterFactory | None = None
    if getattr(ns, "sandbox", False):
        from router.config import router_kwargs_from_env

        def factory() -> Mapping[str, Any]:
            return router_kwargs_from_env(sandbox=True)
    run_worker(JobsConfig.from_env(**overrides), router_factory=factory, burst=ns.burst)
    return 0
