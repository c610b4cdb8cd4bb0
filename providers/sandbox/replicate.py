"""A loopback emulator of Replicate's prediction API for official FLUX models, strict like the real one.

Follows Replicate's OpenAPI document (tests/specs/replicate.openapi.json). Routes (header ``Authorization: Bearer``):

- ``POST /v1/models/{owner}/{name}/predictions`` ``{"input": {...}}`` (optional ``Prefer:
  wait=N``) → 201 prediction object. With ``Prefer: wait`` and ``wait_completes`` the
  prediction answers ``succeeded``; otherwise ``starting`` and it runs through
  ``processing`` for ``pending_polls`` polls.
- ``POST /v1/predictions`` ``{"version", "input"}``: ``version`` in the spec's three forms —
  ``owner/name`` (an official model), ``owner/name:version_id`` and ``version_id`` (the
  version-pinned models of :data:`VERSIONS`).
- ``GET /v1/predictions/{id}``, ``POST /v1/predictions/{id}/cancel``.
- ``POST /v1/files`` (multipart ``content``), ``GET /v1/files``, ``GET``/``DELETE /v1/files/{id}``:
  a file's ``urls.get`` is accepted as a file input of a prediction (served to it by id).
- ``GET /delivery/{id}/out-{i}.{ext}``: the output files, served for ``output_ttl_s`` seconds.

Errors are RFC 7807 problem details ``{type, title, status, detail}``
(``application/problem+json``); invalid input is 422. Model failures come back as
``status: failed`` with ``error`` text (HTTP 200 on polls).

Faults (``sb.faults``), besides the shared ones: ``moderation`` (the prediction fails
with an NSFW error, or ``Fault.moderation(message)``'s text, e.g. one carrying ``(E005)``),
``Fault("model_error")`` (it fails with a generic error), ``Fault("expired_output")`` (its
output URLs are already expired and its files removed), ``Fault("slow")`` (the prediction
stays ``processing`` forever), ``Fault("aborted")`` (it ends ``aborted``, never having
started), ``Fault("canceled")`` (it ran, then ended ``canceled``), and
``Fault("output_unavailable", status=503)`` aimed at an output file's path
(:meth:`ReplicateSandbox.output_path`; ``times=`` how many downloads fail), and
``Fault("corrupt_output")`` (that file answers 200 with bytes that are not an image). The hostile
images (``Fault.hostile_image("bomb_image")``, ``truncated_image``, ``wrong_format_image``,
``huge_image``) make the next prediction succeed, billed, with every output file holding
:func:`~providers.sandbox._server.hostile_image`'s bytes; aimed at an output file's path, that file.
``insufficient_credits`` is the 402.

Billing: :attr:`ReplicateSandbox.billed_usd` is what the sandbox billed — official models
per output made (:data:`OUTPUT_PRICES_USD`), version-pinned models ``predict_time`` × their
hardware's rate (:data:`HARDWARE_USD_PER_S`) whatever the outcome, once they ran — times
``bill_multiplier``. The multiplier stands for a vendor price change: it changes the bill,
never the facts reported (``metrics.predict_time``, the outputs), as on the real API, whose
predictions carry no price.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import re
import secrets
import threading
import time
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

RATIO_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
NSFW_ERROR = "NSFW content detected. Try running it again, or try a different prompt."
MODEL_ERROR = "Prediction failed for an unknown reason. It might have run out of memory?"
# Replicate's moderation refusal with its error code (see providers/replicate.py for the source).
SENSITIVE_ERROR = "The input or output was flagged as sensitive. Please try again with different inputs. (E005)"

# What the sandbox bills: the same public numbers as providers/prices/replicate.toml, each with its source there
# (per output image for official models; $/s of the hardware for version-pinned models, gpu-h100 from
# https://replicate.com/pricing, billed for the time they run: https://replicate.com/docs/topics/billing).
# The rows the toml marks unverified are mirrored as they are.
OUTPUT_PRICES_USD: dict[str, Decimal] = {
    "black-forest-labs/flux-schnell": Decimal("0.003"),
    "black-forest-labs/flux-dev": Decimal("0.025"),
    "black-forest-labs/flux-1.1-pro": Decimal("0.04"),
    "black-forest-labs/flux-dev-lora": Decimal("0.032"),
    "black-forest-labs/flux-fill-pro": Decimal("0.05"),
    "black-forest-labs/flux-canny-pro": Decimal("0.05"),
    "black-forest-labs/flux-depth-pro": Decimal("0.05"),
}
HARDWARE_USD_PER_S: dict[str, Decimal] = {"gpu-h100": Decimal("0.001525")}

MAX_FILE_BYTES = 100 * 1000 * 1000  # the spec's 413: "Files must be less than 100MB in size"
FILE_TTL_S = 3600.0  # the spec's example file expires an hour after it was created
_VERSION_ID = re.compile(r"^[0-9a-f]{64}$")
_MODEL_REF = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class ApiError(SandboxError):
    """An RFC 7807 problem-details answer."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.headers = status, title, detail, headers or {}

    def response(self) -> Response:
        body = {
            "type": "https://replicate.com/docs/errors",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        return Response(
            self.status, json.dumps(body).encode(), {"content-type": "application/problem+json", **self.headers}
        )


def _invalid(name: str, msg: str) -> ApiError:
    return ApiError(422, "Input validation failed", f"- input.{name}: {msg}")


_Check = Callable[[str, Any], Any]


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _invalid(name, "Invalid type. Expected: string")
    return value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _invalid(name, "Invalid type. Expected: boolean")
    return value


def _int(low: int, high: int) -> _Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(name, "Invalid type. Expected: integer")
        if not low <= value <= high:
            raise _invalid(name, f"Must be between {low} and {high}")
        return value

    return check


def _num(low: float, high: float) -> _Check:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _invalid(name, "Invalid type. Expected: number")
        if not low <= value <= high:
            raise _invalid(name, f"Must be between {low} and {high}")
        return float(value)

    return check


def _enum(*allowed: str) -> _Check:
    def check(name: str, value: Any) -> str:
        if value not in allowed:
            raise _invalid(name, f"{name} must be one of the following: " + ", ".join(f'"{a}"' for a in allowed))
        return str(value)

    return check


def _image(name: str, value: Any) -> Image.Image:
    """A file input: a data URL (the sandbox's own file URLs are resolved to their bytes before this)."""
    text = _str(name, value)
    head, sep, data = text.partition(";base64,")
    try:
        if not (sep and head.startswith("data:")):
            raise ValueError
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as img:
            img.load()
            return img.copy()
    except (binascii.Error, ValueError, OSError):
        raise _invalid(name, "Does not match format 'uri'") from None


_COMMON: dict[str, _Check] = {
    "prompt": _str,
    "aspect_ratio": _enum(*RATIO_SIZES),
    "seed": _int(0, 2**32 - 1),
    "output_format": _enum("webp", "jpg", "png"),
    "output_quality": _int(0, 100),
}
_FLUX: dict[str, _Check] = {
    **_COMMON,
    "num_outputs": _int(1, 4),
    "go_fast": _bool,
    "megapixels": _enum("1", "0.25"),
    "disable_safety_checker": _bool,
}
# Inpaint and control models: no aspect_ratio or num_outputs; the output takes the input image's shape.
_INPUT_SHAPED: dict[str, _Check] = {
    "prompt": _str,
    "seed": _int(0, 2**32 - 1),
    "steps": _int(15, 50),
    "guidance": _num(1.5, 100),
    "output_format": _enum("jpg", "png"),
    "safety_tolerance": _int(1, 6),
    "prompt_upsampling": _bool,
}
MODEL_FIELDS: dict[str, dict[str, _Check]] = {
    "black-forest-labs/flux-schnell": {**_FLUX, "num_inference_steps": _int(1, 4)},
    "black-forest-labs/flux-dev": {
        **_FLUX,
        "num_inference_steps": _int(1, 50),
        "guidance": _num(0, 10),
        "image": _image,
        "prompt_strength": _num(0, 1),
    },
    "black-forest-labs/flux-dev-lora": {
        **_FLUX,
        "num_inference_steps": _int(1, 50),
        "guidance": _num(0, 10),
        "image": _image,
        "prompt_strength": _num(0, 1),
        "lora_weights": _str,
        "lora_scale": _num(-1, 3),
    },
    "black-forest-labs/flux-fill-pro": {**_INPUT_SHAPED, "image": _image, "mask": _image},
    "black-forest-labs/flux-canny-pro": {**_INPUT_SHAPED, "control_image": _image},
    "black-forest-labs/flux-depth-pro": {**_INPUT_SHAPED, "control_image": _image},
    "black-forest-labs/flux-1.1-pro": {
        **_COMMON,
        "safety_tolerance": _int(1, 6),
        "prompt_upsampling": _bool,
        "width": _int(256, 1440),
        "height": _int(256, 1440),
    },
}
_FILE_INPUTS = frozenset({"image", "mask", "control_image"})

SDXL_VERSION = "39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b"


def _side(name: str, value: Any) -> int:
    side: int = _int(128, 1024)(name, value)
    if side % 8:
        raise _invalid(name, "Must be a multiple of 8")
    return side


# Version-pinned community models: version id → (model, input fields).
VERSIONS: dict[str, tuple[str, dict[str, _Check]]] = {
    SDXL_VERSION: (
        "stability-ai/sdxl",
        {
            "prompt": _str,
            "negative_prompt": _str,
            "width": _side,
            "height": _side,
            "num_outputs": _int(1, 4),
            "seed": _int(0, 2**32 - 1),
            "num_inference_steps": _int(1, 500),
            "guidance_scale": _num(1, 50),
        },
    ),
}
VERSION_HARDWARE: dict[str, str] = {SDXL_VERSION: "gpu-h100"}


@dataclass
class _Prediction:
    id: str
    model: str
    input: dict[str, Any]
    outputs: list[bytes]
    ext: str
    seed: int
    version: str = "hidden"
    status: str = "starting"
    error: str | None = None
    outcome: str = "succeeded"
    polls: int = 0
    expired: bool = False
    stuck: bool = False
    created: float = field(default_factory=time.time)
    started: float | None = None
    completed: float | None = None
    predict_time: float | None = None
    billed: Decimal = Decimal(0)
    """What the sandbox billed for it (``bill_multiplier`` applied)."""

    @property
    def pinned(self) -> bool:
        return self.version != "hidden"


@dataclass
class _File:
    id: str
    name: str
    content_type: str
    data: bytes
    metadata: dict[str, Any]
    created: float = field(default_factory=time.time)


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _not_found() -> ApiError:
    return ApiError(404, "Not found", "The requested resource could not be found.")


def _invalid_version() -> ApiError:
    return ApiError(
        422,
        "Invalid version or not permitted",
        "The specified version does not exist (or perhaps you don't have permission to use it?)",
    )


class ReplicateSandbox(SandboxServer):
    """Replicate's API on loopback: ``with ReplicateSandbox() as sb: ... sb.base_url``.

    ``wait_completes``: whether ``Prefer: wait`` answers the finished prediction;
    ``pending_polls``: polls answering ``processing`` before the end; ``output_ttl_s``:
    how long output URLs serve; ``predict_time``: the ``metrics.predict_time`` reported;
    ``bill_multiplier``: what the bill is multiplied by (a price change the API does not show).
    """

    base_path = ""
    fault_kinds = (
        VENDOR_FAULTS
        | HOSTILE_IMAGE_FAULTS
        | {"model_error", "expired_output", "slow", "aborted", "canceled", "output_unavailable", "corrupt_output"}
    )

    def __init__(
        self,
        api_token: str = "r8_sandbox",
        *,
        wait_completes: bool = True,
        pending_polls: int = 1,
        output_ttl_s: float = 3600.0,
        predict_time: float = 1.25,
        bill_multiplier: Decimal | int = 1,
    ) -> None:
        super().__init__()
        self.api_token = api_token
        self.wait_completes = wait_completes
        self.pending_polls = pending_polls
        self.output_ttl_s = output_ttl_s
        self.predict_time = predict_time
        self.bill_multiplier = Decimal(bill_multiplier)
        self.predictions: dict[str, _Prediction] = {}
        self.files: dict[str, _File] = {}
        self.next_ids: list[str] = []
        """Ids the next predictions take, in order (tests aim faults at their paths); random once empty."""
        self._plock = threading.Lock()

    # --- what the sandbox billed

    @property
    def billed_usd(self) -> Decimal:
        """Everything billed so far, over all predictions."""
        with self._plock:
            return sum((p.billed for p in self.predictions.values()), Decimal(0))

    def _bill(self, pred: _Prediction) -> None:
        """Bill a prediction that just ended (under ``_plock``)."""
        if pred.pinned:
            rate = HARDWARE_USD_PER_S[VERSION_HARDWARE[pred.version]]
            amount = rate * Decimal(str(pred.predict_time)) if pred.predict_time is not None else Decimal(0)
        else:
            made = len(pred.outputs) if pred.status == "succeeded" else 0
            amount = OUTPUT_PRICES_USD[pred.model] * made
        pred.billed = amount * self.bill_multiplier

    # --- hooks

    def authenticate(self, request: Request) -> Response | None:
        if request.path.startswith("/delivery/"):
            return None
        auth = request.headers.get("authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_token}".encode()):
            return ApiError(401, "Unauthenticated", "You did not pass a valid authentication token").response()
        return None

    def decorate(self, request: Request, response: Response, elapsed_s: float) -> None:
        response.headers.setdefault("content-type", "application/json")

    def render_internal_error(self, request: Request, exc: BaseException) -> Response:
        return ApiError(500, "Internal Server Error", "An unexpected error occurred").response()

    def render_fault(self, fault: Fault, request: Request) -> Response:
        if fault.kind in HOSTILE_IMAGE_FAULTS:
            if request.path.startswith("/delivery/"):  # aimed at one output file
                return Response(200, hostile_image(fault.kind), {"content-type": "image/png"})
            pred = self._pending_create(request)  # else: the prediction succeeds, billed, every output hostile
            pred.outputs = [hostile_image(fault.kind)] * len(pred.outputs)
            return self._answer_create(request, pred)
        if fault.kind in ("output_unavailable", "corrupt_output"):
            if not request.path.startswith("/delivery/"):
                raise ValueError(f"aim {fault.kind} at an output file: path=sandbox.output_path(...)")
            if fault.kind == "corrupt_output":  # 200, but the bytes are not an image
                return Response(200, fault.body or b"\x89PNG\r\n\x1a\n truncated", {"content-type": "image/png"})
            return Response(
                fault.status or 503, (fault.message or "Service Unavailable").encode(), {"content-type": "text/plain"}
            )
        if fault.kind == "rate_limit":
            headers = {} if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
            return ApiError(
                429, "Request was throttled.", "Request was throttled. Expected available in 1 second.", headers
            ).response()
        if fault.kind == "server_error":
            status = fault.status or 500
            return ApiError(status, "Internal Server Error", "An unexpected error occurred").response()
        if fault.kind == "malformed":
            body = fault.body if fault.body is not None else b'{"id": "q8w", "status": "succ'
            return Response(201, body, {"content-type": "application/json"})
        if fault.kind == "insufficient_credits":
            return ApiError(
                402,
                "Insufficient credit",
                "You have insufficient credit to run this model. "
                "Go to https://replicate.com/account/billing#billing to purchase credit.",
            ).response()
        if fault.kind == "invalid_request":
            return _invalid(fault.param or "prompt", fault.message or "Invalid input").response()
        if fault.kind == "auth":
            return ApiError(401, "Unauthenticated", "You did not pass a valid authentication token").response()
        if fault.kind in ("moderation", "model_error", "expired_output", "slow", "aborted", "canceled"):
            pred = self._pending_create(request)
            if fault.kind == "moderation":
                pred.outcome, pred.error = "failed", fault.message or NSFW_ERROR
            elif fault.kind == "model_error":
                pred.outcome, pred.error = "failed", fault.message or MODEL_ERROR
            elif fault.kind == "expired_output":
                pred.expired = True
            elif fault.kind == "slow":
                pred.stuck = True
            else:
                pred.outcome = fault.kind
            return self._answer_create(request, pred)
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    # --- routes

    def handle(self, request: Request) -> Response:
        parts = request.path.strip("/").split("/")
        if request.method == "POST" and (
            parts == ["v1", "predictions"]
            or (len(parts) == 5 and parts[:2] == ["v1", "models"] and parts[4] == "predictions")
        ):
            return self._answer_create(request, self._pending_create(request))
        if request.method == "GET" and len(parts) == 3 and parts[:2] == ["v1", "predictions"]:
            return Response.json(200, self._view(self._get(parts[2]), poll=True))
        if request.method == "POST" and len(parts) == 4 and parts[:2] == ["v1", "predictions"] and parts[3] == "cancel":
            return Response.json(200, self._view(self._cancel(self._get(parts[2]))))
        if parts[:2] == ["v1", "files"]:
            return self._files(request, parts[2:])
        if request.method == "GET" and parts[0] == "delivery" and len(parts) == 3:
            return self._file(parts[1], parts[2])
        raise _not_found()

    def _get(self, pid: str) -> _Prediction:
        with self._plock:
            pred = self.predictions.get(pid)
        if pred is None:
            raise _not_found()
        return pred

    def _cancel(self, pred: _Prediction) -> _Prediction:
        with self._plock:
            if pred.status in ("starting", "processing"):
                pred.status, pred.completed = "canceled", time.time()
                if pred.started is not None:  # it ran until now: that time is billed for pinned versions
                    pred.predict_time = round(pred.completed - pred.started, 3)
                self._bill(pred)
        return pred

    def _model(self, body: dict[str, Any], parts: list[str]) -> tuple[str, str, dict[str, _Check]]:
        """(model, version, input checks) of a create request. ``version`` in ``POST /v1/predictions``
        takes the spec's forms ``owner/name`` (official models only), ``owner/name:version_id`` and
        ``version_id`` (schemas_version_prediction_request.version)."""
        if parts != ["v1", "predictions"]:
            ref = f"{parts[2]}/{parts[3]}"
            if ref not in MODEL_FIELDS:
                raise _not_found()
            return ref, "hidden", MODEL_FIELDS[ref]
        version = body.get("version")
        if version is None:
            raise ApiError(422, "Invalid request body", "- version: version is required")
        if not isinstance(version, str):
            raise ApiError(422, "Invalid request body", "- version: Invalid type. Expected: string")
        owner_name, colon, version_id = version.partition(":")
        if not colon and _VERSION_ID.match(version):
            owner_name, version_id = "", version
        if not colon and not version_id:  # owner/name: official models run without a version
            if _MODEL_REF.match(owner_name) and owner_name in MODEL_FIELDS:
                return owner_name, "hidden", MODEL_FIELDS[owner_name]
            raise _invalid_version()
        known = VERSIONS.get(version_id)
        if known is None or (owner_name and owner_name != known[0]):
            raise _invalid_version()
        return known[0], version_id, known[1]

    def _resolve(self, name: str, value: Any) -> Any:
        """A file input given as one of the sandbox's file URLs (``urls.get``), as the data URL of its bytes."""
        prefix = f"{self.origin}/v1/files/"
        if name not in _FILE_INPUTS or not isinstance(value, str) or not value.startswith(prefix):
            return value
        with self._plock:
            stored = self.files.get(value[len(prefix) :])
        if stored is None:
            raise _invalid(name, "file not found")
        return f"data:{stored.content_type};base64,{base64.b64encode(stored.data).decode()}"

    def _pending_create(self, request: Request) -> _Prediction:
        parts = request.path.strip("/").split("/")
        if request.media_type != "application/json" or not isinstance(request.json, dict):
            raise ApiError(400, "Invalid request body", "The request body must be a JSON object.")
        body = request.json
        pinned = parts == ["v1", "predictions"]
        allowed = {"input", "webhook", "webhook_events_filter", "stream"} | ({"version"} if pinned else set())
        for name in body:
            if name not in allowed:
                raise ApiError(422, "Invalid request body", f"Additional property {name} is not allowed")
        ref, version, checks = self._model(body, parts)
        inp = body.get("input")
        if not isinstance(inp, dict):
            raise ApiError(422, "Input validation failed", "- input: Invalid type. Expected: object")
        for name in inp:
            if name not in checks:
                raise _invalid(name, "Additional property is not allowed")
        if not isinstance(inp.get("prompt"), str) or not inp["prompt"].strip():
            raise _invalid("prompt", "prompt is required")
        values = {name: checks[name](name, self._resolve(name, value)) for name, value in inp.items()}
        seed = values.get("seed", secrets.randbelow(2**32))
        source = values.get("control_image") or (values.get("image") if "mask" in values else None)
        if source is not None:
            size = source.size
        elif version != "hidden":
            size = (values.get("width", 1024), values.get("height", 1024))
        else:
            size = RATIO_SIZES[values.get("aspect_ratio", "1:1")]
        if "mask" in values and values["mask"].size != values["image"].size:
            raise _invalid("mask", "mask must be the same size as image")
        fmt = values.get("output_format", "png" if version != "hidden" else "webp")
        ext = fmt
        pil_fmt = {"jpg": "jpeg", "png": "png", "webp": "webp"}[ext]
        outputs = []
        for i in range(values.get("num_outputs", 1)):
            art = synthetic_image(values["prompt"], seed + i, size)
            if "mask" in values:  # white = repaint, black = keep
                keep = values["mask"].convert("L").point(lambda v: 255 if v < 128 else 0)
                art = Image.composite(values["image"].convert("RGB"), art, keep)
            elif "image" in values:
                art = Image.blend(
                    values["image"].convert("RGB").resize(size), art, float(values.get("prompt_strength", 0.8))
                )
            outputs.append(encode(art, pil_fmt))
        pid = self.next_ids.pop(0) if self.next_ids else secrets.token_hex(10)
        pred = _Prediction(pid, ref, inp, outputs, ext, seed, version=version)
        with self._plock:
            self.predictions[pred.id] = pred
        return pred

    def _answer_create(self, request: Request, pred: _Prediction) -> Response:
        if request.headers.get("prefer", "").startswith("wait") and self.wait_completes and not pred.stuck:
            self._finish(pred)
        headers = {"location": f"{self.origin}/v1/predictions/{pred.id}"}
        view = self._view(pred)
        return Response.json(201 if view["status"] != "starting" else 202, view, headers)

    def _finish(self, pred: _Prediction) -> None:
        with self._plock:
            if pred.status not in ("starting", "processing"):
                return
            pred.status, pred.completed = pred.outcome, time.time()
            if pred.outcome != "aborted":  # aborted: ended before it started running, nothing ran
                pred.started = pred.started if pred.started is not None else pred.created
                pred.predict_time = self.predict_time
            self._bill(pred)

    def _expired(self, pred: _Prediction) -> bool:
        return pred.expired or time.time() > (pred.completed or pred.created) + self.output_ttl_s

    def _view(self, pred: _Prediction, *, poll: bool = False) -> dict[str, Any]:
        if poll and pred.status in ("starting", "processing"):
            with self._plock:
                pred.polls += 1
                if pred.outcome != "aborted":  # an aborted prediction never starts running
                    pred.status = "processing"
                    pred.started = pred.started if pred.started is not None else time.time()
            if pred.polls > self.pending_polls and not pred.stuck:
                self._finish(pred)
        done = pred.status == "succeeded"
        removed = done and poll and self._expired(pred)  # the files are gone: a read says so
        urls = [f"{self.origin}{self.output_path(pred.id, i, pred.ext)}" for i in range(len(pred.outputs))]
        view: dict[str, Any] = {
            "id": pred.id,
            "model": pred.model,
            "version": pred.version,
            "input": pred.input,
            "logs": f"Using seed: {pred.seed}\n" if pred.started is not None else "",
            "output": urls if done and not removed else None,
            "data_removed": removed,
            "error": pred.error if pred.status == "failed" else None,
            "status": pred.status,
            "source": "api",
            "created_at": _iso(pred.created),
            "urls": {
                "get": f"{self.origin}/v1/predictions/{pred.id}",
                "cancel": f"{self.origin}/v1/predictions/{pred.id}/cancel",
                "web": f"{self.origin}/p/{pred.id}",
            },
            "metrics": {},
        }
        if pred.started is not None:
            view["started_at"] = _iso(pred.started)
        if pred.completed is not None:
            view["completed_at"] = _iso(pred.completed)
            if pred.predict_time is not None:
                view["metrics"] = {"predict_time": pred.predict_time, "total_time": round(pred.predict_time + 0.1, 3)}
                if done:
                    view["metrics"]["image_count"] = len(pred.outputs)
        return view

    @staticmethod
    def output_path(pid: str, index: int = 0, ext: str = "webp") -> str:
        """The path of a prediction's output file (aim ``output_unavailable`` faults at it)."""
        return f"/delivery/{pid}/out-{index}.{ext}"

    def _file(self, pid: str, name: str) -> Response:
        with self._plock:
            pred = self.predictions.get(pid)
        stem, _, ext = name.partition(".")
        if (
            pred is None
            or pred.status != "succeeded"
            or not stem.startswith("out-")
            or not stem[4:].isdigit()
            or int(stem[4:]) >= len(pred.outputs)
        ):
            return Response(404, b"Not Found", {"content-type": "text/plain"})
        if self._expired(pred):
            return Response(404, b"Not Found: the output has expired", {"content-type": "text/plain"})
        mime = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}[ext]
        return Response(200, pred.outputs[int(stem[4:])], {"content-type": mime})

    # --- the Files API (spec: /files, /files/{file_id}; schemas_file_response)

    def _files(self, request: Request, rest: list[str]) -> Response:
        if not rest and request.method == "POST":
            return self._create_file(request)
        if not rest and request.method == "GET":
            with self._plock:
                files = sorted(self.files.values(), key=lambda f: f.created, reverse=True)
            return Response.json(200, {"next": None, "previous": None, "results": [self._file_view(f) for f in files]})
        if len(rest) == 1:
            with self._plock:
                stored = self.files.get(rest[0])
                if stored is not None and request.method == "DELETE":
                    del self.files[rest[0]]
            if stored is None:
                raise ApiError(404, "Not found", "File not found")
            if request.method == "DELETE":
                return Response(204, b"", {"content-type": "text/plain"})
            if request.method == "GET":
                return Response.json(200, self._file_view(stored))
        raise _not_found()

    def _create_file(self, request: Request) -> Response:
        if request.media_type != "multipart/form-data" or request.body_error:
            raise ApiError(400, "Invalid request body", "The request body must be multipart/form-data.")
        content = request.uploads_named("content")
        if len(content) != 1:
            raise ApiError(422, "Invalid request body", "- content: content is required")
        upload = content[0]
        if len(upload.data) >= MAX_FILE_BYTES:
            raise ApiError(413, "Content Too Large", "Files must be less than 100MB in size")
        form = request.form
        name = form.get("filename") or upload.filename or "file"
        if len(name.encode()) > 255:
            raise ApiError(422, "Invalid request body", "- filename: must be at most 255 bytes")
        try:
            metadata = json.loads(form["metadata"]) if "metadata" in form else {}
        except ValueError:
            raise ApiError(422, "Invalid request body", "- metadata: must be valid JSON") from None
        if not isinstance(metadata, dict):
            raise ApiError(422, "Invalid request body", "- metadata: Invalid type. Expected: object")
        ctype = form.get("type") or upload.content_type or "application/octet-stream"
        stored = _File(secrets.token_hex(13), name, ctype, upload.data, metadata)
        with self._plock:
            self.files[stored.id] = stored
        return Response.json(201, self._file_view(stored))

    def _file_view(self, stored: _File) -> dict[str, Any]:
        digest = hashlib.sha256(stored.data).hexdigest()
        return {
            "id": stored.id,
            "name": stored.name,
            "content_type": stored.content_type,
            "size": len(stored.data),
            "etag": digest[:32],
            "checksums": {"sha256": digest},
            "metadata": stored.metadata,
            "created_at": _iso(stored.created),
            "expires_at": _iso(stored.created + FILE_TTL_S),
            "urls": {"get": f"{self.origin}/v1/files/{stored.id}"},
        }

    # --- helpers for tests

    def prediction(self, pid: str) -> _Prediction:
        return self._get(pid)
