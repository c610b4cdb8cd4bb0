"""OpenAI Images (gpt-image-2 family) through the official ``openai`` SDK.

Generations and edits (init image; mask converted to OpenAI's alpha 0 = repaint),
sizes adapted with a warning, residency hosts as regions, and the actual cost
from the response's ``usage`` tokens. The SDK runs with ``max_retries=0``: the
router owns retries.

A 200 answer is billed by OpenAI whatever its images hold (the bill is its ``usage``): an
image that fails the one check every output passes (:func:`providers.vendor.output_image`: bad
base64, not an image, a decompression bomb, a truncated file) is dropped with a warning, and
when none is left the error carries that bill (:func:`providers.vendor.charged`), so the
router settles it and tries the next candidate.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import math
import os
import types
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from providers.base import Billing, Capabilities, Estimate, Plan, Provider, ProviderResponse
from providers.vendor import ApiKey, charged, connection_error, output_image, status_error
from router.errors import (
    ContentPolicyError,
    ImageRouterError,
    InsufficientCredits,
    InvalidRequestError,
    MalformedResponse,
    ProviderUnavailable,
    redact,
)
from router.geometry import SizeRules, plan_size
from router.images import (
    ImageDecodeError,
    ab64decode,
    amask_png,
    image_size,
    load_bytes,
    mask_to_alpha_repaint,
)
from router.prices import PriceRow, PriceTable
from router.progress import PartialImage, ProgressCallback, current_sink
from router.request import ImageRequest
from router.result import GeneratedImage

if TYPE_CHECKING:
    import openai

    from router.fetch import SafeFetcher

REGIONS = ("global", "us", "eu", "ae", "au", "in", "jp")
MODELS = ("gpt-image-2",)
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_COMMON_OPTIONS = frozenset({"quality", "background", "output_compression", "user"})
_GENERATION_OPTIONS = _COMMON_OPTIONS | {"moderation"}
_EDIT_OPTIONS = _COMMON_OPTIONS | {"input_fidelity"}
_OPTIONS = _GENERATION_OPTIONS | _EDIT_OPTIONS
_SIZES = SizeRules(
    multiple=16,
    min_side=256,
    max_side=3840,
    min_pixels=655_360,
    max_pixels=3840 * 2160,
    max_ratio=3.0,
    native=(1024, 1024),
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
    ``region_base_urls`` maps regions to other endpoints (a proxy, a sandbox). ``fetcher``
    downloads init and mask images given by URL (default: a :class:`~router.fetch.SafeFetcher`).
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
        fetcher: SafeFetcher | None = None,
    ) -> None:
        super().__init__(name=name, prices=prices)
        self._key = ApiKey(api_key, "OPENAI_API_KEY")
        self._fetcher = fetcher
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
        return self._key.problem() or sdk_missing("openai")

    def plan(self, request: ImageRequest, model: str) -> Plan:
        base = super().plan(request, model)
        allowed = _options_for(request)
        endpoint = "edits" if request.init_image is not None else "generations"
        misplaced = tuple(
            f"provider_options.{self.name}.{k} does not apply to {endpoint}; ignored"
            for k in request.provider_options.get(self.name, {})
            if k in _OPTIONS - allowed
        )
        base = Plan(base.size, base.warnings + misplaced)
        if request.width is None and request.aspect_ratio is None and request.init_image is not None:
            src = request.init_image
            if src.width and src.height:
                size = plan_size(src.width, src.height, None, _SIZES)
                note = (
                    ()
                    if size.exact
                    else (
                        f"output size {size.width}x{size.height}: the nearest shape "
                        f"{model} makes to the init image's {src.width}x{src.height}",
                    )
                )
                return Plan(size, base.warnings + note)
        return base

    # --- cost --------------------------------------------------------------------

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        """The expected bill, and the most the call can be billed (``max_cost_usd``), both in tokens.

        Expected: output tokens for the quality asked (``auto`` at the table's ``auto`` count), text at
        ~4 bytes a token, the init image's vision tokens (the mask is not billed as input). Worst case:
        the most output tokens any quality the request allows makes at this size (``auto`` lets OpenAI
        pick, up to ``high``), one text token per byte of the prompt (a token covers at least one byte),
        and the init image's vision tokens (the largest tile count where its size is unknown).
        """
        row = self.price_row(model)
        size = self.plan(request, model).size
        quality = str(request.provider_options.get(self.name, {}).get("quality", "auto"))
        per_mp: Mapping[str, int] = row.rates["output_tokens_1mp"]
        megapixels = size.width * size.height / 1024**2
        out_tokens = request.n * round(per_mp.get(quality, per_mp["auto"]) * megapixels)
        text_tokens = math.ceil(len(request.prompt.encode()) / 4)
        image_tokens = max_image_tokens = 0
        src = request.init_image
        if src is not None:  # the mask is not billed as input
            image_tokens = _image_tokens(src.width or 1024, src.height or 1024)
            max_image_tokens = _image_tokens(src.width, src.height) if src.width and src.height else _MAX_IMAGE_TOKENS
        cost = _token_cost(row, text_tokens, image_tokens, out_tokens)
        worst_per_mp = per_mp[quality] if quality in _QUALITIES and quality in per_mp else max(per_mp.values())
        max_out = request.n * math.ceil(worst_per_mp * megapixels)
        most = _token_cost(row, len(request.prompt.encode()), max_image_tokens, max_out)
        latency = float(row.rates.get("latency_s", 12.0)) * max(1.0, megapixels) ** 0.5
        return Estimate(cost, latency, "tokens", Decimal(text_tokens + image_tokens + out_tokens), max_cost_usd=most)

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

            kw: dict[str, Any] = {"api_key": self._key.value(), "max_retries": 0}
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
        sink = current_sink()
        if request.partial_images and request.n == 1 and sink is not None:
            # Streamed: partial images as progress events. One image only: with several, the reference does not
            # say whether each completed event's usage is that image's or the whole request's.
            params |= {"stream": True, "partial_images": request.partial_images}
            return await self._streamed(client, request, params, headers, timeout_s, sink)
        try:
            if request.init_image is None:
                raw = await client.images.with_raw_response.generate(**params, timeout=timeout_s, extra_headers=headers)
            else:
                files = await self._edit_files(request)
                raw = await client.images.with_raw_response.edit(
                    **params, **files, timeout=timeout_s, extra_headers=headers
                )
        except ImageRouterError:
            raise
        except Exception as exc:
            raise _map_error(exc, self.name) from None
        request_id = raw.headers.get("x-request-id")
        try:
            body = raw.parse()
        except Exception as exc:  # a 200 whose body is not the API's JSON: no usage to settle from
            raise MalformedResponse(
                f"response body unreadable ({type(exc).__name__})",
                provider=self.name,
                status_code=raw.status_code,
                request_id=request_id,
            ) from None
        response = await self._response(body, request_id, model, request.output_format)
        if request.partial_images and sink is not None:  # asked for previews, made without: say why
            note = "partial_images not streamed: OpenAI streams previews for one image per call (n=1)"
            response = dataclasses.replace(response, warnings=(*response.warnings, note))
        return response

    async def _streamed(self, client: openai.AsyncOpenAI, request: ImageRequest, params: dict[str, Any],
                        headers: dict[str, str] | None, timeout_s: float, sink: ProgressCallback) -> ProviderResponse:
        """One image made with ``stream: true``: each ``*.partial_image`` event goes to ``sink`` as a
        :class:`PartialImage`; the ``*.completed`` event holds the image and the usage billed (events:
        ImageGenPartialImageEvent / ImageGenCompletedEvent, https://platform.openai.com/docs/api-reference/images-streaming)."""
        model = params["model"]
        final: Any = None
        request_id: str | None = None
        try:
            if request.init_image is None:
                raw = await client.images.with_raw_response.generate(**params, timeout=timeout_s, extra_headers=headers)
            else:
                files = await self._edit_files(request)
                raw = await client.images.with_raw_response.edit(**params, **files, timeout=timeout_s,
                                                                 extra_headers=headers)
            request_id = raw.headers.get("x-request-id")
            async for event in await _parsed(raw):
                kind = str(getattr(event, "type", ""))
                if kind.endswith(".partial_image"):
                    data = await ab64decode(getattr(event, "b64_json", "") or "", what="partial image")
                    sink(PartialImage(self.name, model, int(getattr(event, "partial_image_index", 0) or 0), data,
                                      _MIME.get(str(getattr(event, "output_format", "png")), "image/png")))
                elif kind.endswith(".completed"):
                    final = event
        except ImageRouterError:
            raise
        except Exception as exc:
            raise _map_error(exc, self.name) from None
        if final is None:
            raise MalformedResponse("the event stream ended without a completed event", provider=self.name,
                                    status_code=200, request_id=request_id)
        body = types.SimpleNamespace(data=[final], usage=getattr(final, "usage", None))
        return await self._response(body, request_id, model, request.output_format)

    async def _edit_files(self, request: ImageRequest) -> dict[str, Any]:
        assert request.init_image is not None
        image = await load_bytes(request.init_image, fetcher=self._fetcher)
        # file objects, not bytes: the SDK then streams the upload in chunks instead of copying it whole
        files: dict[str, Any] = {"image": ("image.png", io.BytesIO(image), request.init_image.mime or "image/png")}
        if request.mask_image is not None:
            mask = await amask_png(request.mask_image, image_size(image), mask_to_alpha_repaint, fetcher=self._fetcher)
            files["mask"] = ("mask.png", io.BytesIO(mask), "image/png")
        return files

    async def _response(self, body: Any, request_id: str | None, model: str, fmt: str) -> ProviderResponse:
        billing = self._billing(body, model, request_id)  # OpenAI billed this answer, whatever its images hold
        items = getattr(body, "data", None)
        items = list(items) if isinstance(items, list) else []
        images: list[GeneratedImage] = []
        problems: list[str] = []
        for item in items:
            try:
                text = getattr(item, "b64_json", None) or ""
                data = await ab64decode(text, what="b64_json")
            except (TypeError, ValueError, ImageDecodeError) as exc:
                problems.append(type(exc).__name__)
                continue
            try:  # the one check every output passes: the caps user images have, decoded whole, off the loop
                mime, width, height = await output_image(
                    data, provider=self.name, request_id=request_id, status_code=200
                )
            except MalformedResponse as exc:
                problems.append(exc.message)
                continue
            images.append(GeneratedImage(data=data, mime=mime, width=width, height=height))
        if not images:
            what = (
                f"response images unreadable ({', '.join(sorted(set(problems)))})"
                if problems
                else "response held no images"
            )
            raise charged(MalformedResponse(what, provider=self.name, status_code=200, request_id=request_id), billing)
        warnings = (
            (
                f"{len(images)} of {len(items)} images returned: {len(problems)} unreadable "
                f"({', '.join(sorted(set(problems)))}), billed by OpenAI all the same",
            )
            if problems
            else ()
        )
        return ProviderResponse(images, model, billing, request_id, warnings=warnings)

    def _billing(self, body: Any, model: str, request_id: str | None) -> Billing:
        """The bill from the answer's ``usage`` tokens at the price table's rates."""
        row = self.price_row(model)
        usage = getattr(body, "usage", None)
        try:
            if usage is None:
                raise ValueError("no usage")
            details = getattr(usage, "input_tokens_details", None)
            text = int(getattr(details, "text_tokens", 0) or 0) if details else int(usage.input_tokens)
            image_in = int(getattr(details, "image_tokens", 0) or 0) if details else 0
            out = int(usage.output_tokens)
            total = int(usage.total_tokens)
        except (TypeError, ValueError, AttributeError):
            raise MalformedResponse(
                "response has no readable usage: cannot settle the cost",
                provider=self.name,
                status_code=200,
                request_id=request_id,
            ) from None
        return Billing(
            cost_usd=_token_cost(row, text, image_in, out),
            unit="tokens",
            quantity=Decimal(total),
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


# The most tiles an input image can take: its long side fits in 2048 (4 tiles), its short side in 768 (2).
_MAX_IMAGE_TOKENS = 65 + 129 * math.ceil(2048 / 512) * math.ceil(768 / 512)
_QUALITIES = frozenset({"low", "medium", "high"})


@dataclasses.dataclass(frozen=True, slots=True)
class SdkError:
    """What an SDK status error says, in the ``{"error": {message, type, param, code}}`` shape of OpenAI's
    API (Together's API answers the same shape, and its SDK raises the same kind of exception)."""

    status: int
    code: str | None
    etype: str | None
    message: str
    request_id: str | None
    headers: Mapping[str, str] | None

    @classmethod
    def of(cls, exc: Any) -> SdkError:
        body = getattr(exc, "body", None)
        err = body.get("error", body) if isinstance(body, dict) else {}
        err = err if isinstance(err, dict) else {}
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        code, etype = err.get("code"), err.get("type")
        return cls(
            status=int(getattr(exc, "status_code", 0) or 0),
            code=str(code) if code is not None else None,
            etype=str(etype) if etype is not None else None,
            message=redact(str(err.get("message") or "")),
            request_id=headers.get("x-request-id") if headers is not None else None,
            headers=headers,
        )

    @property
    def text(self) -> str:
        return (
            f"HTTP {self.status}"
            + (f" {self.code}" if self.code else "")
            + (f": {self.message}" if self.message else "")
        )

    def as_(self, kind: type[ImageRouterError], provider: str) -> ImageRouterError:
        """This error as ``kind`` (a vendor code that means more than its status)."""
        return kind(self.text, provider=provider, status_code=self.status, code=self.code, request_id=self.request_id)

    def mapped(self, provider: str) -> ImageRouterError:
        """This error by its HTTP status (:func:`providers.vendor.status_error`)."""
        return status_error(
            self.status, self.text, provider=provider, code=self.code, request_id=self.request_id, headers=self.headers
        )


def sdk_missing(module: str) -> str | None:
    """Why a provider built on the vendor SDK ``module`` (also the name of its extra) cannot run, or None."""
    try:
        importlib.import_module(module)
    except ImportError:
        return f"the {module} SDK is not installed: pip install 'pixroute[{module}]'"
    return None


def sdk_error(
    exc: Exception, provider: str, sdk: Any, vendor_kind: Callable[[SdkError], type[ImageRouterError] | None]
) -> ImageRouterError:
    """An exception of a Stainless-generated SDK (``openai``, ``together``: the same exception classes)
    as the router's error; nothing of the request is copied.

    ``vendor_kind`` reads the vendor's own codes (a refusal, an empty account) off a status error;
    where it returns None the HTTP status decides (:func:`providers.vendor.status_error`).
    """
    if isinstance(exc, sdk.APIConnectionError):  # its APITimeoutError included
        return connection_error(exc, provider=provider)
    if isinstance(exc, sdk.APIResponseValidationError):
        return MalformedResponse(
            "response does not follow the API's shape", provider=provider, status_code=getattr(exc, "status_code", None)
        )
    if isinstance(exc, sdk.APIStatusError):
        err = SdkError.of(exc)
        kind = vendor_kind(err)
        return err.as_(kind, provider) if kind is not None else err.mapped(provider)
    if isinstance(exc, ValueError):  # the body was not JSON
        return MalformedResponse(f"response body unreadable ({type(exc).__name__})", provider=provider)
    return ProviderUnavailable(f"unexpected {type(exc).__name__}", provider=provider)


def _openai_kind(err: SdkError) -> type[ImageRouterError] | None:
    """OpenAI's own codes: ``moderation_blocked`` (a 400) is a refusal; ``insufficient_quota`` (a 429:
    OpenAI has no 402) an empty account (PROVIDERS.md, OpenAI Images: errors)."""
    if err.status == 400 and err.code in ("moderation_blocked", "content_policy_violation"):
        return ContentPolicyError
    if err.code == "insufficient_quota":
        return InsufficientCredits
    return None


def _map_error(exc: Exception, provider: str) -> ImageRouterError:
    """The openai SDK's exception as the router's error class."""
    import openai

    return sdk_error(exc, provider, openai, _openai_kind)


async def _parsed(raw: Any) -> Any:
    """The SDK's parsed answer of a raw response (its parse is a coroutine in some versions)."""
    parsed = raw.parse()
    return await parsed if inspect.isawaitable(parsed) else parsed
