"""A loopback emulator of Ideogram's 3.0 API (generate, inpaint, edit, remix), strict like the real one.

It follows Ideogram's published reference (https://developer.ideogram.ai/api-reference; the operations are
vendored in ``tests/specs/ideogram.openapi.yaml``):

- ``POST /v1/ideogram-v3/generate | inpaint | edit | remix``, ``multipart/form-data``, header ``Api-Key``;
  ``prompt`` required; ``inpaint``/``edit`` require ``image`` and ``mask`` (black = the area to edit, the
  image's size), ``remix`` requires ``image`` (cropped to the chosen shape) and takes ``image_weight`` 1..100.
  ``resolution`` is one of ``ResolutionV3``, ``aspect_ratio`` one of ``AspectRatioV3`` ("Cannot be used in
  conjunction with resolution"), ``rendering_speed`` FLASH/TURBO/DEFAULT/QUALITY, ``magic_prompt``
  AUTO/ON/OFF, ``style_type`` AUTO/GENERAL/REALISTIC/DESIGN/FICTION, ``num_images`` 1..8, ``seed``
  0..2147483647. A field the operation does not list is refused (stricter than the real API, so a wrong
  adapter fails).
- 200 → ``{"created", "data": [{"url", "prompt", "resolution", "is_image_safe", "seed", "style_type"}]}``;
  image links expire after ``url_ttl_s`` (then 403). 400 ``{"error"}`` for invalid input, 401 without a valid
  key, 422 ``{"error"}`` when the prompt fails the safety check, 429 when throttled.

Billing: each 200 answer bills every image it lists, at the rendering speed's per-image rate ($0.03 turbo and
flash, $0.06 default, $0.09 quality: https://ideogram.ai/features/api-pricing as quoted by
https://developer.puter.com/tutorials/ideogram-api-pricing/, read 2026-12-02; whether Ideogram bills an image
that failed its safety check is unpublished: billed here). ``billed_usd`` sums it.

Faults (``sb.faults``), besides the shared ones: ``moderation`` (422 safety error), ``Fault("unsafe_image")``
(the first image comes with ``is_image_safe: false`` and no URL, billed), ``insufficient_credits`` (402; the
shape is unpublished). On :data:`MEDIA_PATH`: ``server_error`` / ``rate_limit`` answer 503, ``auth`` 403,
``malformed`` a 200 that is not an image. Hostile images are served as the answer's first image.
"""

from __future__ import annotations

import hmac
import io
import math
import secrets
import threading
import time
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

MEDIA_PATH = "/api/images/ephemeral"
# ResolutionV3 and AspectRatioV3 (tests/specs/ideogram.openapi.yaml)
RESOLUTIONS = frozenset({
    "512x1536", "576x1408", "576x1472", "576x1536", "640x1344", "640x1408", "640x1472", "640x1536", "704x1152",
    "704x1216", "704x1280", "704x1344", "704x1408", "704x1472", "736x1312", "768x1088", "768x1216", "768x1280",
    "768x1344", "800x1280", "832x960", "832x1024", "832x1088", "832x1152", "832x1216", "832x1248", "864x1152",
    "896x960", "896x1024", "896x1088", "896x1120", "896x1152", "960x832", "960x896", "960x1024", "960x1088",
    "1024x832", "1024x896", "1024x960", "1024x1024", "1088x768", "1088x832", "1088x896", "1088x960", "1120x896",
    "1152x704", "1152x832", "1152x864", "1152x896", "1216x704", "1216x768", "1216x832", "1248x832", "1280x704",
    "1280x768", "1280x800", "1312x736", "1344x640", "1344x704", "1344x768", "1408x576", "1408x640", "1408x704",
    "1472x576", "1472x640", "1472x704", "1536x512", "1536x576", "1536x640",
})
ASPECT_RATIOS = frozenset({
    "1x3", "3x1", "1x2", "2x1", "9x16", "16x9", "10x16", "16x10", "2x3", "3x2", "3x4", "4x3", "4x5", "5x4", "1x1",
})
SPEEDS = ("FLASH", "TURBO", "DEFAULT", "QUALITY")
USD_PER_IMAGE = {"FLASH": Decimal("0.03"), "TURBO": Decimal("0.03"), "DEFAULT": Decimal("0.06"),
                 "QUALITY": Decimal("0.09")}
MAGIC = ("AUTO", "ON", "OFF")
STYLES = ("AUTO", "GENERAL", "REALISTIC", "DESIGN", "FICTION")
SEED_MAX = 2147483647
_COMMON = frozenset({"prompt", "seed", "rendering_speed", "magic_prompt", "num_images", "style_type",
                     "color_palette", "style_codes", "style_preset"})
_SIZED = frozenset({"resolution", "aspect_ratio", "negative_prompt"})
FIELDS: dict[str, frozenset[str]] = {
    "generate": _COMMON | _SIZED,
    "inpaint": _COMMON,
    "edit": _COMMON,
    "remix": _COMMON | _SIZED | {"image_weight"},
}
FILES: dict[str, frozenset[str]] = {
    "generate": frozenset({"style_reference_images", "character_reference_images"}),
    "inpaint": frozenset({"image", "mask", "style_reference_images", "character_reference_images"}),
    "edit": frozenset({"image", "mask", "style_reference_images", "character_reference_images"}),
    "remix": frozenset({"image", "style_reference_images", "character_reference_images"}),
}
_REQUIRED_FILES = {"inpaint": ("image", "mask"), "edit": ("image", "mask"), "remix": ("image",)}


class ApiError(SandboxError):
    """An Ideogram error answer: ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def response(self) -> Response:
        return Response.json(self.status, {"error": self.message}, self.headers)


def ratio_resolution(ratio: str) -> tuple[int, int]:
    """The ``ResolutionV3`` shape an ``AspectRatioV3`` value makes: the one closest to the ratio, largest first."""
    a, b = (int(x) for x in ratio.split("x"))
    sizes = [tuple(int(x) for x in r.split("x")) for r in RESOLUTIONS]
    w, h = min(sizes, key=lambda s: (abs(math.log((s[0] / s[1]) / (a / b))), -s[0] * s[1]))
    return w, h


def nearest_resolution(width: int, height: int) -> tuple[int, int]:
    """The ``ResolutionV3`` shape an edit of a ``width`` x ``height`` image comes back at: its answer's
    ``resolution`` is a ``ResolutionV3`` value (``ImageGenerationObjectV3``); how Ideogram picks it is
    unpublished: here the nearest ratio, then the nearest area."""
    sizes = [tuple(int(x) for x in r.split("x")) for r in RESOLUTIONS]
    ratio, area = width / height, width * height
    w, h = min(sizes, key=lambda s: (abs(math.log((s[0] / s[1]) / ratio)), abs(s[0] * s[1] - area)))
    return w, h


def _image(name: str, data: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG", "WEBP"]) as img:
            img.load()
            return img.copy()
    except (ValueError, OSError, SyntaxError, Image.DecompressionBombError):
        raise ApiError(400, f"{name}: only JPEG, WebP and PNG formats are supported") from None


class IdeogramSandbox(SandboxServer):
    """Ideogram's API on loopback: ``with IdeogramSandbox() as sb: ... sb.base_url``.

    ``billed_usd`` is what the 200 answers billed; ``url_ttl_s`` how long image links live.
    """

    base_path = ""
    fault_kinds = VENDOR_FAULTS | HOSTILE_IMAGE_FAULTS | {"unsafe_image"}

    def __init__(self, api_key: str = "ideogram-sandbox-key", *, url_ttl_s: float = 3600.0) -> None:
        super().__init__()
        self.api_key = api_key
        self.url_ttl_s = url_ttl_s
        self.billed_usd = Decimal(0)
        self.images: dict[str, bytes] = {}
        self._lock_images = threading.Lock()
        self._signing_key = secrets.token_bytes(16)

    # --- hooks

    def authenticate(self, request: Request) -> Response | None:
        if request.path == MEDIA_PATH:
            return None  # signed links carry no key
        key = request.headers.get("api-key", "")
        if not key or not hmac.compare_digest(key.encode(), self.api_key.encode()):
            return ApiError(401, "Not authorized to generate an image.").response()
        return None

    def decorate(self, request: Request, response: Response, elapsed_s: float) -> None:
        response.headers["x-request-id"] = request.request_id

    def render_internal_error(self, request: Request, exc: BaseException) -> Response:
        return ApiError(500, "Internal server error").response()

    def render_fault(self, fault: Fault, request: Request) -> Response:
        if request.path == MEDIA_PATH:
            return self._media_fault(fault)
        if fault.kind == "rate_limit":
            headers = {} if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
            return ApiError(429, "Too many requests.", headers).response()
        if fault.kind == "server_error":
            return ApiError(fault.status or 500, "Internal server error").response()
        if fault.kind == "moderation":
            return ApiError(422, fault.message or "Prompt failed the safety check.").response()
        if fault.kind == "malformed":
            return Response(200, fault.body if fault.body is not None else b'{"created": "2026', {
                "content-type": "application/json"})
        if fault.kind == "insufficient_credits":
            return ApiError(402, "Insufficient balance. Please top up your API credits.").response()
        if fault.kind == "invalid_request":
            return ApiError(fault.status or 400, f"{fault.param or 'request'}: {fault.message or 'Invalid input'}"
                            ).response()
        if fault.kind == "auth":
            return ApiError(401, "Not authorized to generate an image.").response()
        if fault.kind == "unsafe_image" or fault.kind in HOSTILE_IMAGE_FAULTS:
            return self.handle(request, fault=fault.kind)
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    def _media_fault(self, fault: Fault) -> Response:
        if fault.kind in ("server_error", "rate_limit"):
            return Response(fault.status or 503 if fault.kind == "server_error" else 503, b"busy",
                            {"content-type": "text/plain"})
        if fault.kind == "auth":
            return Response(403, b"Forbidden", {"content-type": "text/plain"})
        if fault.kind == "malformed":
            return Response(200, fault.body if fault.body is not None else b"<html>", {"content-type": "image/png"})
        if fault.kind in HOSTILE_IMAGE_FAULTS:
            return Response(200, hostile_image(fault.kind), {"content-type": "image/png"})
        raise ValueError(f"fault kind {fault.kind!r} does not apply to image links")

    # --- routes

    def handle(self, request: Request, fault: str | None = None) -> Response:
        if request.method == "GET" and request.path == MEDIA_PATH:
            return self._media(request)
        op = request.path.removeprefix("/v1/ideogram-v3/")
        if request.method != "POST" or op not in FIELDS:
            raise ApiError(404 if request.method in ("GET", "POST") else 405, "Not found")
        return self._generate(request, op, fault)

    def _generate(self, request: Request, op: str, fault: str | None) -> Response:
        if request.media_type != "multipart/form-data" or request.body_error is not None:
            raise ApiError(400, "The request must be multipart/form-data")
        form = request.form
        for name in form:
            if name not in FIELDS[op]:
                raise ApiError(400, f"{name}: unknown field")
        for upload in request.uploads:
            if upload.name not in FILES[op]:
                raise ApiError(400, f"{upload.name}: unknown file field")
        prompt = form.get("prompt", "")
        if not prompt.strip():
            raise ApiError(400, "prompt: field required")
        for name in _REQUIRED_FILES.get(op, ()):
            if not request.uploads_named(name):
                raise ApiError(400, f"{name}: field required")
        speed = _enum(form, "rendering_speed", SPEEDS, "DEFAULT")
        _enum(form, "magic_prompt", MAGIC, "AUTO")
        style = _enum(form, "style_type", STYLES, "GENERAL")
        n = _int(form, "num_images", 1, 8, 1)
        seed = _int(form, "seed", 0, SEED_MAX, secrets.randbelow(SEED_MAX))
        if "resolution" in form and "aspect_ratio" in form:
            raise ApiError(400, "resolution cannot be used in conjunction with aspect_ratio")
        if "resolution" in form and form["resolution"] not in RESOLUTIONS:
            raise ApiError(400, f"resolution: {form['resolution']!r} is not a supported resolution")
        if "aspect_ratio" in form and form["aspect_ratio"] not in ASPECT_RATIOS:
            raise ApiError(400, f"aspect_ratio: {form['aspect_ratio']!r} is not a supported aspect ratio")
        base: Image.Image | None = None
        mask: Image.Image | None = None
        if op in ("inpaint", "edit", "remix"):
            base = _image("image", request.uploads_named("image")[0].data).convert("RGB")
        if op in ("inpaint", "edit"):
            assert base is not None
            mask = _image("mask", request.uploads_named("mask")[0].data).convert("L")
            if mask.size != base.size:
                raise ApiError(400, "mask: must be the same size as the image being edited")
            size = nearest_resolution(*base.size)
        elif "resolution" in form:
            w, h = form["resolution"].split("x")
            size = (int(w), int(h))
        else:
            size = ratio_resolution(form.get("aspect_ratio", "1x1"))
        weight = _int(form, "image_weight", 1, 100, 50) if op == "remix" else 50
        data: list[dict[str, Any]] = []
        for i in range(n):
            picture = self._render(prompt, seed + i, size, base, mask, weight)
            if fault in HOSTILE_IMAGE_FAULTS and i == 0:
                picture = hostile_image(fault)
            safe = not (fault == "unsafe_image" and i == 0)
            data.append({
                "url": self._store(picture) if safe else None,
                "prompt": prompt,
                "resolution": f"{size[0]}x{size[1]}",
                "is_image_safe": safe,
                "seed": (seed + i) % (SEED_MAX + 1),
                "style_type": style,
            })
        with self._lock_images:
            self.billed_usd += USD_PER_IMAGE[speed] * len(data)
        created = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        return Response.json(200, {"created": created, "data": data})

    @staticmethod
    def _render(prompt: str, seed: int, size: tuple[int, int], base: Image.Image | None,
                mask: Image.Image | None, weight: int) -> bytes:
        art = synthetic_image(prompt, seed, size)
        if base is not None and mask is not None:  # black = edit: paint there, keep the rest
            keep = mask.point(lambda v: 255 if v >= 128 else 0)
            art = Image.composite(base, synthetic_image(prompt, seed, base.size), keep)
            art = art.resize(size, Image.Resampling.LANCZOS)
        elif base is not None:  # remix: the image cropped to the shape, blended by image_weight
            art = Image.blend(art, _cover(base, size), weight / 100)
        return encode(art.convert("RGB"), "png")

    def _store(self, data: bytes) -> str:
        key = secrets.token_hex(12)
        expires = int(time.time() + self.url_ttl_s)
        with self._lock_images:
            self.images[key] = data
        sig = hmac.new(self._signing_key, f"{key}:{expires}".encode(), "sha256").hexdigest()
        return f"{self.origin}{MEDIA_PATH}?key={key}&exp={expires}&signature={sig}"

    def _media(self, request: Request) -> Response:
        key, expires = request.query.get("key", ""), request.query.get("exp", "")
        sig = hmac.new(self._signing_key, f"{key}:{expires}".encode(), "sha256").hexdigest()
        with self._lock_images:
            data = self.images.get(key)
        if data is None or not hmac.compare_digest(sig, request.query.get("signature", "")):
            return Response(403, b"Forbidden", {"content-type": "text/plain"})
        if not expires.isdigit() or int(expires) < time.time():
            return Response(403, b"Link expired", {"content-type": "text/plain"})
        return Response(200, data, {"content-type": "image/png"})


def _cover(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img`` cropped to ``size``'s ratio (centred) and resized to it."""
    w, h = img.size
    target = size[0] / size[1]
    if w / h > target:
        cw = round(h * target)
        img = img.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
    else:
        ch = round(w / target)
        img = img.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))
    return img.resize(size, Image.Resampling.LANCZOS)


def _enum(form: dict[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = form.get(name, default)
    if value not in allowed:
        raise ApiError(400, f"{name}: must be one of {', '.join(allowed)}")
    return value


def _int(form: dict[str, str], name: str, low: int, high: int, default: int) -> int:
    if name not in form:
        return default
    text = form[name]
    if not text.isdigit() or not low <= int(text) <= high:
        raise ApiError(400, f"{name}: must be an integer from {low} to {high}")
    return int(text)
