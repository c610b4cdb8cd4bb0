"""A loopback emulator of Black Forest Labs' FLUX API (asynchronous tasks), strict like the real one.

It follows BFL's published reference: the request and response schemas of
https://api.bfl.ai/openapi.json as the docs.bfl.ai API pages publish them (the slices
this project relies on are vendored in ``tests/specs/bfl.openapi.json``), BFL's SDK
(github.com/black-forest-labs/blackforest) for FLUX.2, and BFL's pricing and help
pages for sizes and bills. Each rule below names its source. Routes:

- ``POST /v1/{model}`` (JSON, header ``x-key``) → ``{"id", "polling_url", "cost",
  "input_mp", "output_mp"}`` (``AsyncResponse``: cost in credits); the task answers
  ``Pending`` for ``pending_polls`` polls, then ``Ready``.
- ``GET /v1/get_result?id=…`` (header ``x-key``) → ``{"id", "status", "result",
  "progress", "details", "preview"}`` (``ResultResponse``); ``status`` is one of Pending,
  Ready, Error, Request Moderated, Content Moderated, Task not found; ``result`` is
  ``{"sample", "seed", "prompt", "start_time", "end_time", "duration"}`` once Ready.
- ``GET /delivery/sample?id=…&se=…&sig=…`` (:data:`SAMPLE_PATH`): the signed output URL
  (no key), valid ``sample_ttl_s`` seconds (600), then 403 in the blob store's XML shape.
  Every sample is served from this one path, so a fault pushed with
  ``path=SAMPLE_PATH`` hits the downloads only (see :meth:`BFLSandbox.fail_downloads`).

Errors are FastAPI-shaped: ``{"detail": "…"}``, and 422 ``{"detail": [{loc, msg, type}]}``
(``HTTPValidationError``) for bodies that break the schema (unknown fields included:
stricter than the real API, so a wrong adapter fails). Every answer carries ``x-request-id``.

Billing: a task is billed when it is Ready, never when it ends Error or moderated
(https://help.bfl.ai/articles/4212278032-my-prompt-is-getting-moderated: "Only
successful generations (status: Ready) consume credits"). ``billed_usd`` sums what was
billed (credits × $0.01); ``bill_multiplier`` makes the sandbox bill (and report in
``cost``) a multiple of the public rates, for over-billing tests.

Faults (``sb.faults``), besides the shared ones: ``moderation`` (the task ends
``Content Moderated``, or the status in ``Fault.message`` such as ``Request
Moderated``), ``Fault("task_error")`` (the task ends ``Error``),
``Fault("task_not_found")`` (polls answer ``Task not found``), ``Fault("expired_output")``
(every sample URL of the task is already expired). ``insufficient_credits`` is the 402.
On :data:`SAMPLE_PATH`: ``server_error`` / ``rate_limit`` answer the blob store's 5xx,
``auth`` its 403, ``malformed`` a 200 whose body is not an image. The hostile images
(``Fault.hostile_image("bomb_image")``, ``truncated_image``, ``wrong_format_image``, ``huge_image``)
make the next task Ready and billed as usual with :func:`~providers.sandbox._server.hostile_image`'s
bytes as its sample; on :data:`SAMPLE_PATH`, that download only.
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

SAMPLE_PATH = "/delivery/sample"
MEGAPIXEL = 1024 * 1024
# FLUX.2: "Maximum 4 megapixels (e.g., 2048 × 2048) … Images over 4MP are automatically resized."
# (https://help.bfl.ai/articles/1691577414-can-i-generate-different-aspect-ratios-compared-to-what-the-input-image-is)
FLUX2_MAX_PIXELS = 4 * MEGAPIXEL
# aspect_ratio: "Aspect ratio of the image between 21:9 and 9:21" (FluxUltraInput / FluxKontextProInputs,
# https://api.bfl.ai/openapi.json via https://docs.bfl.ai/api-reference)
MIN_RATIO, MAX_RATIO = 9 / 21, 21 / 9
# Kontext: "fixed ~1MP resolution … dimensions to the nearest multiples of 32 pixels" (help.bfl.ai article above);
# Ultra: "Generate up to 4MP images" (https://docs.bfl.ai/flux_models/flux_1_1_pro_ultra_raw); its exact rounding is
# unpublished: multiples of 32, like BFL's own 1536x2688 examples on that page.
RATIO_AREA = {"flux-kontext-pro": MEGAPIXEL, "flux-pro-1.1-ultra": 4 * MEGAPIXEL}
RATIO_MULTIPLE = 32
MODERATION_STATUSES = ("Request Moderated", "Content Moderated")
USD_PER_CREDIT = Decimal("0.01")  # "1 credit = $0.01 USD" (https://docs.bfl.ai/quick_start/pricing)
# Credits per image (https://docs.bfl.ai/quick_start/pricing; github.com/black-forest-labs/skills
# skills/bfl-api/SKILL.md "Model Endpoints & Pricing").
FLAT_CREDITS = {
    "flux-pro-1.1": Decimal(4),
    "flux-pro-1.1-ultra": Decimal(6),
    "flux-kontext-pro": Decimal(4),
    "flux-pro-1.0-fill": Decimal(5),
}
# FLUX.2 [pro]: 1st MP 3 credits, each further MP 1.5, inputs 1.5 per MP; "(firstMP + (outputMP-1) * mpPrice) +
# (inputMP * mpPrice)" (github.com/black-forest-labs/skills skills/bfl-api/SKILL.md). Counted per started
# megapixel of 1024x1024 pixels, each input image on its own (third-party notes, unconfirmed by BFL; see
# tests/specs/bfl_rules.md).
FLUX2_FIRST_MP, FLUX2_EXTRA_MP, FLUX2_INPUT_MP = Decimal(3), Decimal("1.5"), Decimal("1.5")


def ratio_size(ratio: float, area: int, multiple: int = RATIO_MULTIPLE) -> tuple[int, int]:
    """The output shape of an ``aspect_ratio`` model: about ``area`` pixels, sides multiples of ``multiple``."""
    m = multiple
    return max(m, round(math.sqrt(area * ratio) / m) * m), max(m, round(math.sqrt(area / ratio) / m) * m)


def flux2_fit(width: int, height: int) -> tuple[int, int]:
    """FLUX.2's output shape for a requested one: over 4 MP is resized down (ratio kept, multiples of 16)."""
    if width * height <= FLUX2_MAX_PIXELS:
        return width, height
    scale = math.sqrt(FLUX2_MAX_PIXELS / (width * height))
    return max(16, math.floor(width * scale / 16) * 16), max(16, math.floor(height * scale / 16) * 16)


def megapixels(width: int, height: int) -> float:
    """Megapixels as BFL reports them in ``input_mp`` / ``output_mp``: 2 decimal places (AsyncResponse)."""
    return round(width * height / MEGAPIXEL, 2)


def started_mp(width: int, height: int) -> int:
    """Megapixels of 1024x1024, counted per started one (at least 1)."""
    return max(1, math.ceil(width * height / MEGAPIXEL))


def credits_for(model: str, output: tuple[int, int], inputs: list[tuple[int, int]]) -> Decimal:
    """What BFL bills for one Ready task, in credits, at the public rates."""
    if model != "flux-2-pro":
        return FLAT_CREDITS[model]
    out = FLUX2_FIRST_MP + (started_mp(*output) - 1) * FLUX2_EXTRA_MP
    return out + sum((started_mp(*s) * FLUX2_INPUT_MP for s in inputs), Decimal(0))


class ApiError(SandboxError):
    """A FastAPI-shaped error answer."""

    def __init__(self, status: int, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(str(detail))
        self.status, self.detail, self.headers = status, detail, headers or {}

    def response(self) -> Response:
        return Response.json(self.status, {"detail": self.detail}, self.headers)


def _invalid(loc: str, msg: str, kind: str) -> ApiError:
    return ApiError(422, [{"loc": ["body", loc], "msg": msg, "type": kind}])


# --- field checks (pydantic v2's error types and messages, as FastAPI answers them) ---------

_Check = Callable[[str, Any], Any]


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _invalid(name, "Input should be a valid string", "string_type")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _invalid(name, "Input should be a valid boolean", "bool_type")
    return value


def _int(low: int | None = None, high: int | None = None, multiple: int | None = None) -> _Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(name, "Input should be a valid integer", "int_type")
        if low is not None and value < low:
            raise _invalid(name, f"Input should be greater than or equal to {low}", "greater_than_equal")
        if high is not None and value > high:
            raise _invalid(name, f"Input should be less than or equal to {high}", "less_than_equal")
        if multiple is not None and value % multiple:
            raise _invalid(name, f"Input should be a multiple of {multiple}", "multiple_of")
        return value

    return check


def _num(low: float, high: float) -> _Check:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid(name, "Input should be a valid number", "float_type")
        if value < low:
            raise _invalid(name, f"Input should be greater than or equal to {low}", "greater_than_equal")
        if value > high:
            raise _invalid(name, f"Input should be less than or equal to {high}", "less_than_equal")
        return float(value)

    return check


def _enum(*allowed: str) -> _Check:
    def check(name: str, value: Any) -> str:
        if value not in allowed:
            listed = " or ".join(f"'{a}'" for a in allowed)
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
    "safety_tolerance": _int(0, 6),  # "Between 0 and 6" (openapi.json, every FLUX.1 input schema)
    "output_format": _enum("jpeg", "png"),  # OutputFormat enum
    "prompt_upsampling": _bool,
    "webhook_url": _str,
    "webhook_secret": _str,
}
# FluxPro11Inputs.width/height: integer, multipleOf 32, minimum 256, maximum 1440
# (https://docs.bfl.ai/api-reference/tasks/generate-an-image-with-flux-11-[pro], from https://api.bfl.ai/openapi.json)
_PRO11_SIDE = _int(256, 1440, 32)
# FLUX.2 [pro] width/height: ge=64, multiple_of=16; safety_tolerance 0..5 (BFL's SDK, github.com/black-forest-labs/
# blackforest src/blackforest/types/inputs/flux_pro_2.py); the 4 MP cap resizes instead of refusing (help.bfl.ai above).
_FLUX2_SIDE = _int(64, None, 16)
_FLUX2_INPUTS = ("input_image", *(f"input_image_{i}" for i in range(2, 9)))  # up to 8 references (same SDK file)
_KONTEXT_INPUTS = ("input_image", *(f"input_image_{i}" for i in range(2, 5)))  # FluxKontextProInputs
MODEL_FIELDS: dict[str, dict[str, _Check]] = {
    "flux-pro-1.1": {**_COMMON, "width": _PRO11_SIDE, "height": _PRO11_SIDE, "image_prompt": _image},
    "flux-2-pro": {
        **_COMMON,
        "safety_tolerance": _int(0, 5),
        "width": _FLUX2_SIDE,
        "height": _FLUX2_SIDE,
        **{k: _image for k in _FLUX2_INPUTS},
    },
    "flux-pro-1.1-ultra": {
        **_COMMON,
        "aspect_ratio": _ratio,
        "raw": _bool,
        "image_prompt": _image,
        "image_prompt_strength": _num(0.0, 1.0),
    },
    "flux-kontext-pro": {**_COMMON, "aspect_ratio": _ratio, **{k: _image for k in _KONTEXT_INPUTS}},
    # FluxProFillInputs: steps 15..50, guidance 1.5..100, image required
    "flux-pro-1.0-fill": {
        **_COMMON,
        "image": _image,
        "mask": _image,
        "steps": _int(15, 50),
        "guidance": _num(1.5, 100.0),
    },
}
# Required fields: FluxKontextProInputs and FluxProFillInputs list them; FLUX.2: "The prompt is required"
# (https://docs.bfl.ai/flux_2/flux2_text_to_image). FluxPro11Inputs and FluxUltraInput default prompt to ''.
_REQUIRED = {"flux-kontext-pro": ("prompt",), "flux-pro-1.0-fill": ("image",), "flux-2-pro": ("prompt",)}


@dataclass
class _Task:
    id: str
    model: str
    prompt: str
    seed: int
    output_format: str
    image: bytes
    credits: Decimal
    outcome: str = "Ready"
    polls: int = 0
    expired: bool = False
    billed: bool = False
    created: float = field(default_factory=time.time)


# --- pictures -----------------------------------------------------------------------------


def _output_size(model: str, values: dict[str, Any]) -> tuple[int, int]:
    """The shape the model makes for these (validated) inputs."""
    if model == "flux-pro-1.0-fill":
        base: Image.Image = values["image"]
        return base.size
    if model in RATIO_AREA:
        source = values.get("input_image")
        ratio = values.get("aspect_ratio") or (source.width / source.height if source is not None else 1.0)
        return ratio_size(min(max(ratio, MIN_RATIO), MAX_RATIO), RATIO_AREA[model])
    if model == "flux-2-pro":
        source = values.get("input_image")
        default = source.size if source is not None else (1024, 1024)  # FLUX.2 default 1024 x 1024 (help.bfl.ai)
        return flux2_fit(values.get("width", default[0]), values.get("height", default[1]))
    return values.get("width", 1024), values.get("height", 768)  # FluxPro11Inputs defaults


def _render(model: str, values: dict[str, Any], seed: int, fmt: str, size: tuple[int, int]) -> bytes:
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
    art = synthetic_image(prompt, seed, size)
    source = values.get("input_image")
    if source is not None:
        art = Image.blend(source.convert("RGB").resize(size, Image.Resampling.LANCZOS), art, 0.5)
    return encode(art, fmt)


# --- the emulator ---------------------------------------------------------------------------


class BFLSandbox(SandboxServer):
    """BFL's FLUX API on loopback: ``with BFLSandbox() as sb: ... sb.base_url``.

    ``pending_polls`` sets how many polls answer Pending before Ready; ``sample_ttl_s``
    how long sample URLs live; ``tasks`` holds the tasks created, by id; ``billed_usd``
    what the Ready tasks were billed; ``bill_multiplier`` scales every bill.
    """

    base_path = ""
    fault_kinds = VENDOR_FAULTS | HOSTILE_IMAGE_FAULTS | {"task_error", "task_not_found", "expired_output"}

    def __init__(
        self,
        api_key: str = "bfl-sandbox-key",
        *,
        pending_polls: int = 1,
        sample_ttl_s: float = 600.0,
        bill_multiplier: int | Decimal = 1,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.pending_polls = pending_polls
        self.sample_ttl_s = sample_ttl_s
        self.bill_multiplier = Decimal(bill_multiplier)
        self.tasks: dict[str, _Task] = {}
        self.billed_usd = Decimal(0)
        self._tasks_lock = threading.Lock()
        self._signing_key = secrets.token_bytes(16)

    def fail_downloads(self, times: int | None, status: int = 503) -> None:
        """Make the next ``times`` sample downloads (``None``: all of them) answer the blob store's ``status``."""
        self.faults.push(Fault.server_error(status), times=times, path=SAMPLE_PATH)

    def submitted(self) -> int:
        """How many tasks were accepted."""
        with self._tasks_lock:
            return len(self.tasks)

    # --- hooks

    def authenticate(self, request: Request) -> Response | None:
        if request.path == SAMPLE_PATH:
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
        if request.path == SAMPLE_PATH:
            return self._sample_fault(fault, request)
        if fault.kind == "rate_limit":
            headers = {} if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
            return ApiError(
                429,
                "You have exceeded the number of active tasks (24). Please wait for some tasks "
                "to finish before submitting new ones.",
                headers,
            ).response()
        if fault.kind == "server_error":
            status = fault.status or 500
            return ApiError(status, "Service Unavailable" if status == 503 else "Internal Server Error").response()
        if fault.kind == "malformed":
            body = fault.body if fault.body is not None else b'{"id": "3f1c", "polling_url": "http'
            return Response(200, body, {"content-type": "application/json"})
        if fault.kind == "insufficient_credits":
            return ApiError(402, "Insufficient credits. Please add credits to your account.").response()
        if fault.kind == "invalid_request":
            if fault.status == 400:
                return ApiError(400, f"{fault.param or 'body'}: {fault.message or 'Invalid request'}").response()
            loc = fault.param or "body"
            return _invalid(loc, fault.message or "Invalid request", fault.code or "value_error").response()
        if fault.kind == "auth":
            return ApiError(fault.status or 401, "Not authenticated - Invalid Authentication").response()
        moderated = fault.message if fault.message in MODERATION_STATUSES else "Content Moderated"
        outcomes = {"moderation": moderated, "task_error": "Error", "task_not_found": "Task not found"}
        if fault.kind in outcomes or fault.kind == "expired_output" or fault.kind in HOSTILE_IMAGE_FAULTS:
            response = self.handle(request)
            task = self._task_of(response)
            if task is not None:
                if fault.kind == "expired_output":
                    task.expired = True
                elif fault.kind in HOSTILE_IMAGE_FAULTS:  # Ready and billed as usual; its sample is hostile
                    task.image = hostile_image(fault.kind)
                else:
                    task.outcome = outcomes[fault.kind]
            return response
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    def _sample_fault(self, fault: Fault, request: Request) -> Response:
        """A fault on a sample download, in the blob store's shape."""
        if fault.kind in ("server_error", "rate_limit"):
            status = fault.status if fault.kind == "server_error" and fault.status else 503
            code = "ServerBusy" if status == 503 else "InternalError"
            return _blob_error(
                status,
                code,
                "The server is busy."
                if status == 503
                else "Server encountered an internal error. Please try again after some time.",
            )
        if fault.kind == "auth":
            return _blob_error(403, "AuthenticationFailed", "Signature did not match.")
        if fault.kind == "malformed":
            return Response(
                200,
                fault.body if fault.body is not None else b"\x89PNG\r\n\x1a\n truncated",
                {"content-type": "image/png"},
            )
        if fault.kind in HOSTILE_IMAGE_FAULTS:
            return Response(200, hostile_image(fault.kind), {"content-type": "image/png"})
        raise ValueError(f"fault kind {fault.kind!r} does not apply to sample downloads")

    # --- routes

    def handle(self, request: Request) -> Response:
        if request.method == "POST" and request.path.startswith("/v1/"):
            model = request.path.removeprefix("/v1/")
            if model not in MODEL_FIELDS:
                raise ApiError(404, "Not Found")
            return self._submit(request, model)
        if request.method == "GET" and request.path == "/v1/get_result":
            return self._poll(request)
        if request.method == "GET" and request.path == SAMPLE_PATH:
            return self._sample(request)
        raise ApiError(404 if request.method in ("GET", "POST") else 405, "Not Found")

    def _submit(self, request: Request, model: str) -> Response:
        if request.media_type != "application/json" or request.body_error is not None:
            raise ApiError(
                422, [{"loc": ["body"], "msg": "Input should be a valid JSON object", "type": "model_attributes_type"}]
            )
        body = request.json
        if not isinstance(body, dict):
            raise ApiError(
                422, [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "model_attributes_type"}]
            )
        checks = MODEL_FIELDS[model]
        for name in body:
            if name not in checks:
                raise _invalid(name, "Extra inputs are not permitted", "extra_forbidden")
        for name in _REQUIRED.get(model, ()):
            if body.get(name) is None:
                raise _invalid(name, "Field required", "missing")
        values = {name: checks[name](name, value) for name, value in body.items() if value is not None}
        if model in ("flux-kontext-pro", "flux-2-pro") and not values["prompt"].strip():
            raise _invalid("prompt", "String should have at least 1 character", "string_too_short")
        seed = values.get("seed", secrets.randbelow(2**32))
        fmt = values.get("output_format", "png" if model == "flux-kontext-pro" else "jpeg")  # schema defaults
        size = _output_size(model, values)
        image = _render(model, values, seed, fmt, size)
        inputs = [values[k].size for k in _FLUX2_INPUTS if k in values] if model == "flux-2-pro" else []
        credits = credits_for(model, size, inputs) * self.bill_multiplier
        task = _Task(secrets.token_hex(16), model, values.get("prompt", ""), seed, fmt, image, credits)
        task.id = f"{task.id[:8]}-{task.id[8:12]}-{task.id[12:16]}-{task.id[16:20]}-{task.id[20:]}"
        with self._tasks_lock:
            self.tasks[task.id] = task
        return Response.json(
            200,
            {
                "id": task.id,
                "polling_url": f"{self.origin}/v1/get_result?id={task.id}",
                "cost": float(credits),
                "input_mp": round(sum(megapixels(*s) for s in inputs), 2),
                "output_mp": megapixels(*size),
            },
        )

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
        answer: dict[str, Any] = {
            "id": task.id,
            "status": "Pending",
            "result": None,
            "progress": None,
            "details": None,
            "preview": None,
        }
        if task.polls <= self.pending_polls:
            answer["progress"] = round(task.polls / (self.pending_polls + 1), 2)
            return Response.json(200, answer)
        answer["status"] = task.outcome
        if task.outcome in MODERATION_STATUSES:
            answer["details"] = {"Moderation Reasons": ["Sexual"]}
        elif task.outcome == "Error":
            answer["details"] = {"error": "Generation failed"}
        else:
            self._bill(task)
            expires = int(task.created - 1 if task.expired else time.time() + self.sample_ttl_s)
            answer["result"] = {
                "sample": self._signed(task, expires),
                "prompt": task.prompt,
                "seed": task.seed,
                "start_time": task.created,
                "end_time": time.time(),
                "duration": round(time.time() - task.created, 3),
            }
        return Response.json(200, answer)

    def _bill(self, task: _Task) -> None:
        """Bill a task once, when it is first seen Ready."""
        with self._tasks_lock:
            if not task.billed:
                task.billed = True
                self.billed_usd += task.credits * USD_PER_CREDIT

    def _signed(self, task: _Task, expires: int) -> str:
        sig = hmac.new(self._signing_key, f"{task.id}:{expires}".encode(), "sha256").hexdigest()
        return f"{self.origin}{SAMPLE_PATH}?id={task.id}&se={expires}&sig={sig}"

    def _sample(self, request: Request) -> Response:
        task_id = request.query.get("id", "")
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
    body = (
        f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    ).encode()
    return Response(status, body, {"content-type": "application/xml"})
