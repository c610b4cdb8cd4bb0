"""fal.ai's queue API over httpx: FLUX, SD 3.5, Recraft and Ideogram endpoints behind one submit/poll/result flow.

The queue (https://docs.fal.ai/model-endpoints/queue, https://fal.ai/docs/inference-api/queue/cancel):

- ``POST {queue}/{endpoint_id}`` (JSON input, header ``Authorization: Key …``) → ``{request_id, response_url,
  status_url, cancel_url}``; "The subpath (/dev in this case) should be used when making the request, but not
  when getting request status or results": the provider uses the URLs the answer gives.
- ``GET status_url?logs=1`` → ``{status: IN_QUEUE|IN_PROGRESS|COMPLETED, queue_position, logs, metrics,
  error, error_type}``; ``GET response_url`` → the endpoint's output (``{images: [{url, width, height,
  content_type}], seed, has_nsfw_concepts, …}``), or the request's error; ``PUT cancel_url`` cancels ("If the
  request is in the queue, fal removes it. If the request is in progress, fal sends a cancellation signal"),
  answering CANCELLATION_REQUESTED or ALREADY_COMPLETED.
- Errors (https://fal.ai/docs/documentation/model-apis/errors.md): ``{"detail": [{loc, msg, type, …}]}`` or
  ``{"detail": "…"}``; a refused prompt or image is 422 ``type: content_policy_violation``.

Why not the official ``fal-client`` (1.0.3, checked): it builds the queue URL as ``https://`` +
``FAL_QUEUE_RUN_HOST`` read once at import (no base URL or scheme to point at a proxy or a loopback sandbox), and
retries 408/409/429 and transport errors up to 10 times inside every call with no switch to turn that off
(``_async_maybe_retry_request``, ``MAX_ATTEMPTS = 10``), while the router must own retries. The REST calls it
makes are the four above; they are made here with httpx, the same way.

Inputs follow each endpoint's schema (fal's per-endpoint OpenAPI, https://fal.ai/api/openapi/queue/openapi.json
?endpoint_id=…, as generated into github.com/rawpixel-vincent/fal-endpoint-types types/fal/endpoints/schema.d.ts):
``image_size`` ``{width, height}``, ``num_images``, ``num_inference_steps``, ``guidance_scale``, ``seed``,
``output_format``, ``loras`` ``[{path, scale}]``, ``image_url`` / ``mask_url`` (data URLs are accepted file
inputs). Images are sent as data URLs, never as the caller's URL; a LoRA given by URL is sent by its checked
final URL. Outputs are downloaded at once through the :class:`~router.fetch.SafeFetcher`.

Cost: "you are billed based on the output you generate … You pay only for successful outputs, and you are never
charged for server errors or time spent waiting in the queue" (https://docs.fal.ai/documentation/model-apis/pricing).
The bill is computed from the result's own facts (the images it lists and their sizes) at the price table's
rates: per megapixel (each image's started megapixels) or per image. A completed request is paid: a failed
download is tried again, never the request, and a failure from then on carries the bill.

Status: every status answer is a :class:`~router.progress.Status` event (IN_QUEUE → queued, IN_PROGRESS →
running, COMPLETED → succeeded); :meth:`FalProvider._on_status` logs the queue position and new log lines.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
from pydantic import SecretStr

from providers.base import Billing, Capabilities, Estimate, Plan, Provider, ProviderResponse
from providers.vendor import (
    ApiKey,
    charged,
    combine,
    connection_error,
    download_paid,
    fan_out,
    known_models,
    looks_like_url,
    output_image,
    seed_for,
    status_error,
    vendor_fetched_url,
)
from router.errors import (
    ContentPolicyError,
    ImageRouterError,
    InsufficientCredits,
    MalformedResponse,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    redact,
)
from router.fetch import SafeFetcher
from router.geometry import SizePlan, SizeRules
from router.images import adata_url, amask_png, image_size, load_bytes, mask_to_white_repaint
from router.prices import PriceRow, PriceTable
from router.progress import StatusReporter
from router.request import ImageRequest, Task
from router.result import GeneratedImage

log = logging.getLogger("imagerouter")

QUEUE_URL = "https://queue.fal.run"
MEGAPIXEL = 1024 * 1024
_TRANSIENT = (RateLimited, ProviderUnavailable, ProviderTimeout)
_PROGRESS = {"IN_QUEUE": "queued", "IN_PROGRESS": "running", "COMPLETED": "succeeded"}
"""fal's queue statuses (https://docs.fal.ai/model-endpoints/queue) as progress statuses."""
# fal's ImageSize is {width, height} integers with no published bounds: these are the router's own, so a request
# lands on shapes FLUX-class models make well.
_FREE = SizeRules(multiple=8, min_side=256, max_side=2048, max_pixels=2048 * 2048, max_ratio=4.0)
_FROM_INPUT = SizeRules(multiple=1, min_side=64, max_side=4096, max_pixels=4096 * 4096, max_ratio=8.0)
_FLUX_OPTIONS = frozenset({"enable_safety_checker", "acceleration"})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One fal endpoint: what it does and which inputs it takes (from its schema)."""

    caps: Capabilities
    per_call: int = 4  # the most num_images one request takes; 1: no num_images, n fans out
    steps: tuple[int, int] | None = None  # num_inference_steps range
    guidance: tuple[float, float] | None = None  # guidance_scale range
    image_size: bool = True  # takes image_size; False: the output follows the input image
    output_format: bool = True  # takes output_format jpeg|png
    options: frozenset[str] = frozenset()


def _caps(tasks: set[Task], quality: float, *, sizes: SizeRules = _FREE, max_n: int = 4, seed: bool = True,
          formats: frozenset[str] = frozenset({"png", "jpeg"}), **kw: Any) -> Capabilities:
    return Capabilities(tasks=frozenset(tasks), sizes=sizes, max_n=max_n, seed=seed, quality=quality,
                        output_formats=formats, **kw)


# The endpoints and their inputs. Ranges: fal's model pages' API schemas (FLUX.1 [dev]: num_inference_steps
# 1-50, guidance_scale 1-20, num_images 1-4; [schnell]: same schema, steps default 4, up to 12).
ENDPOINTS: dict[str, Endpoint] = {
    "fal-ai/flux/schnell": Endpoint(
        _caps({"txt2img"}, 0.6, steps=True, guidance=True), steps=(1, 12), guidance=(1.0, 20.0),
        options=_FLUX_OPTIONS),
    "fal-ai/flux/dev": Endpoint(
        _caps({"txt2img"}, 0.75, steps=True, guidance=True), steps=(1, 50), guidance=(1.0, 20.0),
        options=_FLUX_OPTIONS),
    # FluxDevImageToImageInput: image_url (required), strength (default 0.95); no image_size
    "fal-ai/flux/dev/image-to-image": Endpoint(
        _caps({"img2img"}, 0.75, sizes=_FROM_INPUT, steps=True, guidance=True, strength=True),
        steps=(1, 50), guidance=(1.0, 20.0), image_size=False, options=_FLUX_OPTIONS),
    # FluxLoraInput: loras [{path, scale}], "You can use any number of LoRAs": the router caps it at 4
    "fal-ai/flux-lora": Endpoint(
        _caps({"txt2img"}, 0.75, steps=True, guidance=True, max_loras=4), steps=(1, 50), guidance=(1.0, 20.0),
        options=_FLUX_OPTIONS),
    # FluxLoraInpaintingInput: image_url and mask_url required, strength (default 0.85), loras; image_size optional
    "fal-ai/flux-lora/inpainting": Endpoint(
        _caps({"inpaint"}, 0.75, sizes=_FROM_INPUT, steps=True, guidance=True, strength=True, max_loras=4),
        steps=(1, 50), guidance=(1.0, 20.0), image_size=False, options=_FLUX_OPTIONS),
    # FluxProV11Input: image_size, num_images, seed, safety_tolerance "1".."6", enhance_prompt, output_format
    "fal-ai/flux-pro/v1.1": Endpoint(
        _caps({"txt2img"}, 0.85), options=frozenset({"safety_tolerance", "enhance_prompt",
                                                     "enable_safety_checker"})),
    # StableDiffusionV35LargeInput: negative_prompt, num_inference_steps, guidance_scale, image_size, num_images
    "fal-ai/stable-diffusion-v35-large": Endpoint(
        _caps({"txt2img"}, 0.7, steps=True, guidance=True, negative_prompt=True), steps=(1, 50),
        guidance=(0.0, 20.0), options=frozenset({"enable_safety_checker"})),
    # RecraftV3TextToImageInput: prompt, image_size, style, colors, style_id; one image, no seed, no output_format
    "fal-ai/recraft/v3/text-to-image": Endpoint(
        _caps({"txt2img"}, 0.85, seed=False, formats=frozenset({"png"})), per_call=1, output_format=False,
        options=frozenset({"style", "colors", "style_id"})),
    # IdeogramV3Input: rendering_speed TURBO|BALANCED|QUALITY, expand_prompt, style, negative_prompt, seed,
    # num_images, image_size; no output_format
    "fal-ai/ideogram/v3": Endpoint(
        _caps({"txt2img"}, 0.85, negative_prompt=True, formats=frozenset({"png"})), output_format=False,
        options=frozenset({"rendering_speed", "expand_prompt", "style"})),
}
MODELS = tuple(ENDPOINTS)


def started_megapixels(width: int, height: int) -> int:
    """Megapixels of 1024x1024 pixels, each started one counted (at least 1)."""
    return max(1, math.ceil(width * height / MEGAPIXEL))


@dataclass(frozen=True, slots=True)
class _Done:
    """One completed request: its id, the images downloaded and its bill."""

    rid: str
    images: list[GeneratedImage]
    billing: Billing
    warnings: tuple[str, ...] = ()


class FalProvider(Provider):
    """fal.ai's queue API. ``api_key`` defaults to ``FAL_KEY`` (fal's own variable), ``base_url`` to
    ``FAL_QUEUE_URL`` or ``https://queue.fal.run``. ``fetcher`` downloads outputs; a completed request's image
    is downloaded up to ``download_attempts`` times (``download_backoff_s`` doubling) before the call fails
    carrying its bill."""

    kind = "fal"

    def __init__(
        self,
        *,
        name: str | None = None,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        models: Sequence[str] = MODELS,
        fetcher: SafeFetcher | None = None,
        poll_interval_s: float = 0.5,
        download_attempts: int = 4,
        download_backoff_s: float = 0.5,
        prices: PriceTable | None = None,
    ) -> None:
        super().__init__(name=name, prices=prices)
        if download_attempts < 1:
            raise ValueError("download_attempts must be at least 1")
        self._key = ApiKey(api_key, "FAL_KEY")
        self._base = (base_url or os.environ.get("FAL_QUEUE_URL") or QUEUE_URL).rstrip("/")
        self._models = known_models("fal", models, MODELS)
        self._fetcher = fetcher or SafeFetcher()
        self._poll_interval_s = poll_interval_s
        self._download_attempts = download_attempts
        self._download_backoff_s = download_backoff_s
        self._client: httpx.AsyncClient | None = None

    # --- what it can do ----------------------------------------------------------

    def models(self) -> Sequence[str]:
        return self._models

    def capabilities(self, model: str) -> Capabilities:
        return ENDPOINTS[model].caps

    def provider_option_names(self) -> frozenset[str]:
        return frozenset().union(*(e.options for e in ENDPOINTS.values()))

    def configuration_problem(self) -> str | None:
        return self._key.problem()

    def plan(self, request: ImageRequest, model: str) -> Plan:
        base = super().plan(request, model)
        ep = ENDPOINTS[model]
        warnings = list(base.warnings)
        size = base.size
        if not ep.image_size:  # the output follows the input image
            warnings = [w for w in warnings if w != base.size.warning]
            src = request.init_image
            if src is not None and src.width and src.height:
                exact = request.width is None or (request.width, request.height) == (src.width, src.height)
                if not exact:
                    warnings.append(f"size {request.width}x{request.height} adapted to {src.width}x{src.height}: "
                                    f"{model} keeps the input image's size")
                size = SizePlan(src.width, src.height, exact=exact)
        if request.steps is not None and ep.steps is not None:
            low, high = ep.steps
            if not low <= request.steps <= high:
                warnings.append(f"steps {request.steps} adapted to {min(max(request.steps, low), high)}: "
                                f"{model} takes {low}..{high}")
        if request.guidance_scale is not None and ep.guidance is not None:
            low_g, high_g = ep.guidance
            if not low_g <= request.guidance_scale <= high_g:
                warnings.append(f"guidance_scale {request.guidance_scale} adapted to "
                                f"{min(max(request.guidance_scale, low_g), high_g)}: {model} takes {low_g}..{high_g}")
        for option in request.provider_options.get(self.name, {}):
            if option in self.provider_option_names() and option not in ep.options:
                warnings.append(f"provider_options.{self.name}.{option} ignored: {model} does not take it")
        if request.idempotency_key is not None:
            warnings.append("idempotency_key not sent: fal's queue has no idempotency keys")
        return Plan(size, tuple(warnings))

    # --- cost --------------------------------------------------------------------

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        size = self.plan(request, model).size
        usd, unit, quantity = self._price(model, request.provider_options.get(self.name, {}),
                                          [(size.width, size.height)] * request.n)
        row = self.price_row(model)
        return Estimate(usd, float(row.rates.get("latency_s", 8.0)), unit, quantity)

    def _price(self, model: str, options: Mapping[str, Any], sizes: Sequence[tuple[int, int]]
               ) -> tuple[Decimal, str, Decimal]:
        """Cost, unit and quantity of ``sizes`` (one per image) at the price table's row for ``model``."""
        row = self.price_row(model)
        if row.unit == "megapixels":
            mp = Decimal(sum(started_megapixels(w, h) for w, h in sizes))
            return row.rate("usd_per_mp") * mp, "megapixels", mp
        count = Decimal(len(sizes))
        return _per_image(row, options) * count, "images", count

    # --- the call ----------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers={"Authorization": f"Key {self._key.value()}", "accept": "application/json"},
                follow_redirects=False,
            )
        return self._client

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        ep = ENDPOINTS[model]
        plan = self.plan(request, model)
        body = await self._input(request, model, plan)
        # Stop a little before the router's own deadline, so a timeout after completion still carries its bill.
        inner = max(timeout_s * 0.9, timeout_s - 0.25)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + inner
        cancel_by = deadline - min(0.25, inner * 0.1)  # time left to cancel before the call's own cut
        paid: list[Billing] = []

        async def one(i: int) -> _Done:
            inp = dict(body)
            if ep.per_call == 1 and request.seed is not None and ep.caps.seed:
                inp["seed"] = seed_for(request.seed, i, 2**32)
            return await self._request(model, inp, request, plan, (cancel_by, deadline), paid)

        try:
            async with asyncio.timeout(inner):
                fan = await fan_out(1 if ep.per_call > 1 else request.n, one)
        except TimeoutError:
            error = ProviderTimeout(f"no result within {inner:.1f}s", provider=self.name)
            raise charged(error, combine(paid) if paid else None) from None
        images = [img for done in fan.done for img in done.images]
        warnings = (*plan.warnings, *fan.warnings(request.n), *(w for d in fan.done for w in d.warnings))
        return ProviderResponse(images, model, combine(paid), fan.done[0].rid, warnings=tuple(warnings))

    async def _input(self, request: ImageRequest, model: str, plan: Plan) -> dict[str, Any]:
        """The endpoint's JSON input."""
        ep = ENDPOINTS[model]
        options = request.provider_options.get(self.name, {})
        inp: dict[str, Any] = {"prompt": request.prompt, **{k: v for k, v in options.items() if k in ep.options}}
        if ep.per_call > 1:
            inp["num_images"] = request.n
        if request.seed is not None and ep.caps.seed:
            inp["seed"] = request.seed
        if ep.image_size:
            inp["image_size"] = {"width": plan.size.width, "height": plan.size.height}
        if ep.output_format:
            inp["output_format"] = "jpeg" if request.output_format == "jpeg" else "png"
        if request.steps is not None and ep.steps is not None:
            inp["num_inference_steps"] = min(max(request.steps, ep.steps[0]), ep.steps[1])
        if request.guidance_scale is not None and ep.guidance is not None:
            inp["guidance_scale"] = min(max(request.guidance_scale, ep.guidance[0]), ep.guidance[1])
        if request.negative_prompt and ep.caps.negative_prompt:
            inp["negative_prompt"] = request.negative_prompt
        if request.loras and ep.caps.max_loras:
            loras = []
            for i, lora in enumerate(request.loras[: ep.caps.max_loras]):
                ref = lora.ref
                if looks_like_url(ref):  # fal fetches the weights itself: it is sent the checked final URL
                    ref = await vendor_fetched_url(ref, self._fetcher, what=f"loras[{i}].ref", provider=self.name)
                loras.append({"path": ref, "scale": lora.weight})
            inp["loras"] = loras
        if request.init_image is not None and ep.caps.tasks & {"img2img", "inpaint"}:
            image = await load_bytes(request.init_image, fetcher=self._fetcher)
            inp["image_url"] = await adata_url(image)
            if request.mask_image is not None and "inpaint" in ep.caps.tasks:
                # white = the area to inpaint, the diffusers convention fal's FLUX inpainting follows
                mask = await amask_png(request.mask_image, image_size(image), mask_to_white_repaint,
                                       fetcher=self._fetcher)
                inp["mask_url"] = await adata_url(mask, "image/png")
            if request.strength is not None:
                inp["strength"] = max(0.01, request.strength)
        return inp

    async def _request(self, model: str, inp: dict[str, Any], request: ImageRequest, plan: Plan,
                       deadlines: tuple[float, float], paid: list[Billing]) -> _Done:
        """Submit, poll until done (cancelling at the deadline), fetch the result and download its images."""
        client = self._http()
        submitted = await self._json(client.post(f"{self._base}/{model}", json=inp), None)
        rid = submitted.get("request_id")
        urls = {k: submitted.get(k) for k in ("status_url", "response_url", "cancel_url")}
        if not isinstance(rid, str) or not all(isinstance(u, str) for u in urls.values()):
            raise MalformedResponse("submission answered without request_id and the queue URLs", provider=self.name)
        if not all(_same_service(str(u), self._base) for u in urls.values()):
            raise MalformedResponse("queue URLs point outside the API's hosts; not sent the key",
                                    provider=self.name, request_id=rid)
        cancel_by, deadline = deadlines
        status = await self._until_done(client, model, rid, str(urls["status_url"]), str(urls["cancel_url"]),
                                         cancel_by, request, plan, paid)
        result = await self._json(client.get(str(urls["response_url"])), rid)
        if status.get("error"):
            raise ProviderUnavailable(f"the request failed: {redact(str(status['error']))[:200]}",
                                      provider=self.name, request_id=rid, code=str(status.get("error_type") or ""))
        return await self._collect(model, rid, result, request, plan, deadline, paid)

    async def _until_done(self, client: httpx.AsyncClient, model: str, rid: str, status_url: str, cancel_url: str,
                          cancel_by: float, request: ImageRequest, plan: Plan, paid: list[Billing]
                          ) -> dict[str, Any]:
        """Poll the status until COMPLETED. A transient poll failure is polled again (the request runs on:
        resubmitting could pay twice); at ``cancel_by`` the request is cancelled."""
        loop = asyncio.get_running_loop()
        misses = 0
        seen_logs = 0
        report = StatusReporter(self.name, model, loop.time)
        report("queued", "submitted", rid)
        while True:
            left = cancel_by - loop.time()
            if left <= self._poll_interval_s:
                await self._cancel(client, model, rid, cancel_url, request, plan, paid)
            await asyncio.sleep(self._poll_interval_s)
            try:
                status = await self._json(client.get(status_url, params={"logs": 1}), rid)
            except _TRANSIENT:
                misses += 1
                if misses >= 3:
                    raise
                continue
            misses = 0
            seen_logs = self._on_status(model, rid, status, seen_logs)
            state = status.get("status")
            report(_PROGRESS.get(str(state), "failed"), str(state)[:40], rid)
            if state == "COMPLETED":
                return status
            if state not in ("IN_QUEUE", "IN_PROGRESS"):
                raise MalformedResponse(f"unknown request status {str(state)[:40]!r}", provider=self.name,
                                        request_id=rid)

    def _on_status(self, model: str, rid: str, status: Mapping[str, Any], seen_logs: int) -> int:
        """One status answer: its queue position and the log lines not seen before, logged at DEBUG. The one place
        status events are observed (a progress callback attaches here). Returns how many log lines were seen."""
        logs = status.get("logs")
        lines = [entry for entry in logs if isinstance(entry, dict)] if isinstance(logs, list) else []
        if status.get("status") == "IN_QUEUE":
            log.debug("%s/%s %s: in queue at position %s", self.name, model, rid, status.get("queue_position"))
        for entry in lines[seen_logs:]:
            log.debug("%s/%s %s: %s", self.name, model, rid, redact(str(entry.get("message", "")))[:200])
        return max(seen_logs, len(lines))

    async def _cancel(self, client: httpx.AsyncClient, model: str, rid: str, cancel_url: str,
                      request: ImageRequest, plan: Plan, paid: list[Billing]) -> None:
        """Cancel a request out of time and raise ProviderTimeout. When fal answers that it already completed, it
        is paid for: the error carries its bill, estimated from the plan (its result is not fetched)."""
        answer: dict[str, Any] = {}
        try:
            response = await client.put(cancel_url)
            answer = response.json() if response.content else {}
        except (httpx.HTTPError, ValueError):
            pass  # best effort: the timeout is what is reported
        error = ProviderTimeout("no result in time; the request was cancelled", provider=self.name, request_id=rid)
        if isinstance(answer, dict) and answer.get("status") == "ALREADY_COMPLETED":
            usd, unit, quantity = self._price(model, request.provider_options.get(self.name, {}),
                                              [(plan.size.width, plan.size.height)] * max(1, _count(request, model)))
            bill = Billing(usd, unit, quantity, self.prices.version, {"requests": [rid], "billed_by": "estimate"})
            paid.append(bill)
            raise charged(error, bill)
        raise error

    async def _collect(self, model: str, rid: str, result: dict[str, Any], request: ImageRequest, plan: Plan,
                       deadline: float, paid: list[Billing]) -> _Done:
        """The images of a completed (so billed) request. Whatever fails from here on carries its bill."""
        images = result.get("images")
        listed = [i for i in images if isinstance(i, dict)] if isinstance(images, list) else []
        sizes = [(int(i["width"]), int(i["height"])) if isinstance(i.get("width"), int)
                 and isinstance(i.get("height"), int) else (plan.size.width, plan.size.height) for i in listed]
        options = request.provider_options.get(self.name, {})
        usd, unit, quantity = self._price(model, options, sizes)
        details: dict[str, Any] = {"requests": [rid], "images": len(listed)}
        if unit == "megapixels":
            details["sizes"] = [f"{w}x{h}" for w, h in sizes]
        billing = Billing(usd, unit, quantity, self.prices.version, details)
        if listed:
            paid.append(billing)
        try:
            if not listed or not all(isinstance(i.get("url"), str) for i in listed):
                raise MalformedResponse("completed request without image URLs", provider=self.name, request_id=rid)
            seed = result.get("seed")
            nsfw = result.get("has_nsfw_concepts")
            flags = nsfw if isinstance(nsfw, list) else []
            out: list[GeneratedImage] = []
            last: ImageRouterError | None = None
            for i, item in enumerate(listed):
                try:
                    data = await download_paid(self._fetcher, item["url"], provider=self.name, request_id=rid,
                                               deadline=deadline, attempts=self._download_attempts,
                                               backoff_s=self._download_backoff_s)
                    mime, w, h = await output_image(data, provider=self.name, request_id=rid)
                except ImageRouterError as exc:
                    last = exc
                    continue
                out.append(GeneratedImage(
                    data=data, mime=mime, width=w, height=h,
                    seed=seed if i == 0 and isinstance(seed, int) and not isinstance(seed, bool) else None,
                    nsfw=bool(flags[i]) if i < len(flags) else False))
            if not out:
                assert last is not None
                raise last
        except ImageRouterError as exc:
            raise charged(exc, billing) from None
        warnings: list[str] = []
        if len(out) < len(listed):
            warnings.append(f"{len(out)} of {len(listed)} images of request {rid} could not be had (they are paid for)")
        flagged = sum(1 for img in out if img.nsfw)
        if flagged:
            warnings.append(f"{flagged} image(s) flagged by fal's safety checker (has_nsfw_concepts)")
        return _Done(rid, out, billing, tuple(warnings))

    async def _json(self, call: Any, rid: str | None) -> dict[str, Any]:
        try:
            response: httpx.Response = await call
        except httpx.HTTPError as exc:
            raise connection_error(exc, provider=self.name, request_id=rid) from None
        if response.status_code not in (200, 202):
            raise _error(response, self.name, rid)
        try:
            payload = response.json()
        except ValueError:
            raise MalformedResponse("response body is not JSON", provider=self.name, request_id=rid) from None
        if not isinstance(payload, dict):
            raise MalformedResponse("response body is not a JSON object", provider=self.name, request_id=rid)
        return payload

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _count(request: ImageRequest, model: str) -> int:
    """Images one request of ``model`` makes for ``request``."""
    return request.n if ENDPOINTS[model].per_call > 1 else 1


def _per_image(row: PriceRow, options: Mapping[str, Any]) -> Decimal:
    """A per-image row's rate for these options: Recraft's vector styles and Ideogram's rendering speeds are
    priced apart (rows name them ``usd_per_image_<variant>``)."""
    style = str(options.get("style", ""))
    if style.startswith("vector_illustration") and "usd_per_image_vector" in row.rates:
        return row.rate("usd_per_image_vector")
    speed = str(options.get("rendering_speed", "")).lower()
    if speed and f"usd_per_image_{speed}" in row.rates:
        return row.rate(f"usd_per_image_{speed}")
    return row.rate("usd_per_image")


def _same_service(url: str, base: str) -> bool:
    """Whether ``url`` may receive the key: the configured queue's origin, or an https fal.run host."""
    try:
        target, origin = httpx.URL(url), httpx.URL(base)
    except (httpx.InvalidURL, TypeError):
        return False
    if (target.scheme, target.host, target.port) == (origin.scheme, origin.host, origin.port):
        return True
    return target.scheme == "https" and (target.host == "fal.run" or target.host.endswith(".fal.run"))


def _error(response: httpx.Response, provider: str, rid: str | None) -> ImageRouterError:
    """A fal error answer as the router's error: ``detail`` as a string or a list of ``{loc, msg, type}``."""
    try:
        body = response.json()
    except ValueError:
        body = None
    raw = body.get("detail") if isinstance(body, dict) else None
    code: str | None = None
    if isinstance(raw, list):
        items = [e for e in raw if isinstance(e, dict)]
        text = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg', '')}" for e in items)
        types = [str(e.get("type")) for e in items if e.get("type") is not None]
        code = types[0] if types else None
        if "content_policy_violation" in types:
            code = "content_policy_violation"
    else:
        text = "" if raw is None else str(raw)
    message = f"HTTP {response.status_code}" + (f": {redact(text)[:300]}" if text else "")
    kw: dict[str, Any] = {"provider": provider, "status_code": response.status_code, "code": code, "request_id": rid}
    if code == "content_policy_violation":
        return ContentPolicyError(message, **kw)
    # An exhausted balance locks the account: 403 "User is locked. Reason: Exhausted balance." (wording from
    # fal's answers as users report them; fal's error reference does not list it)
    if response.status_code == 403 and "exhausted balance" in text.lower():
        return InsufficientCredits(message, **kw)
    return status_error(response.status_code, message, provider=provider, code=code, request_id=rid,
                        headers=response.headers)

