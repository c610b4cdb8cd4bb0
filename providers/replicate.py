"""Replicate through the official ``replicate`` client: official models by name, and pinned versions.

``POST /v1/models/{owner}/{name}/predictions`` with ``Prefer: wait=N``; when the wait
runs out the prediction comes back ``starting``/``processing`` and the provider polls
``GET /v1/predictions/{id}`` until it ends, cancelling it when the deadline passes.
Outputs are URLs that expire: they are downloaded at once through the
:class:`~router.fetch.SafeFetcher` and pass the one check every output passes
(:func:`providers.vendor.output_image`). Input images are sent as bytes, never as the
user's URL; a LoRA given by URL is sent by URL, its redirects followed and every hop checked.
Official models cost the price table's per-output rate; pinned versions (``POST
/v1/predictions {version, input}``) cost ``metrics.predict_time`` × the hardware's $/s.

Paid work is never paid twice: once a prediction has succeeded its outputs are downloaded
again (a few times, inside the deadline, re-reading the prediction between tries), never
re-generated; when they still cannot be had, the error carries the prediction's bill
(:func:`providers.vendor.charged`), so the router charges it and moves to the next candidate
instead of running the same prediction again. A failed or cancelled version-model prediction
that ran carries its ``predict_time`` bill the same way.

Input images over Replicate's inline limit go through the Files API (``POST /v1/files``)
and are passed by the file's ``urls.get``. Which inputs a model takes comes from
:data:`CATALOG`. The client's own retries are off (the router owns retries).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import io
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
from pydantic import SecretStr

from providers.base import Billing, Capabilities, Estimate, Plan, Provider, ProviderResponse
from providers.vendor import (
    ApiKey,
    billed_by,
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
    Disposition,
    ImageRouterError,
    InvalidRequestError,
    MalformedResponse,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    redact,
)
from router.fetch import SafeFetcher
from router.geometry import SizePlan, SizeRules
from router.images import (
    adata_url,
    amask_png,
    image_size,
    load_bytes,
    mask_to_white_repaint,
    sniff_mime,
)
from router.prices import PriceTable
from router.progress import StatusReporter
from router.request import ImageRequest
from router.result import GeneratedImage

# The shapes FLUX models on Replicate make for each ``aspect_ratio``.
RATIO_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
_BY_SIZE = {size: ratio for ratio, size in RATIO_SIZES.items()}
_SIZES = SizeRules(fixed=tuple(RATIO_SIZES.values()), native=(1024, 1024))
_FORMATS = frozenset({"png", "jpeg", "webp"})
_FORMAT_SENT = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_OPTIONS = frozenset(
    {"go_fast", "megapixels", "output_quality", "disable_safety_checker", "safety_tolerance", "prompt_upsampling"}
)

# The six prediction statuses; the last four are final. "canceled": cancelled by a user or its deadline while
# running; "aborted": ended before it started running.
# Source: Replicate's OpenAPI document https://api.replicate.com/openapi.json (vendored as
# tests/specs/replicate.openapi.json), schemas_prediction_response.status.
_TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
_STATUS = {"starting": "queued", "processing": "running", "succeeded": "succeeded"}
"""Replicate's prediction statuses as progress statuses (the rest: ``failed``); same reference as above."""

# Replicate's prediction error codes (``E####`` in the error text), checked before any keyword.
# https://replicate.com/docs/reference/error-codes documents the format and E1000 (unknown error), E1001 (model
# out of memory), E4875 (webhook URL empty), E6716 (timeout starting the prediction). E005 is not on that page
# (it lists 4-digit codes from E1000): it is the code of Replicate's moderation refusal as failed predictions
# word it, "The input or output was flagged as sensitive. Please try again with different inputs. (E005)"
# (seen in users' reports of Replicate errors; not confirmed in Replicate's reference).
_ERROR_CODES: dict[str, type[ImageRouterError]] = {
    "E005": ContentPolicyError,
    "E1000": ProviderUnavailable,
    "E1001": InvalidRequestError,  # the input is too big for this model: another candidate may serve it
    "E4875": InvalidRequestError,
    "E6716": ProviderUnavailable,
}
_CODE = re.compile(r"\b(E\d{3,4})\b")
# The fallback when a failed prediction carries no code: words moderation refusals use
# (flux's "NSFW content detected", "flagged as sensitive", "moderation", "content policy", "safety").
_POLICY_WORDS = ("nsfw", "sensitive", "safety", "flagged", "moderat", "content policy")

# Data URLs are for small files; bigger ones go through the Files API and are passed by URL.
# The spec's prediction ``input`` description: "Use a data URL when you have a small file <= 256kb …
# Use an HTTP URL when you have a large file > 256kb" (https://api.replicate.com/openapi.json, vendored as
# tests/specs/replicate.openapi.json: schemas_version_prediction_request.input).
# (https://replicate.com/docs/topics/predictions/input-files recommends data URIs only "if the file is less
# than 1MB"; the spec's stricter 256 kB is used.)
INLINE_MAX_BYTES = 256 * 1024

_POLL_ERRORS_MAX = 3  # consecutive failed polls before giving the prediction up (then it is cancelled)
_DOWNLOAD_ATTEMPTS = 4  # tries per output file of a succeeded prediction


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
    caps = Capabilities(
        tasks=frozenset({"control"}),
        sizes=_INPUT_SHAPE,
        control_kinds=frozenset({kind}),
        max_controls=1,
        max_n=4,
        seed=True,
        steps=True,
        guidance=True,
        quality=0.8,
        output_formats=frozenset({"png", "jpeg"}),
    )
    return CatalogEntry(ref, caps, steps_max=50, num_outputs=False, options=_PRO_OPTIONS, shape_from_input=True)


CATALOG: dict[str, CatalogEntry] = {
    "flux-schnell": CatalogEntry(
        "black-forest-labs/flux-schnell",
        Capabilities(
            tasks=frozenset({"txt2img"}),
            sizes=_SIZES,
            max_n=4,
            seed=True,
            steps=True,
            quality=0.6,
            output_formats=_FORMATS,
        ),
        steps_max=4,
        options=frozenset({"go_fast", "megapixels", "output_quality", "disable_safety_checker"}),
    ),
    "flux-dev": CatalogEntry(
        "black-forest-labs/flux-dev",
        Capabilities(
            tasks=frozenset({"txt2img", "img2img"}),
            sizes=_SIZES,
            max_n=4,
            seed=True,
            steps=True,
            guidance=True,
            strength=True,
            quality=0.75,
            output_formats=_FORMATS,
        ),
        steps_max=50,
        options=frozenset({"go_fast", "megapixels", "output_quality", "disable_safety_checker"}),
    ),
    "flux-1.1-pro": CatalogEntry(
        "black-forest-labs/flux-1.1-pro",
        Capabilities(
            tasks=frozenset({"txt2img"}), sizes=_SIZES, max_n=4, seed=True, quality=0.85, output_formats=_FORMATS
        ),
        num_outputs=False,
        options=frozenset({"output_quality", "safety_tolerance", "prompt_upsampling"}),
    ),
    "flux-dev-lora": CatalogEntry(
        "black-forest-labs/flux-dev-lora",
        Capabilities(
            tasks=frozenset({"txt2img", "img2img"}),
            sizes=_SIZES,
            max_n=4,
            max_loras=1,
            seed=True,
            steps=True,
            guidance=True,
            strength=True,
            quality=0.75,
            output_formats=_FORMATS,
        ),
        steps_max=50,
        options=frozenset({"go_fast", "megapixels", "output_quality", "disable_safety_checker"}),
    ),
    "flux-fill-pro": CatalogEntry(
        "black-forest-labs/flux-fill-pro",
        Capabilities(
            tasks=frozenset({"inpaint"}),
            sizes=_INPUT_SHAPE,
            max_n=4,
            seed=True,
            steps=True,
            guidance=True,
            quality=0.85,
            output_formats=frozenset({"png", "jpeg"}),
        ),
        steps_max=50,
        num_outputs=False,
        options=_PRO_OPTIONS,
        shape_from_input=True,
    ),
    "flux-canny-pro": _control_model("black-forest-labs/flux-canny-pro", "canny"),
    "flux-depth-pro": _control_model("black-forest-labs/flux-depth-pro", "depth"),
    "sdxl": CatalogEntry(
        "stability-ai/sdxl",
        Capabilities(
            tasks=frozenset({"txt2img"}),
            sizes=SizeRules(multiple=8, min_side=128, max_side=1024, max_pixels=1024 * 1024),
            max_n=4,
            seed=True,
            steps=True,
            guidance=True,
            negative_prompt=True,
            quality=0.55,
            output_formats=frozenset({"png"}),
        ),
        steps_max=500,
        version="39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b",
        hardware="hardware-gpu-h100",
        expected_predict_s=6.0,
    ),
}
MODELS = tuple(CATALOG)


@dataclass(frozen=True, slots=True)
class _Answer:
    """The last HTTP answer the client received in this task: its status, headers and JSON body."""

    status: int
    headers: httpx.Headers
    body: Any


_answer: contextvars.ContextVar[_Answer | None] = contextvars.ContextVar("replicate_answer", default=None)


async def _keep_answer(response: httpx.Response) -> None:
    """An httpx response hook: keep the answer, which the client's ReplicateError and Prediction drop
    (Retry-After; statuses its Prediction model does not list, such as ``aborted``)."""
    await response.aread()
    try:
        body = response.json()
    except ValueError:
        body = None
    _answer.set(_Answer(response.status_code, response.headers, body))


@dataclass(frozen=True, slots=True)
class _Done:
    """One succeeded prediction: its id, the images downloaded, its bill and what to tell the caller."""

    pid: str
    images: list[GeneratedImage]
    billing: Billing
    warnings: tuple[str, ...] = ()


class ReplicateProvider(Provider):
    """Replicate's prediction API. ``api_token`` defaults to ``REPLICATE_API_TOKEN``.

    ``download_backoff_s``: the first wait before downloading a succeeded prediction's output again
    (doubling, at most :data:`_DOWNLOAD_ATTEMPTS` tries, inside the deadline).
    """

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
        download_backoff_s: float = 0.25,
    ) -> None:
        super().__init__(name=name, prices=prices)
        self._key = ApiKey(api_token, "REPLICATE_API_TOKEN")
        self._base_url = base_url or os.environ.get("REPLICATE_BASE_URL") or None
        self._models = known_models("Replicate", models, MODELS)
        self._fetcher = fetcher or SafeFetcher()
        self._poll_interval_s = poll_interval_s
        self._max_wait_s = max(1, min(60, max_wait_s))
        self._download_backoff_s = download_backoff_s
        self._client: Any = None
        self._transport: httpx.AsyncHTTPTransport | None = None

    # --- what it can do ----------------------------------------------------------

    def models(self) -> Sequence[str]:
        return self._models

    def capabilities(self, model: str) -> Capabilities:
        return CATALOG[model].caps

    def provider_option_names(self) -> frozenset[str]:
        return _OPTIONS

    def configuration_problem(self) -> str | None:
        return self._key.problem()

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
                    warnings.append(
                        f"size {request.width}x{request.height} adapted to {source.width}x"
                        f"{source.height}: {model} keeps the input image's shape"
                    )
                size = SizePlan(
                    source.width,
                    source.height,
                    exact=request.width is None or (request.width, request.height) == (source.width, source.height),
                )
        for control in request.controls:
            if control.scale != 1.0 or control.start != 0.0 or control.end != 1.0:
                warnings.append(f"control scale/start/end ignored: {model} applies its {control.kind} map fully")
        return Plan(size, tuple(warnings))

    # --- cost --------------------------------------------------------------------

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        entry = CATALOG[model]
        if entry.version is not None:
            seconds = Decimal(str(entry.expected_predict_s))
            return Estimate(
                self.price_row(entry.hardware).rate("usd_per_second") * seconds,
                entry.expected_predict_s + 1.0,
                "seconds",
                seconds,
            )
        row = self.price_row(model)
        n = Decimal(request.n)
        return Estimate(row.rate("usd_per_output") * n, float(row.rates.get("latency_s", 5.0)), "outputs", n)

    def _seconds_billing(self, model: str, pid: str, status: str, seconds: Decimal, predict_time: Any) -> Billing:
        entry = CATALOG[model]
        row = self.price_row(entry.hardware)
        return Billing(
            row.rate("usd_per_second") * seconds,
            "seconds",
            seconds,
            self.prices.version,
            {"predictions": [pid], "status": status, "predict_time": [predict_time], "hardware": entry.hardware},
        )

    def _billing(self, model: str, pid: str, prediction: dict[str, Any], outputs: int) -> tuple[Billing, str | None]:
        """What a succeeded prediction costs, and a warning when a fact behind it had to be estimated.

        Official models: the price per output × the outputs it made. Pinned versions:
        ``metrics.predict_time`` × the hardware's $/s (Replicate bills public models for the time
        they run: https://replicate.com/docs/topics/billing).
        """
        entry = CATALOG[model]
        predict_time = _predict_time(prediction)
        if entry.version is not None:
            if predict_time is None:
                seconds = Decimal(str(entry.expected_predict_s))
                return (
                    self._seconds_billing(model, pid, "succeeded", seconds, None),
                    f"prediction {pid} reported no metrics.predict_time: its cost is estimated "
                    f"({seconds} s at the {entry.hardware} rate)",
                )
            return self._seconds_billing(model, pid, "succeeded", predict_time, float(predict_time)), None
        row = self.price_row(model)
        count = Decimal(outputs)
        return Billing(
            row.rate("usd_per_output") * count,
            "outputs",
            count,
            self.prices.version,
            {"predictions": [pid], "predict_time": [_raw_predict_time(prediction)]},
        ), None

    def _ran_billing(self, model: str, pid: str, prediction: dict[str, Any] | None) -> Billing | None:
        """What a prediction that did not succeed (failed, cancelled, given up) was billed, or None.

        A pinned version is billed for the time it ran, whatever the outcome (metrics.predict_time,
        https://replicate.com/docs/topics/billing); an official model bills per output made, so nothing.
        """
        if prediction is None or CATALOG[model].version is None:
            return None
        seconds = _predict_time(prediction)
        if seconds is None or seconds <= 0:
            return None
        return self._seconds_billing(model, pid, str(prediction.get("status")), seconds, float(seconds))

    def _spent(self, model: str, pid: str, final: dict[str, Any] | None, inp: dict[str, Any]) -> Billing | None:
        """What a prediction given up on was billed, from its last known state: a cancel can come too late,
        when it has already succeeded (then its outputs are paid for)."""
        if final is not None and final["status"] == "succeeded":
            urls = _output_urls(final)
            return self._billing(model, pid, final, len(urls) if urls else int(inp.get("num_outputs", 1)))[0]
        return self._ran_billing(model, pid, final)

    # --- the call ----------------------------------------------------------------

    def _replicate(self) -> Any:
        if self._client is None:
            import replicate  # lazy: ``import router`` must not import the SDK

            # replicate.Client passes its keyword arguments to httpx.AsyncClient, and wraps any ``transport=``
            # in its RetryTransport (up to 10 tries of GETs on 429/503/504). httpx's public ``mounts`` option
            # routes every URL ("all://") to a transport of ours instead, so the client never retries: the
            # router owns retries. The response hook keeps each answer's headers and body.
            self._transport = httpx.AsyncHTTPTransport()
            self._client = replicate.Client(
                api_token=self._key.value(),
                base_url=self._base_url,
                follow_redirects=False,
                mounts={"all://": self._transport},
                event_hooks={"response": [_keep_answer]},
            )
        return self._client

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        entry = CATALOG[model]
        plan = self.plan(request, model)
        # End a little before the router's own cut, so that a bill is never lost to its timeout.
        deadline = time.monotonic() + timeout_s - min(0.5, timeout_s * 0.1)
        body = await self._input(request, model, plan, deadline)

        async def one(i: int) -> _Done:
            inp = dict(body)
            seed = seed_for(request.seed, i, 2**32)
            if seed is not None:
                inp["seed"] = seed
            return await self._predict(model, inp, deadline, timeout_s)

        calls = 1 if entry.num_outputs else request.n
        fan = await fan_out(calls, one)
        images = [img for done in fan.done for img in done.images]
        billing = combine([*(done.billing for done in fan.done), *billed_by(fan.errors)])
        warnings = fan.warnings(calls) + tuple(w for done in fan.done for w in done.warnings)
        return ProviderResponse(images, model, billing, fan.done[0].pid, warnings=warnings)

    async def _input(self, request: ImageRequest, model: str, plan: Plan, deadline: float) -> dict[str, Any]:
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
            inp |= {
                "aspect_ratio": _BY_SIZE[(plan.size.width, plan.size.height)],
                "output_format": _FORMAT_SENT.get(request.output_format, "png"),
            }
        if entry.num_outputs:
            inp["num_outputs"] = request.n
        if request.seed is not None:
            inp["seed"] = request.seed
        if request.steps is not None and entry.caps.steps:
            inp["steps" if entry.shape_from_input else "num_inference_steps"] = max(
                1, min(request.steps, entry.steps_max)
            )
        if request.guidance_scale is not None and entry.caps.guidance:
            inp["guidance_scale" if entry.version else "guidance"] = request.guidance_scale
        if request.loras and entry.caps.max_loras:
            ref = request.loras[0].ref
            if looks_like_url(ref):  # Replicate fetches the weights itself: it is sent the checked final URL
                ref = await vendor_fetched_url(ref, self._fetcher, what="loras[0].ref", provider=self.name)
            inp |= {"lora_weights": ref, "lora_scale": request.loras[0].weight}
        if request.controls and entry.caps.control_kinds:
            inp["control_image"] = await self._file_input(
                await load_bytes(request.controls[0].image, fetcher=self._fetcher), deadline
            )
        if request.mask_image is not None and request.init_image is not None and "inpaint" in entry.caps.tasks:
            image = await load_bytes(request.init_image, fetcher=self._fetcher)
            mask = await amask_png(request.mask_image, image_size(image), mask_to_white_repaint, fetcher=self._fetcher)
            inp |= {"image": await self._file_input(image, deadline), "mask": await self._file_input(mask, deadline)}
        if request.init_image is not None and "img2img" in entry.caps.tasks:
            data = await load_bytes(request.init_image, fetcher=self._fetcher)
            inp["image"] = await self._file_input(data, deadline)
            if request.strength is not None:
                inp["prompt_strength"] = request.strength
        return inp

    async def _file_input(self, data: bytes, deadline: float) -> str:
        """An input file as the prediction takes it: a data URL when small, else an uploaded file's URL."""
        if len(data) <= INLINE_MAX_BYTES:
            return await adata_url(data)
        return await self._upload(data, deadline)

    async def _upload(self, data: bytes, deadline: float) -> str:
        """``POST /v1/files`` (multipart ``content``); the prediction takes the file's ``urls.get``.

        Spec: https://api.replicate.com/openapi.json ``POST /files``, ``schemas_file_response``.
        """
        client = self._replicate()
        mime = sniff_mime(data) or "application/octet-stream"
        name = "input." + {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}.get(mime, "bin")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProviderTimeout("no time left to upload the input file", provider=self.name)
        try:
            async with asyncio.timeout(remaining):  # the client sends uploads without a timeout of its own
                body = await self._call(
                    client.files.async_create(io.BytesIO(data), filename=name, content_type=mime), None
                )
        except TimeoutError:
            raise ProviderTimeout("the input file upload timed out", provider=self.name) from None
        urls = body.get("urls") if isinstance(body, dict) else None
        url = urls.get("get") if isinstance(urls, dict) else None
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise MalformedResponse("file upload answered without urls.get", provider=self.name)
        return url

    async def _predict(self, model: str, inp: dict[str, Any], deadline: float, timeout_s: float) -> _Done:
        entry = CATALOG[model]
        client = self._replicate()
        wait = int(max(1, min(self._max_wait_s, deadline - time.monotonic())))
        if entry.version is not None:
            create = client.predictions.async_create(version=entry.version, input=inp, wait=wait)
        else:
            create = client.models.predictions.async_create(model=entry.ref, input=inp, wait=wait)
        prediction = _prediction(await self._call(create, None), self.name, None)
        pid: str = prediction["id"]
        report = StatusReporter(self.name, model, time.monotonic)
        failed_polls = 0
        while True:
            vendor_status = prediction["status"]
            report(_STATUS.get(vendor_status, "failed" if vendor_status in _TERMINAL else "running"), vendor_status,
                   pid)
            if prediction["status"] in _TERMINAL:
                break
            now = time.monotonic()
            if now >= deadline:
                final = await self._cancel(client, pid)
                raise charged(
                    ProviderTimeout(
                        f"no result within {timeout_s:.1f}s; prediction canceled", provider=self.name, request_id=pid
                    ),
                    self._spent(model, pid, final, inp),
                )
            await asyncio.sleep(min(self._poll_interval_s, deadline - now))
            try:
                prediction = _prediction(await self._call(client.predictions.async_get(pid), pid), self.name, pid)
                failed_polls = 0
            except ImageRouterError as exc:
                # A poll only reads: a transient failure is polled again (the prediction runs on, and would be
                # paid for twice if the router started another). Otherwise, or after a few, give it up.
                failed_polls += 1
                transient = exc.disposition is Disposition.RETRY
                wait_s = exc.retry_after if isinstance(exc, RateLimited) and exc.retry_after else 0.0
                if transient and failed_polls < _POLL_ERRORS_MAX and time.monotonic() + wait_s < deadline:
                    await asyncio.sleep(wait_s)
                    continue
                final = await self._cancel(client, pid)
                raise charged(exc, self._spent(model, pid, final, inp)) from None
        status = prediction["status"]
        if status != "succeeded":
            raise charged(_ended_error(prediction, self.name, pid), self._ran_billing(model, pid, prediction))
        return await self._collect(client, model, inp, prediction, deadline)

    async def _collect(
        self, client: Any, model: str, inp: dict[str, Any], prediction: dict[str, Any], deadline: float
    ) -> _Done:
        """The outputs of a succeeded (so billed) prediction. Whatever fails from here on carries its bill."""
        pid: str = prediction["id"]
        urls = _output_urls(prediction)
        billing, note = self._billing(model, pid, prediction, len(urls) if urls else int(inp.get("num_outputs", 1)))
        warnings: tuple[str, ...] = (note,) if note else ()
        try:
            if urls is None:
                raise MalformedResponse("succeeded prediction without output URLs", provider=self.name, request_id=pid)
            seed = inp.get("seed")
            got = await self._download_all(client, pid, urls, seed if isinstance(seed, int) else None, deadline)
        except ImageRouterError as exc:
            exc.request_id = exc.request_id or pid
            raise charged(exc, billing) from None
        images = [got[i] for i in sorted(got)]
        if len(images) < len(urls):
            warnings += (
                f"{len(images)} of {len(urls)} outputs of prediction {pid} could not be downloaded (they are paid for)",
            )
        return _Done(pid, images, billing, warnings)

    async def _download_all(
        self, client: Any, pid: str, urls: list[str], seed: int | None, deadline: float
    ) -> dict[int, GeneratedImage]:
        """Download every output of a succeeded (billed) prediction; a failed one is downloaded again, with
        a fresh URL from the prediction where it gives one, never re-created. An output that is no usable
        image (:func:`providers.vendor.output_image`) is dropped like one that cannot be had. Raises when none
        could be had (a MalformedResponse when one was unusable); returns what could, by output index."""
        got: dict[int, GeneratedImage] = {}
        last: ImageRouterError | None = None
        unusable: MalformedResponse | None = None
        for i, url in enumerate(urls):
            try:
                data = await download_paid(
                    self._fetcher,
                    url,
                    provider=self.name,
                    request_id=pid,
                    deadline=deadline,
                    attempts=_DOWNLOAD_ATTEMPTS,
                    backoff_s=self._download_backoff_s,
                    fresh_url=functools.partial(self._fresh_output, client, pid, i, len(urls)),
                )
                # the one check every output passes: the caps user images have, decoded whole, off the loop
                mime, w, h = await output_image(data, provider=self.name, request_id=pid)
            except MalformedResponse as exc:
                unusable = exc
                continue
            except (ProviderUnavailable, ProviderTimeout) as exc:
                last = exc
                continue
            got[i] = GeneratedImage(data=data, mime=mime, width=w, height=h, seed=seed if i == 0 else None)
        if not got:
            if unusable is not None:
                raise unusable
            detail = f" ({last.message})" if last is not None else ""
            raise ProviderUnavailable(
                f"no output could be downloaded{detail}; it may have expired", provider=self.name, request_id=pid
            )
        return got

    async def _fresh_output(self, client: Any, pid: str, index: int, count: int) -> str | None:
        """Output ``index``'s URL as the prediction gives it now (None: unreadable or unchanged in shape);
        raises when the prediction says its files were removed."""
        fresh = await self._reread(client, pid)
        if fresh is not None and fresh.get("data_removed") is True:
            raise ProviderUnavailable("the prediction's output files were removed", provider=self.name, request_id=pid)
        urls = _output_urls(fresh) if fresh is not None else None
        return urls[index] if urls is not None and len(urls) == count else None

    async def _reread(self, client: Any, pid: str) -> dict[str, Any] | None:
        """The prediction as it stands now, or None when it cannot be read (best effort)."""
        try:
            return _prediction(await self._call(client.predictions.async_get(pid), pid), self.name, pid)
        except ImageRouterError:
            return None

    async def _cancel(self, client: Any, pid: str) -> dict[str, Any] | None:
        """Cancel (best effort: the error that led here is what is reported); the prediction as it ended."""
        try:
            return _prediction(await self._call(client.predictions.async_cancel(pid), pid), self.name, pid)
        except ImageRouterError:
            return None

    async def _call(self, call: Any, pid: str | None) -> Any:
        """Await a client call; the JSON body of its answer, or the router's error for it.

        The body is read from the answer itself (kept by the response hook): replicate 1.0.7's
        Prediction model lists five statuses and rejects ``aborted``, the spec's sixth.
        """
        from replicate.exceptions import ReplicateError

        _answer.set(None)
        try:
            await call
        except ReplicateError as exc:
            answer = _answer.get()
            raise _status_error(exc, answer.headers if answer else None, self.name, pid) from None
        except httpx.HTTPError as exc:
            raise connection_error(exc, provider=self.name, request_id=pid) from None
        except (ValueError, TypeError, KeyError):
            pass  # the client could not read the body into its model: it is checked below, as sent
        answer = _answer.get()
        if answer is None or not isinstance(answer.body, dict):
            raise MalformedResponse("response body is not a JSON object", provider=self.name, request_id=pid)
        return answer.body

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()
        self._client = self._transport = None


def _prediction(body: Any, provider: str, pid: str | None) -> dict[str, Any]:
    """``body`` if it is a prediction object (an id and one of the six statuses), else MalformedResponse."""
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("id"), str)
        or not body["id"]
        or body.get("status") not in {"starting", "processing", *_TERMINAL}
    ):
        raise MalformedResponse("response body is not a prediction", provider=provider, request_id=pid)
    return body


def _output_urls(prediction: dict[str, Any]) -> list[str] | None:
    output = prediction.get("output")
    urls = output if isinstance(output, list) else [output]
    if not urls or not all(isinstance(u, str) and u for u in urls):
        return None
    return list(urls)


def _raw_predict_time(prediction: dict[str, Any]) -> Any:
    metrics = prediction.get("metrics")
    return metrics.get("predict_time") if isinstance(metrics, dict) else None


def _predict_time(prediction: dict[str, Any]) -> Decimal | None:
    value = _raw_predict_time(prediction)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return Decimal(str(value))


def _coded(text: str, kw: dict[str, Any]) -> ImageRouterError | None:
    """The error a Replicate error code in ``text`` stands for, or None when it carries no known code."""
    for code in _CODE.findall(text):
        cls = _ERROR_CODES.get(code)
        if cls is not None:
            return cls(text, code=code, **kw)
    return None


def _ended_error(prediction: dict[str, Any], provider: str, pid: str) -> ImageRouterError:
    """A prediction that ended without succeeding, as the router's error class."""
    status = prediction["status"]
    kw: dict[str, Any] = {"provider": provider, "request_id": pid}
    if status == "aborted":
        return ProviderUnavailable("the prediction was aborted before it started running", **kw)
    if status == "canceled":
        return ProviderUnavailable("the prediction was canceled", **kw)
    text = redact(str(prediction.get("error") or "the prediction failed"))[:300]
    coded = _coded(text, kw)
    if coded is not None:
        return coded
    lower = text.lower()
    if any(w in lower for w in _POLICY_WORDS):
        return ContentPolicyError(text, **kw)
    if "invalid" in lower or "input" in lower:
        return InvalidRequestError(text, **kw)
    return ProviderUnavailable(text, **kw)


def _status_error(exc: Any, headers: httpx.Headers | None, provider: str, pid: str | None) -> ImageRouterError:
    """An RFC 7807 error answer as the router's error class; only the vendor's title/detail in the message."""
    status = int(exc.status or 0)
    detail = exc.detail or exc.title or ""
    text = f"HTTP {status}" + (f": {redact(str(detail))[:300]}" if detail else "")
    if 400 <= status < 500 and status not in (401, 403):
        coded = _coded(text, {"provider": provider, "status_code": status, "request_id": pid})
        if coded is not None:
            return coded
    return status_error(status, text, provider=provider, request_id=pid, headers=headers)
