"""xAI's Grok Imagine image models through its OpenAI-compatible REST API, with the official ``openai`` SDK.

xAI documents ``POST https://api.x.ai/v1/images/generations`` as compatible with the OpenAI SDK (same
``base_url`` ``https://api.x.ai/v1``) and its edits as JSON, not multipart: "The OpenAI SDK's images.edit()
method is not supported … the xAI API requires application/json. Use the xAI SDK, Vercel AI SDK, or direct
HTTP requests instead" (https://docs.x.ai/developers/model-capabilities/images/generation). So generations
go through ``client.images.generate`` (``aspect_ratio`` and ``resolution`` in ``extra_body``) and edits through
the same client's JSON ``post("/images/edits")`` with ``image: {url: <data URL>}``. The SDK runs with
``max_retries=0``: the router owns retries.

Outputs are requested as ``b64_json`` (no URL to download), each passed through the one check every output
passes. The bill is the answer's ``usage.cost_in_usd_ticks`` (10^10 ticks a dollar) where xAI reports it,
else the price table's per-image rates. ``size``, ``quality`` and ``style`` are not sent: xAI answers
"Argument not supported: size"; the shape is chosen by ``aspect_ratio`` from xAI's list.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from providers.base import Billing, Capabilities, Estimate, Plan, Provider, ProviderResponse
from providers.openai import SdkError, sdk_error, sdk_missing
from providers.vendor import ApiKey, charged, known_models, output_image
from router.errors import (
    AuthenticationError,
    ContentPolicyError,
    ImageRouterError,
    InsufficientCredits,
    MalformedResponse,
    redact,
)
from router.geometry import SizePlan, SizeRules, parse_ratio
from router.images import ImageDecodeError, ab64decode, adata_url, load_bytes
from router.prices import PriceTable
from router.request import ImageRequest
from router.result import GeneratedImage

if TYPE_CHECKING:
    import openai

    from router.fetch import SafeFetcher

BASE_URL = "https://api.x.ai/v1"
MODELS = ("grok-imagine-image", "grok-imagine-image-pro")
TICKS_PER_USD = Decimal(10**10)
# xAI's aspect ratios (the images/generations reference: "1:1, 3:4, 4:3, 9:16, 16:9, 2:3, 3:2, 9:19.5, 19.5:9,
# 9:20, 20:9, 1:2, 2:1, auto"). The pixel shapes at "1k" are not published: these are ~1 MP shapes of each ratio
# (verified = false in the price table's sense); the bill is per image whatever the shape.
RATIOS: dict[str, tuple[int, int]] = {
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
_SIZES = SizeRules(fixed=tuple(RATIOS.values()), native=(1024, 1024))
_OPTIONS = frozenset({"resolution", "user"})
_CAPS = Capabilities(
    tasks=frozenset({"txt2img", "img2img"}),  # edits take one source image, no mask (not inpainting)
    sizes=_SIZES,
    max_n=10,  # "n: Number of images to generate … Min: 1. Max: 10"
    quality=0.8,
    output_formats=frozenset({"jpeg"}),
)


class XAIProvider(Provider):
    """xAI's image API (Grok Imagine).

    ``api_key`` defaults to ``XAI_API_KEY``; ``base_url`` (default ``XAI_BASE_URL`` or https://api.x.ai/v1)
    points elsewhere (a proxy, a sandbox). xAI documents no regional hosts: the one region is ``global``.
    ``fetcher`` downloads init images given by URL.
    """

    kind = "xai"

    def __init__(
        self,
        *,
        name: str | None = None,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        models: Sequence[str] = MODELS,
        prices: PriceTable | None = None,
        fetcher: SafeFetcher | None = None,
    ) -> None:
        super().__init__(name=name, prices=prices)
        self._key = ApiKey(api_key, "XAI_API_KEY")
        self._base_url = base_url or os.environ.get("XAI_BASE_URL") or BASE_URL
        self._models = known_models("xAI", models, MODELS)
        self._fetcher = fetcher
        self._client: openai.AsyncOpenAI | None = None

    # --- what it can do ----------------------------------------------------------

    def models(self) -> Sequence[str]:
        return self._models

    def capabilities(self, model: str) -> Capabilities:
        quality = 0.85 if model == "grok-imagine-image-pro" else 0.8
        return dataclasses.replace(_CAPS, quality=quality)

    def provider_option_names(self) -> frozenset[str]:
        return _OPTIONS

    def configuration_problem(self) -> str | None:
        return self._key.problem() or sdk_missing("openai")

    def plan(self, request: ImageRequest, model: str) -> Plan:
        base = super().plan(request, model)
        if request.output_format != "jpeg":  # xAI makes JPEGs ("The generated image will be in jpg format")
            fixed = tuple(w for w in base.warnings if not w.startswith("output_format "))
            base = Plan(base.size, (*fixed, f"output_format {request.output_format} not offered; returning jpeg"))
        if request.init_image is None:
            return base
        # an edit keeps the source image's aspect ratio; aspect_ratio is not taken (see the sandbox's notes)
        src = request.init_image
        ratio = src.width / src.height if src.width and src.height else 1.0
        w, h = min(RATIOS.values(), key=lambda s: abs(math.log(s[0] / s[1] / ratio)))
        warnings = [x for x in base.warnings if x != base.size.warning]
        asked = _asked_ratio(request)
        if asked is not None and abs(math.log(asked / (w / h))) > 0.02:
            warnings.insert(0, f"output {w}x{h}: an xAI edit keeps the init image's aspect ratio")
        return Plan(SizePlan(w, h), tuple(warnings))

    # --- cost --------------------------------------------------------------------

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        row = self.price_row(model)
        cost = request.n * row.rate("usd_per_image")
        if request.init_image is not None:
            cost += row.rate("usd_per_input_image")
        return Estimate(cost, float(row.rates.get("latency_s", 8.0)), "images", Decimal(request.n))

    # --- the call ----------------------------------------------------------------

    def _sdk(self) -> openai.AsyncOpenAI:
        if self._client is None:
            import openai

            self._client = openai.AsyncOpenAI(api_key=self._key.value(), base_url=self._base_url, max_retries=0)
        return self._client

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        plan = self.plan(request, model)
        options = request.provider_options.get(self.name, {})
        extra: dict[str, Any] = {k: v for k, v in options.items() if k in _OPTIONS}
        client = self._sdk()
        try:
            if request.init_image is None:
                extra["aspect_ratio"] = _ratio_name(plan.size.width, plan.size.height)
                raw = await client.images.with_raw_response.generate(
                    model=model, prompt=request.prompt, n=request.n, response_format="b64_json",
                    extra_body=extra, timeout=timeout_s,
                )
                request_id = raw.headers.get("x-request-id")
                payload = _json(raw.content, self.name, request_id)
            else:
                image = await load_bytes(request.init_image, fetcher=self._fetcher)
                body = {"model": model, "prompt": request.prompt, "n": request.n, "response_format": "b64_json",
                        "image": {"url": await adata_url(image)}, **extra}
                response = await client.post(
                    "/images/edits", body=body, cast_to=_raw_response_type(), options={"timeout": timeout_s}
                )
                request_id = response.headers.get("x-request-id")
                payload = _json(response.content, self.name, request_id)
        except ImageRouterError:
            raise
        except Exception as exc:
            raise _map_error(exc, self.name) from None
        return await self._response(payload, request, model, request_id, plan)

    async def _response(
        self, payload: dict[str, Any], request: ImageRequest, model: str, request_id: str | None, plan: Plan
    ) -> ProviderResponse:
        billing = self._billing(payload, request, model)
        items = payload.get("data")
        items = [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []
        blocked = payload.get("block_reason")
        if blocked and not items:
            error = ContentPolicyError(
                f"moderated: {redact(str(blocked))[:200]}", provider=self.name, status_code=200, request_id=request_id
            )
            raise charged(error, billing)
        images: list[GeneratedImage] = []
        problems: list[str] = []
        for item in items:
            try:
                data = await ab64decode(str(item.get("b64_json") or ""), what="b64_json")
                mime, width, height = await output_image(data, provider=self.name, request_id=request_id,
                                                         status_code=200)
            except (ValueError, ImageDecodeError, MalformedResponse) as exc:
                problems.append(getattr(exc, "message", type(exc).__name__))
                continue
            images.append(GeneratedImage(data=data, mime=mime, width=width, height=height))
        if not images:
            what = f"response images unreadable ({'; '.join(sorted(set(problems)))})" if problems else \
                "response held no images"
            raise charged(MalformedResponse(what, provider=self.name, status_code=200, request_id=request_id),
                          billing)
        warnings = list(plan.warnings)
        if problems:
            warnings.append(f"{len(images)} of {len(items)} images returned: {len(problems)} unreadable, "
                            f"billed by xAI all the same")
        return ProviderResponse(images, model, billing, request_id, warnings=tuple(warnings))

    def _billing(self, payload: Mapping[str, Any], request: ImageRequest, model: str) -> Billing:
        """xAI's own ``usage.cost_in_usd_ticks`` where the answer has it, else the price table's per-image rates."""
        row = self.price_row(model)
        items = payload.get("data")
        count = len(items) if isinstance(items, list) else 0
        usage = payload.get("usage")
        ticks = usage.get("cost_in_usd_ticks") if isinstance(usage, dict) else None
        details: dict[str, Any] = {"images": count}
        if isinstance(ticks, int) and not isinstance(ticks, bool) and ticks >= 0:
            cost = Decimal(ticks) / TICKS_PER_USD
            details |= {"cost_in_usd_ticks": ticks, "billed_by": "vendor"}
        else:
            cost = count * row.rate("usd_per_image")
            if request.init_image is not None:
                cost += row.rate("usd_per_input_image")
            details["billed_by"] = "price table"
        return Billing(cost, "images", Decimal(count), self.prices.version, details)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _asked_ratio(request: ImageRequest) -> float | None:
    if request.width is not None and request.height is not None:
        return request.width / request.height
    return parse_ratio(request.aspect_ratio) if request.aspect_ratio is not None else None


def _ratio_name(width: int, height: int) -> str:
    return next(name for name, size in RATIOS.items() if size == (width, height))


def _raw_response_type() -> Any:
    """The SDK transport's response class (openai 3.x runs on ``httpx2``), so ``client.post`` hands back the raw
    answer."""
    import httpx2

    return httpx2.Response


def _json(content: bytes, provider: str, request_id: str | None) -> dict[str, Any]:
    try:
        payload = json.loads(content)
    except ValueError:
        raise MalformedResponse("response body is not JSON", provider=provider, status_code=200,
                                request_id=request_id) from None
    if not isinstance(payload, dict):
        raise MalformedResponse("response body is not a JSON object", provider=provider, status_code=200,
                                request_id=request_id)
    return payload


def _xai_kind(err: SdkError) -> type[ImageRouterError] | None:
    """xAI's error body is ``{"code": <status text>, "error": <message>}``. A refused key is a 400 ("The request is
    invalid or an invalid API key is provided", xAI's REST reference for images/generations); an exhausted
    balance a 403 ("insufficient balance for the requested operation")."""
    text = err.message.lower()
    if err.status == 400 and "api key" in text:
        return AuthenticationError
    if err.status in (402, 403) and ("credit" in text or "balance" in text or "spending limit" in text):
        return InsufficientCredits
    if err.status == 400 and ("moderation" in text or "content policy" in text):
        return ContentPolicyError
    return None


def _map_error(exc: Exception, provider: str) -> ImageRouterError:
    """The openai SDK's exception as the router's error class, reading xAI's own error body."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        body = getattr(exc, "body", None)  # the SDK keeps the body's "error" member: xAI's message, a string
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            exc.body = {"error": {"message": body["error"], "code": None, "type": body.get("code")}}
        elif isinstance(body, str):
            exc.body = {"error": {"message": body, "code": None, "type": None}}
    return sdk_error(exc, provider, openai, _xai_kind)
