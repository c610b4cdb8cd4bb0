"""Ideogram 3.0 over httpx: generate, inpaint (edit with a mask) and remix, synchronous multipart calls.

Every rule below follows Ideogram's published API reference (https://developer.ideogram.ai/api-reference; the
operations this adapter uses are vendored in ``tests/specs/ideogram.openapi.yaml``):

- ``POST /v1/ideogram-v3/generate``, ``/v1/ideogram-v3/inpaint`` and ``/v1/ideogram-v3/remix`` take
  ``multipart/form-data`` and the key in the ``Api-Key`` header; they answer ``{created, data: [{url, prompt,
  resolution, is_image_safe, seed, style_type}]}`` (``ImageGenerationResponseV3``). Image links expire
  ("Images links are available for a limited period of time"): they are downloaded at once through the
  :class:`~router.fetch.SafeFetcher` and pass the one check every output passes.
- The rendering speed (``TURBO``/``DEFAULT``/``QUALITY``) is the model: ``ideogram-v3-turbo``, ``ideogram-v3``,
  ``ideogram-v3-quality``, each with its own per-image price.
- Sizes are the ``ResolutionV3`` list (69 shapes); a request's size or ratio is snapped to the nearest, with a
  warning. Inpainting keeps the image's own size.
- The inpaint mask is "a black and white image of the same size as the image being edited. Black regions in the
  mask should match up with the regions of the image that you would like to edit": the router's white = repaint
  mask is inverted and resized to the image.
- ``magic_prompt`` (AUTO/ON/OFF) and ``style_type`` (AUTO/GENERAL/REALISTIC/DESIGN/FICTION) are provider options.
- Errors: 400 invalid input, 401/403 not authorized, 422 "Prompt failed the safety check" ({"error": …}),
  429 too many requests. An image with ``is_image_safe: false`` comes without a URL.

Paid work is never paid twice: once Ideogram answered 200 the images are billed (per image listed); a failed
download is tried again, never the call, and a failure from then on carries the bill.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import httpx
from pydantic import SecretStr

from providers.base import Billing, Capabilities, Estimate, Plan, Provider, ProviderResponse
from providers.vendor import (
    ApiKey,
    charged,
    connection_error,
    download_paid,
    known_models,
    output_image,
    status_error,
)
from router.errors import (
    ContentPolicyError,
    ImageRouterError,
    InvalidRequestError,
    MalformedResponse,
    ProviderTimeout,
    redact,
)
from router.fetch import SafeFetcher
from router.geometry import SizePlan, SizeRules
from router.images import amask_png, image_size, load_bytes, mask_to_white_repaint, sniff_mime
from router.prices import PriceTable
from router.request import ImageRequest
from router.result import GeneratedImage

BASE_URL = "https://api.ideogram.ai"  # the reference's server
MODELS = ("ideogram-v3", "ideogram-v3-turbo", "ideogram-v3-quality")
# RenderingSpeed enum (FLASH, TURBO, DEFAULT, QUALITY): one model id per priced speed.
SPEEDS: dict[str, str] = {"ideogram-v3-turbo": "TURBO", "ideogram-v3": "DEFAULT", "ideogram-v3-quality": "QUALITY"}
# ResolutionV3: "The resolutions supported for Ideogram 3.0".
RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (512, 1536), (576, 1408), (576, 1472), (576, 1536), (640, 1344), (640, 1408), (640, 1472), (640, 1536),
    (704, 1152), (704, 1216), (704, 1280), (704, 1344), (704, 1408), (704, 1472), (736, 1312), (768, 1088),
    (768, 1216), (768, 1280), (768, 1344), (800, 1280), (832, 960), (832, 1024), (832, 1088), (832, 1152),
    (832, 1216), (832, 1248), (864, 1152), (896, 960), (896, 1024), (896, 1088), (896, 1120), (896, 1152),
    (960, 832), (960, 896), (960, 1024), (960, 1088), (1024, 832), (1024, 896), (1024, 960), (1024, 1024),
    (1088, 768), (1088, 832), (1088, 896), (1088, 960), (1120, 896), (1152, 704), (1152, 832), (1152, 864),
    (1152, 896), (1216, 704), (1216, 768), (1216, 832), (1248, 832), (1280, 704), (1280, 768), (1280, 800),
    (1312, 736), (1344, 640), (1344, 704), (1344, 768), (1408, 576), (1408, 640), (1408, 704), (1472, 576),
    (1472, 640), (1472, 704), (1536, 512), (1536, 576), (1536, 640),
)
_SIZES = SizeRules(fixed=RESOLUTIONS, native=(1024, 1024))
_OPTIONS = frozenset({"magic_prompt", "style_type"})
MAX_IMAGES = 8  # NumImages: "integer >=1 <=8" (remix-v3 reference page)
SEED_MAX = 2147483647  # Seed: ">=0 <=2147483647"
_QUALITY = {"ideogram-v3-turbo": 0.8, "ideogram-v3": 0.85, "ideogram-v3-quality": 0.88}


def black_repaint(mask: Any, size: tuple[int, int] | None = None) -> Any:
    """Any mask form as an 'L' image where black (0) marks the area to edit (Ideogram's polarity)."""
    from PIL import ImageOps

    return ImageOps.invert(mask_to_white_repaint(mask, size))


def image_weight(strength: float) -> int:
    """Remix's ``image_weight`` (1..100, default 50: how much of the image is kept) for a ``strength`` (0 keeps
    the image, 1 ignores it)."""
    return max(1, min(100, round((1 - strength) * 100)))


class IdeogramProvider(Provider):
    """Ideogram's API. ``api_key`` defaults to ``IDEOGRAM_API_KEY``, ``base_url`` to ``IDEOGRAM_BASE_URL`` or
    the public host. ``fetcher`` downloads outputs; a failed download is tried ``download_attempts`` times."""

    kind = "ideogram"

    def __init__(
        self,
        *,
        name: str | None = None,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        models: Sequence[str] = MODELS,
        fetcher: SafeFetcher | None = None,
        download_attempts: int = 4,
        download_backoff_s: float = 0.5,
        prices: PriceTable | None = None,
    ) -> None:
        super().__init__(name=name, prices=prices)
        if download_attempts < 1:
            raise ValueError("download_attempts must be at least 1")
        self._key = ApiKey(api_key, "IDEOGRAM_API_KEY")
        self._base = (base_url or os.environ.get("IDEOGRAM_BASE_URL") or BASE_URL).rstrip("/")
        self._models = known_models("Ideogram", models, MODELS)
        self._fetcher = fetcher or SafeFetcher()
        self._download_attempts = download_attempts
        self._download_backoff_s = download_backoff_s
        self._client: httpx.AsyncClient | None = None

    # --- what it can do ----------------------------------------------------------

    def models(self) -> Sequence[str]:
        return self._models

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(
            tasks=frozenset({"txt2img", "img2img", "inpaint"}),
            sizes=_SIZES,
            max_n=MAX_IMAGES,
            negative_prompt=True,
            seed=True,
            strength=True,
            quality=_QUALITY[model],
            output_formats=frozenset({"png"}),
        )

    def provider_option_names(self) -> frozenset[str]:
        return _OPTIONS

    def configuration_problem(self) -> str | None:
        return self._key.problem()

    def plan(self, request: ImageRequest, model: str) -> Plan:
        base = super().plan(request, model)
        warnings = list(base.warnings)
        size = base.size
        if request.task == "inpaint":
            # the inpaint form has no size field, and its answer's ``resolution`` is a ResolutionV3 value
            # (ImageGenerationObjectV3): an edit comes back at the listed shape nearest the image's
            warnings = [w for w in warnings if w != base.size.warning]
            if request.negative_prompt:
                warnings.append(f"negative_prompt ignored: {self.name} inpainting does not take it")
            src = request.init_image
            if src is not None and src.width and src.height:
                w, h = _SIZES.nearest(src.width, src.height)
                asked = (request.width, request.height) if request.width is not None else (src.width, src.height)
                if asked != (w, h):
                    warnings.append(
                        f"size {asked[0]}x{asked[1]} adapted to {w}x{h}: {self.name} edits come back at the "
                        "nearest Ideogram resolution"
                    )
                size = SizePlan(w, h, exact=request.width is None or asked == (w, h))
        src = request.init_image
        if (request.task == "img2img" and request.width is None and request.aspect_ratio is None
                and src is not None and src.width and src.height):
            # remix crops the image to the shape asked for; none asked: the listed shape nearest the image's
            size = SizePlan(*_SIZES.nearest(src.width, src.height))
        if request.seed is not None and request.seed > SEED_MAX:
            seed = request.seed % (SEED_MAX + 1)
            warnings.append(f"seed {request.seed} adapted to {seed}: Ideogram takes 0..{SEED_MAX}")
        if request.idempotency_key is not None:
            warnings.append("idempotency_key not sent: the Ideogram API has no idempotency keys")
        return Plan(size, tuple(warnings))

    # --- cost --------------------------------------------------------------------

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        row = self.price_row(model)
        n = Decimal(request.n)
        return Estimate(row.rate("usd_per_image") * n, float(row.rates.get("latency_s", 10.0)), "images", n)

    def _bill(self, model: str, listed: int, unsafe: int) -> Billing:
        """Per image Ideogram listed in its answer (unsafe ones included), at the model's rate."""
        row = self.price_row(model)
        count = Decimal(listed)
        return Billing(
            row.rate("usd_per_image") * count,
            "images",
            count,
            self.prices.version,
            {"images": listed, "unsafe": unsafe, "rendering_speed": SPEEDS[model]},
        )

    # --- the call ----------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers={"Api-Key": self._key.value(), "accept": "application/json"}, follow_redirects=False
            )
        return self._client

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        plan = self.plan(request, model)
        path, fields, files = await self._form(request, model, plan)
        # End a little before the router's own cut, so that a bill is never lost to its timeout.
        inner = max(timeout_s * 0.9, timeout_s - 0.25)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + inner
        billing: Billing | None = None
        try:
            async with asyncio.timeout(inner):
                body, rid = await self._post(path, fields, files)
                items = _items(body, self.name, rid)
                unsafe = sum(1 for item in items if item.get("is_image_safe") is False or not item.get("url"))
                billing = self._bill(model, len(items), unsafe)
                images, warnings = await self._collect(items, rid, deadline)
        except TimeoutError:
            raise charged(ProviderTimeout(f"no result within {inner:.1f}s", provider=self.name), billing) from None
        except ImageRouterError as exc:
            raise charged(exc, billing) from None
        if unsafe:
            warnings.append(f"{unsafe} of {len(items)} images failed Ideogram's safety check and came without a URL")
        return ProviderResponse(images, model, billing, rid, warnings=tuple(plan.warnings) + tuple(warnings))

    async def _form(
        self, request: ImageRequest, model: str, plan: Plan
    ) -> tuple[str, dict[str, str], dict[str, tuple[str, bytes, str]]]:
        """The operation's path, its text fields and its files."""
        options = request.provider_options.get(self.name, {})
        fields: dict[str, str] = {
            "prompt": request.prompt,
            "rendering_speed": SPEEDS[model],
            "num_images": str(min(request.n, MAX_IMAGES)),
            **{k: str(v) for k, v in options.items() if k in _OPTIONS},
        }
        if request.seed is not None:
            fields["seed"] = str(request.seed % (SEED_MAX + 1))
        files: dict[str, tuple[str, bytes, str]] = {}
        task = request.task
        if task == "inpaint":
            assert request.init_image is not None and request.mask_image is not None
            image = await load_bytes(request.init_image, fetcher=self._fetcher)
            mask = await amask_png(request.mask_image, image_size(image), black_repaint, fetcher=self._fetcher)
            files = {"image": _part("image", image), "mask": _part("mask", mask)}
            return "/v1/ideogram-v3/inpaint", fields, files
        fields["resolution"] = f"{plan.size.width}x{plan.size.height}"
        if request.negative_prompt:
            fields["negative_prompt"] = request.negative_prompt
        if task == "img2img":
            assert request.init_image is not None
            files = {"image": _part("image", await load_bytes(request.init_image, fetcher=self._fetcher))}
            if request.strength is not None:
                fields["image_weight"] = str(image_weight(request.strength))
            return "/v1/ideogram-v3/remix", fields, files
        if task != "txt2img":
            raise InvalidRequestError(f"{self.name} does not do {task}", provider=self.name)
        return "/v1/ideogram-v3/generate", fields, files

    async def _post(
        self, path: str, fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]
    ) -> tuple[dict[str, Any], str | None]:
        # every field as a multipart part (a filename of None makes a plain field): the operations take
        # multipart/form-data only, with or without files
        parts: list[tuple[str, tuple[str | None, bytes | str] | tuple[str, bytes, str]]] = [
            (k, (None, v)) for k, v in fields.items()
        ]
        parts += list(files.items())
        try:
            response = await self._http().post(self._base + path, files=parts)
        except httpx.HTTPError as exc:
            raise connection_error(exc, provider=self.name) from None
        rid = response.headers.get("x-request-id")
        if response.status_code != 200:
            raise self._error(response, rid)
        try:
            payload = response.json()
        except ValueError:
            raise MalformedResponse("response body is not JSON", provider=self.name, request_id=rid) from None
        if not isinstance(payload, dict):
            raise MalformedResponse("response body is not a JSON object", provider=self.name, request_id=rid)
        return payload, rid

    def _error(self, response: httpx.Response, rid: str | None) -> ImageRouterError:
        text = _detail(response)
        if response.status_code == 422:  # "Prompt failed the safety check" (GenerateImageSafetyError)
            return ContentPolicyError(text, provider=self.name, status_code=422, request_id=rid)
        return status_error(response.status_code, text, provider=self.name, request_id=rid, headers=response.headers)

    async def _collect(
        self, items: list[dict[str, Any]], rid: str | None, deadline: float
    ) -> tuple[list[GeneratedImage], list[str]]:
        """Download every safe image (billed); raise when none could be had."""
        images: list[GeneratedImage] = []
        warnings: list[str] = []
        last: ImageRouterError | None = None
        urls = [(item["url"], item.get("seed")) for item in items if item.get("url")]
        if not urls:
            raise ContentPolicyError("every image failed Ideogram's safety check", provider=self.name, request_id=rid)
        for url, seed in urls:
            try:
                data = await download_paid(
                    self._fetcher,
                    url,
                    provider=self.name,
                    request_id=rid,
                    deadline=deadline,
                    attempts=self._download_attempts,
                    backoff_s=self._download_backoff_s,
                )
                mime, w, h = await output_image(data, provider=self.name, request_id=rid)
            except ImageRouterError as exc:
                last = exc
                continue
            images.append(
                GeneratedImage(
                    data=data, mime=mime, width=w, height=h,
                    seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
                )
            )
        if not images:
            assert last is not None
            raise last
        if len(images) < len(urls):
            warnings.append(f"{len(images)} of {len(urls)} images downloaded (the others are paid for)")
        return images, warnings

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _part(name: str, data: bytes) -> tuple[str, bytes, str]:
    mime = sniff_mime(data) or "application/octet-stream"
    return f"{name}.{mime.rsplit('/', 1)[-1]}", data, mime


def _items(body: dict[str, Any], provider: str, rid: str | None) -> list[dict[str, Any]]:
    data = body.get("data")
    if not isinstance(data, list) or not data or not all(isinstance(i, dict) for i in data):
        raise MalformedResponse("answer without a data list of images", provider=provider, request_id=rid)
    for item in data:
        url = item.get("url")
        if url is not None and not isinstance(url, str):
            raise MalformedResponse("image url is not a string", provider=provider, request_id=rid)
    return data


def _detail(response: httpx.Response) -> str:
    """The vendor's error text (``{"error": …}``, ``{"detail": …}`` or ``{"message": …}``), never a secret."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = ""
    if isinstance(body, dict):
        raw = body.get("error") or body.get("detail") or body.get("message")
        if raw is not None:
            detail = str(raw)
    return f"HTTP {response.status_code}" + (f": {redact(detail)[:300]}" if detail else "")

