"""A loopback emulator of Black Forest Labs' FLUX API (asynchronous tasks), strict like the real one.

No OpenAPI spec is shipped for BFL; this follows PROVIDERS.md. Routes:

- ``POST /v1/{model}`` (JSON, header ``x-key``) → ``{"id", "polling_url"}``; the task
  answers ``Pending`` for ``pending_polls`` polls, then ``Ready``.
- ``GET /v1/get_result?id=…`` (header ``x-key``) → ``{"id", "status", "result",
  "progress", "details"}``; ``status`` is one of Pending, Ready, Error, Request
  Moderated, Content Moderated, Task not found; ``result`` is ``{"sample", "seed",
  "prompt", "start_time", "end_time", "duration"}`` once Ready.
- ``GET /delivery/{id}/sample.{ext}?se=…&sig=…``: the signed output URL (no key),
  valid ``sample_ttl_s`` seconds (600), then 403 in the blob store's XML shape.

Errors are FastAPI-shaped: ``{"detail": "…"}``, and 422 ``{"detail": [{loc, msg,
type}]}`` for bodies that break the schema (unknown fields included). Every answer
carries ``x-request-id``.

Sizes: ``width``/``height`` multiples of 16, each side 256..4096, at most 4 MP.
``aspect_ratio`` models (flux-kontext-pro ~1 MP, flux-pro-1.1-ultra ~4 MP) accept
``"a:b"`` between 9:21 and 21:9 and produce :func:`ratio_size` of it.

Faults (``sb.faults``), besides the shared ones: ``moderation`` (the task ends
``Content Moderated``, or the status in ``Fault.message`` such as ``Request
Moderated``), ``Fault("task_error")`` (the task ends ``Error``),
``Fault("task_not_found")`` (polls answer ``Task not found``), ``Fault("expired_output")``
(the sample URL is already expired). ``insufficient_credits`` is the 402.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from providers.sandbox._server import (
    VENDOR_FAULTS,
    Fault,
    Request,
    Response,
    SandboxError,
    SandboxServer,
    synthetic_image,
)
from router.images import encode

MAX_PIXELS = 4 * 1024 * 1024
MIN_SIDE, MAX_SIDE = 256, 4096
MIN_RATIO, MAX_RATIO = 9 / 21, 21 / 9
RATIO_AREA = {"flux-kontext-pro": 1024 * 1024, "flux-pro-1.1-ultra": 2048 * 2048}
MODERATION_STATUSES = ("Request Moderated", "Content Moderated")


def ratio_size(ratio: float, area: int) -> tuple[int, int]:
    """The output shape of an ``aspect_ratio`` model: about ``area`` pixels, sides multiples of 16."""
    return max(16, round(math.sqrt(area * ratio) / 16) * 16), max(16, round(math.sqrt(area / ratio) / 16) * 16)


class ApiError(SandboxError):
    """A FastAPI-shaped error answer."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(str(detail))
        self.status, self.detail, self.headers = status, detail, headers or {}

    def response(self) -> Response:
        return Response.json(self.status, {"detail": self.detail}, self.headers)


def _invalid(loc: str, msg: str, kind: str) -> ApiError:
    return ApiError(422, [{"loc": ["body", loc], "msg": msg, "type": kind}])


# --- field checks ---------------------------------------------------------------------

_Check = Callable[[str, Any], Any]


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _invalid(name, "Input should be a valid string", "string_type")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _invalid(name, "Input should be a valid boolean", "bool_type")
    return value


def _int(low: int, high: int) -> _Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(name, "Input should be a valid integer", "int_type")
        if not low <= value <= high:
            raise _invalid(name, f"Input should be between {low} and {high}", "value_error")
        return value
    return check


def _num(low: float, high: float) -> _Check:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid(name, "Input should be a valid number", "float_type")
        if not low <= value <= high:
            raise _invalid(name, f"Input should be between {low} and {high}", "value_error")
        return float(value)
    return check


def _side(name: str, value: Any) -> int:
    side: int = _int(MIN_SIDE, MAX_SIDE)(name, value)
    if side % 16:
        raise _invalid(name, "Input should be a multiple of 16", "multiple_of")
    return side


def _enum(*allowed: str) -> _Check:
    def check(name: str, value: Any) -> str:
        if value not in allowed:
            listed = ", ".join(f"'{a}'" for a in allowed)
            raise _invalid(name, f"Input should be {listed}", "enum")
        return str(value)
    return check


def _ratio(name: str, value: Any) -> float:
    text = _str(name, value)
    a, sep, b = text.partition(":")
    if not (sep and a.isdigit() and b.isdigit() and int(a) > 0 and int(b) > 0):
        raise _invalid(name, "Aspect ratio must be in the form 'width:height'", "value_error")
    ratio = int(a) / int(b)
    if not MIN_RATIO - 1e-9 <= ratio <= MAX_RATIO + 1e-9:
        raise _invalid(name, "Aspect ratio must be between 21:9 and 9:21", "value_error")
    return ratio


def _image(name: str, value: Any) -> Image.Image:
    text = _str(name, value)
    try:
        data = base64.b64decode(text, validate=True)
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG", "WEBP"]) as img:
            img.load()
            return img.copy()
    except (binascii.Error, ValueError, OSError, SyntaxError, Image.DecompressionBombError):
        raise _invalid(name, "Input should be a base64-encoded PNG, JPEG or WEBP image", "value_error") from None


_COMMON: dict[str, _Check] = {
    "prompt": _str,
    "seed": _int(0, 2**32 - 1),
    "safety_tolerance": _int(0, 6),
    "output_format": _enum("jpeg", "png"),
    "prompt_upsampling": _bool,
    "webhook_url": _str,
    "webhook_secret": _str,
}
_SIZED = {"width": _side, "height": _side}
MODEL_FIELDS: dict[str, dict[str, _Check]] = {
    "flux-pro-1.1": {**_COMMON, **_SIZED, "image_prompt": _image},
    "flux-2-pro": {**_COMMON, **_SIZED, "input_image": _image},
    "flux-pro-1.1-ultra": {**_COMMON, "aspect_ratio": _ratio, "raw": _bool, "image_prompt": _image,
                           "image_prompt_strength": _num(0.0, 1.0)},
    "flux-kontext-pro": {**_COMMON, "aspect_ratio": _ratio, "input_image": _image},
    "flux-pro-1.0-fill": {**_COMMON, "image": _image, "mask": _image, "steps": _int(15, 50),
                          "guidance": _num(1.5, 100.0)},
}
_REQUIRED = {"flux-pro-1.0-fill": ("image",)}


@dataclass
class _Task:
    id: str
    model: str
    prompt: str
    seed: int
    output_format: str
    image: bytes
    outcome: str = "Ready"
    polls: int = 0
    expired: bool = False
    created: float = field(default_factory=time.time)


# --- pictures -----------------------------------------------------------------------------


def _render(model: str, values: dict[str, Any], seed: int, fmt: str) -> bytes:
    prompt = values.get("prompt", "")
    if model == "flux-pro-1.0-fill":
        base: Image.Image = values["image"].convert("RGB")
        art = synthetic_image(prompt, seed, base.size)
        mask = values.get("mask")
        if mask is None:
            return encode(art, fmt)
        white = mask.convert("L")
        if white.size != base.size:
            raise _invalid("mask", "Mask must have the same dimensions as the image", "value_error")
        return encode(Image.composite(art, base, white.point(lambda v: 255 if v >= 128 else 0)).convert("RGB"), fmt)
    source = values.get("input_image")
    if model in RATIO_AREA:
        ratio = values.get("aspect_ratio") or (source.width / source.height if source is not None else 1.0)
        size = ratio_size(min(max(ratio, MIN_RATIO), MAX_RATIO), RATIO_AREA[model])
    else:
        size = (values.get("width", 1024), values.get("height", 768))
        if size[0] * size[1] > MAX_PIXELS:
            raise _invalid("width", f"width * height must be at most {MAX_PIXELS} pixels", "value_error")
    art = synthetic_image(prompt, seed, size)
    if source is not None:
        art = Image.blend(source.convert("RGB").resize(size, Image.Resampling.LANCZOS), art, 0.5)
    return encode(art, fmt)


# --- the emulator ---------------------------------------------------------------------------


class BFLSandbox(SandboxServer):
    """BFL's FLUX API on loopback: ``with BFLSandbox() as sb: ... sb.base_url``.

    ``pending_polls`` sets how many polls answer Pending before Ready; ``sample_ttl_s``
    how long sample URLs live; ``tasks`` holds the tasks created, by id.
    """

    base_path = ""
    fault_kinds = VENDOR_FAULTS | {"task_error", "task_not_found", "expired_output"}

    def __init__(
        self, api_key: str = "bfl-sandbox-key", *, pending_polls: int = 1, sample_ttl_s: float = 600.0
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.pending_polls = pending_polls
        self.sample_ttl_s = sample_ttl_s
        self.tasks: dict[str, _Task] = {}
        self._tasks_lock = threading.Lock()
        self._signing_key = secrets.token_bytes(16)

    # --- hooks

    def authenticate(self, request: Request) -> Response | None:
        if request.path.startswith("/delivery/"):
            return None  # signed URLs carry no key
        key = request.headers.get("x-key", "")
        if not key:
            return ApiError(403, "Not authenticated").response()
        if not hmac.compare_digest(key.encode(), self.api_key.encode()):
            return ApiError(403, "Not authenticated - Invalid Authentication").response()
        return None

    def decorate(self, request: Request, response: Response, elapsed_s: float) -> None:
        response.headers["x-request-id"] = request.request_id
        response.headers.setdefault("content-type", "application/json")

    def render_internal_error(self, request: Request, exc: BaseException) -> Response:
        return ApiError(500, "Internal Server Error").response()

    def render_fault(self, fault: Fault, request: Request) -> Response:
        if fault.kind == "rate_limit":
            headers = {} if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
            return ApiError(429, "You have exceeded the number of active tasks (24). Please wait for some tasks "
                                 "to finish before submitting new ones.", headers).response()
        if fault.kind == "server_error":
            status = fault.status or 500
            return ApiError(status, "Service Unavailable" if status == 503 else "Internal Server Error").response()
        if fault.kind == "malformed":
            body = fault.body if fault.body is not None else b'{"id": "3f1c", "polling_url": "http'
            return Response(200, body, {"content-type": "application/json"})
        if fault.kind == "insufficient_credits":
            return ApiError(402, "Insufficient credits. Please add credits to your account.").response()
        if fault.kind == "invalid_request":
            loc = fault.param or "body"
            return _invalid(loc, fault.message or "Invalid request", fault.code or "value_error").response()
        if fault.kind == "auth":
            return ApiError(fault.status or 401, "Not authenticated - Invalid Authentication").response()
        moderated = fault.message if fault.message in MODERATION_STATUSES else "Content Moderated"
        outcomes = {"moderation": moderated, "task_error": "Error",
                    "task_not_found": "Task not found"}
        if fault.kind in outcomes or fault.kind == "expired_output":
            response = self.handle(request)
            task = self._task_of(response)
            if task is not None:
                if fault.kind == "expired_output":
                    task.expired = True
                else:
                    task.outcome = outcomes[fault.kind]
            return response
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    # --- routes

    def handle(self, request: Request) -> Response:
        if request.method == "POST" and request.path.startswith("/v1/"):
            model = request.path.removeprefix("/v1/")
            if model not in MODEL_FIELDS:
                raise ApiError(404, "Not Found")
            return self._submit(request, model)
        if request.method == "GET" and request.path == "/v1/get_result":
            return self._poll(request)
        if request.method == "GET" and request.path.startswith("/delivery/"):
            return self._sample(request)
        raise ApiError(404 if request.method in ("GET", "POST") else 405, "Not Found")

    def _submit(self, request: Request, model: str) -> Response:
        if request.media_type != "application/json" or request.body_error is not None:
            raise ApiError(422, [{"loc": ["body"], "msg": "Input should be a valid JSON object",
                                  "type": "model_attributes_type"}])
        body = request.json
        if not isinstance(body, dict):
            raise ApiError(422, [{"loc": ["body"], "msg": "Input should be a valid dictionary",
                                  "type": "model_attributes_type"}])
        checks = MODEL_FIELDS[model]
        for name in body:
            if name not in checks:
                raise _invalid(name, "Extra inputs are not permitted", "extra_forbidden")
        for name in ("prompt", *_REQUIRED.get(model, ())):
            if name == "prompt" and model == "flux-pro-1.0-fill":
                continue
            if body.get(name) is None:
                raise _invalid(name, "Field required", "missing")
        values = {name: checks[name](name, value) for name, value in body.items() if value is not None}
        if not values.get("prompt", "x" if model == "flux-pro-1.0-fill" else "").strip():
            raise _invalid("prompt", "String should have at least 1 character", "string_too_short")
        seed = values.get("seed", secrets.randbelow(2**32))
        fmt = values.get("output_format", "jpeg")
        image = _render(model, values, seed, fmt)
        task = _Task(secrets.token_hex(16), model, values.get("prompt", ""), seed, fmt, image)
        task.id = f"{task.id[:8]}-{task.id[8:12]}-{task.id[12:16]}-{task.id[16:20]}-{task.id[20:]}"
        with self._tasks_lock:
            self.tasks[task.id] = task
        return Response.json(200, {"id": task.id, "polling_url": f"{self.origin}/v1/get_result?id={task.id}"})

    def _poll(self, request: Request) -> Response:
        task_id = request.query.get("id")
        if not task_id:
            raise ApiError(422, [{"loc": ["query", "id"], "msg": "Field required", "type": "missing"}])
        with self._tasks_lock:
            task = self.tasks.get(task_id)
            if task is not None:
                task.polls += 1
        if task is None or task.outcome == "Task not found":
            return Response.json(200, {"id": task_id, "status": "Task not found"})
        answer: dict[str, Any] = {"id": task.id, "status": "Pending", "result": None, "progress": None,
                                  "details": None, "preview": None}
        if task.polls <= self.pending_polls:
            answer["progress"] = round(task.polls / (self.pending_polls + 1), 2)
            return Response.json(200, answer)
        answer["status"] = task.outcome
        if task.outcome in MODERATION_STATUSES:
            answer["details"] = {"Moderation Reasons": ["Sexual"]}
        elif task.outcome == "Error":
            answer["details"] = {"error": "Generation failed"}
        else:
            expires = int(task.created - 1 if task.expired else task.created + self.sample_ttl_s)
            answer["result"] = {"sample": self._signed(task, expires), "prompt": task.prompt, "seed": task.seed,
                                "start_time": task.created, "end_time": time.time(),
                                "duration": round(time.time() - task.created, 3)}
        return Response.json(200, answer)

    def _signed(self, task: _Task, expires: int) -> str:
        sig = hmac.new(self._signing_key, f"{task.id}:{expires}".encode(), "sha256").hexdigest()
        ext = "png" if task.output_format == "png" else "jpeg"
        return f"{self.origin}/delivery/{task.id}/sample.{ext}?se={expires}&sig={sig}"

    def _sample(self, request: Request) -> Response:
        task_id = request.path.split("/")[2]
        with self._tasks_lock:
            task = self.tasks.get(task_id)
        expires = request.query.get("se", "")
        sig = hmac.new(self._signing_key, f"{task_id}:{expires}".encode(), "sha256").hexdigest()
        if task is None or not hmac.compare_digest(sig, request.query.get("sig", "")):
            return _blob_error(403, "AuthenticationFailed", "Signature did not match.")
        if not expires.isdigit() or int(expires) < time.time():
            return _blob_error(403, "AuthenticationFailed", "Signed expiry time has passed.")
        mime = "image/png" if task.output_format == "png" else "image/jpeg"
        return Response(200, task.image, {"content-type": mime})

    def _task_of(self, response: Response) -> _Task | None:
        if response.status != 200:
            return None
        task_id = json.loads(response.body).get("id")
        with self._tasks_lock:
            return self.tasks.get(task_id)

    # --- helpers for tests

    def task(self, task_id: str) -> _Task:
        with self._tasks_lock:
            return self.tasks[task_id]


def _blob_error(status: int, code: str, message: str) -> Response:
    body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>").encode()
    return Response(status, body, {"content-type": "application/xml"})
