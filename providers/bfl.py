"""Black Forest Labs' FLUX API over httpx: asynchronous tasks on regional hosts.

``POST /v1/{model}`` answers ``{id, polling_url, cost}``; the provider polls that URL (with
the key) until the task is Ready, then downloads ``result.sample`` at once through the
:class:`~router.fetch.SafeFetcher` (sample URLs expire after 10 minutes) and passes it through the
one check every output passes (:func:`providers.vendor.output_image`). One image
per task: ``n > 1`` fans out. Inpainting (flux-pro-1.0-fill) takes a white = repaint
mask; flux-kontext-pro and flux-2-pro edit an init image. Regions are hosts: global, eu, us.

Sizes follow each model's published rule (see ``_GEOMETRY``). Cost: FLUX.1 models bill
credits per image, FLUX.2 per megapixel of output and input, at $0.01 a credit; the
bill is the ``cost`` BFL reports for the task where it does, else the price table's.

Never pay twice: a task is billed once it is Ready. When its sample cannot be
downloaded, the download is retried (re-polling for a fresh URL), never the task; if it
still fails, the error carries the task's bill, so the router charges it and falls back
rather than re-running the paid task. No retries of whole calls here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import time
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
    output_image,
    seed_for,
    status_error,
)
from router.errors import (
    ContentPolicyError,
    ImageRouterError,
    InvalidRequestError,
    MalformedResponse,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    redact,
)
from router.fetch import SafeFetcher
from router.geometry import SizePlan, SizeRules, parse_ratio
from router.images import ab64, amask_png, image_size, load_bytes, mask_to_white_repaint
from router.prices import PriceRow, PriceTable
from router.progress import StatusReporter
from router.request import ImageRequest, Task
from router.result import GeneratedImage

REGION_HOSTS: dict[str, str] = {
    "global": "https://api.bfl.ai",
    "eu": "https://api.eu.bfl.ai",
    "us": "https://api.us.bfl.ai",
}
MODELS = ("flux-pro-1.1", "flux-kontext-pro", "flux-pro-1.0-fill", "flux-pro-1.1-ultra", "flux-2-pro")
_OPTIONS = frozenset({"safety_tolerance", "output_format", "prompt_upsampling", "raw"})
_FORMATS = frozenset({"png", "jpeg"})
_MODERATED = ("Request Moderated", "Content Moderated")
# The task statuses (StatusResponse.status in tests/specs/bfl.openapi.json) as progress statuses.
_PROGRESS = {"Pending": "pending", "Ready": "succeeded"}
MEGAPIXEL = 1024 * 1024  # FLUX.2 prices "1MP" at the 1024 x 1024 default (https://docs.bfl.ai/quick_start/pricing)
_TRANSIENT = (RateLimited, ProviderUnavailable, ProviderTimeout)


@dataclass(frozen=True, slots=True)
class Geometry:
    """One model's size rule: how it takes a size, the limits, and the rule in words (for warnings)."""

    takes: str  # "size": width/height; "ratio": aspect_ratio at a fixed area; "image": the init image's size
    rules: SizeRules
    rule: str
    area: int = 0  # "ratio" models: the pixels they make at any ratio
    multiple: int = 32  # "ratio" models: what their sides are multiples of


# Each model's size rule, from BFL's published reference:
_GEOMETRY: dict[str, Geometry] = {
    # FluxPro11Inputs.width/height: integer, multipleOf 32, minimum 256, maximum 1440
    # (https://docs.bfl.ai/api-reference/tasks/generate-an-image-with-flux-11-[pro], from https://api.bfl.ai/openapi.json)
    "flux-pro-1.1": Geometry(
        "size",
        SizeRules(
            multiple=32, min_side=256, max_side=1440, max_pixels=1440 * 1440, max_ratio=1440 / 256, native=(1024, 1024)
        ),
        "width and height multiples of 32, 256-1440 px each",
    ),
    # FLUX.2 [pro]: width/height >= 64 and multiples of 16 (BFL's SDK, github.com/black-forest-labs/blackforest
    # src/blackforest/types/inputs/flux_pro_2.py; github.com/black-forest-labs/skills bfl-api/references/endpoints.md
    # "Minimum: 64x64, Maximum: 4MP total, Multiple of: 16"); "Maximum 4 megapixels (e.g., 2048 × 2048) … Aspect ratio:
    # Any" (https://help.bfl.ai/articles/1691577414-can-i-generate-different-aspect-ratios-compared-to-what-the-input-image-is)
    "flux-2-pro": Geometry(
        "size",
        SizeRules(
            multiple=16,
            min_side=64,
            max_side=4 * MEGAPIXEL // 64,
            max_pixels=4 * MEGAPIXEL,
            max_ratio=4 * MEGAPIXEL / 64**2,
            native=(1024, 1024),
        ),
        "width and height multiples of 16, at least 64 px, at most 4 MP (2048x2048)",
    ),
    # aspect_ratio "between 21:9 and 9:21" (FluxUltraInput, https://api.bfl.ai/openapi.json); "Generate up to 4MP"
    # (https://docs.bfl.ai/flux_models/flux_1_1_pro_ultra_raw). The rounding of its sides is unpublished: multiples
    # of 32, as BFL's 1536x2688 examples there are.
    "flux-pro-1.1-ultra": Geometry(
        "ratio",
        SizeRules(
            multiple=32, min_side=256, max_side=4096, max_pixels=8 * MEGAPIXEL, max_ratio=21 / 9, native=(2048, 2048)
        ),
        "an aspect_ratio between 9:21 and 21:9 at about 4 MP",
        area=4 * MEGAPIXEL,
    ),
    # FluxKontextProInputs.aspect_ratio "between 21:9 and 9:21" (https://api.bfl.ai/openapi.json); "Kontext outputs at
    # a fixed ~1MP resolution … nearest multiples of 32 pixels" (help.bfl.ai article above)
    "flux-kontext-pro": Geometry(
        "ratio",
        SizeRules(
            multiple=32, min_side=256, max_side=2048, max_pixels=2 * MEGAPIXEL, max_ratio=21 / 9, native=(1024, 1024)
        ),
        "an aspect_ratio between 9:21 and 21:9 at about 1 MP",
        area=MEGAPIXEL,
    ),
    # FluxProFillInputs has no size field and "The mask should be the same dimensions as the image": the output is
    # the image's size (https://api.bfl.ai/openapi.json, docs.bfl.ai API reference "Generate an image with FLUX.1
    # Fill [pro] using an input image and mask")
    "flux-pro-1.0-fill": Geometry(
        "image",
        SizeRules(multiple=1, min_side=64, max_side=8192, max_pixels=8192**2, max_ratio=128.0, native=(1024, 1024)),
        "the init image's own size",
    ),
}
_RATIO_RANGE = (9 / 21, 21 / 9)


def _caps(model: str, tasks: set[Task], quality: float, **kw: Any) -> Capabilities:
    return Capabilities(
        tasks=frozenset(tasks),
        sizes=_GEOMETRY[model].rules,
        max_n=8,
        seed=True,
        quality=quality,
        output_formats=_FORMATS,
        **kw,
    )


_CAPS: dict[str, Capabilities] = {
    "flux-pro-1.1": _caps("flux-pro-1.1", {"txt2img"}, 0.85),
    # "All FLUX.2 models support image editing via the `input_image` parameter" (github.com/black-forest-labs/skills
    # skills/bfl-api/SKILL.md)
    "flux-2-pro": _caps("flux-2-pro", {"txt2img", "img2img"}, 0.9),
    "flux-pro-1.1-ultra": _caps("flux-pro-1.1-ultra", {"txt2img"}, 0.9),
    "flux-kontext-pro": _caps("flux-kontext-pro", {"txt2img", "img2img"}, 0.85),
    "flux-pro-1.0-fill": _caps("flux-pro-1.0-fill", {"inpaint"}, 0.85, steps=True, guidance=True),
}


def ratio_size(ratio: float, area: int, multiple: int = 32) -> tuple[int, int]:
    """The shape an ``aspect_ratio`` model makes: about ``area`` pixels, sides multiples of ``multiple``."""
    m = multiple
    return max(m, round(math.sqrt(area * ratio) / m) * m), max(m, round(math.sqrt(area / ratio) / m) * m)


def started_megapixels(width: int, height: int) -> int:
    """Megapixels of 1024x1024 pixels, each started one counted (at least 1)."""
    return max(1, math.ceil(width * height / MEGAPIXEL))


class BFLProvider(Provider):
    """Black Forest Labs' FLUX API.

    ``api_key`` defaults to ``BFL_API_KEY``. Without ``base_url`` the regions are the
    global, eu and us hosts; with it, "global" plus the regions in ``region_base_urls``
    (which replace a region's host: a proxy, a sandbox). ``fetcher`` downloads outputs.
    A Ready task's sample is downloaded up to ``download_attempts`` times, ``download_backoff_s``
    doubling between tries (within the call's time), before the call fails with the task's bill.
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
        download_attempts: int = 4,
        download_backoff_s: float = 0.5,
        prices: PriceTable | None = None,
    ) -> None:
        super().__init__(name=name, prices=prices)
        self._key = ApiKey(api_key, "BFL_API_KEY")
        base = base_url or os.environ.get("BFL_BASE_URL") or None
        overrides = {r: u.rstrip("/") for r, u in (region_base_urls or {}).items()}
        if base is None:
            unknown = set(overrides) - set(REGION_HOSTS)
            if unknown:
                raise ValueError(f"unknown BFL regions {sorted(unknown)}; use {', '.join(REGION_HOSTS)}")
            self._hosts = REGION_HOSTS | overrides
        else:
            self._hosts = {"global": base.rstrip("/")} | overrides
        if download_attempts < 1:
            raise ValueError("download_attempts must be at least 1")
        self._models = known_models("BFL", models, MODELS)
        self._regions = frozenset(self._hosts)
        self._fetcher = fetcher or SafeFetcher()
        self._poll_interval_s = poll_interval_s
        self._download_attempts = download_attempts
        self._download_backoff_s = download_backoff_s
        self._client: httpx.AsyncClient | None = None

    # --- what it can do ----------------------------------------------------------

    def models(self) -> Sequence[str]:
        return self._models

    def capabilities(self, model: str) -> Capabilities:
        return dataclasses.replace(_CAPS[model], regions=self._regions)

    def provider_option_names(self) -> frozenset[str]:
        return _OPTIONS

    def configuration_problem(self) -> str | None:
        return self._key.problem()

    def plan(self, request: ImageRequest, model: str) -> Plan:
        base = super().plan(request, model)
        warnings = [w for w in base.warnings if w != base.size.warning]
        geometry = _GEOMETRY[model]
        if geometry.takes == "image":
            size = self._fill_size(request, model)
        elif geometry.takes == "ratio":
            size = self._ratio_plan(request, model)
        else:
            size = self._sized_plan(request, model)
        options = request.provider_options.get(self.name, {})
        if "raw" in options and model != "flux-pro-1.1-ultra":
            warnings.append(f"provider_options.{self.name}.raw ignored: only flux-pro-1.1-ultra takes it")
        if request.idempotency_key is not None:
            warnings.append("idempotency_key not sent: the BFL API has no idempotency keys")
        option_fmt = options.get("output_format")
        if option_fmt is not None and option_fmt != request.output_format:
            warnings.append(
                f"output_format {request.output_format} replaced by provider_options "
                f"{self.name}.output_format {option_fmt}"
            )
        return Plan(size, tuple(([size.warning] if size.warning else []) + warnings))

    def _sized_plan(self, request: ImageRequest, model: str) -> SizePlan:
        """width/height models: the size asked for where the model's rule allows it, else the nearest it does."""
        geometry = _GEOMETRY[model]
        rules = geometry.rules
        if request.width is not None and request.height is not None:
            if rules.allows(request.width, request.height):
                return SizePlan(request.width, request.height)
            w, h = rules.nearest(request.width, request.height)
            return SizePlan(
                w, h, f"size {request.width}x{request.height} adapted to {w}x{h}: {model} takes {geometry.rule}", False
            )
        if request.aspect_ratio is not None:
            asked = parse_ratio(request.aspect_ratio)
            w, h = rules.for_ratio(asked)
            if abs(math.log((w / h) / asked)) > 0.02:
                return SizePlan(
                    w,
                    h,
                    f"aspect ratio {request.aspect_ratio} adapted to {w}x{h}: {model} takes {geometry.rule}",
                    False,
                )
            return SizePlan(w, h)
        src = request.init_image
        if model == "flux-2-pro" and src is not None and src.width and src.height:
            # an edit keeps the init image's shape by default
            w, h = rules.nearest(src.width, src.height)
            if (w, h) != (src.width, src.height):
                return SizePlan(
                    w,
                    h,
                    f"output {w}x{h}: the init image's {src.width}x{src.height} on {model}'s rule ({geometry.rule})",
                )
            return SizePlan(w, h)
        return SizePlan(*rules.native)

    def _fill_size(self, request: ImageRequest, model: str) -> SizePlan:
        src = request.init_image
        if src is None or not (src.width and src.height):
            return SizePlan(*_GEOMETRY[model].rules.native)
        asked = (request.width, request.height)
        if request.width is not None and asked != (src.width, src.height):
            return SizePlan(
                src.width,
                src.height,
                f"size {request.width}x{request.height} adapted to "
                f"{src.width}x{src.height}: {model} makes {_GEOMETRY[model].rule}",
                False,
            )
        if (
            request.aspect_ratio is not None
            and abs(math.log(parse_ratio(request.aspect_ratio) / (src.width / src.height))) > 0.02
        ):
            return SizePlan(
                src.width,
                src.height,
                f"aspect ratio {request.aspect_ratio} adapted to "
                f"{src.width}x{src.height}: {model} makes {_GEOMETRY[model].rule}",
                False,
            )
        return SizePlan(src.width, src.height)

    def _ratio_plan(self, request: ImageRequest, model: str) -> SizePlan:
        geometry = _GEOMETRY[model]
        ratio = _ratio_of(request)
        clamped = min(max(ratio, _RATIO_RANGE[0]), _RATIO_RANGE[1])
        w, h = ratio_size(clamped, geometry.area, geometry.multiple)
        if request.width is not None and (request.width, request.height) != (w, h):
            return SizePlan(
                w, h, f"size {request.width}x{request.height} adapted to {w}x{h}: {model} takes {geometry.rule}", False
            )
        if abs(math.log(clamped / ratio)) > 0.02:
            return SizePlan(w, h, f"aspect ratio {ratio:.2f} adapted to {w}x{h}: {model} takes {geometry.rule}", False)
        return SizePlan(w, h)

    # --- cost --------------------------------------------------------------------

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        row = self.price_row(model)
        size = self.plan(request, model).size
        inputs = self._input_sizes(request, model)
        per_image = self._credits(row, model, (size.width, size.height), inputs)
        worst = per_image
        if model == "flux-2-pro" and request.init_image is not None and None in inputs:
            # an input image not fetched yet: count it at the 4 MP BFL resizes inputs to, at worst
            worst = self._credits(row, model, (size.width, size.height), [(2048, 2048)])
        usd = row.rate("usd_per_credit")
        return Estimate(
            per_image * request.n * usd,
            float(row.rates.get("latency_s", 10.0)),
            "credits",
            per_image * request.n,
            max_cost_usd=worst * request.n * usd if worst != per_image else None,
        )

    @staticmethod
    def _input_sizes(request: ImageRequest, model: str) -> list[tuple[int, int] | None]:
        """The sizes of the images a FLUX.2 task is billed for as inputs (None: not known yet)."""
        src = request.init_image
        if model != "flux-2-pro" or src is None:
            return []
        return [(src.width, src.height) if src.width and src.height else None]

    @staticmethod
    def _credits(
        row: PriceRow, model: str, output: tuple[int, int], inputs: Sequence[tuple[int, int] | None]
    ) -> Decimal:
        """Credits for one task at the price table's rates."""
        if "credits_first_mp" not in row.rates:
            return row.rate("credits_per_image")
        # FLUX.2: first MP flat, each further output MP and each input MP at the per-MP rate, per started MP
        # (rule: github.com/black-forest-labs/skills skills/bfl-api/SKILL.md; rows: providers/prices/bfl.toml)
        credits = row.rate("credits_first_mp") + (started_megapixels(*output) - 1) * row.rate("credits_per_extra_mp")
        for size in inputs:
            credits += (started_megapixels(*size) if size else 1) * row.rate("credits_per_input_mp")
        return credits

    def _bill(
        self,
        model: str,
        task_id: str,
        submitted: Mapping[str, Any],
        output: tuple[int, int],
        inputs: Sequence[tuple[int, int] | None],
    ) -> tuple[Billing, str | None]:
        """A Ready task's bill: the ``cost`` BFL reported for it (AsyncResponse.cost, "Cost in credits for this
        request", https://api.bfl.ai/openapi.json), else the price table's; and a warning where they differ."""
        row = self.price_row(model)
        table = self._credits(row, model, output, inputs)
        reported = submitted.get("cost")
        by_vendor = isinstance(reported, int | float) and not isinstance(reported, bool) and reported >= 0
        credits = Decimal(str(reported)) if by_vendor else table
        credits = table if credits == table else credits
        warning = None
        if credits != table:
            warning = (
                f"BFL billed {_num(credits)} credits for task {task_id}; the price table "
                f"({self.prices.version}) expects {_num(table)}"
            )
        details: dict[str, Any] = {
            "credits": _num(credits),
            "tasks": [task_id],
            "billed_by": "vendor" if by_vendor else "price table",
        }
        for key in ("output_mp", "input_mp"):
            if isinstance(submitted.get(key), int | float):
                details[key] = submitted[key]
        return Billing(credits * row.rate("usd_per_credit"), "credits", credits, self.prices.version, details), warning

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
            self._client = httpx.AsyncClient(
                headers={"x-key": self._key.value(), "accept": "application/json"}, follow_redirects=False
            )
        return self._client

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        plan = self.plan(request, model)
        host = self._host(request)
        body, inputs = await self._body(request, model, plan)
        out = (plan.size.width, plan.size.height)
        ready: list[Billing] = []  # every task that reached Ready: billed by BFL whatever happens next
        warnings: list[str] = []
        # Stop a little before the router's own deadline, so a timeout after a Ready task still carries its bill.
        inner = max(timeout_s * 0.9, timeout_s - 0.25)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + inner

        async def one(i: int) -> tuple[str, GeneratedImage]:
            task_body = dict(body)
            if request.seed is not None:
                task_body["seed"] = seed_for(request.seed, i, 2**32)
            return await self._task(host, model, task_body, out, inputs, deadline, ready, warnings)

        try:
            async with asyncio.timeout(inner):
                fan = await fan_out(request.n, one)
        except TimeoutError:
            error = ProviderTimeout(f"no result within {inner:.1f}s", provider=self.name)
            raise charged(error, combine(ready) if ready else None) from None
        ids = [task_id for task_id, _ in fan.done]
        billing = combine(ready)
        return ProviderResponse(
            [img for _, img in fan.done], model, billing, ids[0], warnings=(*warnings, *fan.warnings(request.n))
        )

    async def _body(
        self, request: ImageRequest, model: str, plan: Plan
    ) -> tuple[dict[str, Any], list[tuple[int, int] | None]]:
        """The task's JSON body, and the sizes of the input images BFL bills (FLUX.2)."""
        options = request.provider_options.get(self.name, {})
        fmt = request.output_format if request.output_format in _FORMATS else "png"
        body: dict[str, Any] = {
            "prompt": request.prompt,
            "output_format": fmt,
            **{k: v for k, v in options.items() if k in _OPTIONS and (k != "raw" or model == "flux-pro-1.1-ultra")},
        }
        inputs: list[tuple[int, int] | None] = []
        if request.seed is not None:
            body["seed"] = request.seed
        takes = _GEOMETRY[model].takes
        if model == "flux-pro-1.0-fill":
            if request.init_image is None or request.mask_image is None:
                raise InvalidRequestError(f"{model} needs init_image and mask_image", provider=self.name)
            image = await load_bytes(request.init_image, fetcher=self._fetcher)
            mask = await amask_png(request.mask_image, image_size(image), mask_to_white_repaint, fetcher=self._fetcher)
            body |= {"image": await ab64(image), "mask": await ab64(mask)}
            if request.steps is not None:
                body["steps"] = request.steps
            if request.guidance_scale is not None:
                body["guidance"] = request.guidance_scale
        elif takes == "ratio":
            if request.init_image is not None:
                body["input_image"] = await ab64(await load_bytes(request.init_image, fetcher=self._fetcher))
            if request.width is not None or request.aspect_ratio is not None or request.init_image is None:
                body["aspect_ratio"] = _ratio_sent(request, plan)
        else:
            if request.init_image is not None:  # flux-2-pro edits
                data = await load_bytes(request.init_image, fetcher=self._fetcher)
                body["input_image"] = await ab64(data)
                inputs.append(image_size(data))
            body |= {"width": plan.size.width, "height": plan.size.height}
        return body, inputs

    async def _task(
        self,
        host: str,
        model: str,
        body: dict[str, Any],
        out: tuple[int, int],
        inputs: list[tuple[int, int] | None],
        deadline: float,
        ready: list[Billing],
        warnings: list[str],
    ) -> tuple[str, GeneratedImage]:
        client = self._http()
        submitted = await self._json(client.post(f"{host}/v1/{model}", json=body), None)
        task_id, polling_url = submitted.get("id"), submitted.get("polling_url")
        if not isinstance(task_id, str) or not isinstance(polling_url, str):
            raise MalformedResponse("submission answered without id and polling_url", provider=self.name)
        if not _same_service(polling_url, host):
            raise MalformedResponse(
                "polling_url points outside the API's hosts; not sent the key", provider=self.name, request_id=task_id
            )
        polled = await self._until_ready(client, polling_url, task_id, StatusReporter(self.name, model, time.monotonic))
        # Ready: BFL has billed the task ("Only successful generations (status: Ready) consume credits",
        # https://help.bfl.ai/articles/4212278032-my-prompt-is-getting-moderated). From here on every failure
        # carries this bill, and nothing re-submits the task.
        billing, warning = self._bill(model, task_id, submitted, out, inputs)
        ready.append(billing)
        if warning:
            warnings.append(warning)
        try:
            result = polled.get("result")
            sample = result.get("sample") if isinstance(result, dict) else None
            if not isinstance(sample, str):
                raise MalformedResponse("Ready task without result.sample", provider=self.name, request_id=task_id)
            data = await self._download(client, polling_url, task_id, sample, deadline)
            # the one check every output passes: the caps user images have, decoded whole, off the loop
            mime, w, h = await output_image(data, provider=self.name, request_id=task_id)
        except ImageRouterError as exc:
            raise charged(exc, billing) from None
        seed = result.get("seed") if isinstance(result, dict) else None
        image = GeneratedImage(
            data=data,
            mime=mime,
            width=w,
            height=h,
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        )
        return task_id, image

    async def _until_ready(self, client: httpx.AsyncClient, polling_url: str, task_id: str,
                           report: StatusReporter) -> dict[str, Any]:
        """Poll until the task is Ready. A transient poll failure is polled again (the task runs on: resubmitting
        could pay twice); Error, moderation and a lost task end it, unbilled (help.bfl.ai article above)."""
        misses = 0
        report("queued", "submitted", task_id)
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                polled = await self._json(client.get(polling_url), task_id)
            except _TRANSIENT:
                misses += 1
                if misses >= 3:
                    raise
                continue
            misses = 0
            status = polled.get("status")
            # "Pending" covers both waiting and running: BFL does not tell them apart
            report(_PROGRESS.get(str(status), "failed"), str(status)[:40], task_id)
            if status == "Ready":
                return polled
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

    async def _download(
        self, client: httpx.AsyncClient, polling_url: str, task_id: str, sample: str, deadline: float
    ) -> bytes:
        """The sample's bytes (the task is billed): downloaded again after a failure, with a fresh sample URL
        from the polling URL when it gives one; the task is never re-run."""
        return await download_paid(
            self._fetcher,
            sample,
            provider=self.name,
            request_id=task_id,
            deadline=deadline,
            attempts=self._download_attempts,
            backoff_s=self._download_backoff_s,
            fresh_url=lambda: self._fresh_sample(client, polling_url, task_id),
        )

    async def _fresh_sample(self, client: httpx.AsyncClient, polling_url: str, task_id: str) -> str | None:
        """The sample URL a new poll of a Ready task gives, or None."""
        try:
            polled = await self._json(client.get(polling_url), task_id)
        except ImageRouterError:
            return None
        result = polled.get("result")
        sample = result.get("sample") if polled.get("status") == "Ready" and isinstance(result, dict) else None
        return sample if isinstance(sample, str) else None

    async def _json(self, call: Any, task_id: str | None) -> dict[str, Any]:
        try:
            response: httpx.Response = await call
        except httpx.HTTPError as exc:
            raise connection_error(exc, provider=self.name, request_id=task_id) from None
        if response.status_code != 200:
            text, code = _detail(response)
            raise status_error(
                response.status_code, text, provider=self.name, code=code, request_id=task_id, headers=response.headers
            )
        try:
            payload = response.json()
        except ValueError:
            raise MalformedResponse(
                "response body is not JSON", provider=self.name, status_code=200, request_id=task_id
            ) from None
        if not isinstance(payload, dict):
            raise MalformedResponse("response body is not a JSON object", provider=self.name, request_id=task_id)
        return payload

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _num(value: Decimal) -> str:
    """A Decimal as plain digits without trailing zeros: 8.0 → "8", 4.50 → "4.5"."""
    return format(value.normalize(), "f")


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
    if not _RATIO_RANGE[0] <= w / h <= _RATIO_RANGE[1]:
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


def _detail(response: httpx.Response) -> tuple[str, str | None]:
    """BFL's error detail (FastAPI's ``{"detail": "…"}`` or the 422 list of ``{loc, msg, type}``) as
    ``HTTP status: loc: msg; …`` and the first validation error's type. Never a secret."""
    detail, code = "", None
    try:
        body = response.json()
    except ValueError:
        body = None
    raw = body.get("detail") if isinstance(body, dict) else None
    if isinstance(raw, list):
        items = [e for e in raw if isinstance(e, dict)]
        detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg', '')}" for e in items)
        code = str(items[0].get("type")) if items and items[0].get("type") is not None else None
    elif raw is not None:
        detail = str(raw)
    return f"HTTP {response.status_code}" + (f": {redact(detail)[:300]}" if detail else ""), code
