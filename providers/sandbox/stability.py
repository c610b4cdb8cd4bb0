"""A loopback emulator of Stability AI's REST v2beta image API, strict like the real one.

Follows PROVIDERS.md (no OpenAPI spec is shipped for Stability). Routes, every POST
``multipart/form-data`` with ``authorization: Bearer <key>``:

- ``/v2beta/stable-image/generate/{ultra,core,sd3}`` (sd3: ``model``, ``cfg_scale``,
  ``mode=image-to-image`` + ``image`` + ``strength``);
- ``/v2beta/stable-image/edit/inpaint`` (``mask`` grayscale, white = repaint; without
  one, the image's alpha: transparent = repaint);
- ``/v2beta/stable-image/control/{sketch,structure}`` (``control_strength`` 0..1);
- ``/v2beta/stable-image/upscale/{fast,conservative}`` (sync) and ``upscale/creative``
  (async: ``{id}``; ``GET /v2beta/results/{id}`` answers 202 ``{id, status:
  "in-progress"}`` for the first ``job_polls`` polls, then the image; unknown ids 404).

``accept: image/*`` (the default) answers the raw image with ``finish-reason`` and
``seed`` headers; ``accept: application/json`` answers ``{image, finish_reason, seed}``.
Unknown fields, unknown files, bad values → 400 ``{id, name, errors: [...]}``.

Shapes: text-to-image makes the ~1 MP shape of its ``aspect_ratio`` (:data:`SHAPES`);
image-to-image, inpaint and control keep the input's size; fast upscale makes 4x,
conservative and creative about 4 MP at the input's ratio. Seeds 0 or absent are drawn
at random and echoed. Images are Pillow art hashed from (prompt, seed): inpaint keeps
the input where the mask is black, so tests can check mask polarity.

Billing: Stability's answers carry no billing, so the sandbox keeps the account's side.
Every 200 image answer (a content-filtered one and a ``malformed`` fault's too: the work
was done) adds its route's credits (:data:`CREDITS`, $0.01 each) × ``bill_multiplier`` to
``billed_usd``; a creative upscale is billed once, when its result is first delivered.
Error answers bill nothing.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import secrets
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from PIL import Image, ImageFilter

from providers.sandbox._server import (
    HOSTILE_IMAGE_FAULTS,
    VENDOR_FAULTS,
    Fault,
    Request,
    Response,
    SandboxError,
    SandboxServer,
    Upload,
    hostile_image,
    synthetic_image,
)
from router.images import encode

MAX_SEED = 4_294_967_294
MAX_BODY = 10 * 1024 * 1024
MAX_PROMPT = 10_000
SHAPES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "9:16": (768, 1344),
    "21:9": (1536, 640),
    "9:21": (640, 1536),
    "2:3": (832, 1216),
    "3:2": (1216, 832),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
}
SD3_MODELS = ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash")
STYLE_PRESETS = (
    "3d-model",
    "analog-film",
    "anime",
    "cinematic",
    "comic-book",
    "digital-art",
    "enhance",
    "fantasy-art",
    "isometric",
    "line-art",
    "low-poly",
    "modeling-compound",
    "neon-punk",
    "origami",
    "photographic",
    "pixel-art",
    "tile-texture",
)
_FORMATS = ("png", "jpeg", "webp")
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
USD_PER_CREDIT = Decimal("0.01")
# Credits per image answer, by route (sd3 by its ``model`` field). PROVIDERS.md (Stability credits table):
# ultra 8, core 3, sd3.5-large 6.5, large-turbo 4, medium 3.5, flash 2.5, sketch / structure 3. Its edit and
# upscale rates are unverified: the figures here are the shipped price table's estimates, not Stability's.
CREDITS: dict[str, Decimal] = {
    "generate/ultra": Decimal(8),
    "generate/core": Decimal(3),
    "sd3.5-large": Decimal("6.5"),
    "sd3.5-large-turbo": Decimal(4),
    "sd3.5-medium": Decimal("3.5"),
    "sd3.5-flash": Decimal("2.5"),
    "control/sketch": Decimal(3),
    "control/structure": Decimal(3),
    "edit/inpaint": Decimal(5),
    "upscale/fast": Decimal(2),
    "upscale/conservative": Decimal(40),
    "upscale/creative": Decimal(60),
}


class ApiError(SandboxError):
    """A Stability-shaped error answer: ``{id, name, errors}``."""

    def __init__(self, status: int, name: str, *errors: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(errors[0] if errors else name)
        self.status, self.name, self.errors, self.headers = status, name, list(errors), headers or {}

    def response(self) -> Response:
        return Response.json(
            self.status, {"id": secrets.token_hex(16), "name": self.name, "errors": self.errors}, self.headers
        )


def _bad(*errors: str) -> ApiError:
    return ApiError(400, "bad_request", *errors)


# --- field checks ------------------------------------------------------------------------

_Check = Callable[[str, str], Any]


def _text(name: str, value: str) -> str:
    if len(value) > MAX_PROMPT:
        raise _bad(f"{name}: must be at most {MAX_PROMPT} characters")
    return value


def _number(low: float, high: float, *, integer: bool = False) -> _Check:
    def check(name: str, value: str) -> float | int:
        try:
            number: float | int = int(value) if integer else float(value)
        except ValueError:
            raise _bad(f"{name}: must be {'an integer' if integer else 'a number'}") from None
        if not low <= number <= high:
            raise _bad(f"{name}: must be between {low:g} and {high:g}")
        return number

    return check


def _enum(*allowed: str) -> _Check:
    def check(name: str, value: str) -> str:
        if value not in allowed:
            raise _bad(f"{name}: must be one of {', '.join(allowed)}")
        return value

    return check


_COMMON: dict[str, _Check] = {
    "prompt": _text,
    "negative_prompt": _text,
    "seed": _number(0, MAX_SEED, integer=True),
    "output_format": _enum(*_FORMATS),
    "style_preset": _enum(*STYLE_PRESETS),
}
_ROUTES: dict[str, tuple[dict[str, _Check], tuple[str, ...], tuple[str, ...]]] = {
    # path: (text fields, required fields, file fields)
    "generate/ultra": ({**_COMMON, "aspect_ratio": _enum(*SHAPES), "strength": _number(0, 1)}, ("prompt",), ("image",)),
    "generate/core": ({**_COMMON, "aspect_ratio": _enum(*SHAPES)}, ("prompt",), ()),
    "generate/sd3": (
        {
            **_COMMON,
            "aspect_ratio": _enum(*SHAPES),
            "strength": _number(0, 1),
            "mode": _enum("text-to-image", "image-to-image"),
            "model": _enum(*SD3_MODELS),
            "cfg_scale": _number(1, 10),
            "output_format": _enum("png", "jpeg"),
        },
        ("prompt",),
        ("image",),
    ),
    "edit/inpaint": ({**_COMMON, "grow_mask": _number(0, 100, integer=True)}, ("prompt",), ("image", "mask")),
    "control/sketch": ({**_COMMON, "control_strength": _number(0, 1)}, ("prompt",), ("image",)),
    "control/structure": ({**_COMMON, "control_strength": _number(0, 1)}, ("prompt",), ("image",)),
    "upscale/fast": ({"output_format": _enum(*_FORMATS)}, (), ("image",)),
    "upscale/conservative": ({**_COMMON, "creativity": _number(0.2, 0.5)}, ("prompt",), ("image",)),
    "upscale/creative": ({**_COMMON, "creativity": _number(0.1, 0.5)}, ("prompt",), ("image",)),
}
_PREFIX = "/v2beta/stable-image/"


def _values(request: Request, route: str) -> tuple[dict[str, Any], dict[str, Image.Image]]:
    checks, required, file_names = _ROUTES[route]
    values: dict[str, Any] = {}
    for name, text in request.fields:
        if name in file_names:
            raise _bad(f"{name}: must be sent as a file")
        if name not in checks:
            raise _bad(f"{name}: unrecognized parameter")
        if name in values:
            raise _bad(f"{name}: sent more than once")
        values[name] = checks[name](name, text)
    for name in required:
        if not str(values.get(name, "")).strip():
            raise _bad(f"{name}: cannot be empty")
    images: dict[str, Image.Image] = {}
    for upload in request.uploads:
        if upload.name not in file_names:
            raise _bad(f"{upload.name}: unrecognized parameter")
        if upload.name in images:
            raise _bad(f"{upload.name}: sent more than once")
        images[upload.name] = _open(upload)
    return values, images


def _open(upload: Upload) -> Image.Image:
    try:
        with Image.open(io.BytesIO(upload.data), formats=["PNG", "JPEG", "WEBP"]) as img:
            img.load()
            out = img.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise _bad(f"{upload.name}: unreadable image; send png, jpeg or webp") from None
    w, h = out.size
    if min(w, h) < 64 or w * h < 4096:
        raise _bad(f"{upload.name}: every side must be at least 64 pixels")
    if max(w, h) / min(w, h) > 2.5:
        raise _bad(f"{upload.name}: aspect ratio must be between 1:2.5 and 2.5:1")
    return out


# --- pictures --------------------------------------------------------------------------------


def _upscaled(route: str, w: int, h: int) -> tuple[int, int]:
    if route == "upscale/fast":
        return w * 4, h * 4
    scale = (4 * 1024 * 1024 / (w * h)) ** 0.5
    return max(1, round(w * scale)), max(1, round(h * scale))


# --- the emulator ------------------------------------------------------------------------------


class StabilitySandbox(SandboxServer):
    """Stability's v2beta API on loopback: ``with StabilitySandbox() as sb: ... sb.base_url``.

    ``faults`` also serves ``Fault("content_filtered")``: a normal answer flagged
    ``finish-reason: CONTENT_FILTERED`` with a blurred image, and the hostile images
    (``Fault.hostile_image("bomb_image")``, ``truncated_image``, ``wrong_format_image``,
    ``huge_image``): the usual answer, billed, with :func:`~providers.sandbox._server.hostile_image`'s
    bytes as its image (a creative upscale's result, when aimed at its POST). ``job_polls`` sets how many
    result polls answer 202 before a creative upscale is done. ``billed_usd`` is what the
    account was billed so far; ``bill_multiplier`` makes it bill more (or less) than the
    public rates, as a vendor changing its prices would.
    """

    base_path = ""
    fault_kinds = VENDOR_FAULTS | {"content_filtered"} | HOSTILE_IMAGE_FAULTS
    max_body_bytes = MAX_BODY

    def __init__(self, api_key: str = "sk-sandbox", *, job_polls: int = 2) -> None:
        super().__init__()
        self.api_key = api_key
        self.job_polls = job_polls
        self.bill_multiplier = Decimal(1)
        self._billed = Decimal(0)
        self._jobs: dict[str, tuple[Response, int, Decimal]] = {}
        self._jobs_lock = threading.Lock()

    @property
    def billed_usd(self) -> Decimal:
        """What the account has been billed: credits × $0.01 × ``bill_multiplier`` per 200 image answer."""
        with self._jobs_lock:
            return self._billed

    def _bill(self, credits: Decimal) -> None:
        with self._jobs_lock:
            self._billed += credits * USD_PER_CREDIT * self.bill_multiplier

    def expire_jobs(self) -> None:
        """Forget every async job, as after 24 h: their result polls answer 404."""
        with self._jobs_lock:
            self._jobs.clear()

    def authenticate(self, request: Request) -> Response | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return ApiError(401, "unauthorized", "authorization: missing Bearer API key").response()
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return ApiError(401, "unauthorized", "authorization: invalid API key").response()
        return None

    def render_internal_error(self, request: Request, exc: BaseException) -> Response:
        return ApiError(500, "internal_error", "An unexpected server error occurred.").response()

    def render_fault(self, fault: Fault, request: Request) -> Response:
        if fault.kind == "rate_limit":
            headers = {}
            if fault.retry_after is not None:
                seconds = fault.retry_after
                headers["retry-after"] = str(int(seconds)) if seconds == int(seconds) else str(seconds)
            return ApiError(
                429,
                "rate_limit_exceeded",
                "You have exceeded the rate limit of 150 requests within a 10 second period.",
                headers=headers,
            ).response()
        if fault.kind == "server_error":
            return ApiError(fault.status or 500, "internal_error", "An unexpected server error occurred.").response()
        if fault.kind == "moderation":
            return ApiError(
                403, "content_moderation", fault.message or "Your request was flagged by our content moderation system."
            ).response()
        if fault.kind == "malformed":
            body = fault.body if fault.body is not None else b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00"
            self._bill(_credits(request))  # a 200 image answer: the generation ran and is billed
            return Response(200, body, {"content-type": "image/png", "finish-reason": "SUCCESS", "seed": "1"})
        if fault.kind == "insufficient_credits":
            return ApiError(402, "payment_required", "You lack sufficient credits to make this request.").response()
        if fault.kind == "invalid_request":
            status = fault.status or 400
            name = {413: "payload_too_large", 422: "invalid_parameters"}.get(status, fault.code or "bad_request")
            return ApiError(status, name, fault.message or f"{fault.param or 'request'}: invalid").response()
        if fault.kind == "auth":
            return ApiError(401, "unauthorized", "authorization: invalid API key").response()
        if fault.kind == "content_filtered":
            return self._route(request, filtered=True)
        if fault.kind in HOSTILE_IMAGE_FAULTS:  # made and billed as usual, the image in the answer hostile
            return self._route(request, filtered=False, hostile=fault.kind)
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    def handle(self, request: Request) -> Response:
        return self._route(request, filtered=False)

    def _route(self, request: Request, filtered: bool, hostile: str | None = None) -> Response:
        accept = request.headers.get("accept", "image/*")
        if accept not in ("image/*", "application/json", "*/*"):
            raise _bad("accept: must be image/* or application/json")
        if request.method == "GET" and request.path.startswith("/v2beta/results/"):
            return self._result(request.path.removeprefix("/v2beta/results/"))
        route = request.path.removeprefix(_PREFIX)
        if request.method != "POST" or not request.path.startswith(_PREFIX) or route not in _ROUTES:
            raise ApiError(404, "not_found", f"{request.method} {request.path}: no such endpoint")
        if request.media_type != "multipart/form-data":
            raise _bad("content-type: must be multipart/form-data")
        if request.body_error is not None:
            raise _bad(f"body: {request.body_error}")
        values, images = _values(request, route)
        seed = int(values.get("seed") or 0) or secrets.randbelow(MAX_SEED) + 1
        prompt = str(values.get("prompt", ""))
        fmt = str(values.get("output_format", "png"))
        image = images.get("image")
        if route == "generate/sd3" or route == "generate/ultra":
            img2img = values.get("mode") == "image-to-image" if route == "generate/sd3" else image is not None
            if img2img and image is None:
                raise _bad("image: required when mode is image-to-image")
            if img2img and "strength" not in values:
                raise _bad("strength: required with an image")
            if not img2img and (image is not None or "strength" in values):
                raise _bad("image: only valid with mode image-to-image")
            if img2img and "aspect_ratio" in values:
                raise _bad("aspect_ratio: only valid for text-to-image requests")
        if route.startswith("generate/"):
            size = image.size if image is not None else SHAPES[values.get("aspect_ratio", "1:1")]
            out = synthetic_image(prompt, seed, size)
            if image is not None:
                out = Image.blend(image.convert("RGB"), out, float(values["strength"]))
        elif route == "edit/inpaint":
            assert image is not None
            if "mask" in images:
                mask = images["mask"].convert("L")
                if mask.size != image.size:
                    raise _bad("mask: must match the image's dimensions")
            elif image.mode in ("RGBA", "LA"):
                mask = Image.eval(image.convert("RGBA").getchannel("A"), lambda a: 255 - a)
            else:
                raise _bad("mask: required unless the image has an alpha channel")
            out = Image.composite(synthetic_image(prompt, seed, image.size), image.convert("RGB"), mask)
        elif route.startswith("control/"):
            if image is None:
                raise _bad("image: required")
            out = Image.blend(
                synthetic_image(prompt, seed, image.size),
                image.convert("RGB"),
                float(values.get("control_strength", 0.7)) / 2,
            )
        else:
            if image is None:
                raise _bad("image: required")
            if route != "upscale/conservative" and image.width * image.height > 1024 * 1024:
                raise _bad("image: at most 1,048,576 pixels for this upscaler")
            out = image.convert("RGB").resize(_upscaled(route, *image.size), Image.Resampling.BICUBIC)
        if filtered:
            out = out.filter(ImageFilter.GaussianBlur(24))
        data = hostile_image(hostile) if hostile else encode(out.convert("RGB"), fmt)
        answer = _answer(data, fmt, seed, filtered, accept)
        credits = CREDITS[str(values.get("model", "sd3.5-large")) if route == "generate/sd3" else route]
        if route == "upscale/creative":
            job_id = secrets.token_hex(32)
            with self._jobs_lock:
                self._jobs[job_id] = (answer, self.job_polls, credits)
            return Response.json(200, {"id": job_id})
        self._bill(credits)
        return answer

    def _result(self, job_id: str) -> Response:
        with self._jobs_lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise ApiError(404, "not_found", f"id: no generation with id {job_id} (results expire after 24h)")
            answer, left, credits = job
            if left > 0:
                self._jobs[job_id] = (answer, left - 1, credits)
                return Response.json(202, {"id": job_id, "status": "in-progress"})
            self._jobs[job_id] = (answer, 0, Decimal(0))  # billed once, however often it is fetched
        self._bill(credits)
        return answer


def _credits(request: Request) -> Decimal:
    """The credits of the route ``request`` asked for (0 for anything that is not an image route)."""
    route = request.path.removeprefix(_PREFIX)
    if route == "generate/sd3":
        return CREDITS.get(request.form.get("model", "sd3.5-large"), Decimal(0))
    return CREDITS.get(route, Decimal(0))


def _answer(data: bytes, fmt: str, seed: int, filtered: bool, accept: str) -> Response:
    reason = "CONTENT_FILTERED" if filtered else "SUCCESS"
    if accept == "application/json":
        body = {"image": base64.b64encode(data).decode(), "finish_reason": reason, "seed": seed}
        return Response(200, json.dumps(body).encode(), {"content-type": "application/json"})
    return Response(200, data, {"content-type": f"image/{fmt}", "finish-reason": reason, "seed": str(seed)})
