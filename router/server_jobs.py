"""The jobs endpoints of the HTTP server (:mod:`router.server`), over a :class:`~router.jobs.JobQueue`.

- ``POST /v1/jobs``: the body of ``POST /v1/images/generations`` plus an optional ``webhook_url``; answers
  202 with the job (``{"id", "object": "job", "status": "queued", …}``). The request is checked, routed and
  its worst case held against the key's budgets before it is queued (a 429 ``budget_exceeded`` otherwise).
  ``stream`` is refused: a job's progress is its status and its webhook.
- ``GET /v1/jobs/{id}``: the job; once ``succeeded``, ``data`` holds the images (``b64_json``).
- ``DELETE /v1/jobs/{id}``: cancel a queued or running job; an ended job is answered as it ended.

With client keys, a job belongs to the key that submitted it: another key gets the same 404 as for an
unknown id. Install on an app with :func:`install_jobs` (``create_app(...)`` does it when given ``jobs=``).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from fastapi import APIRouter, FastAPI, Request

from router.errors import ConfigurationError, ImageRouterError
from router.jobs import JobNotFound, JobQueue, JobRecord, load_result
from router.server import (
    _ERRORS,
    _INLINE_BYTES,
    APIError,
    Body,
    ClientKey,
    ImageClient,
    ImageGenerationRequest,
    Server,
    _build,
    _client_error,
    _joined,
    _json_object,
    _read_body,
    _request_schema,
)

jobs_api = APIRouter()


def install_jobs(app: FastAPI, queue: JobQueue) -> FastAPI:
    """Serve ``queue``'s jobs from ``app`` (an app made by :func:`router.server.create_app`)."""
    app.state.pixroute_jobs = queue
    app.include_router(jobs_api)
    return app


def _queue(request: Request) -> JobQueue:
    queue: JobQueue | None = getattr(request.app.state, "pixroute_jobs", None)
    if queue is None:
        raise APIError(404, "This server runs no job queue.", code="jobs_not_enabled", error="JobsNotEnabled")
    return queue


def _not_found(job_id: str) -> APIError:
    return APIError(404, f"No job found with id '{job_id[:100]}'.", code="job_not_found", error="JobNotFound")


def _split(body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The generations body and the webhook URL."""
    webhook = body.pop("webhook_url", None)
    if webhook is not None and not isinstance(webhook, str):
        raise APIError(400, "Invalid type for 'webhook_url': expected a string.", param="webhook_url",
                       code="invalid_type")
    if body.get("stream"):
        raise APIError(400, "Jobs are not streamed: poll GET /v1/jobs/{id} or give a webhook_url.", param="stream",
                       code="invalid_value")
    return body, webhook


def _images(record: JobRecord, queue: JobQueue) -> list[dict[str, str]]:
    result = load_result(queue.config.results_dir, record.id, str(record.spec.request.get("prompt", "")))
    return [{"b64_json": base64.b64encode(img.data).decode("ascii")} for img in result.images]


async def _answer(record: JobRecord, queue: JobQueue) -> dict[str, Any]:
    out = record.public()
    if record.state == "succeeded":
        try:
            out["data"] = await asyncio.to_thread(_images, record, queue)
        except JobNotFound:
            out["data"] = None  # swept from disk; the record outlives it by moments at most
    return out


@jobs_api.post("/v1/jobs", status_code=202, tags=["jobs"], responses=_ERRORS,
               openapi_extra=_request_schema(ImageGenerationRequest, "application/json"))
async def submit_job(request: Request, server: Server, key: ImageClient, body: Body) -> dict[str, Any]:
    """Queue a generation (the images/generations body, plus ``webhook_url``); answers at once."""
    queue = _queue(request)
    if body.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise APIError(400, "Send the request body as JSON (Content-Type: application/json).")
    chunks = await _read_body(body)
    router, settings = server.router, server.settings

    def parse() -> tuple[Any, str | None]:
        raw = _json_object(b"".join(chunks) if sum(map(len, chunks)) <= _INLINE_BYTES else _joined(chunks))
        generation, webhook = _split(raw)
        return _build(generation, router, key, settings), webhook

    parsed, webhook = parse() if sum(map(len, chunks)) <= _INLINE_BYTES else await asyncio.to_thread(parse)
    try:
        job = await queue.submit(parsed.request, policy=parsed.policy, webhook_url=webhook,
                                 owner=key.name if key else None)
    except ConfigurationError:
        raise APIError(400, "This server sends no webhooks (no signing secret is configured).",
                       param="webhook_url", code="webhooks_not_enabled") from None
    except ImageRouterError as exc:
        error = _client_error(exc, parsed)
        if webhook is not None and "webhook_url" in exc.message:
            error.param = "webhook_url"
        raise error from None
    return job.record.public() | {"warnings": parsed.notes}


@jobs_api.get("/v1/jobs/{job_id}", tags=["jobs"], responses=_ERRORS)
async def get_job(request: Request, key: ClientKey, job_id: str) -> dict[str, Any]:
    """The job; once it succeeded, its images in ``data``."""
    queue = _queue(request)
    try:
        job = await queue.get(job_id, owner=key.name if key else None)
    except JobNotFound:
        raise _not_found(job_id) from None
    return await _answer(job.record, queue)


@jobs_api.delete("/v1/jobs/{job_id}", tags=["jobs"], responses=_ERRORS)
async def cancel_job(request: Request, key: ClientKey, job_id: str) -> dict[str, Any]:
    """Cancel a queued or running job (an ended job is answered as it ended)."""
    queue = _queue(request)
    try:
        job = await queue.cancel(job_id, owner=key.name if key else None)
    except JobNotFound:
        raise _not_found(job_id) from None
    return job.record.public()
