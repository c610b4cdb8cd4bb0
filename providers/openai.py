"""OpenAI Images (gpt-image-2 family) through the official ``openai`` SDK.

Generations and edits (init image; mask converted to OpenAI's alpha 0 = repaint),
sizes adapted with a warning, residency hosts as regions, and the actual cost
from the response's ``usage`` tokens. The SDK runs with ``max_retries=0``: the
router owns retries.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from providers.base import Billing, Capabilities, Estimate, Plan, Provider, ProviderResponse
from providers.vendor import retry_after_s
from router.errors import (
    AuthenticationError,
    ContentPolicyError,
    ImageRouterError,
    InsufficientCredits,
    InvalidRequestError,
    MalformedResponse,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    redact,
)
from router.geometry import SizeRules, plan_size
from router.images import ImageDecodeError, encode, image_size, load_bytes, mask_to_alpha_repaint
from router.prices import PriceRow, PriceTable
from router.request import ImageRequest
from router.result import GeneratedImage

if TYPE_CHECKING:
    import openai

REGIONS = ("global", "us", "eu", "ae", "au", "in", "jp")
MODELS = ("gpt-image-2",)
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_COMMON_OPTIONS = frozenset({"quality", "background", "output_compression", "user"})
_GENERATION_OPTIONS = _COMMON_OPTIONS | {"moderation"}
_EDIT_OPTIONS = _COMMON_OPTIONS | {"input_fidelity"}
_OPTIONS = _GENERATION_OPTIONS | _EDIT_OPTIONS
_SIZES = SizeRules(
    multiple=16, min_side=256, max_side=3840, min_pixels=655_360, max_pixels=3840 * 2160,
    max_ratio=3.0, native=(1024, 1024),
)
_CAPS = Capabilities(
    tasks=frozenset({"txt2img", "img2img", "inpaint"}),
    sizes=_SIZES,
    max_n=10,
    quality=0.9,
    output_formats=frozenset(_MIME),
)


class OpenAIProvider(Provider):
    """OpenAI's Images API.

    ``api_key`` defaults to ``OPENAI_API_KEY``. Without ``base_url`` the provider
    serves every residency region through the SDK's ``data_residency`` hosts;
    ``region_base_urls`` maps regions to other endpoints (a proxy, a sandbox).
    """

    kind = "openai"

    def __init__(
        self,
        *,
        name: str | None = None,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        region_base_urls: Mapping[str, str] | None = None,
        models: Sequence[str] = MODELS,
        quality: float = 0.9,
        prices: PriceTable | None = None,
    ) -> None:
        super().__init__(name=name, prices=prices)
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._api_key = SecretStr(key) if isinstance(key, str) else key
        self._base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self._region_urls = dict(region_base_urls or {})
        unknown = set(self._region_urls) - set(REGIONS)
        if unknown:
            raise ValueError(f"unknown OpenAI regions {sorted(unknown)}; use {', '.join(REGIONS)}")
        regions = {"global", *self._region_urls} if self._base_url else set(REGIONS)
        self._caps = dataclasses.replace(_CAPS, regions=frozenset(regions), quality=quality)
        self._models = tuple(models)
        self._clients: dict[str, openai.AsyncOpenAI] = {}

    # --- what it can do ----------------------------------------------------------

    def models(self) -> Sequence[str]:
        return self._models

    def supports_model(self, model: str) -> bool:
        return model.startswith("gpt-image-2")

    def capabilities(self, model: str) -> Capabilities:
        return self._caps

    def provider_option_names(self) -> frozenset[str]:
        return _OPTIONS

    def configuration_problem(self) -> str | None:
        if self._api_key is None or not self._api_key.get_secret_value():
            return "not configured: set OPENAI_API_KEY"
        try:
            import openai  # noqa: F401
        except ImportError:
            return "the openai SDK is not installed: pip install 'imagerouter[openai]'"
        return None

    def plan(self, request: ImageRequest, model: str) -> Plan:
        base = super().plan(request, model)
        allowed = _options_for(request)
        endpoint = "edits" if request.init_image is not None else "generations"
        misplaced = tuple(f"provider_options.{self.name}.{k} does not apply to {endpoint}; ignored"
                          for k in request.provider_options.get(self.name, {}) if k in _OPTIONS - allowed)
        base = Plan(base.size, base.warnings + misplaced)
        if request.width is None and request.aspect_ratio is None and request.init_image is not None:
            src = request.init_image
            if src.width and src.height:
                size = plan_size(src.width, src.height, None, _SIZES)
                note = () if size.exact else (f"output size {size.width}x{size.height}: the nearest shape "
                                              f"{model} makes to the init image's {src.width}x{src.height}",)
                return Plan(size, base.warnings + note)
        return base

    # --- cost --------------------------------------------------------------------

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        row = self.price_row(model)
        size = self.plan(request, model).size
        quality = str(request.provider_options.get(self.name, {}).get("quality", "auto"))
        per_mp = row.rates["output_tokens_1mp"]
        out_tokens = request.n * round(per_mp.get(quality, per_mp["auto"]) * size.width * size.height / 1024**2)
        text_tokens = math.ceil(len(request.prompt.encode()) / 4)
        image_tokens = 0
        if request.init_image is not None:  # the mask is not billed as input
            image_tokens = _image_tokens(request.init_image.width or 1024, request.init_image.height or 1024)
        cost = _token_cost(row, text_tokens, image_tokens, out_tokens)
        latency = float(row.rates.get("latency_s", 12.0)) * max(1.0, size.width * size.height / 1024**2) ** 0.5
        return Estimate(cost, latency, "tokens", Decimal(text_tokens + image_tokens + out_tokens))

    # --- the call ----------------------------------------------------------------

    def _region(self, request: ImageRequest) -> str:
        allowed = request.constraints.residency
        if allowed is None:
            return "global"
        for region in REGIONS:
            if region in allowed and region in self._caps.regions:
                return region
        raise InvalidRequestError(f"no OpenAI host in regions {sorted(allowed)}", provider=self.name)

    def _client(self, region: str) -> openai.AsyncOpenAI:
        client = self._clients.get(region)
        if client is None:
            import openai

            kw: dict[str, Any] = {"api_key": self._api_key.get_secret_value() if self._api_key else None,
                                  "max_retries": 0}
            if region in self._region_urls:
                kw["base_url"] = self._region_urls[region]
            elif self._base_url:
                kw["base_url"] = self._base_url
            elif region != "global":
                kw["data_residency"] = region
            client = self._clients[region] = openai.AsyncOpenAI(**kw)
        return client

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        plan = self.plan(request, model)
        options = request.provider_options.get(self.name, {})
        params: dict[str, Any] = {
            "model": model,
            "prompt": request.prompt,
            "n": request.n,
            "size": f"{plan.size.width}x{plan.size.height}",
            "output_format": request.output_format,
            **{k: v for k, v in options.items() if k in _options_for(request)},
        }
        headers = {"Idempotency-Key": request.idempotency_key} if request.idempotency_key else None
        client = self._client(self._region(request))
        try:
            if request.init_image is None:
                raw = await client.images.with_raw_response.generate(
                    **params, timeout=timeout_s, extra_headers=headers)
            else:
                files = await self._edit_files(request)
                raw = await client.images.with_raw_response.edit(
                    **params, **files, timeout=timeout_s, extra_headers=headers)
            body = raw.parse()
        except ImageRouterError:
            raise
        except Exception as exc:
            raise _map_error(exc, self.name) from None
        return self._response(body, raw.headers.get("x-request-id"), model, request.output_format)

    async def _edit_files(self, request: ImageRequest) -> dict[str, Any]:
        assert request.init_image is not None
        image = await load_bytes(request.init_image)
        files: dict[str, Any] = {"image": ("image.png", image, request.init_image.mime or "image/png")}
        if request.mask_image is not None:
            from router.images import decode

            size = image_size(image)
            mask = mask_to_alpha_repaint(decode(await load_bytes(request.mask_image), what="mask_image"), size)
            files["mask"] = ("mask.png", encode(mask, "png"), "image/png")
        return files

    def _response(self, body: Any, request_id: str | None, model: str, fmt: str) -> ProviderResponse:
        try:
            items = list(body.data or [])
            images = []
            for item in items:
                data = base64.b64decode(item.b64_json)
                w, h = image_size(data)
                images.append(GeneratedImage(data=data, mime=_MIME.get(getattr(body, "output_format", None) or fmt,
                                                                       "image/png"), width=w, height=h))
        except (TypeError, ValueError, AttributeError, ImageDecodeError) as exc:
            raise MalformedResponse(f"response images unreadable ({type(exc).__name__})", provider=self.name,
                                    request_id=request_id) from None
        if not images:
            raise MalformedResponse("response held no images", provider=self.name, request_id=request_id)
        return ProviderResponse(images, model, self._billing(body, model), request_id)

    def _billing(self, body: Any, model: str) -> Billing:
        row = self.price_row(model)
        usage = getattr(body, "usage", None)
        if usage is None:
            raise MalformedResponse("response has no usage: cannot settle the cost", provider=self.name)
        details = getattr(usage, "input_tokens_details", None)
        text = int(getattr(details, "text_tokens", 0) or 0) if details else int(usage.input_tokens)
        image_in = int(getattr(details, "image_tokens", 0) or 0) if details else 0
        out = int(usage.output_tokens)
        return Billing(
            cost_usd=_token_cost(row, text, image_in, out),
            unit="tokens",
            quantity=Decimal(int(usage.total_tokens)),
            price_table_version=self.prices.version,
            details={"text_input_tokens": text, "image_input_tokens": image_in, "output_tokens": out},
        )

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


def _options_for(request: ImageRequest) -> frozenset[str]:
    return _EDIT_OPTIONS if request.init_image is not None else _GENERATION_OPTIONS


def _token_cost(row: PriceRow, text: int, image_in: int, out: int) -> Decimal:
    million = Decimal(1_000_000)
    return (
        text * row.rate("text_input_per_mtok")
        + image_in * row.rate("image_input_per_mtok")
        + out * row.rate("image_output_per_mtok")
    ) / million


def _image_tokens(width: int, height: int) -> int:
    """Vision tiles: fit in 2048², shortest side 768, then 65 + 129 per 512² tile."""
    scale = min(1.0, 2048 / max(width, height))
    scale *= min(1.0, 768 / (min(width, height) * scale))
    return 65 + 129 * math.ceil(width * scale / 512) * math.ceil(height * scale / 512)


def _map_error(exc: Exception, provider: str) -> ImageRouterError:
    """The SDK's exception as the router's error class; nothing of the request is copied."""
    import openai

    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else {}
    code = err.get("code") if isinstance(err, dict) else None
    message = redact(str(err.get("message") or "")) if isinstance(err, dict) else ""
    response = getattr(exc, "response", None)
    request_id = response.headers.get("x-request-id") if response is not None else None
    kw: dict[str, Any] = {"provider": provider, "status_code": status, "code": code, "request_id": request_id}
    text = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if isinstance(exc, openai.APITimeoutError):
        return ProviderTimeout("the request timed out", **kw)
    if isinstance(exc, openai.APIConnectionError):
        return ProviderUnavailable("could not connect", **kw)
    if isinstance(exc, openai.RateLimitError):
        if code == "insufficient_quota":
            return InsufficientCredits(text, **kw)
        return RateLimited(text, retry_after=retry_after_s(getattr(response, "headers", None)), **kw)
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return AuthenticationError(f"HTTP {status}: the API key was refused", **kw)
    if isinstance(exc, openai.BadRequestError) and code in ("moderation_blocked", "content_policy_violation"):
        return ContentPolicyError(text, **kw)
    if isinstance(exc, openai.APIResponseValidationError):
        return MalformedResponse("response does not follow the API's shape", **kw)
    if isinstance(exc, openai.BadRequestError | openai.NotFoundError | openai.UnprocessableEntityError):
        return InvalidRequestError(text, **kw)
    if isinstance(exc, openai.APIStatusError):
        return ProviderUnavailable(text, **kw)
    if isinstance(exc, ValueError):  # the body was not JSON
        return MalformedResponse(f"response body unreadable ({type(exc).__name__})", **kw)
    return ProviderUnavailable(f"unexpected {type(exc).__name__}", **kw)
