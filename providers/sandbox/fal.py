"""A loopback emulator of fal.ai's queue API and the image endpoints the router uses, strict like the real one.

It follows fal's published reference (each rule names its source; see ``tests/specs/fal_rules.md``):

- ``POST /{endpoint_id}`` (JSON, header ``Authorization: Key …``) → ``{"status": "IN_QUEUE", "request_id",
  "response_url", "status_url", "cancel_url", "queue_position"}``; the status/result/cancel URLs drop the
  endpoint's subpath ("The subpath … should be used when making the request, but not when getting request
  status or results", https://docs.fal.ai/model-endpoints/queue).
- ``GET …/requests/{id}/status[?logs=1]`` → ``IN_QUEUE`` (``queue_position``) for ``queued_polls`` polls,
  ``IN_PROGRESS`` (``logs``) for ``running_polls``, then ``COMPLETED`` (``logs``, ``metrics``, and ``error`` /
  ``error_type`` when it failed).
- ``GET …/requests/{id}`` → the endpoint's output; 400 while the request is not done; the request's error
  (422 ``content_policy_violation`` list, 500 runner failure) when it failed.
- ``PUT …/requests/{id}/cancel`` → 202 ``{"status": "CANCELLATION_REQUESTED"}``, or 400
  ``{"status": "ALREADY_COMPLETED"}`` (https://fal.ai/docs/inference-api/queue/cancel).
- ``GET /files/output?id=…`` (:data:`MEDIA_PATH`): the CDN file of an output (no key).

Inputs are checked per endpoint (:data:`ENDPOINTS`) in FastAPI's 422 shape ``{"detail": [{loc, msg, type}]}``;
a field the endpoint's schema does not list is refused (stricter than fal, so a wrong adapter fails).

Billing: a request is billed when it completes without error ("You pay only for successful outputs, and you are
never charged for server errors or time spent waiting in the queue", https://docs.fal.ai/documentation/
model-apis/pricing), at :data:`RATES` (per started megapixel of each image, or per image). ``billed_usd`` sums it.

Faults (``sb.faults``), besides the shared ones: ``moderation`` (the request completes with error; its result is
422 ``content_policy_violation``), ``Fault("request_error")`` (completes with a runner error; result 500),
``Fault("nsfw")`` (completes, billed, every image flagged in ``has_nsfw_concepts``), ``insufficient_credits``
(403 "User is locked. Reason: Exhausted balance."). On :data:`MEDIA_PATH`: ``server_error`` / ``rate_limit``
answer 503, ``auth`` 403, ``malformed`` a 200 that is not an image. Hostile images replace the request's first
output (billed as usual).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import math
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from PIL import Image

from providers.sandbox._server import (
    HOSTILE_IMAGE_FAULTS,
    VENDOR_FAULTS,
    Fault,
    Request,
    Response,
    SandboxError,
    SandboxServer,
    hostile_image,
    synthetic_image,
)
from router.images import encode

MEDIA_PATH = "/files/output"
MEGAPIXEL = 1024 * 1024
PRESETS = {  # ImageSize presets (fal's FLUX schemas); landscape_4_3 is FLUX's default
    "square_hd": (1024, 1024), "square": (512, 512), "portrait_4_3": (768, 1024), "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768), "landscape_16_9": (1024, 576),
}


class ApiError(SandboxError):
    """A fal error answer: ``{"detail": …}``."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(str(detail))
        self.status, self.detail, self.headers = status, detail, headers or {}

    def response(self) -> Response:
        return Response.json(self.status, {"detail": self.detail}, self.headers)


def _invalid(loc: str, msg: str, kind: str) -> ApiError:
    return ApiError(422, [{"loc": ["body", loc], "msg": msg, "type": kind}], {"x-fal-retryable": "false"})


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
            kind = "greater_than_equal" if value < low else "less_than_equal"
            raise _invalid(name, f"Input should be between {low} and {high}", kind)
        return value

    return check


def _num(low: float, high: float) -> _Check:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid(name, "Input should be a valid number", "float_type")
        if not low <= value <= high:
            kind = "greater_than_equal" if value < low else "less_than_equal"
            raise _invalid(name, f"Input should be between {low} and {high}", kind)
        return float(value)

    return check


def _enum(*allowed: str) -> _Check:
    def check(name: str, value: Any) -> str:
        if value not in allowed:
            raise _invalid(name, "Input should be " + " or ".join(f"'{a}'" for a in allowed), "enum")
        return str(value)

    return check


def _size(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, str) and value in PRESETS:
        return PRESETS[value]
    if isinstance(value, dict) and set(value) <= {"width", "height"}:
        w, h = value.get("width", 512), value.get("height", 512)  # ImageSize defaults 512
        if all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 14142 for v in (w, h)):
            return int(w), int(h)
    raise _invalid(name, "Input should be an ImageSize {width, height} or a size preset", "value_error")


def _image_url(name: str, value: Any) -> Image.Image:
    """A file input given as a data URL (fal accepts base64 data URIs for file inputs)."""
    text = _str(name, value)
    head, sep, data = text.partition(",")
    if not (sep and head.startswith("data:") and head.endswith(";base64")):
        raise _invalid(name, "Input should be a data URI (the sandbox fetches no URLs)", "value_error")
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True)), formats=["PNG", "JPEG", "WEBP"]) as img:
            img.load()
            return img.copy()
    except (binascii.Error, ValueError, OSError, SyntaxError, Image.DecompressionBombError):
        raise _invalid(name, "Could not read the image", "image_load_error") from None


def _loras(name: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _invalid(name, "Input should be a valid list", "list_type")
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or set(item) - {"path", "scale"}:
            raise _invalid(f"{name}.{i}", "Input should be a LoraWeight {path, scale}", "model_type")
        if "scale" in item:
            _num(-4.0, 4.0)(f"{name}.{i}.scale", item["scale"])
    return value


_FLUX: dict[str, _Check] = {
    "prompt": _str, "seed": _int(0, 2**32 - 1), "num_images": _int(1, 4), "sync_mode": _bool,
    "output_format": _enum("jpeg", "png"), "enable_safety_checker": _bool,
    "acceleration": _enum("none", "regular", "high"), "guidance_scale": _num(1.0, 20.0),
}


@dataclass(frozen=True)
class EndpointSpec:
    """One endpoint: its input checks, required fields, billing and output shape."""

    fields: dict[str, _Check]
    required: tuple[str, ...] = ("prompt",)
    usd_per_mp: Decimal | None = None
    usd_per_image: Decimal | None = None
    default_size: tuple[int, int] = (1024, 768)
    flux_output: bool = True  # {images: [{url, width, height, content_type}], seed, has_nsfw_concepts, …}


# Rates: fal's model pages / pricing as quoted on 2026-12-02 (providers/prices/fal.toml names each source).
ENDPOINTS: dict[str, EndpointSpec] = {
    "fal-ai/flux/schnell": EndpointSpec({**_FLUX, "image_size": _size, "num_inference_steps": _int(1, 12)},
                                        usd_per_mp=Decimal("0.003")),
    "fal-ai/flux/dev": EndpointSpec({**_FLUX, "image_size": _size, "num_inference_steps": _int(1, 50)},
                                    usd_per_mp=Decimal("0.025")),
    "fal-ai/flux/dev/image-to-image": EndpointSpec(
        {**_FLUX, "image_url": _image_url, "strength": _num(0.01, 1.0), "num_inference_steps": _int(1, 50)},
        required=("prompt", "image_url"), usd_per_mp=Decimal("0.03")),
    "fal-ai/flux-lora": EndpointSpec(
        {**_FLUX, "image_size": _size, "num_inference_steps": _int(1, 50), "loras": _loras},
        usd_per_mp=Decimal("0.035")),
    "fal-ai/flux-lora/inpainting": EndpointSpec(
        {**_FLUX, "acceleration": _enum("none", "regular"), "image_size": _size, "num_inference_steps": _int(1, 50),
         "loras": _loras, "image_url": _image_url, "mask_url": _image_url, "strength": _num(0.01, 1.0)},
        required=("prompt", "image_url", "mask_url"), usd_per_mp=Decimal("0.035")),
    "fal-ai/flux-pro/v1.1": EndpointSpec(
        {"prompt": _str, "seed": _int(0, 2**32 - 1), "num_images": _int(1, 4), "sync_mode": _bool,
         "output_format": _enum("jpeg", "png"), "enable_safety_checker": _bool, "image_size": _size,
         "safety_tolerance": _enum("1", "2", "3", "4", "5", "6"), "enhance_prompt": _bool},
        usd_per_mp=Decimal("0.04")),
    "fal-ai/stable-diffusion-v35-large": EndpointSpec(
        {"prompt": _str, "negative_prompt": _str, "seed": _int(0, 2**32 - 1), "num_images": _int(1, 4),
         "num_inference_steps": _int(1, 50), "guidance_scale": _num(0.0, 20.0), "image_size": _size,
         "output_format": _enum("jpeg", "png"), "enable_safety_checker": _bool, "sync_mode": _bool},
        usd_per_image=Decimal("0.065")),
    "fal-ai/recraft/v3/text-to-image": EndpointSpec(
        {"prompt": _str, "image_size": _size, "style": _str, "colors": lambda n, v: v, "style_id": _str,
         "enable_safety_checker": _bool},
        usd_per_image=Decimal("0.04"), default_size=(1024, 1024), flux_output=False),
    "fal-ai/ideogram/v3": EndpointSpec(
        {"prompt": _str, "negative_prompt": _str, "seed": _int(0, 2**31 - 1), "num_images": _int(1, 8),
         "image_size": _size, "rendering_speed": _enum("TURBO", "BALANCED", "QUALITY"), "expand_prompt": _bool,
         "style": _enum("AUTO", "GENERAL", "REALISTIC", "DESIGN"), "sync_mode": _bool},
        usd_per_image=Decimal("0.06"), default_size=(1024, 1024), flux_output=False),
}
IDEOGRAM_SPEED_USD = {"TURBO": Decimal("0.03"), "BALANCED": Decimal("0.06"), "QUALITY": Decimal("0.09")}


def started_mp(width: int, height: int) -> int:
    return max(1, math.ceil(width * height / MEGAPIXEL))


@dataclass
class _Job:
    id: str
    endpoint: str
    app: str
    output: dict[str, Any]
    usd: Decimal
    polls: int = 0
    outcome: str = "ok"  # ok | moderation | request_error
    state: str = "IN_QUEUE"
    cancelled: bool = False
    billed: bool = False
    logs: list[dict[str, str]] = field(default_factory=list)


class FalSandbox(SandboxServer):
    """fal's queue API on loopback: ``with FalSandbox() as sb: ... sb.base_url``.

    ``queued_polls`` / ``running_polls``: status polls answered IN_QUEUE / IN_PROGRESS before COMPLETED;
    ``jobs`` the requests by id; ``billed_usd`` what completed requests were billed.
    """

    base_path = ""
    fault_kinds = VENDOR_FAULTS | HOSTILE_IMAGE_FAULTS | {"request_error", "nsfw"}

    def __init__(self, api_key: str = "fal-sandbox-key", *, queued_polls: int = 1, running_polls: int = 1) -> None:
        super().__init__()
        self.api_key = api_key
        self.queued_polls = queued_polls
        self.running_polls = running_polls
        self.jobs: dict[str, _Job] = {}
        self.files: dict[str, bytes] = {}
        self.billed_usd = Decimal(0)
        self._jobs_lock = threading.Lock()

    def submitted(self) -> int:
        with self._jobs_lock:
            return len(self.jobs)

    # --- hooks

    def authenticate(self, request: Request) -> Response | None:
        if request.path == MEDIA_PATH:
            return None  # CDN files carry no key
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme != "Key" or not hmac.compare_digest(key.encode(), self.api_key.encode()):
            return ApiError(401, "Authentication is required to access this resource").response()
        return None

    def decorate(self, request: Request, response: Response, elapsed_s: float) -> None:
        response.headers["x-fal-request-id"] = request.request_id

    def render_internal_error(self, request: Request, exc: BaseException) -> Response:
        return ApiError(500, "Internal Server Error").response()

    def render_fault(self, fault: Fault, request: Request) -> Response:
        if request.path == MEDIA_PATH:
            return self._media_fault(fault)
        if fault.kind == "rate_limit":
            headers = {} if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
            return ApiError(429, "Too many requests", headers).response()
        if fault.kind == "server_error":
            return ApiError(fault.status or 500, "Internal Server Error", {"x-fal-retryable": "true"}).response()
        if fault.kind == "malformed":
            return Response(200, fault.body if fault.body is not None else b'{"request_id": "a1b2', {
                "content-type": "application/json"})
        if fault.kind == "insufficient_credits":
            return ApiError(403, "User is locked. Reason: Exhausted balance. Top up your balance at "
                                 "fal.ai/dashboard/billing.").response()
        if fault.kind == "invalid_request":
            return _invalid(fault.param or "prompt", fault.message or "Invalid input",
                            fault.code or "value_error").response()
        if fault.kind == "auth":
            return ApiError(401, "Authentication is required to access this resource").response()
        if fault.kind in ("moderation", "request_error", "nsfw") or fault.kind in HOSTILE_IMAGE_FAULTS:
            return self.handle(request, fault=fault.kind)
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    def _media_fault(self, fault: Fault) -> Response:
        if fault.kind in ("server_error", "rate_limit"):
            return Response(503, b"Service Unavailable", {"content-type": "text/plain"})
        if fault.kind == "auth":
            return Response(403, b"Forbidden", {"content-type": "text/plain"})
        if fault.kind == "malformed":
            return Response(200, fault.body if fault.body is not None else b"<html>", {"content-type": "image/png"})
        if fault.kind in HOSTILE_IMAGE_FAULTS:
            return Response(200, hostile_image(fault.kind), {"content-type": "image/png"})
        raise ValueError(f"fault kind {fault.kind!r} does not apply to files")

    # --- routes

    def handle(self, request: Request, fault: str | None = None) -> Response:
        path = request.path.strip("/")
        if request.method == "GET" and request.path == MEDIA_PATH:
            return self._file(request)
        if "/requests/" in path:
            app, _, rest = path.partition("/requests/")
            rid, _, action = rest.partition("/")
            job = self._job(app, rid)
            if request.method == "GET" and action == "status":
                return self._status(job)
            if request.method == "GET" and action == "":
                return self._result(job)
            if request.method == "PUT" and action == "cancel":
                return self._cancel(job)
            raise ApiError(405, "Method Not Allowed")
        if request.method == "POST" and path in ENDPOINTS:
            return self._submit(request, path, fault)
        raise ApiError(404 if request.method in ("GET", "POST") else 405, "Not Found")

    def _submit(self, request: Request, endpoint: str, fault: str | None) -> Response:
        body = request.json
        if request.media_type != "application/json" or not isinstance(body, dict):
            raise ApiError(422, [{"loc": ["body"], "msg": "Input should be a valid dictionary",
                                  "type": "model_attributes_type"}])
        spec = ENDPOINTS[endpoint]
        for name in body:
            if name not in spec.fields:
                raise _invalid(name, "Extra inputs are not permitted", "extra_forbidden")
        for name in spec.required:
            if body.get(name) is None:
                raise _invalid(name, "Field required", "missing")
        values = {name: spec.fields[name](name, value) for name, value in body.items() if value is not None}
        output = self._make(endpoint, spec, values, fault)
        usd = self._price(endpoint, spec, values, output)
        owner, alias = endpoint.split("/")[:2]
        app = f"{owner}/{alias}"
        rid = secrets.token_hex(16)
        rid = f"{rid[:8]}-{rid[8:12]}-{rid[12:16]}-{rid[16:20]}-{rid[20:]}"
        job = _Job(rid, endpoint, app, output, usd,
                   outcome=fault if fault in ("moderation", "request_error") else "ok")
        job.logs = [{"message": f"Step {i}/4", "level": "INFO", "source": "user", "timestamp": _now()}
                    for i in range(1, 5)]
        with self._jobs_lock:
            self.jobs[rid] = job
        return Response.json(200, {"status": "IN_QUEUE", "request_id": rid, **self._urls(app, rid),
                                   "queue_position": self.queued_polls})

    def _urls(self, app: str, rid: str) -> dict[str, str]:
        base = f"{self.origin}/{app}/requests/{rid}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}

    def _make(self, endpoint: str, spec: EndpointSpec, values: dict[str, Any], fault: str | None) -> dict[str, Any]:
        """The endpoint's output, rendered now, served when the request completes."""
        prompt = values.get("prompt", "")
        seed = values.get("seed", secrets.randbelow(2**31))
        base: Image.Image | None = values.get("image_url")
        size = base.size if base is not None and "image_size" not in values else values.get(
            "image_size", spec.default_size)
        fmt = values.get("output_format", "jpeg") if "output_format" in spec.fields else "png"
        n = values.get("num_images", 1)
        images: list[dict[str, Any]] = []
        for i in range(n):
            art = synthetic_image(prompt, seed + i, size)
            if fault == "nsfw":
                art = Image.new("RGB", size, (0, 0, 0))
            elif base is not None and "mask_url" in values:  # white = inpaint: paint there, keep the rest
                white = values["mask_url"].convert("L").resize(base.size).point(lambda v: 255 if v >= 128 else 0)
                art = Image.composite(art, base.convert("RGB").resize(size), white.resize(size))
            elif base is not None:
                art = Image.blend(base.convert("RGB").resize(size), art, values.get("strength", 0.95))
            data = encode(art, fmt)
            if fault in HOSTILE_IMAGE_FAULTS and i == 0:
                data = hostile_image(fault)
            key = secrets.token_hex(12)
            with self._jobs_lock:
                self.files[key] = data
            url = f"{self.origin}{MEDIA_PATH}?id={key}"
            mime = "image/png" if fmt == "png" else "image/jpeg"
            if spec.flux_output:
                images.append({"url": url, "width": size[0], "height": size[1], "content_type": mime})
            else:  # File: {url, content_type, file_name, file_size}
                images.append({"url": url, "content_type": mime, "file_name": f"{key}.{fmt}",
                               "file_size": len(data)})
        if not spec.flux_output:
            return {"images": images, **({"seed": seed} if endpoint == "fal-ai/ideogram/v3" else {})}
        return {"images": images, "seed": seed, "has_nsfw_concepts": [fault == "nsfw"] * n, "prompt": prompt,
                "timings": {"inference": 0.42}}

    def _price(self, endpoint: str, spec: EndpointSpec, values: dict[str, Any], output: dict[str, Any]) -> Decimal:
        n = len(output["images"])
        if spec.usd_per_mp is not None:
            size = (output["images"][0].get("width"), output["images"][0].get("height"))
            return spec.usd_per_mp * started_mp(*size) * n
        rate = spec.usd_per_image or Decimal(0)
        if endpoint == "fal-ai/ideogram/v3":
            rate = IDEOGRAM_SPEED_USD[values.get("rendering_speed", "BALANCED")]
        if endpoint.startswith("fal-ai/recraft") and str(values.get("style", "")).startswith("vector_illustration"):
            rate *= 2  # "Vector images cost 2X as much" (RecraftV3TextToImageInput.style)
        return rate * n

    def _job(self, app: str, rid: str) -> _Job:
        with self._jobs_lock:
            job = self.jobs.get(rid)
        if job is None or job.app != app:
            raise ApiError(404, "Request not found")
        return job

    def _advance(self, job: _Job) -> None:
        """One status poll: IN_QUEUE, then IN_PROGRESS, then COMPLETED (billed once, when it succeeded)."""
        with self._jobs_lock:
            if job.state == "COMPLETED":
                return
            job.polls += 1
            if job.cancelled:
                job.state, job.outcome = "COMPLETED", "cancelled"
            elif job.polls <= self.queued_polls:
                job.state = "IN_QUEUE"
            elif job.polls <= self.queued_polls + self.running_polls:
                job.state = "IN_PROGRESS"
            else:
                job.state = "COMPLETED"
                if job.outcome == "ok" and not job.billed:
                    job.billed = True
                    self.billed_usd += job.usd

    def _status(self, job: _Job) -> Response:
        self._advance(job)
        answer: dict[str, Any] = {"status": job.state, "request_id": job.id, **self._urls(job.app, job.id)}
        if job.state == "IN_QUEUE":
            answer["queue_position"] = max(0, self.queued_polls - job.polls)
        else:
            done = job.state == "COMPLETED"
            shown = len(job.logs) if done else min(len(job.logs), 2 * (job.polls - self.queued_polls))
            answer["logs"] = job.logs[:shown]
        if job.state == "COMPLETED":
            answer["metrics"] = {"inference_time": 0.42} if job.outcome == "ok" else {}
            if job.outcome == "moderation":
                answer |= {"error": "The content was flagged by a content checker.",
                           "error_type": "content_policy_violation"}
            elif job.outcome in ("request_error", "cancelled"):
                answer |= {"error": "Request failed" if job.outcome == "request_error" else "Request cancelled",
                           "error_type": "runner_server_error" if job.outcome == "request_error" else
                           "request_cancelled"}
        return Response.json(200, answer)

    def _result(self, job: _Job) -> Response:
        if job.state != "COMPLETED":
            raise ApiError(400, "Request is still in progress")
        if job.outcome == "moderation":
            raise ApiError(422, [{"loc": ["body", "prompt"], "msg": "The content was flagged by a content checker.",
                                  "type": "content_policy_violation", "url": "https://docs.fal.ai/errors#content_policy_violation",
                                  "input": job.output.get("prompt", "")}], {"x-fal-retryable": "false"})
        if job.outcome == "request_error":
            raise ApiError(500, "Internal Server Error", {"x-fal-retryable": "true"})
        if job.outcome == "cancelled":
            raise ApiError(400, "Request was cancelled")
        return Response.json(200, job.output)

    def _cancel(self, job: _Job) -> Response:
        with self._jobs_lock:
            if job.state == "COMPLETED":
                return Response.json(400, {"status": "ALREADY_COMPLETED"})
            job.cancelled = True
        return Response.json(202, {"status": "CANCELLATION_REQUESTED"})

    def _file(self, request: Request) -> Response:
        with self._jobs_lock:
            data = self.files.get(request.query.get("id", ""))
        if data is None:
            return Response(404, b"Not Found", {"content-type": "text/plain"})
        mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
        return Response(200, data, {"content-type": mime})


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
