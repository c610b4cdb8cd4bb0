"""Replicate through the official ``replicate`` client: official models by name, and pinned versions.

``POST /v1/models/{owner}/{name}/predictions`` with ``Prefer: wait=N``; when the wait
runs out the prediction comes back ``starting``/``processing`` and the provider polls
``GET /v1/predictions/{id}`` until it ends, cancelling it when the deadline passes.
Outputs are URLs that expire: they are downloaded at once through the
:class:`~router.fetch.SafeFetcher`. Official models cost the price table's per-output
rate; pinned versions (``POST /v1/predictions {version, input}``) cost
``metrics.predict_time`` × the hardware's $/s.
Which inputs a model takes comes from :data:`CATALOG`. The client's retries are off.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
from pydantic import SecretStr

from providers.base import Billing, Capabilities, Estimate, Plan, Provider, ProviderResponse
from providers.vendor import billed_by, combine, fan_out, retry_after_s
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
from router.fetch import SafeFetcher
from router.geometry import SizePlan, SizeRules
from router.images import ImageDecodeError, decode, encode, image_size, load_bytes, mask_to_white_repaint, sniff_mime
from router.prices import PriceTable
from router.request import ImageRequest
from router.result import GeneratedImage

# The shapes FLUX models on Replicate make for each ``aspect_ratio``.
RATIO_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024), "16:9": (1344, 768), "21:9": (1536, 640), "3:2": (1216, 832), "2:3": (832, 1216),
    "4:5": (896, 1088), "5:4": (1088, 896), "3:4": (896, 1152), "4:3": (1152, 896), "9:16": (768, 1344),
    "9:21": (640, 1536),
}
_BY_SIZE = {size: ratio for ratio, size in RATIO_SIZES.items()}
_SIZES = SizeRules(fixed=tuple(RATIO_SIZES.values()), native=(1024, 1024))
_FORMATS = frozenset({"png", "jpeg", "webp"})
_FORMAT_SENT = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_OPTIONS = frozenset({"go_fast", "megapixels", "output_quality", "disable_safety_checker", "safety_tolerance",
                      "prompt_upsampling"})
_TERMINAL = frozenset({"succeeded", "failed", "canceled"})
_POLICY_WORDS = ("nsfw", "sensitive", "safety", "flagged")


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One model: its Replicate name, what it can do, and the vendor options it takes."""

    ref: str
    caps: Capabilities
    steps_max: int = 0
    num_outputs: bool = True  # False: one output per prediction, n fans out
    options: frozenset[str] = frozenset()
    version: str | None = None  # a pinned version: POST /v1/predictions, billed predict_time × hardware $/s
    hardware: str = ""  # the price-table row of the hardware it runs on
    expected_predict_s: float = 0.0
    shape_from_input: bool = False  # inpaint / control models: the output takes the input image's shape


_INPUT_SHAPE = SizeRules(multiple=1, min_side=64, max_side=4096, max_pixels=4096 * 4096, max_ratio=8.0)
_PRO_OPTIONS = frozenset({"safety_tolerance", "prompt_upsampling"})


def _control_model(ref: str, kind: str) -> CatalogEntry:
    caps = Capabilities(tasks=frozenset({"control"}), sizes=_INPUT_SHAPE, control_kinds=frozenset({kind}),
                        max_controls=1, max_n=4, seed=True, steps=True, guidance=True, quality=0.8,
                        output_formats=frozenset({"png", "jpeg"}))
    return CatalogEntry(ref, caps, steps_max=50, num_outputs=False, options=_PRO_OPTIONS, shape_from_input=True)


CATALOG: dict[str, CatalogEntry] = {
    "flux-schnell": CatalogEntry(
        "black-forest-labs/flux-schnell",
        Capabilities(tasks=frozenset({"txt2img"}), sizes=_SIZES, max_n=4, seed=True, steps=True, quality=0.6,
                     output_formats=_FORMATS),
        steps_max=4, options=frozenset({"go_fast", "megapixels", "output_quality", "disable_safety_checker"})),
    "flux-dev": CatalogEntry(
        "black-forest-labs/flux-dev",
        Capabilities(tasks=frozenset({"txt2img", "img2img"}), sizes=_SIZES, max_n=4, seed=True, steps=True,
                     guidance=True, strength=True, quality=0.75, output_formats=_FORMATS),
        steps_max=50, options=frozenset({"go_fast", "megapixels", "output_quality", "disable_safety_checker"})),
    "flux-1.1-pro": CatalogEntry(
        "black-forest-labs/flux-1.1-pro",
        Capabilities(tasks=frozenset({"txt2img"}), sizes=_SIZES, max_n=4, seed=True, quality=0.85,
                     output_formats=_FORMATS),
        num_outputs=False, options=frozenset({"output_quality", "safety_tolerance", "prompt_upsampling"})),
    "flux-dev-lora": CatalogEntry(
        "black-forest-labs/flux-dev-lora",
        Capabilities(tasks=frozenset({"txt2img", "img2img"}), sizes=_SIZES, max_n=4, max_loras=1, seed=True,
                     steps=True, guidance=True, strength=True, quality=0.75, output_formats=_FORMATS),
        steps_max=50, options=frozenset({"go_fast", "megapixels", "output_quality", "disable_safety_checker"})),
    "flux-fill-pro": CatalogEntry(
        "black-forest-labs/flux-fill-pro",
        Capabilities(tasks=frozenset({"inpaint"}), sizes=_INPUT_SHAPE, max_n=4, seed=True, steps=True,
                     guidance=True, quality=0.85, output_formats=frozenset({"png", "jpeg"})),
        steps_max=50, num_outputs=False, options=_PRO_OPTIONS, shape_from_input=True),
    "flux-canny-pro": _control_model("black-forest-labs/flux-canny-pro", "canny"),
    "flux-depth-pro": _control_model("black-forest-labs/flux-depth-pro", "depth"),
    "sdxl": CatalogEntry(
        "stability-ai/sdxl",
        Capabilities(tasks=frozenset({"txt2img"}), sizes=SizeRules(multiple=8, min_side=128, max_side=1024,
                                                                   max_pixels=1024 * 1024),
                     max_n=4, seed=True, steps=True, guidance=True, negative_prompt=True, quality=0.55,
                     output_formats=frozenset({"png"})),
        steps_max=500, version="39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b",
        hardware="hardware-gpu-h100", expected_predict_s=6.0),
}
MODELS = tuple(CATALOG)

_retry_after: contextvars.ContextVar[float | None] = contextvars.ContextVar("replicate_retry_after", default=None)


class _HeaderTransport(httpx.AsyncHTTPTransport):
    """Keeps the last answer's Retry-After, which the client's ReplicateError drops."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        _retry_after.set(retry_after_s(response.headers) if response.status_code in (429, 503) else None)
        return response


class ReplicateProvider(Provider):
    """Replicate's prediction API. ``api_token`` defaults to ``REPLICATE_API_TOKEN``."""

    kind = "replicate"

    def __init__(
        self,
        *,
        name: str | None = None,
        api_token: str | SecretStr | None = None,
        base_url: str | None = None,
        models: Sequence[str] = MODELS,
        fetcher: SafeFetcher | None = None,
        poll_interval_s: float = 0.5,
        max_wait_s: int = 60,
        prices: PriceTable | None = None,
    ) -> None:
        super().__init__(name=name, prices=prices)
        token = api_token if api_token is not None else os.environ.get("REPLICATE_API_TOKEN")
        self._token = SecretStr(token) if isinstance(token, str) else token
        self._base_url = base_url or os.environ.get("REPLICATE_BASE_URL") or None
        unknown = set(models) - set(CATALOG)
        if unknown:
            raise ValueError(f"unknown Replicate models {sorted(unknown)}; use {', '.join(MODELS)}")
        self._models = tuple(models)
        self._fetcher = fetcher or SafeFetcher()
        self._poll_interval_s = poll_interval_s
        self._max_wait_s = max(1, min(60, max_wait_s))
        self._client: Any = None

    # --- what it can do ----------------------------------------------------------

    def models(self) -> Sequence[str]:
        return self._models

    def capabilities(self, model: str) -> Capabilities:
        return CATALOG[model].caps

    def provider_option_names(self) -> frozenset[str]:
        return _OPTIONS

    def configuration_problem(self) -> str | None:
        if self._token is None or not self._token.get_secret_value():
            return "not configured: set REPLICATE_API_TOKEN"
        return None

    def plan(self, request: ImageRequest, model: str) -> Plan:
        base = super().plan(request, model)
        entry = CATALOG[model]
        warnings = list(base.warnings)
        if request.steps is not None and entry.steps_max and request.steps > entry.steps_max:
            warnings.append(f"steps {request.steps} adapted to {entry.steps_max}: {model} takes 1..{entry.steps_max}")
        for option in request.provider_options.get(self.name, {}):
            if option in _OPTIONS and option not in entry.options:
                warnings.append(f"provider_options.{self.name}.{option} ignored: {model} does not take it")
        if request.idempotency_key is not None:
            warnings.append("idempotency_key not sent: Replicate predictions have no idempotency keys")
        size = base.size
        if entry.shape_from_input:
            source = request.controls[0].image if request.controls else request.init_image
            warnings = [w for w in warnings if not w.startswith(("size ", "aspect ratio "))]
            if source is not None and source.width and source.height:
                if request.width is not None and (request.width, request.height) != (source.width, source.height):
                    warnings.append(f"size {request.width}x{request.height} adapted to {source.width}x"
                                    f"{source.height}: {model} keeps the input image's shape")
                size = SizePlan(source.width, source.height, exact=request.width is None
                                or (request.width, request.height) == (source.width, source.height))
        for control in request.controls:
            if control.scale != 1.0 or control.start != 0.0 or control.end != 1.0:
                warnings.append(f"control scale/start/end ignored: {model} applies its {control.kind} map fully")
        return Plan(size, tuple(warnings))

    # --- cost --------------------------------------------------------------------

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        entry = CATALOG[model]
        if entry.version is not None:
            seconds = Decimal(str(entry.expected_predict_s))
            return Estimate(self.price_row(entry.hardware).rate("usd_per_second") * seconds,
                            entry.expected_predict_s + 1.0, "seconds", seconds)
        row = self.price_row(model)
        n = Decimal(request.n)
        return Estimate(row.rate("usd_per_output") * n, float(row.rates.get("latency_s", 5.0)), "outputs", n)

    def _billing(self, model: str, ids: list[str], outputs: int, metrics: list[dict[str, Any]]) -> Billing:
        entry = CATALOG[model]
        times = [m.get("predict_time") for m in metrics]
        details = {"predictions": ids, "predict_time": times}
        if entry.version is not None:
            if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in times):
                raise MalformedResponse("succeeded prediction without metrics.predict_time", provider=self.name,
                                        request_id=ids[0])
            seconds = sum((Decimal(str(t)) for t in times), Decimal(0))
            row = self.price_row(entry.hardware)
            return Billing(row.rate("usd_per_second") * seconds, "seconds", seconds, self.prices.version,
                           details | {"hardware": entry.hardware})
        row = self.price_row(model)
        count = Decimal(outputs)
        return Billing(row.rate("usd_per_output") * count, "outputs", count, self.prices.version, details)

    # --- the call ----------------------------------------------------------------

    def _replicate(self) -> Any:
        if self._client is None:
            import replicate  # lazy: ``import router`` must not import the SDK

            token = self._token.get_secret_value() if self._token else ""
            client = replicate.Client(api_token=token, base_url=self._base_url,
                                      transport=_HeaderTransport(), follow_redirects=False)
            transport: Any = client._async_client._transport  # the client's RetryTransport
            transport.max_attempts = 1  # the router owns retries
            self._client = client
        return self._client

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        entry = CATALOG[model]
        plan = self.plan(request, model)
        body = await self._input(request, model, plan)
        deadline = time.monotonic() + timeout_s

        async def one(i: int) -> tuple[str, list[GeneratedImage], dict[str, Any]]:
            inp = dict(body)
            if not entry.num_outputs and request.seed is not None and i:
                inp["seed"] = (request.seed + i) % 2**32
            return await self._predict(entry, inp, deadline, timeout_s)

        calls = 1 if entry.num_outputs else request.n
        fan = await fan_out(calls, one)
        done = fan.done
        images = [img for _, imgs, _ in done for img in imgs]
        ids = [pid for pid, _, _ in done]
        billing = combine([self._billing(model, ids, len(images), [m for _, _, m in done]), *billed_by(fan.errors)])
        return ProviderResponse(images, model, billing, ids[0], warnings=fan.warnings(calls))

    async def _input(self, request: ImageRequest, model: str, plan: Plan) -> dict[str, Any]:
        entry = CATALOG[model]
        options = request.provider_options.get(self.name, {})
        inp: dict[str, Any] = {"prompt": request.prompt, **{k: v for k, v in options.items() if k in entry.options}}
        if entry.version is not None:
            inp |= {"width": plan.size.width, "height": plan.size.height}
            if request.negative_prompt:
                inp["negative_prompt"] = request.negative_prompt
        elif entry.shape_from_input:
            inp["output_format"] = "jpg" if request.output_format == "jpeg" else "png"
        else:
            inp |= {"aspect_ratio": _BY_SIZE[(plan.size.width, plan.size.height)],
                    "output_format": _FORMAT_SENT.get(request.output_format, "png")}
        if entry.num_outputs:
            inp["num_outputs"] = request.n
        if request.seed is not None:
            inp["seed"] = request.seed
        if request.steps is not None and entry.caps.steps:
            inp["steps" if entry.shape_from_input else "num_inference_steps"] = max(1, min(request.steps,
                                                                                          entry.steps_max))
        if request.guidance_scale is not None and entry.caps.guidance:
            inp["guidance_scale" if entry.version else "guidance"] = request.guidance_scale
        if request.loras and entry.caps.max_loras:
            inp |= {"lora_weights": request.loras[0].ref, "lora_scale": request.loras[0].weight}
        if request.controls and entry.caps.control_kinds:
            inp["control_image"] = _data_url(await load_bytes(request.controls[0].image, fetcher=self._fetcher))
        if request.mask_image is not None and request.init_image is not None and "inpaint" in entry.caps.tasks:
            image = await load_bytes(request.init_image, fetcher=self._fetcher)
            mask = mask_to_white_repaint(decode(await load_bytes(request.mask_image, fetcher=self._fetcher),
                                                what="mask_image"), image_size(image))
            inp |= {"image": _data_url(image), "mask": _data_url(encode(mask, "png"))}
        if request.init_image is not None and "img2img" in entry.caps.tasks:
            data = await load_bytes(request.init_image, fetcher=self._fetcher)
            inp["image"] = _data_url(data)
            if request.strength is not None:
                inp["prompt_strength"] = request.strength
        return inp

    async def _predict(self, entry: CatalogEntry, inp: dict[str, Any], deadline: float,
                       timeout_s: float) -> tuple[str, list[GeneratedImage], dict[str, Any]]:
        client = self._replicate()
        wait = int(max(1, min(self._max_wait_s, deadline - time.monotonic())))
        if entry.version is not None:
            create = client.predictions.async_create(version=entry.version, input=inp, wait=wait)
        else:
            create = client.models.predictions.async_create(model=entry.ref, input=inp, wait=wait)
        prediction = await self._call(create, None)
        pid = prediction.id
        while prediction.status not in _TERMINAL:
            if time.monotonic() >= deadline:
                await self._cancel(client, pid)
                raise ProviderTimeout(f"no result within {timeout_s:.1f}s; prediction canceled",
                                      provider=self.name, request_id=pid)
            await asyncio.sleep(self._poll_interval_s)
            prediction = await self._call(client.predictions.async_get(pid), pid)
        if prediction.status == "failed":
            raise _failed_error(prediction.error, self.name, pid)
        if prediction.status == "canceled":
            raise ProviderUnavailable("the prediction was canceled", provider=self.name, request_id=pid)
        output = prediction.output
        urls = output if isinstance(output, list) else [output]
        if not urls or not all(isinstance(u, str) for u in urls):
            raise MalformedResponse("succeeded prediction without output URLs", provider=self.name, request_id=pid)
        seed = inp.get("seed")
        images = [await self._download(u, pid, seed if isinstance(seed, int) and i == 0 else None)
                  for i, u in enumerate(urls)]
        return pid, images, dict(prediction.metrics or {})

    async def _download(self, url: str, pid: str, seed: int | None) -> GeneratedImage:
        try:
            data = await self._fetcher.fetch(url)
        except ImageRouterError as exc:
            raise ProviderUnavailable(f"output download failed ({exc.message}); it may have expired",
                                      provider=self.name, request_id=pid) from None
        try:
            w, h = image_size(data)
        except ImageDecodeError:
            raise MalformedResponse("output is not an image", provider=self.name, request_id=pid) from None
        return GeneratedImage(data=data, mime=sniff_mime(data) or "image/png", width=w, height=h, seed=seed)

    async def _cancel(self, client: Any, pid: str) -> None:
        with contextlib.suppress(Exception):  # best effort: the timeout is what is reported
            await client.predictions.async_cancel(pid)

    async def _call(self, call: Any, pid: str | None) -> Any:
        from replicate.exceptions import ReplicateError

        _retry_after.set(None)
        try:
            return await call
        except ReplicateError as exc:
            raise _status_error(exc, _retry_after.get(), self.name, pid) from None
        except httpx.TimeoutException:
            raise ProviderTimeout("the request timed out", provider=self.name, request_id=pid) from None
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"could not connect ({type(exc).__name__})", provider=self.name,
                                      request_id=pid) from None
        except (ValueError, TypeError, KeyError):  # the client could not parse the body
            raise MalformedResponse("response body is not a prediction", provider=self.name,
                                    request_id=pid) from None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client._async_client.aclose()
            self._client = None


def _failed_error(error: Any, provider: str, pid: str) -> ImageRouterError:
    """A ``status: failed`` prediction as the router's error class, judged from its error text."""
    text = redact(str(error or "the prediction failed"))[:300]
    lower = text.lower()
    kw: dict[str, Any] = {"provider": provider, "request_id": pid}
    if any(w in lower for w in _POLICY_WORDS):
        return ContentPolicyError(text, **kw)
    if "invalid" in lower or "input" in lower:
        return InvalidRequestError(text, **kw)
    return ProviderUnavailable(text, **kw)


def _status_error(exc: Any, retry_after: float | None, provider: str, pid: str | None) -> ImageRouterError:
    """An RFC 7807 error answer as the router's error class; only the vendor's title/detail in the message."""
    status = int(exc.status or 0)
    detail = exc.detail or exc.title or ""
    text = f"HTTP {status}" + (f": {redact(str(detail))[:300]}" if detail else "")
    kw: dict[str, Any] = {"provider": provider, "status_code": status, "request_id": pid}
    if status in (401, 403):
        return AuthenticationError(f"HTTP {status}: the API token was refused", **kw)
    if status == 402:
        return InsufficientCredits(text, **kw)
    if status == 429:
        return RateLimited(text, retry_after=retry_after, **kw)
    if status in (400, 404, 413, 422):
        return InvalidRequestError(text, **kw)
    return ProviderUnavailable(text, **kw)


def _data_url(data: bytes) -> str:
    return f"data:{sniff_mime(data) or 'image/png'};base64,{base64.b64encode(data).decode()}"
