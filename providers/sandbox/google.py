"""A loopback emulator of Google's image APIs: Imagen and Gemini image models, on the Gemini API and on Vertex AI.

Routes, as the ``google-genai`` SDK calls them (its ``models.py``; the REST references below):

- Gemini API (key in ``x-goog-api-key``): ``POST /v1/models/{model}:generateContent`` (or ``/v1beta/…``)
  (https://ai.google.dev/api/generate-content).
- Vertex AI (``Authorization: Bearer`` OAuth token): ``POST /v1beta1/projects/{project}/locations/{location}/
  publishers/google/models/{model}:predict`` (Imagen generate and edit:
  https://cloud.google.com/vertex-ai/generative-ai/docs/model-reference/imagen-api) and ``…:generateContent``.
  A location the sandbox does not serve is a 404; ``served_locations`` records each call's location.

Imagen ``predict``: ``instances[0].prompt``; ``parameters`` sampleCount 1..4, aspectRatio (1:1 3:4 4:3 9:16 16:9),
negativePrompt (refused by Imagen 4, which does not take it), seed (refused unless ``addWatermark`` is false: a seeded
image cannot carry SynthID), personGeneration, safetySetting, addWatermark, includeRaiReason, outputOptions
{mimeType, compressionQuality}, sampleImageSize, enhancePrompt, language; unknown parameters are 400s. Edits
(``imagen-3.0-capability-001``) take ``referenceImages`` (a RAW image and a user-provided MASK, white = edit) and
``editMode``. Answer: ``{predictions: [{bytesBase64Encoded, mimeType}]}``; a filtered image is ``{raiFilteredReason}``
(only with includeRaiReason; otherwise it is left out).

Gemini ``generateContent``: ``contents[].parts[]`` of text and ``inlineData``; ``generationConfig.responseModalities``
must ask for IMAGE; ``imageConfig.aspectRatio`` one of :data:`GEMINI_SHAPES`. Answer: one candidate whose parts are a
text and an ``inlineData`` PNG, ``finishReason`` STOP, and ``usageMetadata`` (1290 image tokens an output image,
258 tokens an input image, a token per 4 prompt characters). A blocked prompt answers ``promptFeedback.blockReason``.

Errors are Google's ``{"error": {code, message, status, details}}``; a 429 carries a ``google.rpc.RetryInfo``
``retryDelay``; a refused Gemini API key is a 400 with ErrorInfo reason ``API_KEY_INVALID``; billing off is a 403
with reason ``BILLING_DISABLED``. ``billed_usd`` adds up what the sandbox billed, at :data:`PRICES`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import re
import threading
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

IMAGEN_SHAPES = {"1:1": (1024, 1024), "3:4": (896, 1280), "4:3": (1280, 896), "9:16": (768, 1408),
                 "16:9": (1408, 768)}
GEMINI_SHAPES = {"1:1": (1024, 1024), "2:3": (832, 1248), "3:2": (1248, 832), "3:4": (864, 1184),
                 "4:3": (1184, 864), "4:5": (896, 1152), "5:4": (1152, 896), "9:16": (768, 1344),
                 "16:9": (1344, 768), "21:9": (1536, 672)}
IMAGEN_GENERATE = frozenset({"imagen-4.0-generate-001", "imagen-4.0-fast-generate-001",
                             "imagen-4.0-ultra-generate-001"})
IMAGEN_EDIT = frozenset({"imagen-3.0-capability-001"})
GEMINI_IMAGE = frozenset({"gemini-2.5-flash-image"})
PRICES: dict[str, dict[str, Decimal]] = {
    "imagen-4.0-generate-001": {"image": Decimal("0.04")},
    "imagen-4.0-fast-generate-001": {"image": Decimal("0.02")},
    "imagen-4.0-ultra-generate-001": {"image": Decimal("0.06")},
    "imagen-3.0-capability-001": {"image": Decimal("0.02")},
    "gemini-2.5-flash-image": {"input": Decimal("0.30"), "text_out": Decimal("2.50"), "image_out": Decimal("30")},
}
LOCATIONS = frozenset({"global", "us-central1", "us-east4", "europe-west1", "europe-west4", "europe-west9",
                       "asia-northeast1"})
IMAGE_OUTPUT_TOKENS = 1290
IMAGE_INPUT_TOKENS = 258
_IMAGEN_PARAMS = frozenset({"sampleCount", "aspectRatio", "negativePrompt", "seed", "personGeneration",
                            "safetySetting", "addWatermark", "includeRaiReason", "includeSafetyAttributes",
                            "outputOptions", "sampleImageSize", "enhancePrompt", "language", "guidanceScale",
                            "editMode", "editConfig", "storageUri"})
_GEMINI_API = re.compile(r"^/v1(?:beta)?/models/(?P<model>[^:/]+):(?P<method>generateContent|predict)$")
_VERTEX = re.compile(r"^/v1beta1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/publishers/google/"
                     r"models/(?P<model>[^:/]+):(?P<method>generateContent|predict)$")
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
           429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


class ApiError(SandboxError):
    """A Google-shaped error answer (google.rpc.Status as JSON)."""

    def __init__(self, code: int, message: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details or []

    def response(self) -> Response:
        status = _STATUS.get(self.code, "UNKNOWN")
        error: dict[str, Any] = {"code": self.code, "message": self.message, "status": status}
        if self.details:
            error["details"] = self.details
        return Response.json(self.code, {"error": error})


def _info(reason: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "googleapis.com"}


def _png(prompt: str, index: int, size: tuple[int, int], init: Image.Image | None, mime: str = "image/png") -> bytes:
    digest = hashlib.sha256(f"{prompt}\0{index}".encode()).digest()
    art = Image.new("RGB", size, tuple(digest[:3]))
    w, h = size
    ImageDraw.Draw(art).ellipse((w // 5, h // 5, 4 * w // 5, 4 * h // 5), fill=tuple(digest[3:6]))
    if init is not None:
        art = Image.blend(init.resize(size), art, 0.5)
    buf = io.BytesIO()
    art.save(buf, format="JPEG" if mime == "image/jpeg" else "PNG")
    return buf.getvalue()


def _decode(data: Any, where: str) -> Image.Image:
    try:
        # proto3 JSON bytes: standard or URL-safe base64 (the SDK sends the URL-safe alphabet)
        raw = base64.b64decode(str(data).replace("-", "+").replace("_", "/"), validate=True)
        with Image.open(io.BytesIO(raw), formats=["PNG", "JPEG", "WEBP"]) as img:
            img.load()
            return img.convert("RGB")
    except (binascii.Error, OSError, ValueError, SyntaxError):
        raise ApiError(400, f"Invalid image in {where}: it could not be decoded.") from None


class GoogleSandbox(SandboxServer):
    """Google's image APIs on loopback. ``sb.base_url`` is the root the SDK's ``http_options.base_url`` takes."""

    fault_kinds = VENDOR_FAULTS | HOSTILE_IMAGE_FAULTS
    secret_headers = SandboxServer.secret_headers | {"x-goog-api-key"}

    def __init__(self, api_key: str = "google-sandbox-key", access_token: str = "ya29.sandbox-token") -> None:
        super().__init__()
        self.api_key, self.access_token = api_key, access_token
        self.billed_usd = Decimal(0)
        self.served_locations: list[str] = []
        self.filter_next = 0
        """How many of the next Imagen images to filter (``raiFilteredReason``) instead of making."""
        self._lock2 = threading.Lock()

    # --- hooks

    def authenticate(self, request: Request) -> Response | None:
        if _GEMINI_API.match(request.path):
            if not hmac.compare_digest(request.headers.get("x-goog-api-key", "").encode(), self.api_key.encode()):
                return _bad_key().response()
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.access_token.encode()):
            return ApiError(401, "Request had invalid authentication credentials. Expected OAuth 2 access token.",
                            [_info("ACCESS_TOKEN_TYPE_UNSUPPORTED")]).response()
        return None

    def render_internal_error(self, request: Request, exc: BaseException) -> Response:
        return ApiError(500, "Internal error encountered.").response()

    def render_fault(self, fault: Fault, request: Request) -> Response:
        if fault.kind == "rate_limit":
            details = [] if fault.retry_after is None else [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{fault.retry_after:g}s"}]
            return ApiError(429, "Resource exhausted. Please try again later.", details).response()
        if fault.kind == "server_error":
            status = fault.status or 500
            text = "The model is overloaded. Please try again later." if status == 503 else \
                "Internal error encountered."
            return ApiError(status, text).response()
        if fault.kind == "moderation":
            return self._serve(request, blocked=True)
        if fault.kind == "malformed":
            body = fault.body if fault.body is not None else b'{"predictions": [{"bytesBase64Encoded": "'
            return Response(200, body, {"content-type": "application/json"})
        if fault.kind == "insufficient_credits":
            return ApiError(403, "This API method requires billing to be enabled.",
                            [_info("BILLING_DISABLED")]).response()
        if fault.kind == "invalid_request":
            return ApiError(400, fault.message or f"Invalid value at '{fault.param or 'request'}'.").response()
        if fault.kind == "auth":
            return _bad_key().response()
        if fault.kind in HOSTILE_IMAGE_FAULTS:
            return self._serve(request, hostile=fault.kind)
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    def handle(self, request: Request) -> Response:
        return self._serve(request)

    # --- routes

    def _serve(self, request: Request, *, hostile: str | None = None, blocked: bool = False) -> Response:
        match = _GEMINI_API.match(request.path) or _VERTEX.match(request.path)
        if request.method != "POST" or match is None:
            raise ApiError(404, f"The requested URL {request.path} was not found on this server.")
        parts = match.groupdict()
        vertex = "location" in parts
        if vertex:
            if parts["location"] not in LOCATIONS:
                raise ApiError(404, f"Publisher Model `{parts['model']}` is not found in {parts['location']}.")
            with self._lock2:
                self.served_locations.append(parts["location"])
        if request.body_error is not None or not isinstance(request.json, dict):
            raise ApiError(400, "Invalid JSON payload received.")
        model, method = parts["model"], parts["method"]
        if method == "predict":
            if not vertex or model not in IMAGEN_GENERATE | IMAGEN_EDIT:
                raise ApiError(404, f"models/{model} is not found for API version, or is not supported for predict.")
            return self._predict(model, request.json, hostile, blocked)
        if model not in GEMINI_IMAGE:
            raise ApiError(404, f"models/{model} is not found for API version, or is not supported for "
                                "generateContent.")
        return self._generate_content(model, request.json, hostile, blocked)

    def _predict(self, model: str, body: dict[str, Any], hostile: str | None, blocked: bool) -> Response:
        instances = body.get("instances")
        if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
            raise ApiError(400, "Exactly one instance is required.")
        instance, params = instances[0], body.get("parameters") or {}
        prompt = instance.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "Prompt is required.")
        unknown = set(params) - _IMAGEN_PARAMS
        if unknown:
            name = sorted(unknown)[0]
            raise ApiError(400, f"Invalid JSON payload received. Unknown name \"{name}\" at 'parameters'.")
        count = params.get("sampleCount", 1)
        if not isinstance(count, int) or not 1 <= count <= 4:
            raise ApiError(400, "sampleCount must be between 1 and 4.")
        if model.startswith("imagen-4") and "negativePrompt" in params:
            raise ApiError(400, "Negative prompts are not supported by this model.")
        if "seed" in params and params.get("addWatermark", True):
            raise ApiError(400, "Seed is not supported when addWatermark is enabled.")
        for name, allowed in (("personGeneration", ("dont_allow", "allow_adult", "allow_all")),
                              ("safetySetting", ("block_low_and_above", "block_medium_and_above", "block_only_high",
                                                 "block_none"))):
            # the REST reference writes these in lower case, the SDK sends its enum names (upper case): both are taken
            if name in params and str(params[name]).lower() not in allowed:
                raise ApiError(400, f"Invalid {name}: {params[name]}.")
        mime = (params.get("outputOptions") or {}).get("mimeType", "image/png")
        if mime not in ("image/png", "image/jpeg"):
            raise ApiError(400, f"Unsupported output mimeType {mime}.")
        init = None
        if model in IMAGEN_EDIT:
            refs = instance.get("referenceImages")
            kinds = {r.get("referenceType"): r for r in refs if isinstance(r, dict)} if isinstance(refs, list) else {}
            raw, mask = kinds.get("REFERENCE_TYPE_RAW"), kinds.get("REFERENCE_TYPE_MASK")
            if raw is None:
                raise ApiError(400, "A raw reference image is required for editing.")
            init = _decode((raw.get("referenceImage") or {}).get("bytesBase64Encoded"), "referenceImages[RAW]")
            if mask is not None:
                mask_data = (mask.get("referenceImage") or {}).get("bytesBase64Encoded")
                mask_img = _decode(mask_data, "referenceImages[MASK]")
                if mask_img.size != init.size:
                    raise ApiError(400, "The mask must be the size of the image.")
            size = init.size
        else:
            if "referenceImages" in instance or "editMode" in params:
                raise ApiError(400, f"{model} does not support image editing.")
            ratio = params.get("aspectRatio", "1:1")
            if ratio not in IMAGEN_SHAPES:
                raise ApiError(400, f"Unsupported aspect ratio {ratio}.")
            size = IMAGEN_SHAPES[ratio]
        predictions: list[dict[str, Any]] = []
        made = 0
        for index in range(count):
            with self._lock2:
                filtered = blocked or self.filter_next > 0
                if filtered and not blocked:
                    self.filter_next -= 1
            if filtered:
                if params.get("includeRaiReason"):
                    predictions.append({"raiFilteredReason": "Your current safety filter threshold filtered out the "
                                                             "generated image. Support codes: 58061214"})
                continue
            data = hostile_image(hostile) if hostile else _png(prompt, index, size, init, mime)
            predictions.append({"bytesBase64Encoded": base64.b64encode(data).decode(), "mimeType": mime})
            made += 1
        with self._lock2:
            self.billed_usd += made * PRICES[model]["image"]
        return Response.json(200, {"predictions": predictions} if predictions else {})

    def _generate_content(self, model: str, body: dict[str, Any], hostile: str | None, blocked: bool) -> Response:
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise ApiError(400, "* GenerateContentRequest.contents: contents is not specified")
        config = body.get("generationConfig") or {}
        if "IMAGE" not in [str(m).upper() for m in config.get("responseModalities", [])]:
            raise ApiError(400, "Model only supports text and image output: responseModalities must include IMAGE.")
        if config.get("candidateCount", 1) != 1:
            raise ApiError(400, "Multiple candidates is not enabled for this model.")
        ratio = (config.get("imageConfig") or {}).get("aspectRatio", "1:1")
        if ratio not in GEMINI_SHAPES:
            raise ApiError(400, f"Unsupported aspect ratio {ratio}.")
        texts, images = [], []
        for content in contents:
            for part in (content.get("parts") or []) if isinstance(content, dict) else []:
                if "text" in part:
                    texts.append(str(part["text"]))
                elif "inlineData" in part:
                    images.append(_decode(part["inlineData"].get("data"), "inlineData"))
                else:
                    raise ApiError(400, "Unsupported part.")
        prompt = " ".join(texts)
        prompt_tokens = max(1, len(prompt) // 4) + IMAGE_INPUT_TOKENS * len(images)
        prices = PRICES[model]
        million = Decimal(1_000_000)
        if blocked:
            counted = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
            with self._lock2:
                self.billed_usd += prompt_tokens * prices["input"] / million
            feedback = {"blockReason": "PROHIBITED_CONTENT"}
            return Response.json(200, {"promptFeedback": feedback, "usageMetadata": counted, "modelVersion": model})
        size = images[0].size if images and ratio == "1:1" and "imageConfig" not in config else GEMINI_SHAPES[ratio]
        size = min(GEMINI_SHAPES.values(), key=lambda s: abs(s[0] / s[1] - size[0] / size[1]))
        data = hostile_image(hostile) if hostile else _png(prompt, 0, size, images[0] if images else None)
        reply = "Here is the image."
        text_tokens = len(reply) // 4
        usage: dict[str, Any] = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": IMAGE_OUTPUT_TOKENS + text_tokens,
            "totalTokenCount": prompt_tokens + IMAGE_OUTPUT_TOKENS + text_tokens,
            "promptTokensDetails": [{"modality": "TEXT",
                                     "tokenCount": prompt_tokens - IMAGE_INPUT_TOKENS * len(images)}]
            + ([{"modality": "IMAGE", "tokenCount": IMAGE_INPUT_TOKENS * len(images)}] if images else []),
            "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": IMAGE_OUTPUT_TOKENS},
                                        {"modality": "TEXT", "tokenCount": text_tokens}],
        }
        with self._lock2:
            self.billed_usd += (prompt_tokens * prices["input"] + IMAGE_OUTPUT_TOKENS * prices["image_out"]
                                + text_tokens * prices["text_out"]) / million
        candidate = {"content": {"role": "model", "parts": [
            {"text": reply}, {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(data).decode()}}]},
            "finishReason": "STOP", "index": 0}
        return Response.json(200, {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model,
                                   "responseId": hashlib.sha256(data).hexdigest()[:20]})


def _bad_key() -> ApiError:
    return ApiError(400, "API key not valid. Please pass a valid API key.", [_info("API_KEY_INVALID")])
