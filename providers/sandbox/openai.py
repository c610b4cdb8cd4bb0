"""A loopback emulator of OpenAI's Images API (gpt-image-2 family), strict like the real one.

Routes under ``/v1``: ``POST images/generations`` (JSON), ``POST images/edits``
(multipart uploads, or JSON whose ``images``/``mask`` are ``{image_url}`` or ``{file_id}``
references: data URLs are read; the sandbox downloads nothing and holds no files, so an
http(s) URL is a 400 and a file id a 404), ``GET models`` and ``GET models/{id}``.
``stream: true`` answers as server-sent events (``partial_images`` blurred previews per image,
then a completed event with the image and its usage). Everything else is a 404 in OpenAI's error
shape ``{"error": {message, type, param, code}}``.
Every answer carries ``x-request-id: req_<hex>`` and ``openai-processing-ms``.

Images are real: Pillow draws a flat colour and a disc, both picked from a hash of
(prompt, index), at the requested size and format, returned as ``b64_json``. Edits
start from the first input image scaled to the output size; with a mask, pixels whose
mask alpha is 255 stay the input's and alpha 0 is painted (in between: blended), so
tests can check mask polarity. Without a mask the art is blended over the whole frame.

Sizes: ``auto`` means 1024x1024 (for edits too). Otherwise ``WxH`` with both sides
multiples of 16, long side / short side <= 3, each side <= 3840, and
655,360 <= W*H <= 3840*2160.

Faults (``sb.faults``) apply only to requests whose key was accepted; a wrong or
missing key is always the 401.

Billing facts (the ``usage`` object; ``sb.usage_override`` replaces it verbatim):

- ``text_tokens = ceil(len(prompt.encode("utf-8")) / 4)``
- ``image_tokens`` (edits only; masks are not counted) = sum over the input images
  of ``65 + 129 * ceil(w' / 512) * ceil(h' / 512)``, where ``(w', h')`` is the image
  scaled down (never up) to fit 2048x2048 and then down so its short side is <= 768.
- ``output_tokens = n * round(base * W * H / 1024**2)`` (Python's round, half to even)
  with base low 272, medium 1056, high 4160; ``auto`` resolves to medium.
- ``input_tokens = text_tokens + image_tokens``, ``total_tokens = input + output``.

What the sandbox billed: every 200 answer that reports ``usage`` is billed at OpenAI's
published gpt-image-2 rates (``PUBLISHED_USD_PER_MTOK``: $5 text in, $8 image in, $30 image
out per million tokens, https://platform.openai.com/docs/pricing, as of 2026-11) and summed
in ``sb.billed_usd``. ``sb.bill_multiplier = k`` makes every answer report ``k`` times its
tokens (a vendor billing more than its published table says). The ``broken_image`` fault
answers 200 with the usual ``usage`` (billed) and an image that does not decode; the hostile-image
faults (``Fault.hostile_image("bomb_image")``, ``truncated_image``, ``wrong_format_image``,
``huge_image``) the same, with :func:`~providers.sandbox._server.hostile_image`'s bytes.

The response reports what was produced: ``quality`` auto as "medium", ``background``
auto/opaque as "opaque", ``size`` as "WxH" (custom sizes too, though the spec's enum
lists only the three standard ones).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import io
import json
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    Upload,
    hostile_image,
)

DEFAULT_MODEL = "gpt-image-2"
MODELS = ("gpt-image-2", "gpt-image-2-2026-04-21")
RETIRED_MODELS = frozenset({"gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "dall-e-2", "dall-e-3"})
MAX_PROMPT_CHARS = 32_000
MAX_EDIT_IMAGES = 16
MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_MASK_BYTES = 4 * 1024 * 1024
MAX_EDGE = 3840
MAX_PIXELS = 3840 * 2160
MIN_PIXELS = 655_360
MAX_RATIO = 3.0
OUTPUT_TOKEN_BASE = {"low": 272, "medium": 1056, "high": 4160}
PUBLISHED_USD_PER_MTOK = {"text": Decimal("5.00"), "image": Decimal("8.00"), "output": Decimal("30.00")}

_QUALITIES = ("low", "medium", "high", "auto")
_BACKGROUNDS = ("transparent", "opaque", "auto")
_FORMATS = ("png", "jpeg", "webp")
_INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
_SIZE_RE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")


class ApiError(SandboxError):
    """An OpenAI-shaped error answer."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def response(self) -> Response:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return Response.json(self.status, {"error": error}, self.headers)


# --- parameters --------------------------------------------------------------------


@dataclass(frozen=True)
class _Params:
    prompt: str
    model: str
    n: int
    width: int
    height: int
    quality: str
    background: str
    output_format: str
    output_compression: int
    stream: bool = False
    partial_images: int = 0


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _want_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ApiError(
            400,
            f"Invalid type for '{name}': expected a string, but got {_type_name(value)} instead.",
            param=name,
            code="invalid_type",
        )
    return value


def _want_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(
            400,
            f"Invalid type for '{name}': expected an integer, but got {_type_name(value)} instead.",
            param=name,
            code="invalid_type",
        )
    if value < low:
        raise ApiError(
            400,
            f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but got {value} instead.",
            param=name,
            code="integer_below_min_value",
        )
    if value > high:
        raise ApiError(
            400,
            f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, but got {value} instead.",
            param=name,
            code="integer_above_max_value",
        )
    return value


def _want_enum(name: str, value: Any, allowed: Sequence[str]) -> str:
    text = _want_str(name, value)
    if text not in allowed:
        listed = ", ".join(f"'{a}'" for a in allowed)
        raise ApiError(
            400, f"Invalid value: '{text}'. Supported values are: {listed}.", param=name, code="invalid_value"
        )
    return text


def _want_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ApiError(
            400,
            f"Invalid type for '{name}': expected a boolean, but got {_type_name(value)} instead.",
            param=name,
            code="invalid_type",
        )
    return value


def _want_ref(name: str, value: Any) -> dict[str, str]:
    """An image reference: an object with exactly one of ``image_url`` and ``file_id``, a string."""
    if not isinstance(value, dict):
        raise ApiError(
            400,
            f"Invalid type for '{name}': expected an object, but got {_type_name(value)} instead.",
            param=name,
            code="invalid_type",
        )
    if len(value) != 1 or not set(value) <= {"image_url", "file_id"}:
        raise ApiError(
            400, f"Invalid '{name}': give exactly one of 'image_url' and 'file_id'.", param=name, code="invalid_value"
        )
    key, ref = next(iter(value.items()))
    return {key: _want_str(f"{name}.{key}", ref)}


def _want_refs(name: str, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise ApiError(
            400,
            f"Invalid type for '{name}': expected an array, but got {_type_name(value)} instead.",
            param=name,
            code="invalid_type",
        )
    if not value:
        raise ApiError(
            400,
            f"Invalid '{name}': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            param=name,
            code="empty_array",
        )
    if len(value) > MAX_EDIT_IMAGES:
        raise ApiError(
            400,
            f"Invalid '{name}': array too long. Expected an array with maximum length "
            f"{MAX_EDIT_IMAGES}, but got an array with length {len(value)} instead.",
            param=name,
            code="array_above_max_length",
        )
    return [_want_ref(name, ref) for ref in value]


def parse_size(value: str) -> tuple[int, int]:
    """``(width, height)`` for a ``size`` value, or an :class:`ApiError` naming the broken rule."""
    if value == "auto":
        return 1024, 1024
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        raise ApiError(
            400, f"Invalid size '{value}': use 'auto' or 'WIDTHxHEIGHT'.", param="size", code="invalid_value"
        )
    w, h = int(match[1]), int(match[2])
    problem = None
    if w % 16 or h % 16:
        problem = "width and height must both be multiples of 16"
    elif max(w, h) > MAX_RATIO * min(w, h):
        problem = "the aspect ratio must lie between 1:3 and 3:1"
    elif max(w, h) > MAX_EDGE:
        problem = f"no side may exceed {MAX_EDGE} pixels"
    elif w * h > MAX_PIXELS:
        problem = f"at most {MAX_PIXELS} pixels in all ({MAX_EDGE}x2160)"
    elif w * h < MIN_PIXELS:
        problem = f"at least {MIN_PIXELS} pixels in all"
    if problem:
        raise ApiError(400, f"Invalid size '{value}': {problem}.", param="size", code="invalid_value")
    return w, h


_Check = Callable[[str, Any], Any]
_COMMON: dict[str, _Check] = {
    "prompt": _want_str,
    "model": _want_str,
    "n": lambda k, v: _want_int(k, v, 1, 10),
    "size": _want_str,
    "quality": lambda k, v: _want_enum(k, v, _QUALITIES),
    "background": lambda k, v: _want_enum(k, v, _BACKGROUNDS),
    "output_format": lambda k, v: _want_enum(k, v, _FORMATS),
    "output_compression": lambda k, v: _want_int(k, v, 0, 100),
    "user": _want_str,
    "safety_identifier": _want_str,
    "stream": _want_bool,
    "partial_images": lambda k, v: _want_int(k, v, 0, 3),
}
_GENERATION_FIELDS: dict[str, _Check] = {**_COMMON, "moderation": lambda k, v: _want_enum(k, v, ("low", "auto"))}
_EDIT_FIELDS: dict[str, _Check] = {**_COMMON, "input_fidelity": lambda k, v: _want_enum(k, v, ("high", "low"))}
_JSON_EDIT_FIELDS: dict[str, _Check] = {
    **_EDIT_FIELDS,
    "moderation": lambda k, v: _want_enum(k, v, ("low", "auto")),
    "images": lambda k, v: _want_refs(k, v),
    "mask": lambda k, v: _want_ref(k, v),
}
_NOT_FOR_GPT_IMAGE = ("response_format", "style")
_NOT_NULLABLE = frozenset({"prompt", "user", "safety_identifier"})
_INT_FIELDS = frozenset({"n", "output_compression", "partial_images"})


def _check_fields(body: dict[str, Any], checks: dict[str, _Check]) -> dict[str, Any]:
    """The body's fields, type- and value-checked; nulls dropped (so defaults apply)."""
    for name in body:
        if name not in checks and name not in _NOT_FOR_GPT_IMAGE:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")
    if "prompt" not in body:
        raise ApiError(400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    values: dict[str, Any] = {}
    for name, value in body.items():
        if value is None and name not in _NOT_NULLABLE:
            continue
        if name in _NOT_FOR_GPT_IMAGE:
            raise ApiError(
                400,
                f"'{name}' is not supported with GPT image models, which always return b64_json.",
                param=name,
                code="unsupported_parameter",
            )
        values[name] = checks[name](name, value)
    return values


def _resolve(values: dict[str, Any]) -> _Params:
    prompt: str = values["prompt"]
    if not prompt.strip():
        raise ApiError(
            400,
            "Invalid 'prompt': empty string. Expected a non-empty description.",
            param="prompt",
            code="empty_string",
        )
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(
            400,
            f"Invalid 'prompt': string too long. Expected at most {MAX_PROMPT_CHARS} characters, "
            f"but got {len(prompt)} characters instead.",
            param="prompt",
            code="string_above_max_length",
        )
    model: str = values.get("model", DEFAULT_MODEL)
    if not model.startswith("gpt-image-2"):
        why = "has been retired" if model in RETIRED_MODELS else "does not exist or you do not have access to it"
        raise ApiError(404, f"The model `{model}` {why}.", code="model_not_found")
    width, height = parse_size(values.get("size", "auto"))
    fmt: str = values.get("output_format", "png")
    background: str = values.get("background", "auto")
    compression: int = values.get("output_compression", 100)
    if background == "transparent" and fmt == "jpeg":
        raise ApiError(
            400, "Transparent backgrounds need output_format 'png' or 'webp'.", param="background", code="invalid_value"
        )
    if fmt == "png" and compression < 100:
        raise ApiError(
            400,
            "output_compression below 100 needs output_format 'jpeg' or 'webp'.",
            param="output_compression",
            code="invalid_value",
        )
    quality: str = values.get("quality", "auto")
    return _Params(
        prompt=prompt,
        model=model,
        n=values.get("n", 1),
        width=width,
        height=height,
        quality="medium" if quality == "auto" else quality,
        background="transparent" if background == "transparent" else "opaque",
        output_format=fmt,
        output_compression=compression,
        stream=bool(values.get("stream", False)),
        partial_images=values.get("partial_images", 0),
    )


def _form_values(request: Request) -> dict[str, Any]:
    """Multipart text fields as JSON-typed values (integers and booleans parsed)."""
    body: dict[str, Any] = {}
    for name, text in request.fields:
        if name in ("image", "image[]", "mask"):
            raise ApiError(
                400, f"'{name}' must be uploaded as a file.", param=name.removesuffix("[]"), code="invalid_type"
            )
        value: Any = text
        if name in _INT_FIELDS:
            try:
                value = int(text)
            except ValueError:
                raise ApiError(
                    400,
                    f"Invalid type for '{name}': expected an integer, but got a string instead.",
                    param=name,
                    code="invalid_type",
                ) from None
        elif name == "stream" and text in ("true", "false"):
            value = text == "true"
        body[name] = value
    return body


# --- tokens ----------------------------------------------------------------------------


def vision_tokens(width: int, height: int) -> int:
    """Input tokens for one image: 65 + 129 per 512-pixel tile after the 2048 / 768 downscale."""
    scale = min(1.0, 2048 / max(width, height))
    scale *= min(1.0, 768 / (min(width, height) * scale))
    return 65 + 129 * math.ceil(width * scale / 512) * math.ceil(height * scale / 512)


def usage(params: _Params, input_sizes: Sequence[tuple[int, int]] = ()) -> dict[str, Any]:
    """The ``usage`` object for a request (see the module docstring)."""
    text = math.ceil(len(params.prompt.encode()) / 4)
    image = sum(vision_tokens(w, h) for w, h in input_sizes)
    out = params.n * round(OUTPUT_TOKEN_BASE[params.quality] * params.width * params.height / 1024**2)
    return {
        "input_tokens": text + image,
        "input_tokens_details": {"image_tokens": image, "text_tokens": text},
        "output_tokens": out,
        "total_tokens": text + image + out,
    }


# --- pictures ---------------------------------------------------------------------------


def _art(prompt: str, index: int, size: tuple[int, int], transparent: bool) -> Image.Image:
    digest = hashlib.sha256(f"{index}\x00{prompt}".encode()).digest()
    bg, fg = tuple(digest[0:3]), tuple(255 - c for c in digest[0:3])
    w, h = size
    img = Image.new("RGBA", size, (*bg, 0 if transparent else 255))
    r = min(w, h) * (0.15 + digest[8] / 255 * 0.2)
    cx, cy = w * (0.3 + digest[6] / 255 * 0.4), h * (0.3 + digest[7] / 255 * 0.4)
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(*fg, 255))
    return img


def _encode(img: Image.Image, fmt: str, compression: int, transparent: bool) -> bytes:
    buf = io.BytesIO()
    img = img.convert("RGBA" if transparent else "RGB")
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        img.save(buf, format="JPEG", quality=max(1, compression))
    else:
        img.save(buf, format="WEBP", quality=compression, lossless=compression == 100)
    return buf.getvalue()


_DrawKey = tuple[str, int, int, int, str, str, int]
_flights: dict[_DrawKey, threading.Lock] = {}
_flights_lock = threading.Lock()


def _generated(prompt: str, index: int, params: _Params) -> bytes:
    """The encoded image, drawn once however many requests ask for it at the same time."""
    key = (
        prompt,
        index,
        params.width,
        params.height,
        params.background,
        params.output_format,
        params.output_compression,
    )
    with _flights_lock:
        flight = _flights.setdefault(key, threading.Lock())
    with flight:
        data = _draw(*key)
    with _flights_lock:
        _flights.pop(key, None)
    return data


@functools.lru_cache(maxsize=128)
def _draw(prompt: str, index: int, width: int, height: int, background: str, fmt: str, compression: int) -> bytes:
    transparent = background == "transparent"
    return _encode(_art(prompt, index, (width, height), transparent), fmt, compression, transparent)


def _edited(params: _Params, index: int, source: Image.Image, mask: Image.Image | None) -> bytes:
    size = (params.width, params.height)
    transparent = params.background == "transparent"
    art = _art(params.prompt, index, size, transparent)
    base = source.convert("RGBA")
    if base.size != size:
        base = base.resize(size, Image.Resampling.LANCZOS)
    if mask is None:
        out = Image.blend(base, art, 0.5)
    else:
        alpha = mask.convert("RGBA").getchannel("A")
        if alpha.size != size:
            alpha = alpha.resize(size, Image.Resampling.NEAREST)
        out = Image.composite(base, art, alpha)  # alpha 255 keeps the input, 0 takes the art
    return _encode(out, params.output_format, params.output_compression, transparent)


def _open_image(upload: Upload, *, what: str, formats: Sequence[str], max_bytes: int) -> Image.Image:
    if len(upload.data) > max_bytes:
        raise ApiError(
            400,
            f"Invalid '{what}': the file is over {max_bytes // (1024 * 1024)} MB.",
            param=what,
            code="image_too_large",
        )
    try:
        with Image.open(io.BytesIO(upload.data), formats=list(formats)) as img:
            if img.width * img.height > MAX_PIXELS * 4:
                raise ApiError(
                    400,
                    f"Invalid '{what}': {img.width}x{img.height} has too many pixels.",
                    param=what,
                    code="image_too_large",
                )
            img.load()
            return img.copy()
    except ApiError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        listed = ", ".join(f.lower() for f in formats)
        raise ApiError(
            400,
            f"Invalid '{what}': unreadable or unsupported image file; use {listed}.",
            param=what,
            code="invalid_image_format",
        ) from None


def _referenced_image(ref: dict[str, str], *, what: str, formats: Sequence[str], max_bytes: int) -> Image.Image:
    """The image a JSON edit references: a base64 data URL is read; nothing is downloaded, no file is held."""
    if "file_id" in ref:
        raise ApiError(404, f"No such File object: {ref['file_id']}", param=what)
    url = ref["image_url"]
    head, sep, payload = url.partition(",")
    if url.startswith(("http://", "https://")):
        raise ApiError(
            400,
            f"Error while downloading {url}: this sandbox downloads no images; send a data URL.",
            param=what,
            code="invalid_image_url",
        )
    if not (sep and head.startswith("data:") and head.endswith(";base64")):
        raise ApiError(
            400,
            f"Invalid '{what}': expected an http(s) URL or a base64 data URL.",
            param=what,
            code="invalid_image_url",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:
        raise ApiError(
            400, f"Invalid '{what}': the data URL is not valid base64.", param=what, code="invalid_image_url"
        ) from None
    return _open_image(
        Upload(what, None, head.removeprefix("data:").removesuffix(";base64"), data),
        what=what,
        formats=formats,
        max_bytes=max_bytes,
    )


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


# --- the emulator --------------------------------------------------------------------------


class OpenAISandbox(SandboxServer):
    """OpenAI's Images API on loopback: ``with OpenAISandbox() as sb: ... sb.base_url``.

    ``faults`` queues failures (:class:`~providers.sandbox.Fault`); ``requests`` and
    ``hits()`` show what arrived; set ``usage_override`` to fix the ``usage`` object.
    """

    base_path = "/v1"
    fault_kinds = VENDOR_FAULTS | {"broken_image"} | HOSTILE_IMAGE_FAULTS

    def __init__(self, api_key: str = "sk-sandbox") -> None:
        super().__init__()
        self.api_key = api_key
        self.usage_override: dict[str, Any] | None = None
        self.bill_multiplier = 1
        self._bill_lock = threading.Lock()
        self._billed = Decimal(0)

    @property
    def billed_usd(self) -> Decimal:
        """What this sandbox has billed: every reported ``usage`` at the published rates."""
        with self._bill_lock:
            return self._billed

    def _bill(self, reported: dict[str, Any]) -> None:
        details = reported.get("input_tokens_details") or {}
        cost = (
            Decimal(details.get("text_tokens", 0)) * PUBLISHED_USD_PER_MTOK["text"]
            + Decimal(details.get("image_tokens", 0)) * PUBLISHED_USD_PER_MTOK["image"]
            + Decimal(reported.get("output_tokens", 0)) * PUBLISHED_USD_PER_MTOK["output"]
        ) / 1_000_000
        with self._bill_lock:
            self._billed += cost

    # --- hooks

    def authenticate(self, request: Request) -> Response | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return ApiError(
                401, "No API key was sent: authenticate with 'Authorization: Bearer <key>'.", code=None
            ).response()
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            return _bad_key(token).response()
        return None

    def decorate(self, request: Request, response: Response, elapsed_s: float) -> None:
        response.headers["x-request-id"] = f"req_{request.request_id}"
        response.headers["openai-processing-ms"] = str(max(1, round(elapsed_s * 1000)))
        response.headers["openai-version"] = "2020-10-01"
        response.headers.setdefault("content-type", "application/json")

    def render_internal_error(self, request: Request, exc: BaseException) -> Response:
        return ApiError(500, "The sandbox failed while handling the request.", type="server_error").response()

    def render_fault(self, fault: Fault, request: Request) -> Response:
        if fault.kind == "rate_limit":
            headers = {"x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "0"}
            wait = ""
            if fault.retry_after is not None:
                seconds = fault.retry_after
                headers["retry-after"] = str(int(seconds)) if seconds == int(seconds) else str(seconds)
                headers["retry-after-ms"] = str(round(seconds * 1000))
                headers["x-ratelimit-reset-requests"] = f"{seconds}s"
                wait = f" Please try again in {seconds}s."
            return ApiError(
                429,
                f"Rate limit reached for requests to {DEFAULT_MODEL}.{wait}",
                type="requests",
                code="rate_limit_exceeded",
                headers=headers,
            ).response()
        if fault.kind == "server_error":
            status = fault.status or 500
            message = (
                "The server is overloaded; try again later."
                if status == 503
                else "The server had an error while processing the request."
            )
            return ApiError(status, message, type="server_error").response()
        if fault.kind == "moderation":
            return ApiError(
                400,
                fault.message or "The request was rejected by the safety system.",
                type="image_generation_user_error",
                code="moderation_blocked",
            ).response()
        if fault.kind == "malformed":
            body = fault.body if fault.body is not None else b'{"created": 1713833628, "data": [{"b64_json": "iVBO'
            return Response(200, body, {"content-type": "application/json"})
        if fault.kind == "insufficient_credits":
            return ApiError(
                429,
                "You exceeded your current quota; check the plan and billing details.",
                type="insufficient_quota",
                code="insufficient_quota",
            ).response()
        if fault.kind == "invalid_request":
            message = fault.message or (f"Invalid value for '{fault.param}'." if fault.param else "Invalid request.")
            return ApiError(
                fault.status or 400, message, param=fault.param, code=fault.code or "invalid_value"
            ).response()
        if fault.kind == "auth":
            return _bad_key(self.api_key).response()
        if fault.kind == "broken_image" or fault.kind in HOSTILE_IMAGE_FAULTS:  # served and billed as usual,
            served = self.handle(request)  # but the image is not one, or a hostile one
            if served.status != 200:
                return served
            body = json.loads(served.body)
            image = b"\x89PNG\r\n\x1a\n not an image"
            if fault.kind in HOSTILE_IMAGE_FAULTS:
                image = hostile_image(fault.kind)
            for item in body["data"]:
                item["b64_json"] = base64.b64encode(image).decode()
            return Response.json(200, body)
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    # --- routes

    def handle(self, request: Request) -> Response:
        route = (request.method, request.path)
        if route == ("POST", "/v1/images/generations"):
            return self._generate(request)
        if route == ("POST", "/v1/images/edits"):
            return self._edit(request)
        if route == ("GET", "/v1/models"):
            return Response.json(200, {"object": "list", "data": [_model(m) for m in MODELS]})
        if request.method == "GET" and request.path.startswith("/v1/models/"):
            model = request.path.removeprefix("/v1/models/")
            if model not in MODELS:
                raise ApiError(
                    404, f"The model `{model}` does not exist or you do not have access to it.", code="model_not_found"
                )
            return Response.json(200, _model(model))
        raise ApiError(404, f"Invalid URL ({request.method} {request.path})")

    def _generate(self, request: Request) -> Response:
        if request.media_type != "application/json":
            raise ApiError(400, "Send the request body as JSON (Content-Type: application/json).")
        if request.body_error is not None or not isinstance(request.json, dict):
            raise ApiError(400, "The request body is not a JSON object.")
        params = _resolve(_check_fields(request.json, _GENERATION_FIELDS))
        images = [_generated(params.prompt, i, params) for i in range(params.n)]
        return self._images(params, images, usage(params))

    def _edit(self, request: Request) -> Response:
        if request.media_type == "application/json":
            return self._json_edit(request)
        if request.media_type != "multipart/form-data":
            raise ApiError(400, "Send image edits as multipart/form-data or as JSON (Content-Type: application/json).")
        if request.body_error is not None:
            raise ApiError(400, f"The multipart body could not be read: {request.body_error}.")
        for upload in request.uploads:
            if upload.name not in ("image", "image[]", "mask"):
                raise ApiError(
                    400,
                    f"Unrecognized request argument supplied: {upload.name}",
                    param=upload.name,
                    code="unknown_parameter",
                )
        body = _form_values(request)
        params = _resolve(_check_fields(body, _EDIT_FIELDS))
        uploads = request.uploads_named("image", "image[]")
        if not uploads:
            raise ApiError(
                400, "Missing required parameter: 'image'.", param="image", code="missing_required_parameter"
            )
        if len(uploads) > MAX_EDIT_IMAGES:
            raise ApiError(
                400,
                f"Invalid 'image': at most {MAX_EDIT_IMAGES} images, got {len(uploads)}.",
                param="image",
                code="too_many_images",
            )
        sources = [_open_image(u, what="image", formats=_INPUT_FORMATS, max_bytes=MAX_IMAGE_BYTES) for u in uploads]
        masks = request.uploads_named("mask")
        if len(masks) > 1:
            raise ApiError(400, "Invalid 'mask': send one mask.", param="mask", code="invalid_value")
        mask = _open_image(masks[0], what="mask", formats=("PNG",), max_bytes=MAX_MASK_BYTES) if masks else None
        return self._edited_images(params, sources, mask)

    def _json_edit(self, request: Request) -> Response:
        if request.body_error is not None or not isinstance(request.json, dict):
            raise ApiError(400, "The request body is not a JSON object.")
        values = _check_fields(request.json, _JSON_EDIT_FIELDS)
        refs: list[dict[str, str]] | None = values.pop("images", None)
        mask_ref: dict[str, str] | None = values.pop("mask", None)
        params = _resolve(values)
        if not refs:
            raise ApiError(
                400, "Missing required parameter: 'images'.", param="images", code="missing_required_parameter"
            )
        sources = [_referenced_image(r, what="images", formats=_INPUT_FORMATS, max_bytes=MAX_IMAGE_BYTES) for r in refs]
        mask = None
        if mask_ref is not None:
            mask = _referenced_image(mask_ref, what="mask", formats=("PNG",), max_bytes=MAX_MASK_BYTES)
        return self._edited_images(params, sources, mask)

    def _edited_images(self, params: _Params, sources: list[Image.Image], mask: Image.Image | None) -> Response:
        if mask is not None:
            if not _has_alpha(mask):
                raise ApiError(
                    400,
                    "Invalid 'mask': the PNG needs an alpha channel (alpha 0 marks the edit).",
                    param="mask",
                    code="invalid_value",
                )
            if mask.size != sources[0].size:
                raise ApiError(
                    400,
                    f"Invalid 'mask': {mask.width}x{mask.height} differs from the first image's "
                    f"{sources[0].width}x{sources[0].height}.",
                    param="mask",
                    code="invalid_value",
                )
        images = [_edited(params, i, sources[0], mask) for i in range(params.n)]
        return self._images(params, images, usage(params, [s.size for s in sources]), event="image_edit")

    def _images(self, params: _Params, images: list[bytes], billed: dict[str, Any],
                event: str = "image_generation") -> Response:
        reported = self.usage_override if self.usage_override is not None else billed
        if self.bill_multiplier != 1:
            reported = _scaled(reported, self.bill_multiplier)
        self._bill(reported)
        if params.stream:
            return _event_stream(params, images, reported, event)
        return Response.json(
            200,
            {
                "created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(data).decode()} for data in images],
                "background": params.background,
                "output_format": params.output_format,
                "size": f"{params.width}x{params.height}",
                "quality": params.quality,
                "usage": reported,
            },
        )


def _event_stream(params: _Params, images: list[bytes], reported: dict[str, Any], event: str) -> Response:
    """A ``stream: true`` answer as server-sent events: per image, ``partial_images`` blurred previews
    (``{event}.partial_image``, indices from 0) and then ``{event}.completed`` with the image and the
    usage (with several images, each completed event reports its share). Shapes: ImageGenPartialImageEvent /
    ImageGenCompletedEvent and the image_edit ones in tests/specs/openai.openapi.yaml."""
    common = {"created_at": int(time.time()), "size": f"{params.width}x{params.height}", "quality": params.quality,
              "background": params.background, "output_format": params.output_format}
    chunks: list[str] = []
    for data, share in zip(images, _shares(reported, len(images)), strict=True):
        for index in range(params.partial_images):
            partial = _blurred(data, params, radius=2 ** (params.partial_images - index + 2))
            chunks.append(_sse(f"{event}.partial_image", {"type": f"{event}.partial_image", **common,
                                                          "b64_json": base64.b64encode(partial).decode(),
                                                          "partial_image_index": index}))
        chunks.append(_sse(f"{event}.completed", {"type": f"{event}.completed", **common,
                                                  "b64_json": base64.b64encode(data).decode(), "usage": share}))
    return Response(200, "".join(chunks).encode(), {"content-type": "text/event-stream; charset=utf-8"})


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _blurred(data: bytes, params: _Params, radius: int) -> bytes:
    """A rough early version of an image: ``data`` blurred, in the request's format."""
    from PIL import ImageFilter

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rough = img.filter(ImageFilter.GaussianBlur(radius))
    return _encode(rough, params.output_format, params.output_compression, params.background == "transparent")


def _shares(reported: dict[str, Any], k: int) -> list[dict[str, Any]]:
    """``reported`` split into ``k`` usage objects of whole tokens that add up to it (the last takes the rest)."""
    if k == 1:
        return [reported]

    def part(value: dict[str, Any], last: bool) -> dict[str, Any]:
        return {key: part(v, last) if isinstance(v, dict) else (v - (k - 1) * (v // k) if last else v // k)
                for key, v in value.items()}

    return [part(reported, i == k - 1) for i in range(k)]


def _scaled(reported: dict[str, Any], k: int) -> dict[str, Any]:
    """A ``usage`` object with every token count multiplied by ``k``."""
    return {key: _scaled(value, k) if isinstance(value, dict) else value * k for key, value in reported.items()}


def _bad_key(sent: str) -> ApiError:
    shown = sent[: min(5, len(sent) // 2)]
    return ApiError(
        401, f"Incorrect API key provided: {shown}***. Check the key and try again.", code="invalid_api_key"
    )


def _model(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 1745000000, "owned_by": "system"}
