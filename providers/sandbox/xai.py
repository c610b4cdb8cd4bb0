"""A loopback emulator of xAI's image API (Grok Imagine), after xAI's published reference.

Routes (https://docs.x.ai/developers/model-capabilities/images/generation; the REST reference of
``POST /v1/images/generations`` and ``POST /v1/images/edits``):

- ``POST /v1/images/generations`` (JSON): ``model``, ``prompt`` (required), ``n`` 1..10,
  ``response_format`` ``url`` | ``b64_json`` (default url), ``aspect_ratio`` (one of :data:`RATIOS`,
  default 1:1), ``resolution`` ``1k`` | ``2k``, ``quality``, ``user``. ``size`` and ``style`` are refused
  ("Argument not supported").
- ``POST /v1/images/edits`` (JSON, not multipart: "the xAI API requires application/json"): the same
  fields plus ``image: {url}`` (an http(s) URL or a base64 data URL); the output keeps the input's
  aspect ratio, so ``aspect_ratio`` is not taken. A multipart body is a 400.
- ``GET /outputs/<token>`` serves ``url`` outputs (temporary, unauthenticated like a signed URL).

Answers: ``{created, data: [{b64_json | url, mime_type, revised_prompt}], usage: {cost_in_usd_ticks}}``
(one USD is 10^10 ticks); the images are JPEGs. A moderated request is a 200 with ``block_reason`` and no
data. Errors are xAI's ``{"code": <status text>, "error": <message>}``; every answer has ``x-request-id``.

Prices (the sandbox's bill, see providers/prices/xai.toml): ``grok-imagine-image`` $0.02 per output
image, $0.002 per input image; ``grok-imagine-image-pro`` $0.07 per output image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import secrets
import threading
import time
from decimal import Decimal
from typing import Any

from PIL import Image, ImageDraw

from providers.sandbox._server import (
    HOSTILE_IMAGE_FAULTS,
    VENDOR_FAULTS,
    Fault,
    Request,
    Response,
    SandboxError,
    SandboxServer,
    hostile_image,
)

TICKS_PER_USD = 10**10
PRICES = {  # USD per output image, per input image
    "grok-imagine-image": (Decimal("0.02"), Decimal("0.002")),
    "grok-imagine-image-pro": (Decimal("0.07"), Decimal("0.002")),
}
MODELS = frozenset(PRICES)
RATIOS: dict[str, tuple[int, int]] = {  # the 1k shapes; 2k doubles each side
    "1:1": (1024, 1024),
    "3:4": (896, 1184),
    "4:3": (1184, 896),
    "9:16": (768, 1376),
    "16:9": (1376, 768),
    "2:3": (832, 1248),
    "3:2": (1248, 832),
    "9:19.5": (704, 1520),
    "19.5:9": (1520, 704),
    "9:20": (688, 1536),
    "20:9": (1536, 688),
    "1:2": (720, 1440),
    "2:1": (1440, 720),
}
MAX_N = 10
_FIELDS = {
    "model": str,
    "prompt": str,
    "n": int,
    "response_format": str,
    "aspect_ratio": str,
    "resolution": str,
    "quality": str,
    "user": str,
    "image": dict,
}
_UNSUPPORTED = frozenset({"size", "style"})


class ApiError(SandboxError):
    """An xAI-shaped error answer: ``{"code": ..., "error": ...}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def response(self) -> Response:
        return Response.json(self.status, {"code": self.code, "error": self.message}, self.headers)


def _bad(message: str) -> ApiError:
    return ApiError(400, "Client specified an invalid argument", message)


def _check(body: dict[str, Any], edit: bool) -> dict[str, Any]:
    for name, value in body.items():
        if name in _UNSUPPORTED:
            raise _bad(f"Argument not supported: {name}")
        kind = _FIELDS.get(name)
        if kind is None or (name == "image" and not edit) or (name == "aspect_ratio" and edit):
            raise _bad(f"Unknown or unsupported argument: {name}")
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise _bad(f"Invalid type for {name}")
    if not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
        raise _bad("prompt is required")
    model = body.get("model") or "grok-imagine-image"
    if model not in MODELS:
        raise ApiError(404, "Some requested entity was not found", f"The model {model} does not exist")
    if not 1 <= (body.get("n") or 1) <= MAX_N:
        raise _bad(f"n must be between 1 and {MAX_N}")
    if body.get("response_format", "url") not in ("url", "b64_json"):
        raise _bad("response_format must be url or b64_json")
    if body.get("aspect_ratio") not in (None, "auto", *RATIOS):
        raise _bad(f"Invalid aspect_ratio: {body['aspect_ratio']}")
    if body.get("resolution") not in (None, "1k", "2k"):
        raise _bad("resolution must be 1k or 2k")
    if edit:
        image = body.get("image")
        if not isinstance(image, dict) or not isinstance(image.get("url"), str):
            raise _bad("image.url is required")
    return {**body, "model": model}


def _decode_input(url: str) -> Image.Image | None:
    if url.startswith(("http://", "https://")):
        return None
    head, sep, payload = url.partition(",")
    if not (url.startswith("data:image/") and sep and head.endswith(";base64")):
        raise _bad("image.url must be an http(s) URL or a base64 data URL")
    try:
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True)), formats=["PNG", "JPEG", "WEBP"]) as img:
            img.load()
            return img.convert("RGB")
    except (binascii.Error, OSError, ValueError, SyntaxError):
        raise _bad("image.url could not be decoded as an image") from None


def _shape(ratio: float, resolution: str) -> tuple[int, int]:
    w, h = min(RATIOS.values(), key=lambda s: abs(s[0] / s[1] - ratio))
    return (w * 2, h * 2) if resolution == "2k" else (w, h)


def _draw(prompt: str, index: int, size: tuple[int, int], init: Image.Image | None) -> bytes:
    digest = hashlib.sha256(f"{prompt}\0{index}".encode()).digest()
    art = Image.new("RGB", size, tuple(digest[:3]))
    w, h = size
    ImageDraw.Draw(art).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=tuple(digest[3:6]))
    if init is not None:
        art = Image.blend(init.resize(size), art, 0.5)
    buf = io.BytesIO()
    art.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


class XAISandbox(SandboxServer):
    """xAI's image API on loopback: ``with XAISandbox() as sb: ... sb.base_url`` (``…/v1``, the SDK's base URL).

    ``billed_usd`` adds up what the sandbox billed (``usage.cost_in_usd_ticks``); ``report_cost`` False
    leaves ``usage`` out of the answers (a bill the provider then takes from its price table).
    """

    base_path = "/v1"
    fault_kinds = VENDOR_FAULTS | HOSTILE_IMAGE_FAULTS

    def __init__(self, api_key: str = "xai-sandbox-key") -> None:
        super().__init__()
        self.api_key = api_key
        self.billed_usd = Decimal(0)
        self.report_cost = True
        self._outputs: dict[str, bytes] = {}
        self._lock2 = threading.Lock()

    def authenticate(self, request: Request) -> Response | None:
        if request.path.startswith("/outputs/"):
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return _bad_key().response()
        return None

    def decorate(self, request: Request, response: Response, elapsed_s: float) -> None:
        response.headers.setdefault("x-request-id", request.request_id)

    def render_internal_error(self, request: Request, exc: BaseException) -> Response:
        return ApiError(500, "Internal error", "The service encountered an internal error").response()

    def render_fault(self, fault: Fault, request: Request) -> Response:
        if fault.kind == "rate_limit":
            headers = {} if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
            return ApiError(429, "Too many requests", "You have exceeded your rate limit", headers).response()
        if fault.kind == "server_error":
            status = fault.status or 500
            code = "Service unavailable" if status == 503 else "Internal error"
            return ApiError(status, code, "The service is temporarily unable to serve the request").response()
        if fault.kind == "moderation":
            return self._generate(request, blocked=fault.message or "Generated image rejected by content moderation.")
        if fault.kind == "malformed":
            body = fault.body if fault.body is not None else b'{"created": 1, "data": [{"b64_json": "'
            return Response(200, body, {"content-type": "application/json"})
        if fault.kind == "insufficient_credits":
            return ApiError(
                403,
                "The caller does not have permission to execute the specified operation",
                "Your team has either used all available credits or reached its monthly spending limit.",
            ).response()
        if fault.kind == "invalid_request":
            return _bad(fault.message or f"Invalid argument: {fault.param or 'request'}").response()
        if fault.kind == "auth":
            return _bad_key().response()
        if fault.kind in HOSTILE_IMAGE_FAULTS:
            return self._generate(request, hostile=fault.kind)
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    def handle(self, request: Request) -> Response:
        if request.method == "POST" and request.path in ("/v1/images/generations", "/v1/images/edits"):
            return self._generate(request)
        if request.method == "GET" and request.path.startswith("/outputs/"):
            with self._lock2:
                data = self._outputs.get(request.path.removeprefix("/outputs/"))
            if data is None:
                return Response(404, b"not found", {"content-type": "text/plain"})
            return Response(200, data, {"content-type": "image/jpeg"})
        raise ApiError(404, "Some requested entity was not found", f"No route for {request.method} {request.path}")

    def _generate(self, request: Request, *, hostile: str | None = None, blocked: str | None = None) -> Response:
        edit = request.path.endswith("/edits")
        if request.media_type != "application/json":
            raise _bad("The request body must be JSON (application/json); multipart is not supported")
        if request.body_error is not None or not isinstance(request.json, dict):
            raise _bad("The request body is not a JSON object")
        body = _check(request.json, edit)
        model: str = body["model"]
        out_price, in_price = PRICES[model]
        init = _decode_input(body["image"]["url"]) if edit else None
        if init is not None:
            ratio = init.width / init.height
        elif body.get("aspect_ratio") in RATIOS:
            a, _, b = body["aspect_ratio"].partition(":")
            ratio = float(a) / float(b)
        else:
            ratio = 1.0
        size = _shape(ratio, body.get("resolution") or "1k")
        payload: dict[str, Any] = {"created": int(time.time()), "data": []}
        cost = in_price if edit else Decimal(0)
        if blocked is not None:
            payload["block_reason"] = blocked
        else:
            for index in range(body.get("n") or 1):
                image = hostile_image(hostile) if hostile else _draw(body["prompt"], index, size, init)
                item: dict[str, Any] = {"mime_type": "image/jpeg", "revised_prompt": body["prompt"]}
                if body.get("response_format", "url") == "b64_json":
                    item["b64_json"] = base64.b64encode(image).decode()
                else:
                    token = secrets.token_hex(12) + ".jpeg"
                    with self._lock2:
                        self._outputs[token] = image
                    item["url"] = f"{self.origin}/outputs/{token}"
                payload["data"].append(item)
                cost += out_price
        with self._lock2:
            self.billed_usd += cost
        if self.report_cost:
            payload["usage"] = {"cost_in_usd_ticks": int(cost * TICKS_PER_USD)}
        return Response.json(200, payload)


def _bad_key() -> ApiError:
    return ApiError(400, "Client specified an invalid argument", "Incorrect API key provided: ***. Obtain an API key "
                    "from https://console.x.ai.")
