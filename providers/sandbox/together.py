"""A loopback emulator of Together AI's image API, as strict as its OpenAPI spec.

Routes: ``POST /v1/images/generations`` (JSON) and ``GET /outputs/<token>.<ext>`` (the
images of ``response_format: "url"`` requests, unauthenticated like a signed URL;
:meth:`TogetherSandbox.expire_outputs` makes them answer 403). Everything else is a
404. Errors use Together's shape ``{"error": {message, type, param, code}}``; every
answer carries ``x-request-id``.

Validation: unknown fields, wrong types and missing ``prompt``/``model`` are 400s;
``n`` 1..4; ``steps`` 1..50 (1..12 on the FLUX.1-schnell models); ``width``/``height`` 256..1792
and multiples of 16; ``image_loras`` (``[{path, scale}]``, at most 2) only on the
``-lora`` models; ``image_url`` (an http(s) URL, or a data URL holding a PNG/JPEG/WEBP)
only on the Kontext models; an unknown model is a 404. Defaults: steps per model
(schnell 4, others 28), 1024x1024, ``response_format`` url, ``output_format`` jpeg.

Images are real: a flat colour and a disc picked from a hash of (prompt, seed, index),
so one seed gives one image. With ``image_url`` (a data URL) the art is blended half
over the init image, so tests can see it was used. No seed is echoed: the response is
``{id, model, object: "list", data: [{index, type, b64_json | url}]}``.

Faults (``sb.faults``): the shared ones, and the hostile images
(``Fault.hostile_image("bomb_image")``, ``truncated_image``, ``wrong_format_image``, ``huge_image``):
the usual answer, base64 or URL, with :func:`~providers.sandbox._server.hostile_image`'s bytes in it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import secrets
import threading
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

DEFAULT_STEPS = {  # the spec's model enum names FLUX.1-schnell-Free and FLUX.1.1-pro: served with their family's steps
    "black-forest-labs/FLUX.1-schnell": 4,
    "black-forest-labs/FLUX.1-schnell-Free": 4,
    "black-forest-labs/FLUX.1.1-pro": 28,
    "black-forest-labs/FLUX.1-dev": 28,
    "black-forest-labs/FLUX.1-dev-lora": 28,
    "black-forest-labs/FLUX.1-kontext-dev": 28,
    "black-forest-labs/FLUX.1-kontext-pro": 28,
}
MODELS = frozenset(DEFAULT_STEPS)
LORA_MODELS = frozenset({"black-forest-labs/FLUX.1-dev-lora"})
EDIT_MODELS = frozenset({"black-forest-labs/FLUX.1-kontext-dev", "black-forest-labs/FLUX.1-kontext-pro"})
MAX_STEPS = {"black-forest-labs/FLUX.1-schnell": 12, "black-forest-labs/FLUX.1-schnell-Free": 12}
MAX_N = 4
MAX_LORAS = 2
MIN_SIDE, MAX_SIDE = 256, 1792
_FIELDS = {
    "prompt": "string",
    "model": "string",
    "steps": "integer",
    "image_url": "string",
    "seed": "integer",
    "n": "integer",
    "height": "integer",
    "width": "integer",
    "negative_prompt": "string",
    "response_format": "string",
    "guidance_scale": "number",
    "output_format": "string",
    "image_loras": "array",
    "reference_images": "array",
    "disable_safety_checker": "boolean",
}


class ApiError(SandboxError):
    """A Together-shaped error answer."""

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


def _is(kind: str, value: Any) -> bool:
    if kind == "integer":  # JSON Schema's: 2.0 is an integer too
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "array": list}[kind])


def _check(body: dict[str, Any]) -> dict[str, Any]:
    for name, value in body.items():
        if name not in _FIELDS:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name, code="invalid_parameter")
        if not _is(_FIELDS[name], value):
            raise ApiError(
                400, f"Invalid type for '{name}': expected {_FIELDS[name]}.", param=name, code="invalid_type"
            )
    body = {name: int(value) if _FIELDS[name] == "integer" else value for name, value in body.items()}
    for name in ("prompt", "model"):
        if name not in body:
            raise ApiError(400, f"Missing required parameter: '{name}'.", param=name, code="missing_parameter")
    model = body["model"]
    if model not in MODELS:
        raise ApiError(
            404,
            f"Unable to access model {model}. Please visit the models page for the available models.",
            code="model_not_available",
        )
    if not body["prompt"].strip():
        raise ApiError(400, "Input validation error: 'prompt' must not be empty.", param="prompt")
    _range(body, "n", 1, MAX_N)
    _range(body, "steps", 1, MAX_STEPS.get(model, 50))
    for side in ("width", "height"):
        _range(body, side, MIN_SIDE, MAX_SIDE)
        if side in body and body[side] % 16:
            raise ApiError(400, f"Input validation error: '{side}' must be a multiple of 16.", param=side)
    for name, allowed in (("response_format", ("base64", "url")), ("output_format", ("jpeg", "png"))):
        if name in body and body[name] not in allowed:
            raise ApiError(400, f"Invalid value for '{name}': use one of {', '.join(allowed)}.", param=name)
    if "image_loras" in body:
        if model not in LORA_MODELS:
            raise ApiError(400, f"Model {model} does not support image_loras.", param="image_loras")
        loras = body["image_loras"]
        if len(loras) > MAX_LORAS:
            raise ApiError(400, f"Input validation error: at most {MAX_LORAS} image_loras.", param="image_loras")
        for lora in loras:
            if (
                not isinstance(lora, dict)
                or set(lora) != {"path", "scale"}
                or not isinstance(lora["path"], str)
                or not _is("number", lora["scale"])
            ):
                raise ApiError(
                    400, "Invalid 'image_loras': each item is {path: string, scale: number}.", param="image_loras"
                )
    if "reference_images" in body and not all(isinstance(u, str) for u in body["reference_images"]):
        raise ApiError(400, "Invalid 'reference_images': expected an array of URLs.", param="reference_images")
    if "image_url" in body and model not in EDIT_MODELS:
        raise ApiError(400, f"Model {model} does not take image_url.", param="image_url")
    return body


def _range(body: dict[str, Any], name: str, low: int, high: int) -> None:
    if name in body and not low <= body[name] <= high:
        raise ApiError(
            400, f"Input validation error: '{name}' must be between {low} and {high}, got {body[name]}.", param=name
        )


def _init_image(url: str) -> Image.Image | None:
    """The image of a data URL; None for an http(s) URL (not fetched here)."""
    if url.startswith(("http://", "https://")):
        return None
    head, sep, payload = url.partition(",")
    if not (url.startswith("data:image/") and sep and head.endswith(";base64")):
        raise ApiError(400, "Invalid 'image_url': use an http(s) URL or a base64 data URL.", param="image_url")
    try:
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True)), formats=["PNG", "JPEG", "WEBP"]) as img:
            img.load()
            return img.convert("RGB")
    except (binascii.Error, OSError, ValueError, SyntaxError):
        raise ApiError(400, "Invalid 'image_url': the image could not be read.", param="image_url") from None


def _draw(prompt: str, seed: int, index: int, size: tuple[int, int], init: Image.Image | None, fmt: str) -> bytes:
    digest = hashlib.sha256(f"{prompt}\0{seed}\0{index}".encode()).digest()
    art = Image.new("RGB", size, tuple(digest[:3]))
    w, h = size
    ImageDraw.Draw(art).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=tuple(digest[3:6]))
    if init is not None:
        art = Image.blend(init.resize(size, Image.Resampling.LANCZOS), art, 0.5)
    buf = io.BytesIO()
    art.save(buf, format="PNG" if fmt == "png" else "JPEG", **({"compress_level": 1} if fmt == "png" else {}))
    return buf.getvalue()


class TogetherSandbox(SandboxServer):
    """Together's image API on loopback: ``with TogetherSandbox() as sb: ... sb.base_url``.

    The SDK's ``base_url`` is the origin (it adds ``/v1`` itself). ``seeds`` lists the
    seed each image was made with, newest last.
    """

    base_path = ""
    fault_kinds = VENDOR_FAULTS | HOSTILE_IMAGE_FAULTS

    def __init__(self, api_key: str = "tg-sandbox-key") -> None:
        super().__init__()
        self.api_key = api_key
        self.seeds: list[int] = []
        self._outputs: dict[str, tuple[bytes, str]] = {}
        self._outputs_lock = threading.Lock()
        self._expired = False

    def expire_outputs(self) -> None:
        """Make every output URL answer 403, as an expired signed URL does."""
        self._expired = True

    # --- hooks

    def authenticate(self, request: Request) -> Response | None:
        if request.path.startswith("/outputs/"):
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return _bad_key().response()
        return None

    def decorate(self, request: Request, response: Response, elapsed_s: float) -> None:
        response.headers.setdefault("x-request-id", request.request_id)
        response.headers.setdefault("content-type", "application/json")

    def render_internal_error(self, request: Request, exc: BaseException) -> Response:
        return ApiError(500, "Internal server error.", type="server_error").response()

    def render_fault(self, fault: Fault, request: Request) -> Response:
        if fault.kind == "rate_limit":
            headers = {"x-ratelimit-limit": "10", "x-ratelimit-remaining": "0"}
            if fault.retry_after is not None:
                seconds = fault.retry_after
                headers["retry-after"] = str(int(seconds)) if seconds == int(seconds) else str(seconds)
            return ApiError(
                429,
                "You are being rate limited; slow down your requests.",
                type="rate_limit",
                code="rate_limit_exceeded",
                headers=headers,
            ).response()
        if fault.kind == "server_error":
            status = fault.status or 500
            message = "The service is overloaded; try again later." if status == 503 else "Internal server error."
            return ApiError(status, message, type="server_error").response()
        if fault.kind == "moderation":
            return ApiError(
                422,
                fault.message or "NSFW content detected in the request; the image was not made.",
                code="nsfw_content",
            ).response()
        if fault.kind == "malformed":
            body = fault.body if fault.body is not None else b'{"id": "x", "object": "list", "data": [{"index": 0, "'
            return Response(200, body, {"content-type": "application/json"})
        if fault.kind == "insufficient_credits":
            return ApiError(
                402,
                "Credit limit exceeded: add credit to your account to keep using the API.",
                type="credit_limit",
                code="credit_limit_exceeded",
            ).response()
        if fault.kind == "invalid_request":
            status = fault.status or 400
            message = fault.message or (f"Invalid value for '{fault.param}'." if fault.param else "Invalid request.")
            return ApiError(status, message, param=fault.param, code=fault.code).response()
        if fault.kind == "auth":
            if fault.status == 403:
                return ApiError(403, "Your account may not use this model.", type="forbidden").response()
            return _bad_key().response()
        if fault.kind in HOSTILE_IMAGE_FAULTS:  # made and answered as usual (base64 or URL), the image hostile
            return self._generate(request, hostile=fault.kind)
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    def handle(self, request: Request) -> Response:
        if (request.method, request.path) == ("POST", "/v1/images/generations"):
            return self._generate(request)
        if request.method == "GET" and request.path.startswith("/outputs/"):
            return self._output(request.path.removeprefix("/outputs/"))
        raise ApiError(404, f"Not found: {request.method} {request.path}", code="not_found")

    # --- routes

    def _generate(self, request: Request, hostile: str | None = None) -> Response:
        if request.media_type != "application/json":
            raise ApiError(400, "Send the request body as JSON (Content-Type: application/json).")
        if request.body_error is not None or not isinstance(request.json, dict):
            raise ApiError(400, "The request body is not a JSON object.")
        body = _check(request.json)
        model: str = body["model"]
        size = (body.get("width", 1024), body.get("height", 1024))
        fmt: str = body.get("output_format", "jpeg")
        seed: int = body["seed"] if "seed" in body else secrets.randbelow(2**32)
        init = _init_image(body["image_url"]) if "image_url" in body else None
        data: list[dict[str, Any]] = []
        for index in range(body.get("n", 1)):
            image = hostile_image(hostile) if hostile else _draw(body["prompt"], seed, index, size, init, fmt)
            self.seeds.append(seed)
            if body.get("response_format", "url") == "base64":
                data.append({"index": index, "type": "b64_json", "b64_json": base64.b64encode(image).decode()})
            else:
                token = f"{secrets.token_hex(12)}.{'png' if fmt == 'png' else 'jpg'}"
                with self._outputs_lock:
                    self._outputs[token] = (image, "image/png" if fmt == "png" else "image/jpeg")
                data.append({"index": index, "type": "url", "url": f"{self.origin}/outputs/{token}"})
        return Response.json(200, {"id": request.request_id, "model": model, "object": "list", "data": data})

    def _output(self, token: str) -> Response:
        with self._outputs_lock:
            found = self._outputs.get(token)
        if found is None or self._expired:
            return Response(
                403,
                b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
                {"content-type": "application/xml"},
            )
        return Response(200, found[0], {"content-type": found[1]})


def _bad_key() -> ApiError:
    return ApiError(
        401,
        "Invalid API key provided. You can find your API key in your account settings.",
        type="invalid_request_error",
        code="invalid_api_key",
    )
