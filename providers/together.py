"""Together AI image generation (FLUX models) through the official ``together`` SDK.

One endpoint, ``POST /v1/images/generations`` (JSON): txt2img on FLUX.1 schnell/dev,
up to two LoRAs on FLUX.1-dev-lora, and img2img on the Kontext editing models (the
init image sent as ``image_url``: a data URL, or the user's http(s) URL as is). No
mask, no seed echo (the request's seed is the image's). Images come back base64.
Together reports no usage, so the cost is computed from what was sent:
images × megapixels × $/MP × steps / default steps. The SDK runs with ``max_retries=0``.
"""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Sequence
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
from router.images import ImageDecodeError, image_size, sniff_mime
from router.prices import PriceTable
from router.request import ImageRequest
from router.result import GeneratedImage

if TYPE_CHECKING:
    import httpx
    import together

    from router.fetch import SafeFetcher

SCHNELL = "black-forest-labs/FLUX.1-schnell"
DEV = "black-forest-labs/FLUX.1-dev"
DEV_LORA = "black-forest-labs/FLUX.1-dev-lora"
KONTEXT_DEV = "black-forest-labs/FLUX.1-kontext-dev"
KONTEXT_PRO = "black-forest-labs/FLUX.1-kontext-pro"
MODELS = (SCHNELL, DEV, DEV_LORA, KONTEXT_DEV, KONTEXT_PRO)
MAX_N = 4
MAX_LORAS = 2
MAX_STEPS = {SCHNELL: 12}  # the others take 1..50
_MIME = {"png": "image/png", "jpeg": "image/jpeg"}
_OPTIONS = frozenset({"disable_safety_checker", "reference_images"})
_SIZES = SizeRules(multiple=16, min_side=256, max_side=1792, max_pixels=1792 * 1792, max_ratio=4.0,
                   native=(1024, 1024))
_TXT = Capabilities(
    tasks=frozenset({"txt2img"}), sizes=_SIZES, max_n=MAX_N, negative_prompt=True, seed=True, steps=True,
    guidance=True, quality=0.75, output_formats=frozenset(_MIME),
)
_CAPS: dict[str, Capabilities] = {
    SCHNELL: dataclasses.replace(_TXT, guidance=False, quality=0.6),
    DEV: _TXT,
    DEV_LORA: dataclasses.replace(_TXT, max_loras=MAX_LORAS),
    KONTEXT_DEV: dataclasses.replace(_TXT, tasks=frozenset({"txt2img", "img2img"})),
    KONTEXT_PRO: dataclasses.replace(_TXT, tasks=frozenset({"txt2img", "img2img"}), steps=False, quality=0.85),
}
_MODERATION_CODES = frozenset({"nsfw_content", "content_policy_violation", "moderation_blocked"})
_CREDIT_CODES = frozenset({"credit_limit_exceeded", "insufficient_credits", "insufficient_quota"})


class TogetherProvider(Provider):
    """Together AI's image API.

    ``api_key`` defaults to ``TOGETHER_API_KEY``; ``base_url`` to the SDK's host.
    ``fetcher`` downloads any output that comes back as a URL (outputs are
    requested as base64, so normally none does).
    """

    kind = "together"

    def __init__(
        self,
        *,
        name: str | None = None,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        models: Sequence[str] = MODELS,
        fetcher: SafeFetcher | None = None,
        http_client: httpx.AsyncClient | None = None,
        prices: PriceTable | None = None,
    ) -> None:
        super().__init__(name=name, prices=prices)
        key = api_key if api_key is not None else os.environ.get("TOGETHER_API_KEY")
        self._api_key = SecretStr(key) if isinstance(key, str) else key
        self._base_url = base_url or os.environ.get("TOGETHER_BASE_URL") or None
        unknown = [m for m in models if m not in _CAPS]
        if unknown:
            raise ValueError(f"unknown Together models {unknown}; known: {', '.join(MODELS)}")
        self._models = tuple(models)
        self._fetcher = fetcher
        self._http_client = http_client
        self._client_obj: together.AsyncTogether | None = None

    # --- what it can do ----------------------------------------------------------

    def models(self) -> Sequence[str]:
        return self._models

    def capabilities(self, model: str) -> Capabilities:
        return _CAPS[model]

    def provider_option_names(self) -> frozenset[str]:
        return _OPTIONS

    def configuration_problem(self) -> str | None:
        if self._api_key is None or not self._api_key.get_secret_value():
            return "not configured: set TOGETHER_API_KEY"
        try:
            import together  # noqa: F401
        except ImportError:
            return "the together SDK is not installed: pip install 'imagerouter[together]'"
        return None

    def plan(self, request: ImageRequest, model: str) -> Plan:
        base = super().plan(request, model)
        extra: list[str] = []
        top = MAX_STEPS.get(model, 50)
        if request.steps is not None and request.steps > top and _CAPS[model].steps:
            extra.append(f"steps {request.steps} adapted to {top}: the most {model} takes")
        size = base.size
        src = request.init_image
        if src is not None and request.width is None and request.aspect_ratio is None and src.width and src.height:
            size = plan_size(src.width, src.height, None, _SIZES)
            if not size.exact:
                extra.append(f"output size {size.width}x{size.height}: the nearest shape {model} makes to the init "
                             f"image's {src.width}x{src.height}")
        return Plan(size, base.warnings + tuple(extra))

    # --- cost --------------------------------------------------------------------

    def _cost(self, model: str, images: int, width: int, height: int, steps: int | None) -> tuple[Decimal, Decimal]:
        """(USD, billed megapixels) for ``images`` of ``width``×``height`` at ``steps``."""
        row = self.price_row(model)
        megapixels = images * Decimal(width * height) / row.rate("mp_pixels")
        cost = megapixels * row.rate("usd_per_mp")
        if "default_steps" in row.rates and steps is not None:
            cost = cost * steps / row.rate("default_steps")
        return cost, megapixels

    def _steps(self, request: ImageRequest, model: str) -> int | None:
        """The steps the call runs (the request's, else the model's default); None where not settable."""
        if not _CAPS[model].steps:
            return None
        if request.steps is not None:
            return min(request.steps, MAX_STEPS.get(model, 50))
        row = self.price_row(model)
        return int(row.rates["default_steps"]) if "default_steps" in row.rates else None

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        size = self.plan(request, model).size
        cost, megapixels = self._cost(model, request.n, size.width, size.height, self._steps(request, model))
        latency = float(self.price_row(model).rates.get("latency_s", 6.0)) * max(1.0, float(megapixels) / request.n)
        return Estimate(cost, latency, "megapixel_steps", megapixels)

    # --- the call ----------------------------------------------------------------

    def _client(self) -> together.AsyncTogether:
        if self._client_obj is None:
            import together

            kw: dict[str, Any] = {"api_key": self._api_key.get_secret_value() if self._api_key else None,
                                  "max_retries": 0}
            if self._base_url:
                kw["base_url"] = self._base_url
            if self._http_client is not None:
                kw["http_client"] = self._http_client
            self._client_obj = together.AsyncTogether(**kw)
        return self._client_obj

    def _params(self, request: ImageRequest, model: str) -> dict[str, Any]:
        """The JSON body, from the plan: every field either mapped or warned about in plan()."""
        caps = _CAPS[model]
        size = self.plan(request, model).size
        params: dict[str, Any] = {
            "model": model,
            "prompt": request.prompt,
            "width": size.width,
            "height": size.height,
            "n": request.n,
            "response_format": "base64",
            "output_format": request.output_format if request.output_format in _MIME else "png",
        }
        steps = self._steps(request, model)
        if steps is not None:
            params["steps"] = steps
        if request.seed is not None:
            params["seed"] = request.seed
        if request.negative_prompt and caps.negative_prompt:
            params["negative_prompt"] = request.negative_prompt
        if request.guidance_scale is not None and caps.guidance:
            params["guidance_scale"] = request.guidance_scale
        if request.loras:
            params["image_loras"] = [{"path": lora.ref, "scale": lora.weight} for lora in request.loras]
        options = request.provider_options.get(self.name, {})
        params.update({k: v for k, v in options.items() if k in _OPTIONS})
        return params

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        params = self._params(request, model)
        if request.init_image is not None:
            image = request.init_image
            if image.url is not None:
                params["image_url"] = image.url
            else:
                assert image.data is not None
                mime = image.mime or sniff_mime(image.data) or "image/png"
                params["image_url"] = f"data:{mime};base64,{base64.b64encode(image.data).decode()}"
        client = self._client()
        try:
            raw = await client.images.with_raw_response.generate(**params, timeout=timeout_s)
            body = await raw.parse()
        except ImageRouterError:
            raise
        except Exception as exc:
            raise _map_error(exc, self.name) from None
        request_id = getattr(body, "id", None) or raw.headers.get("x-request-id")
        images = await self._images(body, params, request_id)
        cost, megapixels = self._cost(model, len(images), params["width"], params["height"], params.get("steps"))
        billing = Billing(
            cost_usd=cost, unit="megapixel_steps", quantity=megapixels, price_table_version=self.prices.version,
            details={"images": len(images), "width": params["width"], "height": params["height"],
                     "steps": params.get("steps")},
        )
        return ProviderResponse(images, model, billing, str(request_id) if request_id else None)

    async def _images(self, body: Any, params: dict[str, Any], request_id: Any) -> list[GeneratedImage]:
        rid = str(request_id) if request_id else None
        seed = params.get("seed")
        images: list[GeneratedImage] = []
        try:
            items = sorted(body.data, key=lambda item: int(getattr(item, "index", 0) or 0))
            for item in items:
                b64 = getattr(item, "b64_json", None)
                if b64 is not None:
                    data = base64.b64decode(b64, validate=True)
                else:
                    data = await self._download(str(item.url))
                w, h = image_size(data)
                images.append(GeneratedImage(data=data, mime=sniff_mime(data) or _MIME[params["output_format"]],
                                             width=w, height=h, seed=seed))
        except ImageRouterError:
            raise
        except (TypeError, ValueError, AttributeError, ImageDecodeError) as exc:
            raise MalformedResponse(f"response images unreadable ({type(exc).__name__})", provider=self.name,
                                    request_id=rid) from None
        if not images:
            raise MalformedResponse("response held no images", provider=self.name, request_id=rid)
        return images

    async def _download(self, url: str) -> bytes:
        from router.fetch import SafeFetcher

        if self._fetcher is None:
            self._fetcher = SafeFetcher()
        try:
            return await self._fetcher.fetch(url)
        except ImageRouterError:
            raise
        except Exception as exc:
            raise ProviderUnavailable(f"output download failed ({type(exc).__name__})", provider=self.name) from None

    async def aclose(self) -> None:
        if self._client_obj is not None:
            await self._client_obj.close()
            self._client_obj = None


def _map_error(exc: Exception, provider: str) -> ImageRouterError:
    """The SDK's exception as the router's error class; nothing of the request is copied."""
    import together

    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else {}
    code = err.get("code") if isinstance(err, dict) else None
    etype = err.get("type") if isinstance(err, dict) else None
    message = redact(str(err.get("message") or "")) if isinstance(err, dict) else ""
    response = getattr(exc, "response", None)
    request_id = response.headers.get("x-request-id") if response is not None else None
    kw: dict[str, Any] = {"provider": provider, "status_code": status, "code": code, "request_id": request_id}
    text = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if isinstance(exc, together.APITimeoutError):
        return ProviderTimeout("the request timed out", **kw)
    if isinstance(exc, together.APIConnectionError):
        return ProviderUnavailable("could not connect", **kw)
    if isinstance(exc, together.APIResponseValidationError):
        return MalformedResponse("response does not follow the API's shape", **kw)
    if isinstance(exc, together.APIStatusError):
        if status == 402 or code in _CREDIT_CODES or etype in _CREDIT_CODES:
            return InsufficientCredits(text, **kw)
        if status in (400, 422) and (code in _MODERATION_CODES or etype in _MODERATION_CODES
                                     or "nsfw" in message.lower()):
            return ContentPolicyError(text, **kw)
        if isinstance(exc, together.RateLimitError):
            return RateLimited(text, retry_after=retry_after_s(getattr(response, "headers", None)), **kw)
        if isinstance(exc, together.AuthenticationError | together.PermissionDeniedError):
            return AuthenticationError(f"HTTP {status}: the API key was refused", **kw)
        if isinstance(exc, together.BadRequestError | together.NotFoundError | together.UnprocessableEntityError):
            return InvalidRequestError(text, **kw)
        return ProviderUnavailable(text, **kw)
    if isinstance(exc, ValueError):  # the body was not JSON
        return MalformedResponse(f"response body unreadable ({type(exc).__name__})", **kw)
    return ProviderUnavailable(f"unexpected {type(exc).__name__}", **kw)
