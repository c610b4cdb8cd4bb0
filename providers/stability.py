"""Stability AI's REST v2beta API over httpx (not the legacy gRPC ``stability-sdk``).

Every call is ``multipart/form-data`` with ``accept: image/*``: the answer is the raw
image with ``finish-reason`` and ``seed`` headers. One image per call, so ``n > 1``
fans out in parallel. Sizes snap to the documented aspect ratios (~1 MP each).
With a seed, image ``i`` of ``n`` is made with ``seed + i`` (identical seeds would
make identical images). ``finish-reason: CONTENT_FILTERED`` is not an error: the (blurred) image comes back
flagged ``nsfw=True``. Costs are credits from the price table ($0.01 each) per image.
Creative upscales are async: POST answers ``{id}``; ``GET /v2beta/results/{id}``
answers 202 while running and the image when done.

Stability's answers carry no billing (no credits used, no balance): the bill is the price
table's credits per image, counted for every 200 image answer, readable or not. An image
the adapter cannot read is a MalformedResponse carrying that image's bill; when some calls
of a fan-out fail, the others' images come back with a warning and their bill.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from providers.base import Billing, Capabilities, Estimate, Plan, Provider, ProviderResponse
from providers.vendor import (
    ApiKey,
    billed_by,
    charged,
    combine,
    connection_error,
    fan_out,
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
    ProviderUnavailable,
    redact,
)
from router.geometry import SizePlan, SizeRules
from router.images import (
    ImageDecodeError,
    ab64decode,
    amask_png,
    image_size,
    load_bytes,
    mask_to_white_repaint,
)
from router.prices import PriceTable
from router.progress import StatusReporter
from router.request import ImageRequest
from router.result import GeneratedImage

if TYPE_CHECKING:
    import httpx

    from router.fetch import SafeFetcher

DEFAULT_BASE_URL = "https://api.stability.ai"
MAX_SEED = 4_294_967_294

# The documented aspect ratios and the ~1 MP shapes Stability makes for them.
RATIOS: dict[tuple[int, int], str] = {
    (1024, 1024): "1:1",
    (1344, 768): "16:9",
    (768, 1344): "9:16",
    (1536, 640): "21:9",
    (640, 1536): "9:21",
    (832, 1216): "2:3",
    (1216, 832): "3:2",
    (896, 1088): "4:5",
    (1088, 896): "5:4",
}
SIZES = SizeRules(fixed=tuple(RATIOS), native=(1024, 1024), max_side=1536)

SD3_MODELS = ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash")
GENERATE_MODELS = ("stable-image-ultra", "stable-image-core", *SD3_MODELS)
INPAINT_MODEL = "stable-image-inpaint"
CONTROL_MODEL = "stable-image-control"
UPSCALE_MODELS = ("stable-image-upscale-fast", "stable-image-upscale-conservative", "stable-image-upscale-creative")
MODELS = (*GENERATE_MODELS, INPAINT_MODEL, CONTROL_MODEL, *UPSCALE_MODELS)

# Edits, controls and upscales keep the input's shape: any size within the API's limits.
_FREE = SizeRules(multiple=1, min_side=64, max_side=16384, min_pixels=4096, max_pixels=16384**2, max_ratio=2.5)
_QUALITY = {
    "stable-image-ultra": 0.9,
    "sd3.5-large": 0.85,
    "stable-image-core": 0.75,
    "sd3.5-large-turbo": 0.75,
    "sd3.5-medium": 0.7,
    "sd3.5-flash": 0.6,
}
_ALL_FORMATS = frozenset({"png", "jpeg", "webp"})
_OPTIONS = frozenset({"style_preset", "grow_mask", "creativity"})
_OPTION_MODELS = {
    "style_preset": frozenset(MODELS) - {UPSCALE_MODELS[0]},
    "grow_mask": frozenset({INPAINT_MODEL}),
    "creativity": frozenset(UPSCALE_MODELS[1:]),
}
# Control kinds: line drawings go to /control/sketch, the rest to /control/structure. Stability has no
# ControlNet per kind: sketch "translates hand-drawn sketches" and structure keeps "the structure of a
# reference image" (it reads the layout from the image itself). Only a scribble or a line drawing is what
# its endpoint means; every other kind is an approximation, and plan() says so.
_SKETCH = frozenset({"scribble", "lineart", "lineart_anime", "softedge"})
_STRUCTURE = frozenset({"canny", "depth", "mlsd", "seg", "normal"})
_NATIVE = frozenset({"scribble", "lineart"})
_ENDPOINT_MEANS = {
    "sketch": "reads the image as a hand-drawn sketch",
    "structure": "keeps the layout of the image it is given as a reference",
}


def _control_endpoint(kind: str) -> tuple[str, str | None]:
    """The control endpoint a ControlNet kind goes to, and the warning when that only approximates it."""
    endpoint = "sketch" if kind in _SKETCH else "structure"
    if kind in _NATIVE:
        return endpoint, None
    return endpoint, (
        f"control {kind} approximated by Stability's {endpoint} control, which "
        f"{_ENDPOINT_MEANS[endpoint]}; it is not a {kind} ControlNet"
    )


def _caps(model: str) -> Capabilities:
    if model in SD3_MODELS:
        return Capabilities(
            tasks=frozenset({"txt2img", "img2img"}),
            sizes=SIZES,
            max_n=10,
            negative_prompt=True,
            seed=True,
            guidance=True,
            strength=True,
            quality=_QUALITY[model],
            output_formats=frozenset({"png", "jpeg"}),
        )
    if model in GENERATE_MODELS:
        ultra = model == "stable-image-ultra"
        return Capabilities(
            tasks=frozenset({"txt2img", "img2img"} if ultra else {"txt2img"}),
            sizes=SIZES,
            max_n=10,
            negative_prompt=True,
            seed=True,
            strength=ultra,
            quality=_QUALITY[model],
            output_formats=_ALL_FORMATS,
        )
    if model == INPAINT_MODEL:
        return Capabilities(
            tasks=frozenset({"inpaint"}),
            sizes=_FREE,
            max_n=10,
            negative_prompt=True,
            seed=True,
            quality=0.8,
            output_formats=_ALL_FORMATS,
        )
    if model == CONTROL_MODEL:
        return Capabilities(
            tasks=frozenset({"control"}),
            sizes=_FREE,
            control_kinds=_SKETCH | _STRUCTURE,
            max_controls=1,
            max_n=10,
            negative_prompt=True,
            seed=True,
            quality=0.75,
            output_formats=_ALL_FORMATS,
        )
    if model in UPSCALE_MODELS:
        creative = model.endswith("creative")
        return Capabilities(
            tasks=frozenset({"upscale"}),
            sizes=_FREE,
            negative_prompt=model != UPSCALE_MODELS[0],
            seed=model != UPSCALE_MODELS[0],
            quality=0.85 if creative else 0.7,
            output_formats=_ALL_FORMATS,
        )
    raise InvalidRequestError(
        f"unknown Stability model {model!r}; use one of {', '.join(MODELS)}", provider="stability"
    )


class StabilityProvider(Provider):
    """Stability AI's v2beta REST API.

    ``api_key`` defaults to ``STABILITY_API_KEY``; ``base_url`` to the public host.
    ``fetcher`` downloads URL inputs; ``poll_interval_s`` paces async result polls.
    """

    kind = "stability"

    def __init__(
        self,
        *,
        name: str | None = None,
        api_key: str | SecretStr | None = None,
        base_url: str | None = None,
        models: Sequence[str] = MODELS,
        prices: PriceTable | None = None,
        fetcher: SafeFetcher | None = None,
        poll_interval_s: float = 2.0,
    ) -> None:
        super().__init__(name=name, prices=prices)
        self._key = ApiKey(api_key, "STABILITY_API_KEY")
        self._base_url = (base_url or os.environ.get("STABILITY_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self._models = known_models("Stability", models, MODELS)
        self._fetcher = fetcher
        self._poll_interval_s = poll_interval_s
        self._http: httpx.AsyncClient | None = None

    # --- what it can do ----------------------------------------------------------

    def models(self) -> Sequence[str]:
        return self._models

    def capabilities(self, model: str) -> Capabilities:
        return _caps(model)

    def provider_option_names(self) -> frozenset[str]:
        return _OPTIONS

    def configuration_problem(self) -> str | None:
        return self._key.problem()

    def plan(self, request: ImageRequest, model: str) -> Plan:
        base = super().plan(request, model)
        warnings = list(base.warnings)
        size = base.size
        if model not in GENERATE_MODELS or request.init_image is not None:
            size, note = self._input_shape(request, model)
            warnings = [w for w in warnings if not w.startswith(("size ", "aspect ratio "))] + note
        if request.seed is not None and request.seed > MAX_SEED:
            sent = request.seed % (MAX_SEED + 1)
            warnings.append(f"seed {request.seed} above Stability's {MAX_SEED}; sent as {sent}")
        if request.guidance_scale is not None and not 1.0 <= request.guidance_scale <= 10.0:
            warnings.append(f"guidance_scale {request.guidance_scale} clamped to Stability's cfg_scale range 1..10")
        if request.controls and model == CONTROL_MODEL:
            control = request.controls[0]
            _, approximation = _control_endpoint(control.kind)
            if approximation:
                warnings.append(approximation)
            if control.scale > 1.0:
                warnings.append(f"control scale {control.scale} clamped to Stability's control_strength maximum 1")
            if control.start != 0.0 or control.end != 1.0:
                warnings.append("control start/end ignored: Stability applies control over every step")
        for option in request.provider_options.get(self.name, {}):
            if option in _OPTIONS and model not in _OPTION_MODELS[option]:
                warnings.append(f"provider_options.{self.name}.{option} ignored: {model} does not take it")
        if request.upscale is not None and model == UPSCALE_MODELS[0] and request.prompt.strip():
            warnings.append("prompt ignored: the fast upscaler takes none")
        return Plan(size, tuple(warnings))

    def _input_shape(self, request: ImageRequest, model: str) -> tuple[SizePlan, list[str]]:
        """Edits, controls and upscales keep the input's shape (fast upscale: 4x; others: ~4 MP)."""
        src = request.controls[0].image if request.controls and request.init_image is None else request.init_image
        if src is None or not (src.width and src.height):
            return SizePlan(1024, 1024, None), []
        w, h = src.width, src.height
        if model in UPSCALE_MODELS:
            w, h = _upscaled(model, w, h)
        asked = None
        if request.upscale is not None and model in UPSCALE_MODELS:
            factor = w / src.width
            if abs(factor - request.upscale) > 0.05:
                asked = f"upscale x{request.upscale} adapted to x{factor:.2f} ({w}x{h}): what {model} makes"
        elif request.width is not None and (request.width, request.height) != (w, h):
            asked = f"size {request.width}x{request.height} adapted to {w}x{h}: {model} keeps the input's shape"
        elif request.aspect_ratio is not None:
            asked = f"aspect ratio {request.aspect_ratio} ignored: {model} keeps the input's shape ({w}x{h})"
        return SizePlan(w, h, asked, asked is None), [asked] if asked else []

    # --- cost --------------------------------------------------------------------

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        row = self.price_row(model)
        n = 1 if model in UPSCALE_MODELS else request.n
        credits = row.rate("credits") * n
        return Estimate(
            credits * row.rate("usd_per_credit"), float(row.rates.get("latency_s", 8.0)), "credits", credits
        )

    def _billing(self, model: str, images: int) -> Billing:
        row = self.price_row(model)
        credits = row.rate("credits") * images
        return Billing(
            cost_usd=credits * row.rate("usd_per_credit"),
            unit="credits",
            quantity=credits,
            price_table_version=self.prices.version,
            details={"credits_per_image": str(row.rate("credits")), "images": images},
        )

    # --- the call ----------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(
                base_url=self._base_url, headers={"authorization": f"Bearer {self._key.value()}"}
            )
        return self._http

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        if model not in MODELS:
            raise InvalidRequestError(f"unknown Stability model {model!r}", provider=self.name)
        plan = self.plan(request, model)
        path, fields, files = await self._form(request, model, plan)
        bill = self._billing(model, 1)  # what one 200 image answer costs, read or not
        if model in UPSCALE_MODELS:
            images = [await self._call(path, fields, files, timeout_s, bill, poll=model == UPSCALE_MODELS[2])]
        else:

            def call_for(i: int) -> Any:
                own = dict(fields)
                if request.seed is not None:
                    own["seed"] = str((request.seed + i) % (MAX_SEED + 1))
                return self._call(path, own, files, timeout_s, bill, poll=False)

            fan = await fan_out(request.n, call_for)
            billing = combine([self._billing(model, len(fan.done)), *billed_by(fan.errors)])
            return ProviderResponse(fan.done, model, billing, warnings=(*plan.warnings, *fan.warnings(request.n)))
        return ProviderResponse(images, model, self._billing(model, len(images)), warnings=plan.warnings)

    async def _form(
        self, request: ImageRequest, model: str, plan: Plan
    ) -> tuple[str, dict[str, str], dict[str, tuple[str, bytes, str]]]:
        """The endpoint, the text fields and the file parts for ``request`` on ``model``."""
        options = request.provider_options.get(self.name, {})
        fmt = request.output_format if request.output_format in self.capabilities(model).output_formats else "png"
        fields: dict[str, str] = {"output_format": fmt}
        if model != UPSCALE_MODELS[0]:
            fields["prompt"] = request.prompt
            if request.negative_prompt:
                fields["negative_prompt"] = request.negative_prompt
            if request.seed is not None:
                fields["seed"] = str(request.seed % (MAX_SEED + 1))
            if "style_preset" in options:
                fields["style_preset"] = str(options["style_preset"])
        files: dict[str, tuple[str, bytes, str]] = {}
        if model in GENERATE_MODELS:
            if model in SD3_MODELS:
                fields["model"] = model
                path = "/v2beta/stable-image/generate/sd3"
                if request.guidance_scale is not None:
                    fields["cfg_scale"] = f"{min(10.0, max(1.0, request.guidance_scale)):g}"
            else:
                path = f"/v2beta/stable-image/generate/{model.removeprefix('stable-image-')}"
            if request.init_image is not None:
                if model in SD3_MODELS:
                    fields["mode"] = "image-to-image"
                fields["strength"] = f"{request.strength if request.strength is not None else 0.6:g}"
                files["image"] = await self._image_part(request)
            else:
                fields["aspect_ratio"] = RATIOS[(plan.size.width, plan.size.height)]
            return path, fields, files
        if model == INPAINT_MODEL:
            files["image"] = await self._image_part(request)
            assert request.mask_image is not None
            mask = await amask_png(
                request.mask_image, image_size(files["image"][1]), mask_to_white_repaint, fetcher=self._fetcher
            )
            files["mask"] = ("mask.png", mask, "image/png")
            if "grow_mask" in options:
                fields["grow_mask"] = str(int(options["grow_mask"]))
            return "/v2beta/stable-image/edit/inpaint", fields, files
        if model == CONTROL_MODEL:
            control = request.controls[0]
            data = await load_bytes(control.image, fetcher=self._fetcher)
            files["image"] = ("control.png", data, control.image.mime or "image/png")
            fields["control_strength"] = f"{min(1.0, control.scale):g}"
            endpoint, _ = _control_endpoint(control.kind)
            return f"/v2beta/stable-image/control/{endpoint}", fields, files
        files["image"] = await self._image_part(request)
        if model != UPSCALE_MODELS[0] and "creativity" in options:
            fields["creativity"] = f"{float(options['creativity']):g}"
        if model != UPSCALE_MODELS[0] and not request.prompt.strip():
            raise InvalidRequestError(f"{model} needs a prompt describing the image", provider=self.name)
        return f"/v2beta/stable-image/upscale/{model.removeprefix('stable-image-upscale-')}", fields, files

    async def _image_part(self, request: ImageRequest) -> tuple[str, bytes, str]:
        assert request.init_image is not None
        data = await load_bytes(request.init_image, fetcher=self._fetcher)
        return "image.png", data, request.init_image.mime or "image/png"

    async def _call(
        self,
        path: str,
        fields: dict[str, str],
        files: dict[str, tuple[str, bytes, str]],
        timeout_s: float,
        bill: Billing,
        *,
        poll: bool,
    ) -> GeneratedImage:
        """One image from one call; a 200 image answer that cannot be read raises carrying ``bill``."""
        import httpx

        parts: dict[str, Any] = {k: (None, v) for k, v in fields.items()} | files
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            response = await self._client().post(path, files=parts, headers={"accept": "image/*"}, timeout=timeout_s)
            if poll:
                job = self._json(_checked(response, self.name))
                job_id = job.get("id")
                if not isinstance(job_id, str) or not job_id:
                    raise MalformedResponse("async job answer has no id", provider=self.name)
                report = StatusReporter(self.name, UPSCALE_MODELS[2], loop.time)  # the one model that polls
                report("queued", "submitted", job_id)
                while True:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise ProviderTimeout(f"job {job_id} unfinished within {timeout_s:.1f}s", provider=self.name)
                    response = await self._client().get(
                        f"/v2beta/results/{job_id}", headers={"accept": "image/*"}, timeout=left
                    )
                    if response.status_code == 404:
                        raise ProviderUnavailable(
                            f"job {job_id}: result expired or unknown (HTTP 404)", provider=self.name, status_code=404
                        )
                    if response.status_code != 202:
                        report("succeeded" if response.status_code == 200 else "failed",
                               f"HTTP {response.status_code}", job_id)
                        break
                    report("pending", "HTTP 202 (in progress)", job_id)
                    await asyncio.sleep(min(self._poll_interval_s, max(0.0, deadline - loop.time())))
        except ImageRouterError:
            raise
        except httpx.HTTPError as exc:
            raise connection_error(exc, provider=self.name) from None
        answer = _checked(response, self.name)
        try:
            return await self._image(answer)
        except MalformedResponse as exc:  # a 200 image answer: Stability billed it, readable or not
            raise charged(exc, bill) from None

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise MalformedResponse(
                "response body is not a JSON object", provider=self.name, status_code=response.status_code
            )
        return body

    async def _image(self, response: httpx.Response) -> GeneratedImage:
        data = response.content
        try:
            if response.headers.get("content-type", "").startswith("application/json"):
                body = self._json(response)
                data = await ab64decode(body["image"], what="image")
                reason, seed = body.get("finish_reason"), body.get("seed")
            else:
                reason, seed = response.headers.get("finish-reason"), response.headers.get("seed")
        except (KeyError, TypeError, ValueError, ImageDecodeError) as exc:
            raise MalformedResponse(
                f"response image unreadable ({type(exc).__name__})",
                provider=self.name,
                status_code=response.status_code,
            ) from None
        # the one check every output passes: the caps user images have, decoded whole, off the loop
        mime, width, height = await output_image(data, provider=self.name, status_code=response.status_code)
        if reason not in ("SUCCESS", "CONTENT_FILTERED"):
            raise MalformedResponse(f"unknown finish-reason {reason!r}", provider=self.name)
        return GeneratedImage(
            data=data,
            mime=mime,
            width=width,
            height=height,
            seed=int(seed) if seed is not None and str(seed).isdigit() else None,
            nsfw=reason == "CONTENT_FILTERED",
        )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None


def _upscaled(model: str, w: int, h: int) -> tuple[int, int]:
    """Fast upscales 4x; conservative and creative make about 4 MP at the input's ratio."""
    if model == UPSCALE_MODELS[0]:
        return w * 4, h * 4
    scale = (4 * 1024 * 1024 / (w * h)) ** 0.5
    return max(1, round(w * scale)), max(1, round(h * scale))


def _checked(response: httpx.Response, provider: str) -> httpx.Response:
    """``response`` when it succeeded (200, or 202 for a job still running); else the mapped error."""
    status = response.status_code
    if status in (200, 202):
        return response
    try:
        body = response.json()
    except ValueError:
        body = None
    name = body.get("name") if isinstance(body, dict) else None
    errors = body.get("errors") if isinstance(body, dict) else None
    detail = "; ".join(str(e) for e in errors) if isinstance(errors, list) else ""
    code = str(name) if isinstance(name, str) else None
    request_id = body.get("id") if isinstance(body, dict) and isinstance(body.get("id"), str) else None
    text = redact(f"HTTP {status}" + (f" {code}" if code else "") + (f": {detail}" if detail else ""))
    if code == "content_moderation":  # Stability's refusal is a 403 (PROVIDERS.md): not a key problem
        raise ContentPolicyError(text, provider=provider, status_code=status, code=code, request_id=request_id)
    raise status_error(status, text, provider=provider, code=code, request_id=request_id, headers=response.headers)
