"""An OpenAI-compatible HTTP server over an :class:`~router.router.AsyncRouter` (``pip install 'imagerouter[server]'``).

Any OpenAI Images client can point its ``base_url`` at it; the router picks the backend::

    from router.server import create_app, serve
    app = create_app(router, keys=ServerKeys.from_file("keys.toml"))   # an ASGI app for any server
    serve("0.0.0.0", 8000, keys_file="keys.toml")                        # or run it with uvicorn

Endpoints (request and response bodies in OpenAI's shapes):

- ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (multipart: ``image``, optional
  ``mask`` — alpha 0 marks the area to repaint, as OpenAI's — and the same fields as text parts).
  ``size`` ``WxH`` becomes width/height, ``auto`` or none lets the backend choose. The answer is
  ``{"created", "data": [{"b64_json"}], "output_format", "size", "usage"?, "imagerouter": {...}}``:
  ``usage`` (OpenAI's token shape) only when the serving backend bills tokens; ``imagerouter`` holds the
  provider, model, cost, attempts and warnings. ``response_format: "url"`` is served as ``data:`` URLs:
  this server keeps no images to link to.
- The router's own fields ride along as extra body fields (JSON values; in multipart, JSON-encoded text):
  ``negative_prompt``, ``seed``, ``steps``, ``guidance_scale``, ``scheduler``, ``aspect_ratio``,
  ``size_mode``, ``strength``, ``init_image``, ``mask_image``, ``controls``, ``loras``, ``upscale``,
  ``provider``, ``constraints`` (or its fields flat: ``max_cost_usd``, ``residency``, …), ``tags``,
  ``idempotency_key``, ``deadline_s``, ``provider_options`` and ``policy`` (a preset name). Images in JSON
  are base64 or data URLs; server paths are never read, and http(s) URLs only with ``allow_image_urls``.
  OpenAI's vendor settings (``quality``, ``background``, ``output_compression``, ``moderation``,
  ``input_fidelity``, ``user``, ``style``, ``safety_identifier``) go into ``provider_options`` of every
  provider that declares them; with none, they are ignored with a warning. Unknown fields are a 400.
- ``model``: a model some provider offers pins it; ``provider/model`` pins both; a provider's name pins
  the provider; absent, ``""`` or ``auto`` routes freely. Any other name (``dall-e-3``) is routed by
  policy with an ``x-imagerouter-warning`` header, or refused with a 404 ``model_not_found`` when
  ``unknown_model="reject"``.
- ``GET /v1/models`` (and ``/v1/models/{id}``): every model the configured providers offer, ``owned_by``
  the provider's name; a model offered by two providers is listed again as ``provider/model``.
- ``POST /v1/route``: a generations body in, the routing decision out (``decision``, ``explain``); a dry
  run, nothing is called or charged.
- ``GET /healthz`` and ``GET /metrics`` (Prometheus text; see :mod:`router.metrics`) need no key unless
  ``protect_metrics=True``.

Answers carry ``x-imagerouter-request-id``, ``-provider``, ``-model``, ``-cost-usd`` (actual),
``-estimated-cost-usd``, ``-attempts`` and one ``x-imagerouter-warning`` per warning.

Authentication: with :class:`~router.keys.ServerKeys`, ``/v1/*`` needs ``Authorization: Bearer <key>``.
Each request is tagged ``key:<name>`` in the ledger (plus the key's own tags), and a key's budget is set
on that tag; a key's ``rpm`` caps its image requests per minute (429 ``rate_limit_exceeded`` with
``Retry-After`` beyond it). With no keys the app is open and logs a warning; :func:`serve` refuses to bind anything but
loopback without keys unless ``allow_open=True``.

Nothing blocks the event loop: a body or an answer over 256 KiB is parsed, decoded and encoded in a worker
thread, a slice at a time (inline images are never parsed by json or copied whole), and images are checked
from their headers; the pixels are decoded by the backend that needs them. Answers are sent as a series of
parts with a ``Content-Length``.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 invalid request (the
field in ``param``) or content policy, 401 missing or wrong key, 404 unknown route or model, 413 body or
image over its limit, 429 budget exceeded (code ``budget_exceeded``) or every provider rate limited,
502 every provider failed or a provider refused the server's credentials, 503 no provider can serve the
request (``no_route``), 504 deadline exceeded. Messages never carry a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException

from policies.policy import PRESETS
from router.errors import (
    AllProvidersFailed,
    AuthenticationError,
    BudgetExceeded,
    ContentPolicyError,
    DeadlineExceeded,
    ImageRouterError,
    InvalidRequestError,
    NoRouteError,
    RequestValidationError,
    redact,
)
from router.images import (
    MAX_IMAGE_BYTES,
    ImageDecodeError,
    b64decode,
    b64encode_parts,
    join_pieces,
    let_others_run,
)
from router.keys import TAG_PREFIX, RateLimiter, ServerKey, ServerKeys
from router.logs import install_redaction
from router.metrics import ServerMetrics
from router.request import Constraints, ImageRequest

if TYPE_CHECKING:
    from router.result import GenerationResult
    from router.router import AsyncRouter

log = install_redaction(logging.getLogger("imagerouter.server"))

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_BYTES = MAX_IMAGE_BYTES
_MAX_FIELD_BYTES = 1024 * 1024

_OPENAI_FIELDS = frozenset({"prompt", "model", "n", "size", "response_format", "output_format", "stream",
                            "partial_images"})
# OpenAI settings with no unified field: forwarded to every provider that declares the option.
_VENDOR_OPTIONS = ("quality", "background", "output_compression", "moderation", "input_fidelity", "user", "style",
                   "safety_identifier")
_REQUEST_FIELDS = frozenset({
    "negative_prompt", "seed", "steps", "guidance_scale", "scheduler", "aspect_ratio", "size_mode", "strength",
    "init_image", "mask_image", "controls", "loras", "upscale", "provider", "constraints", "tags",
    "idempotency_key", "deadline_s", "provider_options", "width", "height",
}) | frozenset(Constraints.model_fields)
_KNOWN_FIELDS = _OPENAI_FIELDS | _REQUEST_FIELDS | frozenset(_VENDOR_OPTIONS) | {"policy"}
_JSON_FORM_FIELDS = frozenset({"controls", "loras", "constraints", "provider_options", "tags", "residency",
                               "allow_providers", "deny_providers"})
_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
_PARAM_NAMES = {"width": "size", "height": "size", "init_image": "image", "mask_image": "mask"}
_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
_MAX_WARNING_HEADERS = 20
_MAX_FILES, _MAX_FIELDS = 4, 100

# Nothing blocks the event loop: a request body, or the images of an answer, up to _INLINE_BYTES is
# handled on the loop (microseconds); a larger one in a worker thread. There, JSON, multipart and
# base64 work on slices of at most _SLICE bytes per C call, so the thread hands the GIL back to the
# loop within a millisecond or two: a long string value (an inline image) is never parsed, copied or
# decoded whole in one call.
_INLINE_BYTES = 256 * 1024
_LONG_STRING = 64 * 1024
_SLICE = 256 * 1024
_YIELD_BYTES = 256 * 1024  # the loop runs other tasks after each 256 KiB of a body read or an answer sent


# --- errors ------------------------------------------------------------------------


class APIError(Exception):
    """An error answer in OpenAI's shape; ``error`` is the label counted in the metrics."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, error: str = "InvalidRequest", headers: Mapping[str, str] | None = None,
                 ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, redact(message), type, param, code
        self.error = error
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _too_large(what: str, limit: int, param: str | None = None) -> APIError:
    return APIError(413, f"{what} is over this server's limit of {limit} bytes.", param=param,
                    code="request_too_large" if param is None else "image_too_large", error="RequestTooLarge")


def api_error(exc: ImageRouterError) -> APIError:
    """The HTTP answer for a router error (see the module docstring for the statuses)."""
    headers = {"x-imagerouter-request-id": exc.request_id} if exc.request_id else {}
    kind = exc.kind
    if isinstance(exc, RequestValidationError):
        field_name = exc.field.split(".")[0]
        return APIError(400, exc.message, param=_PARAM_NAMES.get(field_name, exc.field), code="invalid_value",
                        error=kind, headers=headers)
    if isinstance(exc, BudgetExceeded):
        return APIError(429, exc.message, type="insufficient_quota", code="budget_exceeded", error=kind,
                        headers=headers)
    if isinstance(exc, NoRouteError):
        reasons = [r for r in exc.rejections if r.code != "not-configured"]
        if reasons and all(r.code == "budget" for r in reasons):
            return APIError(429, exc.message, type="insufficient_quota", code="budget_exceeded", error=kind,
                            headers=headers)
        return APIError(503, exc.message, type="server_error", code="no_route", error=kind, headers=headers)
    if isinstance(exc, AllProvidersFailed):
        failed = [a for a in exc.attempts if a.outcome == "error"]
        if failed and all(a.error == "RateLimited" for a in failed):
            return APIError(429, exc.message, type="requests", code="rate_limit_exceeded", error=kind,
                            headers=headers)
        return APIError(502, exc.message, type="server_error", code="all_providers_failed", error=kind,
                        headers=headers)
    if isinstance(exc, DeadlineExceeded):
        return APIError(504, exc.message, type="server_error", code="deadline_exceeded", error=kind, headers=headers)
    if isinstance(exc, AuthenticationError):  # the provider refused the server's credentials, not the client's
        return APIError(502, f"provider {exc.provider or '?'} refused this server's credentials", type="server_error",
                        code="upstream_authentication", error=kind, headers=headers)
    if isinstance(exc, ContentPolicyError):
        return APIError(400, exc.message, type="image_generation_user_error", code="content_policy_violation",
                        error=kind, headers=headers)
    if isinstance(exc, InvalidRequestError):
        return APIError(400, exc.message, code=exc.code or "invalid_request", error=kind, headers=headers)
    return APIError(500, exc.message, type="server_error", code=None, error=kind, headers=headers)


# --- request mapping -----------------------------------------------------------------


@dataclass
class _Parsed:
    request: ImageRequest
    policy: str | None
    response_format: Literal["b64_json", "url"]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Settings:
    max_body_bytes: int
    max_image_bytes: int
    unknown_model: Literal["route", "reject"]
    allow_image_urls: bool
    client_policies: frozenset[str]


def _client_image(value: Any, param: str, s: _Settings) -> bytes | str:
    """Image bytes from a base64 string or data URL sent by a client (never a server path).

    ``value`` is a str, or a :class:`_Span` of a large body; base64 is decoded in slices.
    """
    text: str | memoryview
    if isinstance(value, _Span):
        text = value.view()
        head = bytes(text[:8]).decode("ascii", "replace").lower()
        comma = value.body.find(b",", value.start, min(value.end, value.start + 1024)) - value.start
    elif isinstance(value, str):
        text, head, comma = value, value[:8].lower(), value.find(",", 0, 1024)
    else:
        raise APIError(400, f"'{param}' must be a base64 string or a data URL.", param=param, code="invalid_type")
    if head.startswith(("http://", "https://")):
        if s.allow_image_urls:
            return value.text() if isinstance(value, _Span) else value
        raise APIError(400, f"'{param}': this server does not fetch image URLs; send base64 or a data URL.",
                       param=param, code="invalid_value")
    start = 0
    if head.startswith("data:"):
        start = comma + 1 if comma >= 0 else len(text)
    if len(text) - start > s.max_image_bytes * 4 // 3 + 4:
        raise _too_large(f"'{param}'", s.max_image_bytes, param)
    try:
        return b64decode(text, start=start, what=param)
    except ImageDecodeError:
        raise APIError(400, f"'{param}' is not valid base64 or a data URL.", param=param,
                       code="invalid_value") from None


# --- large bodies, without holding the GIL for long ------------------------------------------


@dataclass(frozen=True, slots=True)
class _Span:
    """A long string value of a JSON body, left where it is: ``body[start:end]`` holds its characters
    (no escape among them). Image fields decode it from there; any other field gets :meth:`text`."""

    body: bytes
    start: int
    end: int

    def view(self) -> memoryview:
        return memoryview(self.body)[self.start:self.end]

    def text(self) -> str:
        """The string itself, as json.loads reads it (the rare long value that is not an image)."""
        return str(json.loads(self.body[self.start - 1:self.end + 1]))


def _find(body: bytes, char: bytes, start: int, end: int) -> int:
    """``body.find(char, start, end)``, scanning at most _SLICE bytes per call."""
    for pos in range(start, end, _SLICE):
        found = body.find(char, pos, min(pos + _SLICE, end))
        if found >= 0:
            return found
        let_others_run()
    return -1


def _loads(body: bytes) -> Any:
    """``json.loads(body)`` for a large body: string values longer than _LONG_STRING with no escape in
    them (inline images) are cut out and left in the body as :class:`_Span`; the rest is parsed at once.

    Outside strings JSON has no quote, so the unescaped quotes, in order, open and close its strings.
    """
    if b"\x00" in body[:4]:  # UTF-16/32: not worth the trouble
        return json.loads(body)
    nonce = secrets.token_hex(8)
    spans: dict[str, _Span] = {}
    skeleton: list[bytes] = []
    pos = copied = 0
    while (quote := _find(body, b'"', pos, len(body))) >= 0:
        close = quote
        while True:  # the closing quote: the next one that no backslash escapes
            close = _find(body, b'"', close + 1, len(body))
            if close < 0:
                return json.loads(body)  # unterminated: json says how
            first = close
            while body[first - 1] == 0x5C:
                first -= 1
            if (close - first) % 2 == 0:
                break
        if close - quote - 1 > _LONG_STRING and _find(body, b"\\", quote + 1, close) < 0:
            mark = f"\x00{nonce}:{len(spans)}"
            spans[mark] = _Span(body, quote + 1, close)
            skeleton += [body[copied:quote], json.dumps(mark).encode()]
            copied = close + 1
        pos = close + 1
    if not spans:
        return json.loads(body)
    skeleton.append(body[copied:])
    return _restore(json.loads(b"".join(skeleton)), spans, ())


def _restore(value: Any, spans: dict[str, _Span], path: tuple[Any, ...]) -> Any:
    """The parsed skeleton with its marks replaced: by the span in an image field, else by the string."""
    if isinstance(value, str):
        span = spans.get(value)
        if span is None:
            return value
        image = path in (("init_image",), ("mask_image",)) or (len(path) == 3 and path[0] == "controls"
                                                                and path[2] == "image")
        return span if image else span.text()
    if isinstance(value, dict):
        return {(spans[k].text() if k in spans else k): _restore(v, spans, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v, spans, (*path, i)) for i, v in enumerate(value)]
    return value


def _joined(chunks: list[bytes]) -> bytes:
    """The body's chunks in one bytes object (:func:`~router.images.join_pieces`: b"".join would hold
    the GIL for the whole copy). Empties ``chunks`` as it goes: freeing hundreds of chunks at once,
    on the loop, would stall it too."""
    return chunks[0] if len(chunks) == 1 else join_pieces(_consumed(chunks))


def _consumed(chunks: list[bytes]) -> Iterator[bytes]:
    """Each chunk in turn, dropped from the list once handed out (so it is freed here, bit by bit)."""
    for i in range(len(chunks)):
        chunk, chunks[i] = chunks[i], b""
        yield chunk


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = _loads(raw) if len(raw) > _INLINE_BYTES else json.loads(raw)
    except ValueError:
        raise APIError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return body


@dataclass(eq=False)
class _FilePart:
    """An uploaded file of a multipart body: its pieces, kept up to the image cap."""

    name: str
    size: int = 0
    pieces: list[bytes] = field(default_factory=list)


def _read_form(content_type: str, chunks: list[bytes], s: _Settings) -> list[tuple[str, str | _FilePart]]:
    """The parts of a multipart body in order: fields as text, files as :class:`_FilePart`.

    python-multipart is fed _SLICE bytes at a time; a file's bytes are kept only up to
    ``max_image_bytes`` (its size is still counted), a field's up to 1 MiB.
    """
    def fail(message: str) -> APIError:
        return APIError(400, f"The multipart body could not be read: {message}")

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise fail("Missing boundary in multipart.")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    items: list[tuple[str, str | _FilePart]] = []
    header = [b"", b""]
    part: dict[str, Any] = {}
    counts = {"files": 0, "fields": 0}

    def text(data: bytes) -> str:
        try:
            return data.decode(charset)
        except (UnicodeDecodeError, LookupError):
            return data.decode("latin-1")

    def on_part_begin() -> None:
        part.clear()
        part.update(disposition=b"", value=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        if header[0].lower() == b"content-disposition":
            part["disposition"] = header[1]
        header[0] = header[1] = b""

    def on_headers_finished() -> None:
        _, options = parse_options_header(part["disposition"])
        if b"name" not in options:
            raise fail('The Content-Disposition header field "name" must be provided.')
        name = text(options[b"name"])
        if b"filename" in options:
            counts["files"] += 1
            if counts["files"] > _MAX_FILES:
                raise fail(f"Too many files. Maximum number of files is {_MAX_FILES}.")
            part["value"] = _FilePart(name)
        else:
            counts["fields"] += 1
            if counts["fields"] > _MAX_FIELDS:
                raise fail(f"Too many fields. Maximum number of fields is {_MAX_FIELDS}.")
            part["value"] = bytearray()
        part["name"] = name

    def on_part_data(data: bytes, start: int, end: int) -> None:
        value = part["value"]
        if isinstance(value, _FilePart):
            value.size += end - start
            if value.size <= s.max_image_bytes:
                value.pieces.append(data[start:end])
        else:
            if len(value) + end - start > _MAX_FIELD_BYTES:
                raise fail(f"Part exceeded maximum size of {_MAX_FIELD_BYTES // 1024}KB.")
            value += data[start:end]

    def on_part_end() -> None:
        value = part["value"]
        items.append((part["name"], value if isinstance(value, _FilePart) else text(bytes(value))))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
    })
    try:
        for chunk in _consumed(chunks):
            for pos in range(0, len(chunk), _SLICE):
                parser.write(chunk[pos:pos + _SLICE] if len(chunk) > _SLICE else chunk)
                let_others_run()
        parser.finalize()
    except FormParserError:
        raise fail("Invalid multipart data.") from None
    return items


def _edit(content_type: str, chunks: list[bytes], router: AsyncRouter, key: ServerKey | None,
          s: _Settings) -> _Parsed:
    """The request of a multipart ``/v1/images/edits`` body (given as the chunks it arrived in)."""
    body: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for name, value in _read_form(content_type, chunks, s):
        if isinstance(value, _FilePart):
            param = {"image": "image", "image[]": "image", "mask": "mask"}.get(name)
            if param is None:
                raise APIError(400, f"Unrecognized file supplied: {name}", param=name, code="unknown_parameter")
            target = "init_image" if param == "image" else "mask_image"
            if target in files:
                raise APIError(400, f"Send one '{param}' file; this server edits one image at a time.",
                               param=param, code="invalid_value")
            if value.size > s.max_image_bytes:
                raise _too_large(f"'{param}'", s.max_image_bytes, param)
            files[target] = join_pieces(_consumed(value.pieces))
        elif name in ("image", "image[]", "mask", "init_image", "mask_image"):
            raise APIError(400, f"'{name}' must be uploaded as a file.", param=name, code="invalid_type")
        else:
            body[name] = _form_value(name, value)
    if "init_image" not in files:
        raise APIError(400, "Missing required parameter: 'image'.", param="image", code="missing_required_parameter")
    return _build(body, router, key, s, files)


def _resolve_model(model: Any, router: AsyncRouter, s: _Settings, kw: dict[str, Any], notes: list[str]) -> None:
    if model is None or model in ("", "auto"):
        return
    if not isinstance(model, str) or len(model) > 200:
        raise APIError(400, "'model' must be a model name.", param="model", code="invalid_type")
    providers = router.providers
    head, sep, tail = model.partition("/")
    if sep and head in providers and tail:
        if not providers[head].supports_model(tail):
            raise APIError(404, f"The model `{tail}` is not offered by provider {head}.", param="model",
                           code="model_not_found", error="ModelNotFound")
        kw.setdefault("provider", head)
        kw.setdefault("model", tail)
    elif any(p.supports_model(model) for p in providers.values()):
        kw.setdefault("model", model)
    elif model in providers:
        kw.setdefault("provider", model)
    elif s.unknown_model == "reject":
        raise APIError(404, f"The model `{model}` is not offered by this server; GET /v1/models lists them.",
                       param="model", code="model_not_found", error="ModelNotFound")
    else:
        notes.append(f"model {model} is not offered here; routed by policy")


def _build(body: Mapping[str, Any], router: AsyncRouter, key: ServerKey | None, s: _Settings,
           images: Mapping[str, bytes] | None = None) -> _Parsed:
    """The :class:`ImageRequest` (and server options) for an OpenAI-shaped body plus the router's fields."""
    for name in body:
        if name not in _KNOWN_FIELDS:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name,
                           code="unknown_parameter")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise APIError(400, "Missing required parameter: 'prompt'." if prompt is None else
                       "Invalid type for 'prompt': expected a string.", param="prompt",
                       code="missing_required_parameter" if prompt is None else "invalid_type")
    if body.get("stream") in (True, "true"):
        raise APIError(400, "Streaming is not supported by this server.", param="stream", code="unsupported_value")
    response_format: Literal["b64_json", "url"] = body.get("response_format") or "b64_json"
    if response_format not in ("b64_json", "url"):
        raise APIError(400, f"Invalid value: '{response_format}'. Supported values are: 'b64_json', 'url'.",
                       param="response_format", code="invalid_value")
    notes: list[str] = []
    kw: dict[str, Any] = {k: v for k, v in body.items() if k in _REQUEST_FIELDS and v is not None}

    size = body.get("size")
    if size not in (None, "", "auto"):
        match = _SIZE.match(size) if isinstance(size, str) else None
        if match is None:
            raise APIError(400, f"Invalid size '{size}': use 'auto' or 'WIDTHxHEIGHT'.", param="size",
                           code="invalid_value")
        if "width" in kw or "height" in kw or "aspect_ratio" in kw:
            raise APIError(400, "Give either 'size' or width/height/aspect_ratio, not both.", param="size",
                           code="invalid_value")
        kw["width"], kw["height"] = int(match[1]), int(match[2])
    for name in ("n", "output_format"):
        if body.get(name) is not None:
            kw[name] = body[name]
    _resolve_model(body.get("model"), router, s, kw, notes)

    given = kw.get("provider_options") or {}
    if not isinstance(given, dict):
        raise APIError(400, "'provider_options' must be an object keyed by provider name.", param="provider_options",
                       code="invalid_type")
    options = {k: dict(v) if isinstance(v, dict) else v for k, v in given.items()}
    for option in _VENDOR_OPTIONS:
        if body.get(option) is None:
            continue
        takers = [p.name for p in router.providers.values() if option in p.provider_option_names()]
        if not takers:
            notes.append(f"{option} ignored: no provider here takes it")
        for name in takers:
            if isinstance(options.setdefault(name, {}), dict):
                options[name].setdefault(option, body[option])
    if options:
        kw["provider_options"] = options

    for name in ("init_image", "mask_image"):
        if name in kw:
            kw[name] = _client_image(kw[name], name, s)
    if images:
        kw.update(images)
    if isinstance(kw.get("controls"), list):
        kw["controls"] = [
            {**c, "image": _client_image(c.get("image"), f"controls.{i}.image", s)} if isinstance(c, dict) else c
            for i, c in enumerate(kw["controls"])
        ]

    tags = kw.get("tags", ())
    tags = [tags] if isinstance(tags, str) else tags
    if not isinstance(tags, list | tuple | set | frozenset) or not all(isinstance(t, str) for t in tags):
        raise APIError(400, "'tags' must be a list of strings.", param="tags", code="invalid_type")
    if any(t.startswith(TAG_PREFIX) for t in tags):
        raise APIError(400, f"tags starting with '{TAG_PREFIX}' are set by the server from the API key.",
                       param="tags", code="invalid_value")
    if key is not None:
        tags = [*tags, key.tag, *key.tags]
    if tags:
        kw["tags"] = frozenset(tags)

    policy = body.get("policy")
    if policy is not None and (not isinstance(policy, str) or policy not in s.client_policies):
        allowed = ", ".join(sorted(s.client_policies)) or "none: the server's policy applies"
        raise APIError(400, f"Invalid 'policy': choose a preset this server allows ({allowed}).", param="policy",
                       code="invalid_value")
    try:
        request = ImageRequest.from_kwargs(prompt, **kw)
    except RequestValidationError:
        raise
    except (TypeError, ValueError) as exc:  # a wrongly typed nested value the validators did not expect
        raise APIError(400, f"invalid request: {type(exc).__name__}", code="invalid_type") from None
    return _Parsed(request, policy, response_format, notes)


def _form_value(name: str, text: str) -> Any:
    if name in _JSON_FORM_FIELDS and text[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except ValueError:
            raise APIError(400, f"'{name}' must be JSON.", param=name, code="invalid_value") from None
    return text


# --- responses ----------------------------------------------------------------------


def _header_text(text: str) -> str:
    return redact(text).encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")[:500]


def _headers(result: GenerationResult, notes: list[str]) -> list[tuple[str, str]]:
    headers = [
        ("x-imagerouter-request-id", result.request_id),
        ("x-imagerouter-provider", result.provider),
        ("x-imagerouter-model", result.model),
        ("x-imagerouter-cost-usd", str(result.cost.actual_usd)),
        ("x-imagerouter-estimated-cost-usd", str(result.cost.estimated_usd)),
        ("x-imagerouter-attempts", str(len(result.attempts))),
    ]
    warnings = [*notes, *result.warnings]
    headers += [("x-imagerouter-warning", _header_text(w)) for w in warnings[:_MAX_WARNING_HEADERS]]
    return headers


def _usage(result: GenerationResult) -> dict[str, Any] | None:
    details = result.cost.details
    if result.cost.unit != "tokens" or "output_tokens" not in details:
        return None
    text, image = int(details.get("text_input_tokens", 0)), int(details.get("image_input_tokens", 0))
    out = int(details["output_tokens"])
    return {"input_tokens": text + image, "input_tokens_details": {"text_tokens": text, "image_tokens": image},
            "output_tokens": out, "total_tokens": text + image + out}


def _images_body(result: GenerationResult, parsed: _Parsed, payloads: list[str]) -> dict[str, Any]:
    """The answer's JSON body, with ``payloads[i]`` where image i's base64 goes."""
    data = []
    for img, b64 in zip(result.images, payloads, strict=True):
        data.append({"url": f"data:{img.mime};base64,{b64}"} if parsed.response_format == "url" else {"b64_json": b64})
    first = result.images[0]
    body: dict[str, Any] = {
        "created": int(time.time()),
        "data": data,
        "output_format": _FORMATS.get(first.mime, "png"),
        "size": f"{first.width}x{first.height}",
    }
    usage = _usage(result)
    if usage is not None:
        body["usage"] = usage
    summary = result.to_dict()
    summary.pop("decision", None)
    summary["warnings"] = [*parsed.notes, *result.warnings]
    body["imagerouter"] = summary
    return body


def _answer_parts(result: GenerationResult, parsed: _Parsed) -> list[bytes]:
    """The answer's JSON body as consecutive byte strings: the JSON around the images rendered by
    json.dumps (with a mark where each image goes), each image's base64 converted in slices."""
    nonce = secrets.token_hex(8)
    marks = [f"\x00{nonce}:{i}" for i in range(len(result.images))]
    text = json.dumps(_images_body(result, parsed, marks), ensure_ascii=False, allow_nan=False, indent=None,
                      separators=(",", ":"))
    parts: list[bytes] = []
    pos = 0
    for mark, img in zip(marks, result.images, strict=True):
        token = json.dumps(mark)[1:-1]  # the mark as it reads inside the JSON text
        at = text.index(token, pos)
        parts.append(text[pos:at].encode())
        parts.extend(b64encode_parts(img.data))
        pos = at + len(token)
    parts.append(text[pos:].encode())
    return parts


class _JSONParts(Response):
    """A JSON answer sent as the consecutive byte strings it was rendered in, never joined into one."""

    media_type = "application/json"

    def __init__(self, parts: list[bytes], status_code: int = 200) -> None:
        self.parts = parts
        super().__init__(status_code=status_code)
        self.headers["content-length"] = str(sum(len(p) for p in parts))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        parts, self.parts = self.parts, []
        last, sent = len(parts) - 1, 0
        for i in range(len(parts)):
            part, parts[i] = parts[i], b""  # each part is freed once sent, not all together at the end
            await send({"type": "http.response.body", "body": part, "more_body": i < last})
            sent += len(part)
            if sent >= _YIELD_BYTES:  # let other tasks run while a large answer goes out
                sent = 0
                await asyncio.sleep(0)


# --- the app ------------------------------------------------------------------------


def _endpoint(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return path if path in _ENDPOINTS else "other"


_ENDPOINTS = frozenset({"/v1/images/generations", "/v1/images/edits", "/v1/models", "/v1/route", "/healthz",
                        "/metrics"})
_ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                    Awaitable[None]]


class _Observe:
    """ASGI middleware: counts every answer by endpoint and status and times it."""

    def __init__(self, app: _ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def observed_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.observe_request(_endpoint(scope["path"]), scope["method"], status,
                                         time.perf_counter() - start)


def create_app(
    router: AsyncRouter,
    *,
    keys: ServerKeys | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    unknown_model: Literal["route", "reject"] = "route",
    allow_image_urls: bool = False,
    client_policies: Collection[str] | None = None,
    protect_metrics: bool = False,
    metrics: ServerMetrics | None = None,
    close_router: bool = False,
) -> FastAPI:
    """The OpenAI-compatible ASGI app over ``router`` (see the module docstring for the API).

    ``keys``: client keys (None or empty: no authentication, with a warning); their budgets are set in
    ``router.ledger``. ``max_body_bytes`` caps a request body (checked on Content-Length before reading,
    and while reading), ``max_image_bytes`` each uploaded or inline image. ``unknown_model``: route a
    ``model`` no provider offers by policy, or refuse it. ``client_policies``: the presets a request may
    pick with ``policy`` (default: every preset when the router runs a preset, none when it runs a custom
    policy, so a policy file's rules cannot be side-stepped). ``close_router`` closes the router when the
    app shuts down.
    """
    keys = keys or ServerKeys()
    if keys:
        keys.apply_budgets(router.ledger)
    else:
        log.warning("imagerouter server: no client keys configured; every request is accepted")
    if client_policies is None:
        runs_preset = PRESETS.get(router.policy.name) is router.policy
        client_policies = frozenset(PRESETS) if runs_preset else frozenset()
    unknown = set(client_policies) - set(PRESETS)
    if unknown:
        raise ValueError(f"client_policies must be presets; unknown: {sorted(unknown)}")
    settings = _Settings(max_body_bytes, max_image_bytes, unknown_model, allow_image_urls, frozenset(client_policies))
    metrics = metrics or ServerMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_router:
            await router.aclose()

    app = FastAPI(title="imagerouter", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.router = router
    app.state.metrics = metrics
    app.add_middleware(_Observe, metrics=metrics)

    async def render_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        metrics.observe_error(exc.error)
        return exc.response()

    async def render_router_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ImageRouterError)
        return await render_api_error(request, api_error(exc))

    async def render_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        error = APIError(exc.status_code, f"Invalid URL ({request.method} {request.url.path})"
                         if exc.status_code in (404, 405) else str(exc.detail), error=f"HTTP{exc.status_code}")
        return await render_api_error(request, error)

    async def render_unexpected(request: Request, exc: Exception) -> Response:
        log.error("imagerouter server: unexpected %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
        return await render_api_error(request, APIError(500, "The server failed while handling the request.",
                                                        type="server_error", error=type(exc).__name__))

    app.add_exception_handler(APIError, render_api_error)
    app.add_exception_handler(ImageRouterError, render_router_error)
    app.add_exception_handler(StarletteHTTPException, render_http_error)
    app.add_exception_handler(Exception, render_unexpected)

    def authenticate(request: Request) -> ServerKey | None:
        if not keys:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "You didn't provide an API key: send 'Authorization: Bearer <key>'.",
                           error="MissingAPIKey")
        entry = keys.verify(token)
        if entry is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", error="InvalidAPIKey")
        return entry

    async def read_body(request: Request) -> list[bytes]:
        """The body as the chunks it arrived in (joining them is left to whoever reads it, off the loop
        when it is large)."""
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise APIError(400, "Invalid Content-Length header.")
            if int(length) > settings.max_body_bytes:
                raise _too_large("The request body", settings.max_body_bytes)
        chunks: list[bytes] = []
        total, pause = 0, _YIELD_BYTES
        async for chunk in request.stream():
            total += len(chunk)
            if total > settings.max_body_bytes:
                raise _too_large("The request body", settings.max_body_bytes)
            if chunk:
                chunks.append(chunk)
            if total >= pause:  # a body already buffered arrives without a pause: make one
                pause += _YIELD_BYTES
                await asyncio.sleep(0)
        return chunks

    async def parse_json(request: Request, key: ServerKey | None) -> _Parsed:
        chunks = await read_body(request)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise APIError(400, "Send the request body as JSON (Content-Type: application/json).")
        if sum(len(c) for c in chunks) <= _INLINE_BYTES:
            return _build(_json_object(b"".join(chunks)), router, key, settings)
        return await asyncio.to_thread(lambda: _build(_json_object(_joined(chunks)), router, key, settings))

    async def generate(parsed: _Parsed) -> Response:
        result = await router.agenerate(parsed.request, policy=parsed.policy)
        metrics.observe_generation(result.provider, result.model, len(result.images), result.cost.actual_usd)
        if sum(len(img.data) for img in result.images) <= _INLINE_BYTES:
            parts = _answer_parts(result, parsed)
        else:
            parts = await asyncio.to_thread(_answer_parts, result, parsed)
        response = _JSONParts(parts)
        for name, value in _headers(result, parsed.notes):
            response.headers.append(name, value)
        return response

    limiter = RateLimiter()

    def within_rate(key: ServerKey | None) -> None:
        if key is None or key.rpm is None:
            return
        wait = limiter.take(key.name, key.rpm)
        if wait:
            raise APIError(429, f"Rate limit reached for key {key.name!r}: {key.rpm} image requests per minute; "
                                f"retry in {wait:.1f}s.", type="requests", code="rate_limit_exceeded",
                           error="RateLimited", headers={"retry-after": str(max(1, math.ceil(wait)))})

    @app.post("/v1/images/generations")
    async def images_generations(request: Request) -> Response:
        key = authenticate(request)
        within_rate(key)
        return await generate(await parse_json(request, key))

    @app.post("/v1/images/edits")
    async def images_edits(request: Request) -> Response:
        key = authenticate(request)
        within_rate(key)
        chunks = await read_body(request)
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "multipart/form-data":
            raise APIError(400, "Send image edits as multipart/form-data.")
        if sum(len(c) for c in chunks) <= _INLINE_BYTES:
            return await generate(_edit(content_type, chunks, router, key, settings))
        return await generate(await asyncio.to_thread(_edit, content_type, chunks, router, key, settings))

    @app.post("/v1/route")
    async def route(request: Request) -> Response:
        key = authenticate(request)
        parsed = await parse_json(request, key)
        # a thread: a file ledger's headroom may wait on another process's write lock
        decision = await asyncio.to_thread(router.route, parsed.request, policy=parsed.policy,
                                             assume_configured=False)  # what this server can serve
        return JSONResponse({"object": "route", "decision": decision.to_dict(), "explain": decision.explain(),
                             "warnings": parsed.notes})

    def model_list() -> list[dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for provider in router.providers.values():
            if provider.configuration_problem() is not None:
                continue
            for model in provider.models():
                ident = model if model not in out else f"{provider.name}/{model}"
                out[ident] = {"id": ident, "object": "model", "created": 0, "owned_by": provider.name}
        return list(out.values())

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authenticate(request)
        return JSONResponse({"object": "list", "data": model_list()})

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> Response:
        authenticate(request)
        for entry in model_list():
            if entry["id"] == model:
                return JSONResponse(entry)
        raise APIError(404, f"The model `{model}` does not exist or is not offered here.", code="model_not_found",
                       error="ModelNotFound")

    @app.get("/healthz")
    async def healthz() -> Response:
        providers = {
            p.name: {"configured": p.configuration_problem() is None,
                     "circuit_open": not router.breaker.available(p.name)}
            for p in router.providers.values()
        }
        return JSONResponse({"status": "ok", "providers": providers})

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> Response:
        if protect_metrics:
            authenticate(request)
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


# --- running it -----------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    policy: str | Path | None = None,
    ledger: str | Path | None = None,
    keys_file: str | Path | None = None,
    allow_open: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    unknown_model: Literal["route", "reject"] = "route",
    log_level: str = "info",
) -> None:
    """Run the server with uvicorn until interrupted (the ``imagerouter serve`` command).

    Providers come from the environment (:func:`router.config.router_kwargs_from_env`); ``policy`` (a
    preset or a policy file) and ``ledger`` (a path or ``":memory:"``) override ``IMAGEROUTER_POLICY`` and
    ``IMAGEROUTER_LEDGER``. ``keys_file`` (default: ``IMAGEROUTER_SERVER_KEYS``) is a key file
    (:mod:`router.keys`). Without keys, only a loopback ``host`` is served unless ``allow_open=True``.
    """
    import uvicorn

    from router.router import AsyncRouter

    keys_path = keys_file or os.environ.get("IMAGEROUTER_SERVER_KEYS") or None
    keys = ServerKeys.from_file(keys_path) if keys_path else ServerKeys()
    if not keys and not _is_loopback(host) and not allow_open:
        raise ValueError(f"refusing to serve on {host} without client keys: give keys_file "
                         "(python -m router.keys NAME --file keys.toml), or allow_open=True")
    overrides: dict[str, Any] = {}
    if policy is not None:
        overrides["policy"] = policy
    if ledger is not None:
        overrides["ledger"] = ledger
    router = AsyncRouter.from_env(**overrides)
    app = create_app(router, keys=keys, max_body_bytes=max_body_bytes, max_image_bytes=max_image_bytes,
                     unknown_model=unknown_model, close_router=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class ServerThread:
    """An ASGI app served by uvicorn from a background thread, for tests, examples and notebooks.

    ``with ServerThread(app) as server: openai.OpenAI(base_url=server.base_url, ...)``; ``port=0`` picks a
    free port.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> None:
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The root an OpenAI client takes as ``base_url``."""
        return f"{self.origin}/v1"

    def start(self, timeout_s: float = 10.0) -> ServerThread:
        import uvicorn

        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, access_log=False, lifespan="on")
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="imagerouter-server",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_IMAGE_BYTES", "APIError", "ServerThread", "api_error",
           "create_app", "serve"]
