"""An OpenAI-compatible HTTP server over an :class:`~router.router.AsyncRouter` (``pip install 'pixroute[server]'``).

Any OpenAI Images client can point its ``base_url`` at it; the router picks the backend::

    from router.server import create_app, serve
    app = create_app(router, keys=ServerKeys.from_file("keys.toml"))   # an ASGI app for any server
    serve("0.0.0.0", 8000, keys_file="keys.toml")                        # or run it with uvicorn

Endpoints (request and response bodies in OpenAI's shapes; the schema is served at ``/openapi.json``,
readable at ``/docs``):

- ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits`` (multipart: ``image``, optional
  ``mask`` — alpha 0 marks the area to repaint, as OpenAI's — and the same fields as text parts).
  ``size`` ``WxH`` becomes width/height, ``auto`` or none lets the backend choose. The answer is
  ``{"created", "data": [{"b64_json"}], "output_format", "size", "usage"?, "imagerouter": {...}}``:
  ``usage`` (OpenAI's token shape) only when the serving backend bills tokens; ``imagerouter`` holds the
  provider, model, cost, attempts and warnings. ``response_format: "url"`` is served as ``data:`` URLs:
  this server keeps no images to link to. ``n`` and ``partial_images`` must be JSON integers, ``stream``
  a JSON boolean (``n: "2"`` and ``n: true`` are refused); in multipart they are the usual text.
  ``stream: true`` answers with server-sent events in OpenAI's image-streaming shape (:mod:`router.sse`):
  ``partial_images`` previews from backends that make them, then the completed images.
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
``Retry-After`` beyond it). With no keys the app is open and logs a warning; :func:`serve` refuses to bind
anything but loopback without keys unless ``allow_open=True``, and refuses a key file that group or others
may write.

What the operator decides, not the client:

- Provider options: a client sets only those its key's allow-list grants (``provider_options`` in the key
  file; else the server's ``client_options``, ``*`` by default: every option). The safety switches
  (:data:`~router.keys.SAFETY_OPTIONS`: ``safety_checker``, ``disable_safety_checker``,
  ``safety_tolerance``, ``moderation``) are granted only by name in a key's own list; anything else is a
  403 ``option_not_allowed``.
- LoRAs: a client names one (``{"ref": "film-grain", "weight": 0.8}``) and the server finds
  ``film-grain.safetensors`` (or a directory ``film-grain/`` holding one) in the directories the operator
  lists (``lora_dirs``, ``--lora-dir``), never outside them (links out of them are not followed). Paths,
  ``~`` and ``..`` are refused, and every miss has the same answer, so the answers tell nothing about the
  server's files.

Memory is bounded: a body is streamed and counted against ``max_body_bytes`` (FastAPI's ``max_body_size``: a
413; a ``Content-Length`` over it is refused before anything is read, with Starlette's plain-text 413
``Content Too Large``); the bodies of requests in flight together hold at most
``max_inflight_body_bytes`` (default: one maximal body), reserved from ``Content-Length`` (or the whole body
cap when there is none) for the request's whole life, first come first served; a request that waits longer
than ``body_wait_s`` for room is a 503 ``server_busy`` with ``Retry-After``. Multipart bodies go through
Starlette's parser with its limits (files, fields, 1 MiB a text field; files spool to disk past 1 MiB).

Nothing blocks the event loop: a body or an answer over 256 KiB is parsed, decoded and encoded in a worker
thread, a slice at a time (inline images are never parsed by json or copied whole), and images are checked
from their headers; the pixels are decoded by the backend that needs them. Answers are sent as a series of
parts with a ``Content-Length``.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 invalid request (the
field in ``param``), content policy, or no provider can serve the request (``no_route``, with every
candidate's ``rejections``), 401 missing or wrong key, 403 a provider option the key may not set, 404
unknown route or model, 413 body or image over its limit, 429 budget exceeded (code ``budget_exceeded``)
or rate limited, 502 every provider failed or a provider refused the server's credentials, 503 the server
is busy (bodies in flight), 504 deadline exceeded. Messages never carry a secret.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import json
import logging
import math
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, WithJsonSchema
from pydantic.json_schema import models_json_schema
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from policies.policy import PRESETS
from router import sse
from router.errors import (
    AllProvidersFailed,
    AuthenticationError,
    BudgetExceeded,
    ConfigurationError,
    ContentPolicyError,
    DeadlineExceeded,
    ImageRouterError,
    InsufficientCredits,
    InvalidRequestError,
    MalformedResponse,
    NoRouteError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    RequestValidationError,
    redact,
)
from router.fetch import is_loopback_host
from router.images import (
    MAX_IMAGE_BYTES,
    ImageDecodeError,
    b64decode,
    b64encode_parts,
    join_pieces,
    let_others_run,
)
from router.keys import TAG_PREFIX, ServerKey, ServerKeys, is_safety_option, option_allowed, option_entries
from router.logs import install_redaction
from router.metrics import ServerMetrics
from router.progress import Completed, PartialImage
from router.request import Constraints, ImageRequest, QualityFloor

if TYPE_CHECKING:
    from router.jobs import JobQueue
    from router.result import GenerationResult
    from router.router import AsyncRouter

log = install_redaction(logging.getLogger("imagerouter.server"))

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_BYTES = MAX_IMAGE_BYTES
DEFAULT_BODY_WAIT_S = 30.0
DEFAULT_CLIENT_OPTIONS: tuple[str, ...] = ("*",)
_MAX_FIELD_BYTES = 1024 * 1024

# OpenAI settings with no unified field: forwarded to every provider that declares the option.
_VENDOR_OPTIONS = (
    "quality",
    "background",
    "output_compression",
    "moderation",
    "input_fidelity",
    "user",
    "style",
    "safety_identifier",
)
_REQUEST_FIELDS = frozenset(
    {
        "negative_prompt",
        "seed",
        "steps",
        "guidance_scale",
        "scheduler",
        "aspect_ratio",
        "size_mode",
        "strength",
        "upscale",
        "provider",
        "idempotency_key",
        "deadline_s",
        "width",
        "height",
        "n",
        "output_format",
    }
) | frozenset(Constraints.model_fields)
# multipart text parts holding JSON; and the strictly typed fields, whose multipart text is read as JSON
_JSON_FORM_FIELDS = frozenset(
    {"controls", "loras", "constraints", "provider_options", "tags", "residency", "allow_providers", "deny_providers"}
)
_SCALAR_FORM_FIELDS = frozenset({"n", "partial_images", "stream", "output_compression"})
_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
_PARAM_NAMES = {"width": "size", "height": "size", "init_image": "image", "mask_image": "mask"}
_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
_MAX_WARNING_HEADERS = 20
_MAX_FILES, _MAX_FIELDS = 4, 100
_LORA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_LORA_MISS = (
    "No LoRA by that name is offered by this server: give the bare name of a LoRA its operator provides (no path)."
)

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
    """An error answer in OpenAI's shape; ``error`` is the label counted in the metrics, ``extra`` more
    fields of the error object (``rejections`` of a no-route answer)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        error: str = "InvalidRequest",
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, redact(message), type, param, code
        self.error = error
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def response(self) -> JSONResponse:
        body = {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code, **self.extra}
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _too_large(what: str, limit: int, param: str | None = None) -> APIError:
    return APIError(
        413,
        f"{what} is over this server's limit of {limit} bytes.",
        param=param,
        code="request_too_large" if param is None else "image_too_large",
        error="RequestTooLarge",
    )


def _rejections(exc: NoRouteError) -> list[dict[str, str]]:
    """Why each candidate was refused (providers this server has no credentials for left out)."""
    return [
        {"provider": r.provider, "model": r.model, "code": r.code, "reason": redact(r.reason)}
        for r in exc.rejections
        if r.code != "not-configured"
    ]


def api_error(exc: ImageRouterError) -> APIError:
    """The HTTP answer for a router error (see the module docstring for the statuses)."""
    headers = {"x-imagerouter-request-id": exc.request_id} if exc.request_id else {}
    if exc.cost_usd:  # vendors billed failed attempts of this request: the client is told what it was charged
        headers["x-imagerouter-cost-usd"] = str(exc.cost_usd)
    kind = exc.kind
    if isinstance(exc, RequestValidationError):
        field_name = exc.field.split(".")[0]
        return APIError(
            400,
            exc.message,
            param=_PARAM_NAMES.get(field_name, exc.field),
            code="invalid_value",
            error=kind,
            headers=headers,
        )
    if isinstance(exc, BudgetExceeded):
        return APIError(
            429, exc.message, type="insufficient_quota", code="budget_exceeded", error=kind, headers=headers
        )
    if isinstance(exc, NoRouteError):
        rejections = _rejections(exc)
        if rejections and all(r["code"] == "budget" for r in rejections):
            return APIError(
                429, exc.message, type="insufficient_quota", code="budget_exceeded", error=kind, headers=headers
            )
        return APIError(
            400, exc.message, code="no_route", error=kind, headers=headers, extra={"rejections": rejections}
        )
    if isinstance(exc, AllProvidersFailed):
        failed = [a for a in exc.attempts if a.outcome == "error"]
        if failed and all(a.error == "RateLimited" for a in failed):
            return APIError(429, exc.message, type="requests", code="rate_limit_exceeded", error=kind, headers=headers)
        return APIError(502, exc.message, type="server_error", code="all_providers_failed", error=kind, headers=headers)
    if isinstance(exc, DeadlineExceeded):
        return APIError(504, exc.message, type="server_error", code="deadline_exceeded", error=kind, headers=headers)
    if isinstance(exc, AuthenticationError):  # the provider refused the server's credentials, not the client's
        return APIError(
            502,
            f"provider {exc.provider or '?'} refused this server's credentials",
            type="server_error",
            code="upstream_authentication",
            error=kind,
            headers=headers,
        )
    if isinstance(exc, ContentPolicyError):
        return APIError(
            400,
            exc.message,
            type="image_generation_user_error",
            code="content_policy_violation",
            error=kind,
            headers=headers,
        )
    if isinstance(exc, InvalidRequestError):
        return APIError(400, exc.message, code=exc.code or "invalid_request", error=kind, headers=headers)
    if isinstance(exc, RateLimited):
        return APIError(429, exc.message, type="requests", code="rate_limit_exceeded", error=kind, headers=headers)
    if isinstance(exc, ProviderUnavailable | ProviderTimeout | MalformedResponse | InsufficientCredits):
        return APIError(502, exc.message, type="server_error", code="upstream_error", error=kind, headers=headers)
    return APIError(500, exc.message, type="server_error", code=None, error=kind, headers=headers)


def _invalid(exc: pydantic.ValidationError, prefix: str = "") -> APIError:
    """A 400 for the first problem pydantic found in a body (the field in ``param``)."""
    problems = exc.errors(include_url=False, include_input=False, include_context=False)
    first = problems[0]
    where = ".".join(str(p) for p in first["loc"])
    param = prefix + where if where else None
    kind = first["type"]
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    more = f" ({len(problems) - 1} more problem(s) in this body)" if len(problems) > 1 else ""
    if kind in ("value_error", "assertion_error"):
        message = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return APIError(400, f"{message}{more}", param=param, code="invalid_value")
    typed = kind.endswith(("_type", "_parsing")) or kind in ("is_instance_of", "model_attributes_type")
    what = "type" if typed else "value"
    return APIError(
        400,
        f"Invalid {what} for '{param}': {first['msg']}.{more}",
        param=param,
        code="invalid_type" if typed else "invalid_value",
    )


# --- request and response models (the OpenAPI schema) -------------------------------------


def _image_text(value: Any) -> Any:
    if value is None or isinstance(value, str | _Span):
        return value
    raise ValueError("expected a base64 string or a data URL")


ClientImage = Annotated[
    Any,
    AfterValidator(_image_text),
    WithJsonSchema(
        {"type": "string", "description": "base64 or a data: URL (an http(s) URL only where the server allows them)"}
    ),
]


def _valid_size(value: str | None) -> str | None:
    if value in (None, "", "auto"):
        return None
    assert value is not None
    if not _SIZE.match(value):
        raise ValueError(f"Invalid size '{value[:40]}': use 'auto' or 'WIDTHxHEIGHT'.")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ControlBody(_Body):
    """A ControlNet condition: its kind and image, and how strongly and when it applies."""

    kind: str
    image: ClientImage
    scale: float | None = None
    start: float | None = None
    end: float | None = None
    preprocess: bool | None = None


class LoraBody(_Body):
    """A LoRA by the name the server offers it under (never a path), and its weight."""

    ref: str = Field(min_length=1, max_length=200, description="the bare name of a LoRA this server offers")
    weight: float | None = None


class ImageGenerationRequest(_Body):
    """``POST /v1/images/generations`` and ``/v1/route``: OpenAI's fields, then the router's."""

    prompt: str
    model: str | None = Field(None, max_length=200, description="a model, provider/model, a provider, or auto")
    n: StrictInt | None = Field(None, ge=1, le=16)
    size: Annotated[str | None, AfterValidator(_valid_size)] = Field(None, description="WIDTHxHEIGHT or auto")
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    stream: StrictBool | None = Field(None, description="answer with server-sent events (OpenAI's image streaming)")
    partial_images: StrictInt | None = Field(None, ge=0, le=3, description="previews to stream (with stream=true) "
                                             "from backends that make them")
    stream_events: StrictBool | None = Field(None, description="with stream=true, also send every progress event "
                                             "(routing, attempts, vendor status, steps) as pixroute.<kind> events")
    # OpenAI's vendor settings, forwarded to the providers that declare them
    quality: str | None = None
    background: str | None = None
    output_compression: int | None = None
    moderation: str | None = None
    input_fidelity: str | None = None
    user: str | None = None
    style: str | None = None
    safety_identifier: str | None = None
    # the router's own fields (see router.request.ImageRequest)
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    aspect_ratio: str | None = None
    size_mode: Literal["adapt", "exact"] | None = None
    width: int | None = None
    height: int | None = None
    strength: float | None = None
    init_image: ClientImage = None
    mask_image: ClientImage = None
    controls: list[ControlBody] | None = None
    loras: list[LoraBody] | None = None
    upscale: float | None = None
    provider: str | None = None
    constraints: Constraints | None = None
    max_cost_usd: Decimal | None = None
    max_latency_s: float | None = None
    residency: list[str] | str | None = None
    allow_providers: list[str] | str | None = None
    deny_providers: list[str] | str | None = None
    quality_floor: QualityFloor | None = None
    strict: bool | None = None
    tags: list[str] | str | None = None
    idempotency_key: str | None = None
    deadline_s: float | None = None
    provider_options: dict[str, dict[str, Any]] | None = Field(
        None, description="settings keyed by provider name; a key sets only those its allow-list grants"
    )
    policy: str | None = Field(None, description="a preset the server lets clients pick")


class ImageEditRequest(ImageGenerationRequest):
    """``POST /v1/images/edits`` (multipart): the image and optional mask as files, the rest as text parts
    (JSON-encoded for objects and lists)."""

    image: bytes
    mask: bytes | None = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = Field(None, description="a data: URL")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str
    size: str
    usage: dict[str, Any] | None = None
    imagerouter: dict[str, Any] = Field(description="provider, model, cost, attempts and warnings")


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None
    rejections: list[dict[str, str]] | None = Field(None, description="no_route: why each candidate was refused")


class ErrorResponse(BaseModel):
    error: ErrorObject


class RouteResponse(BaseModel):
    object: Literal["route"] = "route"
    decision: dict[str, Any]
    explain: str
    warnings: list[str]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in (
        (400, "invalid request, content policy, or no provider can serve it (no_route)"),
        (401, "missing or wrong API key"),
        (403, "a provider option this key may not set"),
        (404, "unknown model"),
        (413, "body or image over its limit"),
        (429, "budget exceeded or rate limited"),
        (502, "every provider failed"),
        (503, "the server is busy (request bodies in flight)"),
        (504, "deadline exceeded"),
    )
}


def _request_schema(model: type[BaseModel], media: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {media: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


# --- request mapping -----------------------------------------------------------------


@dataclass
class _Parsed:
    request: ImageRequest
    policy: str | None
    response_format: Literal["b64_json", "url"]
    notes: list[str] = field(default_factory=list)
    lora_names: dict[str, str] = field(default_factory=dict)
    """resolved path -> the name the client gave, to put back into error messages."""
    stream: bool = False
    stream_events: bool = False


@dataclass(frozen=True)
class _Settings:
    max_body_bytes: int
    max_image_bytes: int
    unknown_model: Literal["route", "reject"]
    allow_image_urls: bool
    client_policies: frozenset[str]
    client_options: frozenset[str] = frozenset(DEFAULT_CLIENT_OPTIONS)
    lora_dirs: tuple[Path, ...] = ()


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
        raise APIError(
            400,
            f"'{param}': this server does not fetch image URLs; send base64 or a data URL.",
            param=param,
            code="invalid_value",
        )
    start = 0
    if head.startswith("data:"):
        start = comma + 1 if comma >= 0 else len(text)
    if len(text) - start > s.max_image_bytes * 4 // 3 + 4:
        raise _too_large(f"'{param}'", s.max_image_bytes, param)
    try:
        return b64decode(text, start=start, what=param)
    except ImageDecodeError:
        raise APIError(
            400, f"'{param}' is not valid base64 or a data URL.", param=param, code="invalid_value"
        ) from None


def _lora_file(name: str, dirs: Sequence[Path]) -> Path | None:
    """The ``.safetensors`` file a client's LoRA name stands for, inside one of ``dirs`` (resolved
    paths), or None. A name is never a path: separators, ``~``, ``..`` and leading dots are misses, and
    a link leading out of the directory is not followed."""
    if not _LORA_NAME.match(name) or ".." in name:
        return None
    stem = name.removesuffix(".safetensors")
    for root in dirs:
        for candidate in (root / f"{stem}.safetensors", root / stem):
            try:
                real = Path(os.path.realpath(candidate))
                if not real.is_relative_to(root):
                    continue
                if real.is_dir():
                    files = sorted(p for p in real.glob("*.safetensors") if p.is_file())
                    preferred = [p for p in files if p.name == "pytorch_lora_weights.safetensors"]
                    if not preferred and len(files) != 1:
                        continue
                    real = Path(os.path.realpath((preferred or files)[0]))
                    if not real.is_relative_to(root):
                        continue
                if real.suffix == ".safetensors" and real.is_file():
                    return real
            except (OSError, ValueError):
                continue
    return None


def _check_options(
    options: Mapping[str, Mapping[str, Any]], top_level: Collection[str], key: ServerKey | None, s: _Settings
) -> None:
    """Refuse (403) a provider option the key's allow-list (or the server's default) does not grant."""
    allowed = s.client_options if key is None or key.provider_options is None else key.provider_options
    for provider, settings in options.items():
        for option in settings:
            if option_allowed(allowed, provider, option):
                continue
            param = option if option in top_level else f"provider_options.{provider}.{option}"
            who = f"key {key.name!r}" if key is not None else "this server's clients"
            if is_safety_option(option):
                message = (
                    f"'{param}' is a safety setting: only this server's operator decides it "
                    f"({who} is not allowed to change it). Leave it out."
                )
            else:
                message = (
                    f"'{param}' is not a provider option {who} may set; leave it out, or ask the operator "
                    "to allow it for your key."
                )
            raise APIError(403, message, param=param, code="option_not_allowed", error="OptionNotAllowed")


def _build(
    body: Mapping[str, Any],
    router: AsyncRouter,
    key: ServerKey | None,
    s: _Settings,
    images: Mapping[str, bytes] | None = None,
) -> _Parsed:
    """The :class:`ImageRequest` (and server options) for an OpenAI-shaped body plus the router's fields."""
    try:
        req = ImageGenerationRequest.model_validate(body)
    except pydantic.ValidationError as exc:
        raise _invalid(exc) from None
    notes: list[str] = []
    kw: dict[str, Any] = {k: v for k in _REQUEST_FIELDS if (v := getattr(req, k)) is not None}
    if req.partial_images and req.stream:
        kw["partial_images"] = req.partial_images
    elif req.partial_images:
        notes.append("partial_images ignored: they are sent only with stream=true")
    if req.constraints is not None:
        kw["constraints"] = req.constraints

    if req.size is not None:
        if "width" in kw or "height" in kw or "aspect_ratio" in kw:
            raise APIError(
                400, "Give either 'size' or width/height/aspect_ratio, not both.", param="size", code="invalid_value"
            )
        match = _SIZE.match(req.size)
        assert match is not None
        kw["width"], kw["height"] = int(match[1]), int(match[2])
    _resolve_model(req.model, router, s, kw, notes)

    options = {name: dict(settings) for name, settings in (req.provider_options or {}).items()}
    top_level = [option for option in _VENDOR_OPTIONS if getattr(req, option) is not None]
    for option in top_level:
        takers = [p.name for p in router.providers.values() if option in p.provider_option_names()]
        if not takers:
            options.setdefault("*", {})[option] = getattr(req, option)  # checked below, then dropped
            notes.append(f"{option} ignored: no provider here takes it")
        for name in takers:
            options.setdefault(name, {}).setdefault(option, getattr(req, option))
    _check_options(options, top_level, key, s)
    options.pop("*", None)
    if options:
        kw["provider_options"] = options

    lora_names: dict[str, str] = {}
    if req.loras:
        loras = []
        for i, lora in enumerate(req.loras):
            path = _lora_file(lora.ref, s.lora_dirs)
            if path is None:
                raise APIError(400, _LORA_MISS, param=f"loras.{i}.ref", code="lora_not_found")
            lora_names[str(path)] = lora.ref
            loras.append({"ref": str(path), **({} if lora.weight is None else {"weight": lora.weight})})
        kw["loras"] = loras

    for name in ("init_image", "mask_image"):  # the costly part last
        value = getattr(req, name)
        if value is not None:
            kw[name] = _client_image(value, name, s)
    if images:
        kw.update(images)
    if req.controls:
        kw["controls"] = [
            {
                **c.model_dump(exclude={"image"}, exclude_none=True),
                "image": _client_image(c.image, f"controls.{i}.image", s),
            }
            for i, c in enumerate(req.controls)
        ]

    tags = [req.tags] if isinstance(req.tags, str) else list(req.tags or ())
    if any(t.startswith(TAG_PREFIX) for t in tags):
        raise APIError(
            400,
            f"tags starting with '{TAG_PREFIX}' are set by the server from the API key.",
            param="tags",
            code="invalid_value",
        )
    if key is not None:
        tags = [*tags, key.tag, *key.tags]
    if tags:
        kw["tags"] = frozenset(tags)

    if req.policy is not None and req.policy not in s.client_policies:
        allowed = ", ".join(sorted(s.client_policies)) or "none: the server's policy applies"
        raise APIError(
            400,
            f"Invalid 'policy': choose a preset this server allows ({allowed}).",
            param="policy",
            code="invalid_value",
        )
    try:
        request = ImageRequest.from_kwargs(req.prompt, **kw)
    except RequestValidationError:
        raise
    except (TypeError, ValueError) as exc:  # a wrongly typed nested value the validators did not expect
        raise APIError(400, f"invalid request: {type(exc).__name__}", code="invalid_type") from None
    return _Parsed(request, req.policy, req.response_format or "b64_json", notes, lora_names, bool(req.stream),
                   bool(req.stream and req.stream_events))


def _form_value(name: str, text: str) -> Any:
    """A multipart text part as the value a JSON body would hold: objects and lists, and the strictly
    typed scalars (``n``, ``stream``, …), are read as JSON; everything else stays text."""
    if (name in _JSON_FORM_FIELDS and text[:1] in ("[", "{")) or name in _SCALAR_FORM_FIELDS:
        try:
            return json.loads(text)
        except ValueError:
            if name in _SCALAR_FORM_FIELDS:
                return text  # the model says what it should be
            raise APIError(400, f"'{name}' must be JSON.", param=name, code="invalid_value") from None
    return text


def _edit(form: FormData, router: AsyncRouter, key: ServerKey | None, s: _Settings) -> _Parsed:
    """The request of a multipart ``/v1/images/edits`` body, parsed by Starlette (files spooled)."""
    body: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            param = {"image": "image", "image[]": "image", "mask": "mask"}.get(name)
            if param is None:
                raise APIError(400, f"Unrecognized file supplied: {name}", param=name, code="unknown_parameter")
            target = "init_image" if param == "image" else "mask_image"
            if target in files:
                raise APIError(
                    400,
                    f"Send one '{param}' file; this server edits one image at a time.",
                    param=param,
                    code="invalid_value",
                )
            value.file.seek(0)
            data = value.file.read(s.max_image_bytes + 1)
            if len(data) > s.max_image_bytes:
                raise _too_large(f"'{param}'", s.max_image_bytes, param)
            files[target] = data
        elif name in ("image", "image[]", "mask", "init_image", "mask_image"):
            raise APIError(400, f"'{name}' must be uploaded as a file.", param=name, code="invalid_type")
        elif name in body:
            raise APIError(400, f"'{name}' is given twice.", param=name, code="invalid_value")
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
            raise APIError(
                404,
                f"The model `{tail}` is not offered by provider {head}.",
                param="model",
                code="model_not_found",
                error="ModelNotFound",
            )
        kw.setdefault("provider", head)
        kw.setdefault("model", tail)
    elif any(p.supports_model(model) for p in providers.values()):
        kw.setdefault("model", model)
    elif model in providers:
        kw.setdefault("provider", model)
    elif s.unknown_model == "reject":
        raise APIError(
            404,
            f"The model `{model}` is not offered by this server; GET /v1/models lists them.",
            param="model",
            code="model_not_found",
            error="ModelNotFound",
        )
    else:
        notes.append(f"model {model} is not offered here; routed by policy")


# --- large bodies, without holding the GIL for long ------------------------------------------


@dataclass(frozen=True, slots=True)
class _Span:
    """A long string value of a JSON body, left where it is: ``body[start:end]`` holds its characters
    (no escape among them). Image fields decode it from there; any other field gets :meth:`text`."""

    body: bytes
    start: int
    end: int

    def view(self) -> memoryview:
        return memoryview(self.body)[self.start : self.end]

    def text(self) -> str:
        """The string itself, as json.loads reads it (the rare long value that is not an image)."""
        return str(json.loads(self.body[self.start - 1 : self.end + 1]))


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
        image = path in (("init_image",), ("mask_image",)) or (
            len(path) == 3 and path[0] == "controls" and path[2] == "image"
        )
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
    return {
        "input_tokens": text + image,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image},
        "output_tokens": out,
        "total_tokens": text + image + out,
    }


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
    text = json.dumps(
        _images_body(result, parsed, marks), ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    )
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


_ENDPOINTS = frozenset(
    {"/v1/images/generations", "/v1/images/edits", "/v1/models", "/v1/route", "/healthz", "/metrics"}
)
_ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class _Observe:
    """ASGI middleware: counts every answer by endpoint and status and times it."""

    def __init__(self, app: _ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
    ) -> None:
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
            self.metrics.observe_request(_endpoint(scope["path"]), scope["method"], status, time.perf_counter() - start)


# --- memory: request bodies in flight --------------------------------------------------


class _BodyBytes:
    """The bytes of request bodies in flight, across requests, held under ``limit``: a request reserves its
    size before its body is read and gives it back when it is answered. First come, first served (a
    request waits while an earlier one waits), so a maximal body is never starved by smaller ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, size: int, timeout_s: float) -> bool:
        """Reserve ``size`` bytes; False if there was no room within ``timeout_s``."""
        if not self._waiting and self.held + size <= self.limit:
            self.held += size
            return True
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            async with asyncio.timeout(timeout_s):
                await entry[1]
        except BaseException as exc:
            if entry[1].done() and not entry[1].cancelled():
                self.release(size)  # granted just as it gave up: hand it back
            else:
                entry[1].cancel()
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
                self._grant()  # it may have been the one the others waited behind
            if isinstance(exc, TimeoutError):
                return False
            raise
        return True

    def release(self, size: int) -> None:
        self.held -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            size, waiter = self._waiting[0]
            if waiter.done():
                self._waiting.popleft()
            elif self.held + size <= self.limit:
                self._waiting.popleft()
                self.held += size
                waiter.set_result(None)
            else:
                return


# --- the routes ---------------------------------------------------------------------


@dataclass
class _Server:
    """What the routes share: the router, the settings and the per-server state."""

    router: AsyncRouter
    keys: ServerKeys
    settings: _Settings
    metrics: ServerMetrics
    bodies: _BodyBytes
    body_wait_s: float
    protect_metrics: bool


def _server(request: Request) -> _Server:
    server: _Server = request.app.state.imagerouter
    return server


def _client_key(request: Request, server: Annotated[_Server, Depends(_server)]) -> ServerKey | None:
    """The caller's key (401 without a valid one); None when the server has no keys."""
    if not server.keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "You didn't provide an API key: send it in the Authorization header, as 'Bearer <key>'.",
                       error="MissingAPIKey")
    entry = server.keys.verify(token)
    if entry is None:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key", error="InvalidAPIKey")
    return entry


async def _image_client(
    key: Annotated[ServerKey | None, Depends(_client_key)], server: Annotated[_Server, Depends(_server)]
) -> ServerKey | None:
    """The caller's key, within its image requests per minute (429 beyond), counted in the router's state:
    per process by default, across every worker with ``state="redis://…"``."""
    if key is None or key.rpm is None:
        return key
    wait = await server.router.state.limits.atake(key.name, key.rpm)
    if wait:
        raise APIError(
            429,
            f"Rate limit reached for key {key.name!r}: {key.rpm} image requests per minute; retry in {wait:.1f}s.",
            type="requests",
            code="rate_limit_exceeded",
            error="RateLimited",
            headers={"retry-after": str(max(1, math.ceil(wait)))},
        )
    return key


async def _body(request: Request, server: Annotated[_Server, Depends(_server)]) -> AsyncIterator[Request]:
    """The request, once room for its body is reserved among the bodies in flight (503 when none comes in
    time). A Content-Length over the cap is a 413 before that; FastAPI's ``max_body_size`` counts the body
    as it arrives (413 past the cap)."""
    limit = server.settings.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, "Invalid Content-Length header.")
        if int(length) > limit:
            raise _too_large("The request body", limit)
    size = limit if length is None else int(length)
    if not await server.bodies.acquire(size, server.body_wait_s):
        raise APIError(
            503,
            "The server is busy with other large requests; retry shortly.",
            type="server_error",
            code="server_busy",
            error="ServerBusy",
            headers={"retry-after": "2"},
        )
    try:
        yield request
    finally:
        server.bodies.release(size)


Server = Annotated[_Server, Depends(_server)]
ClientKey = Annotated[ServerKey | None, Depends(_client_key)]
ImageClient = Annotated[ServerKey | None, Depends(_image_client)]
Body = Annotated[Request, Depends(_body, scope="function")]  # the room is given back as the handler returns


async def _read_body(request: Request) -> list[bytes]:
    """The body as the chunks it arrived in (joining them is left to whoever reads it, off the loop
    when it is large)."""
    chunks: list[bytes] = []
    total, pause = 0, _YIELD_BYTES
    async for chunk in request.stream():
        total += len(chunk)
        if chunk:
            chunks.append(chunk)
        if total >= pause:  # a body already buffered arrives without a pause: make one
            pause += _YIELD_BYTES
            await asyncio.sleep(0)
    return chunks


async def _parse_json(request: Request, server: _Server, key: ServerKey | None) -> _Parsed:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(400, "Send the request body as JSON (Content-Type: application/json).")
    chunks = await _read_body(request)
    router, settings = server.router, server.settings
    if sum(len(c) for c in chunks) <= _INLINE_BYTES:
        return _build(_json_object(b"".join(chunks)), router, key, settings)
    return await asyncio.to_thread(lambda: _build(_json_object(_joined(chunks)), router, key, settings))


def _client_error(exc: ImageRouterError, parsed: _Parsed) -> APIError:
    error = api_error(exc)
    for path, name in parsed.lora_names.items():  # the client's LoRA names, not the server's paths
        error.message = error.message.replace(path, name)
        for rejection in error.extra.get("rejections", ()):
            rejection["reason"] = rejection["reason"].replace(path, name)
    return error


async def _generate(server: _Server, parsed: _Parsed, prefix: str = "image_generation") -> Response:
    if parsed.stream:
        return await _streamed(server, parsed, prefix)
    try:
        result = await server.router.agenerate(parsed.request, policy=parsed.policy)
    except ImageRouterError as exc:
        raise _client_error(exc, parsed) from None
    server.metrics.observe_generation(result.provider, result.model, len(result.images), result.cost.actual_usd)
    if sum(len(img.data) for img in result.images) <= _INLINE_BYTES:
        parts = _answer_parts(result, parsed)
    else:
        parts = await asyncio.to_thread(_answer_parts, result, parsed)
    response = _JSONParts(parts)
    for name, value in _headers(result, parsed.notes):
        response.headers.append(name, value)
    return response


async def _streamed(server: _Server, parsed: _Parsed, prefix: str) -> Response:
    """The generation as server-sent events (:mod:`router.sse`). A request refused before any event (no
    route, a bad request) is an ordinary error answer; a failure later is an ``error`` event."""
    events = server.router.astream(parsed.request, policy=parsed.policy)
    try:
        first = await anext(events)
    except ImageRouterError as exc:
        await events.aclose()
        raise _client_error(exc, parsed) from None

    async def body() -> AsyncIterator[bytes]:
        event: Any = first
        try:
            while True:
                if isinstance(event, PartialImage):
                    yield await asyncio.to_thread(sse.partial_event, event, prefix)
                elif isinstance(event, Completed):
                    yield b"".join(await asyncio.to_thread(_completed, event.result, parsed, prefix))
                    server.metrics.observe_generation(event.result.provider, event.result.model,
                                                      len(event.result.images), event.result.cost.actual_usd)
                    return
                elif parsed.stream_events:
                    yield sse.progress_event(event)
                event = await anext(events)
        except ImageRouterError as exc:
            error = _client_error(exc, parsed)
            yield sse.error_event({"message": error.message, "type": error.type, "param": error.param,
                                   "code": error.code, **error.extra})
        finally:
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={"cache-control": "no-store"})


def _completed(result: GenerationResult, parsed: _Parsed, prefix: str) -> list[bytes]:
    summary = result.to_dict()
    summary.pop("decision", None)
    summary["warnings"] = [*parsed.notes, *result.warnings]
    return sse.completed_events(result, prefix, _usage(result), summary)


api = APIRouter()


@api.post(
    "/v1/images/generations",
    response_class=Response,
    tags=["images"],
    responses={200: {"model": ImagesResponse}, **_ERRORS},
    openapi_extra=_request_schema(ImageGenerationRequest, "application/json"),
)
async def images_generations(server: Server, key: ImageClient, body: Body) -> Response:
    """Generate images (OpenAI's Images API); the router picks the backend."""
    return await _generate(server, await _parse_json(body, server, key))


@api.post(
    "/v1/images/edits",
    response_class=Response,
    tags=["images"],
    responses={200: {"model": ImagesResponse}, **_ERRORS},
    openapi_extra=_request_schema(ImageEditRequest, "multipart/form-data"),
)
async def images_edits(server: Server, key: ImageClient, body: Body) -> Response:
    """Edit an image (multipart, OpenAI's Images API): img2img, or inpainting with a mask."""
    if body.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
        raise APIError(400, "Send image edits as multipart/form-data.")
    router, settings = server.router, server.settings
    async with body.form(max_files=_MAX_FILES, max_fields=_MAX_FIELDS, max_part_size=_MAX_FIELD_BYTES) as form:
        uploaded = sum(v.size or 0 for _, v in form.multi_items() if isinstance(v, UploadFile))
        if uploaded <= _INLINE_BYTES:
            parsed = _edit(form, router, key, settings)
        else:
            parsed = await asyncio.to_thread(_edit, form, router, key, settings)
    return await _generate(server, parsed, "image_edit")


@api.post(
    "/v1/route",
    response_model=RouteResponse,
    tags=["routing"],
    responses=_ERRORS,
    openapi_extra=_request_schema(ImageGenerationRequest, "application/json"),
)
async def route_request(server: Server, key: ClientKey, body: Body) -> dict[str, Any]:
    """Where a generations body would go, and why (a dry run: nothing is called or charged)."""
    parsed = await _parse_json(body, server, key)
    # a thread: a file ledger's headroom may wait on another process's write lock
    decision = await asyncio.to_thread(
        server.router.route, parsed.request, policy=parsed.policy, assume_configured=False
    )  # what this server can serve
    return {"object": "route", "decision": decision.to_dict(), "explain": decision.explain(), "warnings": parsed.notes}


def _model_list(router: AsyncRouter) -> list[ModelCard]:
    out: dict[str, ModelCard] = {}
    for provider in router.providers.values():
        if provider.configuration_problem() is not None:
            continue
        for model in provider.models():
            ident = model if model not in out else f"{provider.name}/{model}"
            out[ident] = ModelCard(id=ident, owned_by=provider.name)
    return list(out.values())


@api.get("/v1/models", response_model=ModelList, tags=["models"], responses=_ERRORS)
async def list_models(server: Server, key: ClientKey) -> ModelList:
    """Every model the configured providers offer."""
    return ModelList(data=_model_list(server.router))


@api.get("/v1/models/{model:path}", response_model=ModelCard, tags=["models"], responses=_ERRORS)
async def retrieve_model(server: Server, key: ClientKey, model: str) -> ModelCard:
    """One model (``provider/model`` for a model two providers offer)."""
    for entry in _model_list(server.router):
        if entry.id == model:
            return entry
    raise APIError(
        404,
        f"The model `{model}` does not exist or is not offered here.",
        code="model_not_found",
        error="ModelNotFound",
    )


@api.get("/healthz", tags=["operations"])
async def healthz(server: Server) -> dict[str, Any]:
    """Each provider: configured, and whether its circuit is open."""
    router = server.router
    providers = {
        p.name: {"configured": p.configuration_problem() is None, "circuit_open": not router.breaker.available(p.name)}
        for p in router.providers.values()
    }
    return {"status": "ok", "providers": providers}


@api.get("/metrics", response_class=Response, tags=["operations"])
async def metrics_endpoint(request: Request, server: Server) -> Response:
    """Prometheus metrics (a key is needed when the server protects them)."""
    if server.protect_metrics:
        _client_key(request, server)
    return Response(server.metrics.render(), media_type=server.metrics.content_type)


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """The app's OpenAPI schema, with the request models the image routes read themselves (their bodies
    are parsed off the event loop, so FastAPI does not see them as parameters)."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, defs = models_json_schema(
                [(ImageGenerationRequest, "validation"), (ImageEditRequest, "validation")],
                ref_template="#/components/schemas/{model}",
            )
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = doc
        return app.openapi_schema

    return schema


def create_app(
    router: AsyncRouter,
    *,
    keys: ServerKeys | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_inflight_body_bytes: int | None = None,
    body_wait_s: float = DEFAULT_BODY_WAIT_S,
    unknown_model: Literal["route", "reject"] = "route",
    allow_image_urls: bool = False,
    client_policies: Collection[str] | None = None,
    client_options: Collection[str] = DEFAULT_CLIENT_OPTIONS,
    lora_dirs: Sequence[str | Path] = (),
    protect_metrics: bool = False,
    metrics: ServerMetrics | None = None,
    close_router: bool = False,
    jobs: JobQueue | None = None,
    warm: bool = True,
) -> FastAPI:
    """The OpenAI-compatible ASGI app over ``router`` (see the module docstring for the API).

    ``keys``: client keys (None or empty: no authentication, with a warning); their budgets are set in
    ``router.ledger``. ``max_body_bytes`` caps a request body (checked on Content-Length before reading,
    and while reading), ``max_image_bytes`` each uploaded or inline image, ``max_inflight_body_bytes``
    (default: ``max_body_bytes``) the bodies of all requests in flight together; a request waits up to
    ``body_wait_s`` for room (then 503). ``unknown_model``: route a ``model`` no provider offers by
    policy, or refuse it. ``client_policies``: the presets a request may pick with ``policy`` (default:
    every preset when the router runs a preset, none when it runs a custom policy, so a policy file's
    rules cannot be side-stepped). ``client_options``: the provider options a key without its own list
    may set (``"quality"``, ``"<provider>.background"``, ``"<provider>.*"``, ``"*"``; never a safety switch).
    ``lora_dirs``: the directories whose LoRAs clients may name. ``close_router`` closes the router when
    the app shuts down. ``jobs``: a :class:`~router.jobs.JobQueue` to serve ``/v1/jobs`` from. ``warm``: at
    startup, each provider's :meth:`~providers.base.Provider.warm` (the local backend loads and compiles its
    ``compile: true`` models; ComfyUI and a GPU pool read their model lists).
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
    options = option_entries(client_options, where="client_options")
    safety = sorted(o for o in options if is_safety_option(o.rpartition(".")[2]))
    if safety:
        raise ValueError(
            f"client_options cannot grant safety settings ({', '.join(safety)}): allow them per key, "
            "in the key file's provider_options"
        )
    inflight = max_body_bytes if max_inflight_body_bytes is None else max_inflight_body_bytes
    if inflight < max_body_bytes:
        raise ValueError(
            f"max_inflight_body_bytes ({inflight}) must be at least max_body_bytes ({max_body_bytes}): "
            "one maximal body must fit"
        )
    dirs = []
    for d in lora_dirs:
        real = Path(os.path.realpath(Path(d).expanduser()))
        if not real.is_dir():
            raise ValueError(f"lora_dirs: {d} is not a directory")
        dirs.append(real)
    settings = _Settings(
        max_body_bytes,
        max_image_bytes,
        unknown_model,
        allow_image_urls,
        frozenset(client_policies),
        options,
        tuple(dirs),
    )
    metrics = metrics or ServerMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if warm:
            for provider in router.providers.values():
                try:  # a backend that cannot get ready now is routed around, as a failing one would be
                    ready = await provider.warm()
                except Exception as exc:
                    log.warning("provider %s could not warm up: %s", provider.name, type(exc).__name__)
                else:
                    if ready:
                        log.info("provider %s ready: %s", provider.name, ", ".join(ready))
        yield
        if close_router:
            await router.aclose()

    app = FastAPI(
        title="imagerouter",
        version=_version(),
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        max_body_size=max_body_bytes,
        description="An OpenAI-compatible Images API that routes each request to the best backend.",
    )
    app.state.router = router
    app.state.metrics = metrics
    app.state.imagerouter = _Server(router, keys, settings, metrics, _BodyBytes(inflight), body_wait_s, protect_metrics)
    app.include_router(api)
    if jobs is not None:
        from router.server_jobs import install_jobs

        install_jobs(app, jobs)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
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
        if exc.status_code == 413:  # FastAPI's max_body_size: the body grew past the cap as it arrived
            return await render_api_error(request, _too_large("The request body", max_body_bytes))
        error = APIError(
            exc.status_code,
            f"Invalid URL ({request.method} {request.url.path})" if exc.status_code in (404, 405) else str(exc.detail),
            error=f"HTTP{exc.status_code}",
        )
        return await render_api_error(request, error)

    async def render_unexpected(request: Request, exc: Exception) -> Response:
        log.error("imagerouter server: unexpected %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
        return await render_api_error(
            request,
            APIError(
                500, "The server failed while handling the request.", type="server_error", error=type(exc).__name__
            ),
        )

    app.add_exception_handler(APIError, render_api_error)
    app.add_exception_handler(ImageRouterError, render_router_error)
    app.add_exception_handler(StarletteHTTPException, render_http_error)
    app.add_exception_handler(Exception, render_unexpected)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pixroute")
    except PackageNotFoundError:
        return "0"


# --- running it -----------------------------------------------------------------------




def _return_large_frees() -> None:
    """Have glibc serve every block of 128 KiB or more from mmap, so the memory of a large body or image
    goes back to the system when it is freed.

    glibc's default raises that threshold to the largest block freed so far (up to 32 MiB): after the first
    large body, later ones come from per-thread arenas that keep their pages, and the server's RSS grows
    with each worker thread that once held one (measured in benchmarks/server_memory.py). An operator's
    own ``MALLOC_MMAP_THRESHOLD_`` is left alone; elsewhere than glibc this does nothing."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


_M_MMAP_THRESHOLD = -3


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
    max_inflight_body_bytes: int | None = None,
    body_wait_s: float = DEFAULT_BODY_WAIT_S,
    unknown_model: Literal["route", "reject"] = "route",
    client_options: Collection[str] = DEFAULT_CLIENT_OPTIONS,
    lora_dirs: Sequence[str | Path] = (),
    log_level: str = "info",
) -> None:
    """Run the server with uvicorn until interrupted (the ``pixroute serve`` command).

    Providers come from the environment (:func:`router.config.router_kwargs_from_env`); ``policy`` (a
    preset or a policy file) and ``ledger`` (a path or ``":memory:"``) override ``IMAGEROUTER_POLICY`` and
    ``IMAGEROUTER_LEDGER``. ``keys_file`` (default: ``IMAGEROUTER_SERVER_KEYS``) is a key file
    (:mod:`router.keys`), refused when group or others may write it. Without keys, only a loopback
    ``host`` is served unless ``allow_open=True``. The other arguments are :func:`create_app`'s. On glibc,
    large freed blocks go back to the system at once (:func:`_return_large_frees`).
    """
    import uvicorn

    from router.router import AsyncRouter

    keys_path = keys_file or os.environ.get("IMAGEROUTER_SERVER_KEYS") or None
    keys = ServerKeys.from_file(keys_path) if keys_path else ServerKeys()
    if not keys and not is_loopback_host(host) and not allow_open:
        raise ConfigurationError(
            f"refusing to serve on {host} without client keys: give a key file with --keys keys.toml (make one "
            "with `pixroute keys NAME --file keys.toml`), or pass --allow-open to serve it to anyone"
        )
    overrides: dict[str, Any] = {}
    if policy is not None:
        overrides["policy"] = policy
    if ledger is not None:
        overrides["ledger"] = ledger
    router = AsyncRouter.from_env(**overrides)
    _return_large_frees()
    app = create_app(
        router,
        keys=keys,
        max_body_bytes=max_body_bytes,
        max_image_bytes=max_image_bytes,
        max_inflight_body_bytes=max_inflight_body_bytes,
        body_wait_s=body_wait_s,
        unknown_model=unknown_model,
        client_options=client_options,
        lora_dirs=lora_dirs,
        close_router=True,
    )
    # Keep idle connections longer than clients do (httpx, and so the openai SDK, keep them 5 s, uvicorn's own
    # default): with equal timeouts a client may reuse a connection just as the server closes it.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=75)


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
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="imagerouter-server", daemon=True
        )
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


__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_IMAGE_BYTES",
    "APIError",
    "ImageEditRequest",
    "ImageGenerationRequest",
    "ImagesResponse",
    "ServerThread",
    "api_error",
    "create_app",
    "serve",
]
