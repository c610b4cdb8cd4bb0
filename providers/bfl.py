"""Black Forest Labs' FLUX API over httpx: asynchronous tasks on regional hosts.

``POST /v1/{model}`` answers ``{id, polling_url}``; the provider polls that URL (with
the key) until the task is Ready, then downloads ``result.sample`` at once through the
:class:`~router.fetch.SafeFetcher` (sample URLs expire after 10 minutes). One image
per task: ``n > 1`` fans out. Inpainting (flux-pro-1.0-fill) takes a white = repaint
mask; flux-kontext-pro edits an init image. Regions are hosts: global, eu, us.
Cost is the model's credits per image at $0.01 a credit. No retries here.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
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
from router.geometry import SizePlan, SizeRules, parse_ratio
from router.images import ImageDecodeError, decode, encode, image_size, load_bytes, mask_to_white_repaint, sniff_mime
from router.prices import PriceTable
from router.request import ImageRequest
from router.result import GeneratedImage

REGION_HOSTS: dict[str, str] = {"global": "https://api.bfl.ai", "eu": "https://api.eu.bfl.ai",
                                "us": "https://api.us.bfl.ai"}
MODELS = ("flux-pro-1.1", "flux-kontext-pro", "flux-pro-1.0-fill", "flux-pro-1.1-ultra", "flux-2-pro")
_OPTIONS = frozenset({"safety_tolerance", "output_format", "prompt_upsampling", "raw"})
_FORMATS = frozenset({"png", "jpeg"})
_MODERATED = ("Request Moderated", "Content Moderated")
_SIZES = SizeRules(multiple=16, min_side=256, max_side=4096, max_pixels=4 * 1024 * 1024, max_ratio=4.0,
                   native=(1024, 1024))
# aspect_ratio models: output of about this many pixels at a ratio between 9:21 and 21:9
_RATIO_AREA = {"flux-kontext-pro": 1024 * 1024, "flux-pro-1.1-ultra": 2048 * 2048}
_RATIO_RULES = SizeRules(multiple=16, min_side=256, max_side=4096, max_pixels=4 * 1024 * 1024,
                         max_ratio=21 / 9, native=(1024, 1024))
_CAPS: dict[str, Capabilities] = {
    "flux-pro-1.1": Capabilities(tasks=frozenset({"txt2img"}), sizes=_SIZES, max_n=8, seed=True, quality=0.85,
                                 output_formats=_FORMATS),
    "flux-2-pro": Capabilities(tasks=frozenset({"txt2img"}), sizes=_SIZES, max_n=8, seed=True, quality=0.9,
                               output_formats=_FORMATS),
    "flux-pro-1.1-ultra": Capabilities(tasks=frozenset({"txt2img"}), sizes=_RATIO_RULES, max_n=8, seed=True,
                                       quality=0.9, output_formats=_FORMATS),
    "flux-kontext-pro": Capabilities(tasks=frozenset({"txt2img", "img2img"}), sizes=_RATIO_RULES, max_n=8,
                                     seed=True, quality=0.85, output_formats=_FORMATS),
    "flux-pro-1.0-fill": Capabilities(tasks=frozenset({"inpaint"}), sizes=_SIZES, max_n=8, seed=True, steps=True,
                                      guidance=True, quality=0.85, output_formats=_FORMATS),
}


def ratio_size(ratio: float, area: int) -> tuple[int, int]:
    """The shape an ``aspect_ratio`` model makes: about ``area`` pixels, sides multiples of 16."""
    return max(16, round(math.sqrt(area * ratio) / 16) * 16), max(16, round(math.sqrt(area / ratio) / 16) * 16)


class BFLProvider(Provider):
    """Black Forest Labs' FLUX API.

    ``api_key`` defaults to ``BFL_API_KEY``. Without ``base_url`` the regions are the
    global, eu and us hosts; with it, "global" plus the regions in ``region_base_urls``
    (which replace a region's host: a proxy, a sandbox). ``fetcher`` downloads outputs.
    """

    kind = "bfl"

    def __init__(
        self,
        *,
        name: str | None = None,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        region_base_urls: Mapping[str, str] | None = None,
        models: Sequence[str] = MODELS,
        fetcher: SafeFetcher | None = None,
        poll_interval_s: float = 0.5,
        prices: PriceTable | None = None,
    ) -> None:
        super().__init__(name=name, prices=prices)
        key = api_key if api_key is not None else os.environ.get("BFL_API_KEY")
        self._api_key = SecretStr(key) if isinstance(key, str) else key
        base = base_url or os.environ.get("BFL_BASE_URL") or None
        overrides = {r: u.rstrip("/") for r, u in (region_base_urls or {}).items()}
        if base is None:
            unknown = set(overrides) - set(REGION_HOSTS)
            if unknown:
                raise ValueError(f"unknown BFL regions {sorted(unknown)}; use {', '.join(REGION_HOSTS)}")
            self._hosts = REGION_HOSTS | overrides
        else:
            self._hosts = {"global": base.rstrip("/")} | overrides
        unknown_models = set(models) - set(_CAPS)
        if unknown_models:
            raise ValueError(f"unknown BFL models {sorted(unknown_models)}; use {', '.join(MODELS)}")
        self._models = tuple(models)
        self._regions = frozenset(self._hosts)
        self._fetcher = fetcher or SafeFetcher()
        self._poll_interval_s = poll_interval_s
        self._client: httpx.AsyncClient | None = None

    # --- what it can do ----------------------------------------------------------

    def models(self) -> Sequence[str]:
        return self._models

    def capabilities(self, model: str) -> Capabilities:
        return dataclasses.replace(_CAPS[model], regions=self._regions)

    def provider_option_names(self) -> frozenset[str]:
        return _OPTIONS

    def configuration_problem(self) -> str | None:
        if self._api_key is None or not self._api_key.get_secret_value():
            return "not configured: set BFL_API_KEY"
        return None

    def plan(self, request: ImageRequest, model: str) -> Plan:
        base = super().plan(request, model)
        warnings = [w for w in base.warnings if w != base.size.warning]
        if model == "flux-pro-1.0-fill":
            size = self._fill_size(request)
        elif model in _RATIO_AREA:
            size = self._ratio_plan(request, model)
        else:
            size = base.size
        options = request.provider_options.get(self.name, {})
        if "raw" in options and model != "flux-pro-1.1-ultra":
            warnings.append(f"provider_options.{self.name}.raw ignored: only flux-pro-1.1-ultra takes it")
        if request.idempotency_key is not None:
            warnings.append("idempotency_key not sent: the BFL API has no idempotency keys")
        option_fmt = options.get("output_format")
        if option_fmt is not None and option_fmt != request.output_format:
            warnings.append(f"output_format {request.output_format} replaced by provider_options "
                            f"{self.name}.output_format {option_fmt}")
        return Plan(size, tuple(([size.warning] if size.warning else []) + warnings))

    def _fill_size(self, request: ImageRequest) -> SizePlan:
        src = request.init_image
        if src is None or not (src.width and src.height):
            return SizePlan(*_SIZES.native)
        asked = (request.width, request.height)
        if request.width is not None and asked != (src.width, src.height):
            return SizePlan(src.width, src.height, f"size {request.width}x{request.height} adapted to "
                            f"{src.width}x{src.height}: flux-pro-1.0-fill keeps the init image's size", False)
        return SizePlan(src.width, src.height)

    def _ratio_plan(self, request: ImageRequest, model: str) -> SizePlan:
        ratio = _ratio_of(request)
        clamped = min(max(ratio, 9 / 21), 21 / 9)
        w, h = ratio_size(clamped, _RATIO_AREA[model])
        if request.width is not None and (request.width, request.height) != (w, h):
            return SizePlan(w, h, f"size {request.width}x{request.height} adapted to {w}x{h}: {model} makes about "
                            f"{_RATIO_AREA[model] / 1024**2:.0f} MP at the requested aspect ratio", False)
        if abs(math.log(clamped / ratio)) > 0.02:
            return SizePlan(w, h, f"aspect ratio {ratio:.2f} adapted to {w}x{h}: {model} takes 9:21 to 21:9", False)
        return SizePlan(w, h)

    # --- cost --------------------------------------------------------------------

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        row = self.price_row(model)
        credits = row.rate("credits_per_image") * request.n
        return Estimate(credits * row.rate("usd_per_credit"), float(row.rates.get("latency_s", 10.0)), "credits",
                        credits)

    def _billing(self, model: str, task_ids: list[str]) -> Billing:
        row = self.price_row(model)
        credits = row.rate("credits_per_image") * len(task_ids)
        return Billing(credits * row.rate("usd_per_credit"), "credits", credits, self.prices.version,
                       {"credits": str(credits), "tasks": task_ids})

    # --- the call ----------------------------------------------------------------

    def _host(self, request: ImageRequest) -> str:
        allowed = request.constraints.residency
        if allowed is None:
            return self._hosts["global"]
        for region in ("eu", "us", "global"):
            if region in allowed and region in self._hosts:
                return self._hosts[region]
        raise InvalidRequestError(f"no BFL host in regions {sorted(allowed)}", provider=self.name)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            key = self._api_key.get_secret_value() if self._api_key else ""
            self._client = httpx.AsyncClient(headers={"x-key": key, "accept": "application/json"},
                                             follow_redirects=False)
        return self._client

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        plan = self.plan(request, model)
        host = self._host(request)
        body = await self._body(request, model, plan)

        async def one(i: int) -> tuple[str, GeneratedImage]:
            task_body = dict(body)
            if request.seed is not None and i:
                task_body["seed"] = (request.seed + i) % 2**32
            return await self._task(host, model, task_body)

        try:
            async with asyncio.timeout(timeout_s):
                fan = await fan_out(request.n, one)
        except TimeoutError:
            raise ProviderTimeout(f"no result within {timeout_s:.1f}s", provider=self.name) from None
        ids = [task_id for task_id, _ in fan.done]
        billing = combine([self._billing(model, ids), *billed_by(fan.errors)])
        return ProviderResponse([img for _, img in fan.done], model, billing, ids[0],
                                warnings=fan.warnings(request.n))

    async def _body(self, request: ImageRequest, model: str, plan: Plan) -> dict[str, Any]:
        options = request.provider_options.get(self.name, {})
        fmt = request.output_format if request.output_format in _FORMATS else "png"
        body: dict[str, Any] = {"prompt": request.prompt, "output_format": fmt,
                                **{k: v for k, v in options.items()
                                   if k in _OPTIONS and (k != "raw" or model == "flux-pro-1.1-ultra")}}
        if request.seed is not None:
            body["seed"] = request.seed
        if model == "flux-pro-1.0-fill":
            if request.init_image is None or request.mask_image is None:
                raise InvalidRequestError(f"{model} needs init_image and mask_image", provider=self.name)
            image = await load_bytes(request.init_image, fetcher=self._fetcher)
            mask = mask_to_white_repaint(decode(await load_bytes(request.mask_image, fetcher=self._fetcher),
                                                what="mask_image"), image_size(image))
            body |= {"image": _b64(image), "mask": _b64(encode(mask, "png"))}
            if request.steps is not None:
                body["steps"] = request.steps
            if request.guidance_scale is not None:
                body["guidance"] = request.guidance_scale
        elif model in _RATIO_AREA:
            if request.init_image is not None:
                body["input_image"] = _b64(await load_bytes(request.init_image, fetcher=self._fetcher))
            if request.width is not None or request.aspect_ratio is not None or request.init_image is None:
                body["aspect_ratio"] = _ratio_sent(request, plan)
        else:
            body |= {"width": plan.size.width, "height": plan.size.height}
        return body

    async def _task(self, host: str, model: str, body: dict[str, Any]) -> tuple[str, GeneratedImage]:
        client = self._http()
        submitted = await self._json(client.post(f"{host}/v1/{model}", json=body), None)
        task_id, polling_url = submitted.get("id"), submitted.get("polling_url")
        if not isinstance(task_id, str) or not isinstance(polling_url, str):
            raise MalformedResponse("submission answered without id and polling_url", provider=self.name)
        if not _same_service(polling_url, host):
            raise MalformedResponse("polling_url points outside the API's hosts; not sent the key",
                                    provider=self.name, request_id=task_id)
        while True:
            await asyncio.sleep(self._poll_interval_s)
            polled = await self._json(client.get(polling_url), task_id)
            status = polled.get("status")
            if status == "Ready":
                break
            if status == "Pending":
                continue
            kw: dict[str, Any] = {"provider": self.name, "code": status, "request_id": task_id}
            if status in _MODERATED:
                raise ContentPolicyError(f"task {status.lower()}", **kw)
            if status == "Error":
                raise ProviderUnavailable("the task failed on the provider's side", **kw)
            if status == "Task not found":
                raise ProviderUnavailable("the provider lost the task", **kw)
            raise MalformedResponse(f"unknown task status {str(status)[:40]!r}", **kw)
        result = polled.get("result")
        sample = result.get("sample") if isinstance(result, dict) else None
        if not isinstance(sample, str):
            raise MalformedResponse("Ready task without result.sample", provider=self.name, request_id=task_id)
        try:
            data = await self._fetcher.fetch(sample)
        except ImageRouterError as exc:
            raise ProviderUnavailable(f"sample download failed ({exc.message}); it may have expired",
                                      provider=self.name, request_id=task_id) from None
        seed = result.get("seed") if isinstance(result, dict) else None
        try:
            w, h = image_size(data)
        except ImageDecodeError:
            raise MalformedResponse("sample is not an image", provider=self.name, request_id=task_id) from None
        image = GeneratedImage(data=data, mime=sniff_mime(data) or "image/png", width=w, height=h,
                               seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None)
        return task_id, image

    async def _json(self, call: Any, task_id: str | None) -> dict[str, Any]:
        try:
            response: httpx.Response = await call
        except httpx.TimeoutException:
            raise ProviderTimeout("the request timed out", provider=self.name, request_id=task_id) from None
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"could not connect ({type(exc).__name__})", provider=self.name,
                                      request_id=task_id) from None
        if response.status_code != 200:
            raise _status_error(response, self.name, task_id)
        try:
            payload = response.json()
        except ValueError:
            raise MalformedResponse("response body is not JSON", provider=self.name, status_code=200,
                                    request_id=task_id) from None
        if not isinstance(payload, dict):
            raise MalformedResponse("response body is not a JSON object", provider=self.name, request_id=task_id)
        return payload

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _ratio_of(request: ImageRequest) -> float:
    if request.width is not None and request.height is not None:
        return request.width / request.height
    if request.aspect_ratio is not None:
        return parse_ratio(request.aspect_ratio)
    src = request.init_image
    if src is not None and src.width and src.height:
        return src.width / src.height
    return 1.0


def _ratio_sent(request: ImageRequest, plan: Plan) -> str:
    """The ``aspect_ratio`` to send: the one asked for where it is in range, else the planned shape's."""
    if request.aspect_ratio is not None:
        a, _, b = request.aspect_ratio.partition(":")
        w, h = int(a), int(b)
    elif request.width is not None and request.height is not None:
        w, h = request.width, request.height
    else:
        w, h = plan.size.width, plan.size.height
    if not 9 / 21 <= w / h <= 21 / 9:
        w, h = plan.size.width, plan.size.height
    g = math.gcd(w, h)
    return f"{w // g}:{h // g}"


def _same_service(url: str, host: str) -> bool:
    """Whether ``url`` may receive the key: the configured host's origin, or an https bfl.ai host."""
    try:
        target, base = httpx.URL(url), httpx.URL(host)
    except (httpx.InvalidURL, TypeError):
        return False
    if (target.scheme, target.host, target.port) == (base.scheme, base.host, base.port):
        return True
    return target.scheme == "https" and (target.host == "bfl.ai" or target.host.endswith(".bfl.ai"))


def _status_error(response: httpx.Response, provider: str, task_id: str | None) -> ImageRouterError:
    """An HTTP error answer as the router's error class; the message holds only the vendor's detail."""
    status = response.status_code
    detail = ""
    try:
        body = response.json()
        raw = body.get("detail") if isinstance(body, dict) else None
        if isinstance(raw, list):
            detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg', '')}"
                               for e in raw if isinstance(e, dict))
        elif raw is not None:
            detail = str(raw)
    except ValueError:
        pass
    text = f"HTTP {status}" + (f": {redact(detail)[:300]}" if detail else "")
    kw: dict[str, Any] = {"provider": provider, "status_code": status, "request_id": task_id}
    if status in (401, 403):
        return AuthenticationError(f"HTTP {status}: the API key was refused", **kw)
    if status == 402:
        return InsufficientCredits(text, **kw)
    if status == 429:
        return RateLimited(text, retry_after=retry_after_s(response.headers), **kw)
    if status in (400, 404, 413, 422):
        return InvalidRequestError(text, **kw)
    return ProviderUnavailable(text, **kw)
