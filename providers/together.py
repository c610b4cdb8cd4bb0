"""Together AI image generation (FLUX models) through the official ``together`` SDK.

One endpoint, ``POST /v1/images/generations`` (JSON): txt2img on FLUX.1 schnell/dev,
up to two LoRAs on FLUX.1-dev-lora, and img2img on the Kontext editing models (the
init image sent as ``image_url``: always a data URL; a user's http(s) URL is downloaded here
through the safe fetcher first, so Together never fetches a URL it was handed; reference images
alike). A LoRA given by URL is sent by URL, its redirects followed and every hop checked. No
mask, no seed echo (the request's seed is the image's). Images come back base64.
Together reports no usage, so the cost is computed from what was sent:
images × megapixels × $/MP × steps / default steps. The SDK runs with ``max_retries=0``.

A 200 answer is a generation Together bills, for every image it made, readable or not. An
output that arrives as a URL is downloaded (through the safe fetcher), and a failed download
is tried again a few times within the call's time, never re-generated. Images that cannot
be had are dropped with a warning; when none is left, the error carries the generation's
bill (:func:`providers.vendor.charged`), so the router settles it and tries the next candidate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from providers.base import Billing, Capabilities, Estimate, Plan, Provider, ProviderResponse
from providers.openai import SdkError, sdk_error, sdk_missing
from providers.vendor import (
    ApiKey,
    charged,
    download_paid,
    known_models,
    looks_like_url,
    output_image,
    vendor_fetched_url,
    vendor_image,
)
from router.errors import (
    ContentPolicyError,
    ImageRouterError,
    InsufficientCredits,
    MalformedResponse,
)
from router.geometry import SizeRules, plan_size
from router.images import ImageDecodeError, ab64decode, adata_url
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
_SIZES = SizeRules(multiple=16, min_side=256, max_side=1792, max_pixels=1792 * 1792, max_ratio=4.0, native=(1024, 1024))
_TXT = Capabilities(
    tasks=frozenset({"txt2img"}),
    sizes=_SIZES,
    max_n=MAX_N,
    negative_prompt=True,
    seed=True,
    steps=True,
    guidance=True,
    quality=0.75,
    output_formats=frozenset(_MIME),
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
_REPORT_MARGIN_S = 0.5  # the most of a call's time kept back to hand a paid answer's bill to the router


class TogetherProvider(Provider):
    """Together AI's image API.

    ``api_key`` defaults to ``TOGETHER_API_KEY``; ``base_url`` to the SDK's host.
    ``fetcher`` downloads any output that comes back as a URL (outputs are
    requested as base64, so normally none does); a failed download is made up to
    ``download_attempts`` times, ``download_backoff_s`` doubling between them.
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
        download_attempts: int = 3,
        download_backoff_s: float = 0.5,
    ) -> None:
        super().__init__(name=name, prices=prices)
        if download_attempts < 1:
            raise ValueError("download_attempts must be at least 1")
        self._key = ApiKey(api_key, "TOGETHER_API_KEY")
        self._download_attempts = download_attempts
        self._download_backoff_s = download_backoff_s
        self._base_url = base_url or os.environ.get("TOGETHER_BASE_URL") or None
        self._models = known_models("Together", models, MODELS)
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
        return self._key.problem() or sdk_missing("together")

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
                extra.append(
                    f"output size {size.width}x{size.height}: the nearest shape {model} makes to the init "
                    f"image's {src.width}x{src.height}"
                )
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

            kw: dict[str, Any] = {"api_key": self._key.value(), "max_retries": 0}
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
        loop = asyncio.get_running_loop()
        # Downloads of a paid answer stop short of the call's time, so its bill reaches the router.
        deadline = loop.time() + timeout_s - min(_REPORT_MARGIN_S, timeout_s / 10)
        params = self._params(request, model)
        await self._check_urls(params)
        if request.init_image is not None:
            image = request.init_image
            if image.url is not None:  # downloaded here, through the safe fetcher: Together is sent bytes
                params["image_url"] = await vendor_image(
                    image.url, self._safe_fetcher(), what="init_image", provider=self.name
                )
            else:
                assert image.data is not None
                params["image_url"] = await adata_url(image.data, image.mime)
        client = self._client()
        try:
            raw = await client.images.with_raw_response.generate(**params, timeout=timeout_s)
        except ImageRouterError:
            raise
        except Exception as exc:
            raise _map_error(exc, self.name) from None
        header_id = raw.headers.get("x-request-id")
        try:
            body = await raw.parse()
            items = sorted(body.data, key=lambda item: int(getattr(item, "index", 0) or 0))
        except Exception as exc:  # a 200 we cannot read: Together made (and bills) the images asked for
            error = MalformedResponse(
                f"response body unreadable ({type(exc).__name__})",
                provider=self.name,
                status_code=raw.status_code,
                request_id=header_id,
            )
            raise charged(error, self._billing(model, params, params["n"])) from None
        request_id = str(getattr(body, "id", None) or header_id or "") or None
        billing = self._billing(model, params, len(items))
        outcomes = await asyncio.gather(
            *(self._image(item, params, request_id, deadline) for item in items), return_exceptions=True
        )
        images = [o for o in outcomes if isinstance(o, GeneratedImage)]
        errors = [o for o in outcomes if isinstance(o, ImageRouterError)]
        for other in outcomes:
            if isinstance(other, BaseException) and not isinstance(other, ImageRouterError):
                raise other
        if not images:
            first = (
                errors[0]
                if errors
                else MalformedResponse("response held no images", provider=self.name, request_id=request_id)
            )
            raise charged(first, billing)
        warnings = (
            (
                f"{len(images)} of {len(items)} images returned: {len(errors)} could not be had "
                f"({', '.join(sorted({e.kind for e in errors}))}), billed by Together all the same",
            )
            if errors
            else ()
        )
        return ProviderResponse(images, model, billing, request_id, warnings=warnings)

    async def _check_urls(self, params: dict[str, Any]) -> None:
        """Every URL Together would fetch for us, made safe before it is sent: a LoRA's weights URL is
        followed and checked hop by hop, and its final URL sent (:func:`providers.vendor.vendor_fetched_url`);
        a reference image is downloaded here and sent as a data URL (:func:`providers.vendor.vendor_image`).
        Anything else is left to the API."""
        for i, lora in enumerate(params.get("image_loras", ())):
            if looks_like_url(lora["path"]):
                lora["path"] = await vendor_fetched_url(
                    lora["path"], self._safe_fetcher(), what=f"loras[{i}].ref", provider=self.name
                )
        refs = params.get("reference_images")
        if isinstance(refs, list):
            params["reference_images"] = [
                await vendor_image(
                    ref, self._safe_fetcher(), what=f"provider_options.{self.name}.reference_images", provider=self.name
                )
                if isinstance(ref, str) and looks_like_url(ref) and not ref.startswith("data:")
                else ref
                for ref in refs
            ]

    def _safe_fetcher(self) -> SafeFetcher:
        from router.fetch import SafeFetcher

        if self._fetcher is None:
            self._fetcher = SafeFetcher()
        return self._fetcher

    def _billing(self, model: str, params: dict[str, Any], images: int) -> Billing:
        """The bill for ``images`` made as ``params`` asked (Together reports no usage)."""
        cost, megapixels = self._cost(model, images, params["width"], params["height"], params.get("steps"))
        return Billing(
            cost_usd=cost,
            unit="megapixel_steps",
            quantity=megapixels,
            price_table_version=self.prices.version,
            details={
                "images": images,
                "width": params["width"],
                "height": params["height"],
                "steps": params.get("steps"),
            },
        )

    async def _image(
        self, item: Any, params: dict[str, Any], request_id: str | None, deadline: float
    ) -> GeneratedImage:
        """One output item as an image: base64 decoded, or its URL downloaded; then decoded once, whole."""
        b64, url = getattr(item, "b64_json", None), getattr(item, "url", None)
        try:
            if b64 is not None:
                data = await ab64decode(b64, what="b64_json")
            elif isinstance(url, str) and url:
                data = await self._download(url, deadline)
            else:
                raise ValueError("an item with neither b64_json nor url")
        except (TypeError, ValueError, ImageDecodeError) as exc:
            raise MalformedResponse(
                f"response image unreadable ({type(exc).__name__})",
                provider=self.name,
                status_code=200,
                request_id=request_id,
            ) from None
        mime, width, height = await output_image(data, provider=self.name, request_id=request_id, status_code=200)
        return GeneratedImage(data=data, mime=mime, width=width, height=height, seed=params.get("seed"))

    async def _download(self, url: str, deadline: float) -> bytes:
        """The output at ``url`` (already billed): downloaded again after a failure, never re-generated."""
        return await download_paid(
            self._safe_fetcher(),
            url,
            provider=self.name,
            request_id=None,
            deadline=deadline,
            attempts=self._download_attempts,
            backoff_s=self._download_backoff_s,
        )

    async def aclose(self) -> None:
        if self._client_obj is not None:
            await self._client_obj.close()
            self._client_obj = None


def _together_kind(err: SdkError) -> type[ImageRouterError] | None:
    """Together's own codes: 402 and its credit codes are an empty account (spend limit); a 400/422
    naming NSFW content is a refusal (PROVIDERS.md, Together AI: errors 400 401 402 403 404 429 500 503)."""
    if err.status == 402 or err.code in _CREDIT_CODES or err.etype in _CREDIT_CODES:
        return InsufficientCredits
    if err.status in (400, 422) and (
        err.code in _MODERATION_CODES or err.etype in _MODERATION_CODES or "nsfw" in err.message.lower()
    ):
        return ContentPolicyError
    return None


def _map_error(exc: Exception, provider: str) -> ImageRouterError:
    """The together SDK's exception as the router's error class."""
    import together

    return sdk_error(exc, provider, together, _together_kind)
