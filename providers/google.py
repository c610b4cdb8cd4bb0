"""Google's image models through the official ``google-genai`` SDK: Imagen on Vertex AI, Gemini image models on
the Gemini API (an API key) or Vertex AI (a project and its locations).

- Imagen (``generate_images``; ``edit_image`` on ``imagen-3.0-capability-001`` for inpainting with a white = edit
  mask): aspect ratios 1:1 3:4 4:3 9:16 16:9, ``n`` 1..4 per call, and the operator's ``person_generation`` and
  ``safety_filter_level``. The SDK serves Imagen only in Vertex AI mode ("This method is only supported in … Agent
  Platform mode, not in Gemini Developer API mode", google-genai ``models.py``), so an API-key provider offers the
  Gemini image models only. Imagen 4 takes no negative prompt; a seed only where the watermark is off
  (https://cloud.google.com/vertex-ai/generative-ai/docs/model-reference/imagen-api: "seed … not available when
  addWatermark is set to true"), which only the operator may choose (``add_watermark=False``).
- Gemini image models (``generate_content`` with ``response_modalities=["TEXT", "IMAGE"]``): a prompt plus reference
  images → one image per call (``n`` fans out), ``image_config.aspect_ratio`` from the model's list.

Regions are Vertex AI locations mapped to residency codes (:func:`residency_of`: ``europe-west4`` → eu,
``us-central1`` → us; the ``global`` endpoint and the Gemini API are ``global``, never EU). Content filters
(Imagen's ``rai_filtered_reason``, Gemini's ``prompt_feedback.block_reason`` or a SAFETY finish) raise
ContentPolicyError. Every image carries Google's SynthID watermark (Imagen unless ``add_watermark=False``), noted in
the image's provenance and the bill's details. The SDK runs with retries off (``HttpRetryOptions(attempts=1)``,
which also turns off its implicit connection-error retry): the router owns retries.

Cost: Imagen per returned image (the price table); Gemini from the answer's ``usage_metadata`` tokens at the
table's per-million rates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from providers.base import Billing, Capabilities, Estimate, Plan, Provider, ProviderResponse
from providers.openai import sdk_missing
from providers.vendor import (
    ApiKey,
    charged,
    combine,
    connection_error,
    fan_out,
    known_models,
    output_image,
    status_error,
)
from router.errors import (
    AuthenticationError,
    ContentPolicyError,
    ImageRouterError,
    InsufficientCredits,
    InvalidRequestError,
    MalformedResponse,
    ProviderTimeout,
    RateLimited,
    redact,
)
from router.geometry import SizePlan, SizeRules
from router.images import amask_png, image_size, load_bytes, mask_to_white_repaint
from router.prices import PriceTable
from router.request import ImageRequest
from router.result import GeneratedImage

if TYPE_CHECKING:
    from google import genai

    from router.fetch import SafeFetcher

IMAGEN = ("imagen-4.0-generate-001", "imagen-4.0-fast-generate-001", "imagen-4.0-ultra-generate-001")
IMAGEN_EDIT = ("imagen-3.0-capability-001",)
GEMINI = ("gemini-2.5-flash-image",)
MODELS = (*GEMINI, *IMAGEN, *IMAGEN_EDIT)
# Imagen's 1K shapes per aspect ratio (https://cloud.google.com/vertex-ai/generative-ai/docs/image/generate-images,
# "Supported aspect ratios and resolutions").
IMAGEN_SHAPES = {"1:1": (1024, 1024), "3:4": (896, 1280), "4:3": (1280, 896), "9:16": (768, 1408),
                 "16:9": (1408, 768)}
# Gemini 2.5 Flash Image's shapes (https://ai.google.dev/gemini-api/docs/image-generation, "aspect ratios" table:
# 1290 tokens each).
GEMINI_SHAPES = {"1:1": (1024, 1024), "2:3": (832, 1248), "3:2": (1248, 832), "3:4": (864, 1184),
                 "4:3": (1184, 864), "4:5": (896, 1152), "5:4": (1152, 896), "9:16": (768, 1344),
                 "16:9": (1344, 768), "21:9": (1536, 672)}
# Vertex AI locations → residency codes (https://cloud.google.com/vertex-ai/generative-ai/docs/learn/locations);
# "eu" and "us" are the multi-regional endpoints (aiplatform.{eu,us}.rep.googleapis.com, google-genai
# _MULTI_REGIONAL_LOCATIONS). Europe's locations all lie in the EU/EEA except those listed as others.
_EXACT_REGIONS = {"global": "global", "eu": "eu", "us": "us", "europe-west2": "uk", "europe-west6": "ch",
                  "asia-northeast1": "jp", "asia-south1": "in", "australia-southeast1": "au",
                  "me-central2": "sa", "northamerica-northeast1": "ca"}
_OPERATOR_OPTIONS = ("person_generation", "safety_filter_level", "add_watermark")
_OPTIONS = frozenset({"enhance_prompt", "language", "output_compression_quality", "mask_dilation", "edit_mode"})
_SAFETY_FINISH = frozenset({"SAFETY", "IMAGE_SAFETY", "PROHIBITED_CONTENT", "IMAGE_PROHIBITED_CONTENT", "BLOCKLIST",
                            "SPII", "RECITATION", "IMAGE_RECITATION"})
_MIME = {"png": "image/png", "jpeg": "image/jpeg"}
SYNTHID = "SynthID"


def residency_of(location: str) -> str:
    """The residency code of a Vertex AI location: ``europe-west4`` → ``eu``, ``us-central1`` → ``us``,
    ``global`` → ``global`` (never EU); an unlisted location is its own code."""
    if location in _EXACT_REGIONS:
        return _EXACT_REGIONS[location]
    if location.startswith("europe-"):
        return "eu"
    if location.startswith("us-"):
        return "us"
    return location


def _caps(model: str, quality: float, seed: bool) -> Capabilities:
    if model in GEMINI:
        return Capabilities(tasks=frozenset({"txt2img", "img2img"}), max_n=4, quality=quality,
                            sizes=SizeRules(fixed=tuple(GEMINI_SHAPES.values())), output_formats=frozenset({"png"}))
    if model in IMAGEN_EDIT:
        return Capabilities(tasks=frozenset({"inpaint"}), max_n=4, quality=quality, negative_prompt=True, seed=seed,
                            sizes=SizeRules(multiple=1, min_side=64, max_side=4096, max_pixels=4096**2,
                                            max_ratio=16.0), output_formats=frozenset(_MIME))
    return Capabilities(tasks=frozenset({"txt2img"}), max_n=1 if "ultra" in model else 4, quality=quality, seed=seed,
                        sizes=SizeRules(fixed=tuple(IMAGEN_SHAPES.values())), output_formats=frozenset(_MIME))


_QUALITY = {"gemini-2.5-flash-image": 0.85, "imagen-4.0-generate-001": 0.88, "imagen-4.0-fast-generate-001": 0.8,
            "imagen-4.0-ultra-generate-001": 0.9, "imagen-3.0-capability-001": 0.8}


class GoogleProvider(Provider):
    """Google's Imagen and Gemini image models.

    Gemini API: ``api_key`` (default ``GEMINI_API_KEY`` / ``GOOGLE_API_KEY``); the region is ``global``.
    Vertex AI: ``project`` and ``locations`` (one client per location; each location's residency code is a region,
    :func:`residency_of`), authenticated by ``credentials`` (google-auth; default: Application Default
    Credentials, as the SDK finds them). ``base_url`` replaces Google's hosts (a proxy, a sandbox).
    ``person_generation``, ``safety_filter_level`` and ``add_watermark`` are the operator's, never a request's.
    """

    kind = "google"

    def __init__(
        self,
        *,
        name: str | None = None,
        api_key: str | SecretStr | None = None,
        project: str | None = None,
        locations: Sequence[str] = (),
        credentials: Any = None,
        base_url: str | None = None,
        models: Sequence[str] | None = None,
        person_generation: str | None = None,
        safety_filter_level: str | None = None,
        add_watermark: bool = True,
        prices: PriceTable | None = None,
        fetcher: SafeFetcher | None = None,
    ) -> None:
        super().__init__(name=name, prices=prices)
        self.vertex = project is not None
        if self.vertex and not locations:
            raise ValueError("Vertex AI needs at least one location (e.g. europe-west4)")
        if not self.vertex and locations:
            raise ValueError("locations apply to Vertex AI: give project too")
        if add_watermark is False and not self.vertex:
            raise ValueError("add_watermark=False is a Vertex AI (Imagen) setting")
        self._project, self._locations = project, tuple(locations)
        self._credentials = credentials
        self._key = ApiKey(api_key, "GEMINI_API_KEY") if not self.vertex else None
        if self._key is not None and self._key.secret is None:
            self._key = ApiKey(api_key, "GOOGLE_API_KEY")
        self._base_url = base_url
        offered = MODELS if self.vertex else GEMINI
        self._models = known_models("Google", models if models is not None else offered, offered)
        self._operator = {"person_generation": person_generation, "safety_filter_level": safety_filter_level,
                          "add_watermark": add_watermark}
        self._region_location: dict[str, str] = {} if self.vertex else {"global": ""}
        for location in self._locations:  # the first location given serves its region
            self._region_location.setdefault(residency_of(location), location)
        self._fetcher = fetcher
        self._clients: dict[str, genai.Client] = {}

    # --- what it can do ----------------------------------------------------------

    def models(self) -> Sequence[str]:
        return self._models

    def capabilities(self, model: str) -> Capabilities:
        seed = self.vertex and not self._operator["add_watermark"]
        return dataclasses.replace(_caps(model, _QUALITY[model], seed), regions=frozenset(self._region_location))

    def provider_option_names(self) -> frozenset[str]:
        return _OPTIONS | frozenset(_OPERATOR_OPTIONS)

    def configuration_problem(self) -> str | None:
        missing = sdk_missing("google.genai")
        if missing:
            return "the google-genai SDK is not installed: pip install 'pixroute[google]'"
        if self._key is not None and self._key.problem():
            return ("not configured: set GEMINI_API_KEY (or GOOGLE_API_KEY), or give GoogleProvider project= and "
                    "locations= for Vertex AI")
        return None

    def plan(self, request: ImageRequest, model: str) -> Plan:
        base = super().plan(request, model)
        warnings = list(base.warnings)
        size = base.size
        options = request.provider_options.get(self.name, {})
        for option in _OPERATOR_OPTIONS:
            if option in options:
                warnings.append(f"provider_options.{self.name}.{option} ignored: it is the operator's setting "
                                f"(GoogleProvider({option}=…))")
        if model in IMAGEN_EDIT:
            warnings = [w for w in warnings if w != size.warning]
            src = request.init_image
            size = SizePlan(src.width, src.height) if src is not None and src.width and src.height else \
                SizePlan(1024, 1024)
        elif model in GEMINI and request.init_image is not None and request.width is None and \
                request.aspect_ratio is None:
            src = request.init_image
            ratio = src.width / src.height if src.width and src.height else 1.0
            size = SizePlan(*min(GEMINI_SHAPES.values(), key=lambda s: abs(math.log(s[0] / s[1] / ratio))))
        return Plan(size, tuple(warnings))

    # --- cost --------------------------------------------------------------------

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        row = self.price_row(model)
        latency = float(row.rates.get("latency_s", 8.0))
        if model in GEMINI:
            million = Decimal(1_000_000)
            prompt_tokens = math.ceil(len(request.prompt.encode()) / 4)
            prompt_tokens += int(row.rates["input_image_tokens"]) if request.init_image is not None else 0
            out = int(row.rates["output_image_tokens"])
            per_call = (prompt_tokens * row.rate("input_per_mtok") + out * row.rate("image_output_per_mtok")) / million
            return Estimate(per_call * request.n, latency, "tokens", Decimal((prompt_tokens + out) * request.n))
        return Estimate(request.n * row.rate("usd_per_image"), latency, "images", Decimal(request.n))

    # --- the call ----------------------------------------------------------------

    def _location(self, request: ImageRequest) -> str:
        allowed = request.constraints.residency
        if allowed is None:
            return next(iter(self._region_location.values()))
        for region, location in self._region_location.items():
            if region in allowed:
                return location
        raise InvalidRequestError(f"no Google endpoint in regions {sorted(allowed)}", provider=self.name)

    def _client(self, location: str) -> genai.Client:
        client = self._clients.get(location)
        if client is None:
            from google import genai
            from google.genai import types

            http = types.HttpOptions(base_url=self._base_url, retry_options=types.HttpRetryOptions(attempts=1))
            if self.vertex:
                client = genai.Client(vertexai=True, project=self._project, location=location,
                                      credentials=self._credentials, http_options=http)
            else:
                assert self._key is not None
                client = genai.Client(vertexai=False, api_key=self._key.value(), http_options=http)
            self._clients[location] = client
        return client

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        plan = self.plan(request, model)
        location = self._location(request)
        client = self._client(location)
        billed: list[Billing] = []
        try:
            async with asyncio.timeout(timeout_s):
                if model in GEMINI:
                    fan = await fan_out(request.n, lambda i: self._gemini(client, request, model, plan, billed))
                    images, ids, warnings = [img for img, _ in fan.done], [r for _, r in fan.done], fan.warnings(
                        request.n)
                    billing = combine(billed)
                else:
                    images, ids, warnings, billing = await self._imagen(client, request, model, plan)
        except TimeoutError:
            error = ProviderTimeout(f"no answer within {timeout_s:.1f}s", provider=self.name)
            raise charged(error, combine(billed) if billed else None) from None
        details = dict(billing.details) | {"location": location or "global", "watermark": _watermark(self, model)}
        billing = dataclasses.replace(billing, details=details)
        return ProviderResponse(images, model, billing, ids[0] if ids else None,
                                warnings=(*plan.warnings, *warnings))

    async def _imagen(
        self, client: genai.Client, request: ImageRequest, model: str, plan: Plan
    ) -> tuple[list[GeneratedImage], list[str | None], tuple[str, ...], Billing]:
        from google.genai import types

        options = request.provider_options.get(self.name, {})
        fmt = request.output_format if request.output_format in _MIME else "png"
        common: dict[str, Any] = {
            "number_of_images": request.n,
            "include_rai_reason": True,
            "output_mime_type": _MIME[fmt],
            **{k: v for k, v in self._operator.items() if v is not None and not (k == "add_watermark" and v)},
        }
        if "output_compression_quality" in options and fmt == "jpeg":
            common["output_compression_quality"] = options["output_compression_quality"]
        if request.seed is not None and self.capabilities(model).seed:
            common["seed"] = request.seed
        try:
            if model in IMAGEN_EDIT:
                if request.init_image is None or request.mask_image is None:
                    raise InvalidRequestError(f"{model} needs init_image and mask_image", provider=self.name)
                image = await load_bytes(request.init_image, fetcher=self._fetcher)
                mask = await amask_png(request.mask_image, image_size(image), mask_to_white_repaint,
                                       fetcher=self._fetcher)
                refs = [
                    types.RawReferenceImage(reference_id=1, reference_image=types.Image(image_bytes=image)),
                    types.MaskReferenceImage(reference_id=2, reference_image=types.Image(image_bytes=mask),
                                             config=types.MaskReferenceConfig(
                                                 mask_mode="MASK_MODE_USER_PROVIDED",
                                                 mask_dilation=options.get("mask_dilation"))),
                ]
                edit = types.EditImageConfig(
                    edit_mode=options.get("edit_mode", "EDIT_MODE_INPAINT_INSERTION"),
                    negative_prompt=request.negative_prompt, **common)
                response: Any = await client.aio.models.edit_image(model=model, prompt=request.prompt,
                                                                    reference_images=refs, config=edit)
            else:
                ratio = next(r for r, s in IMAGEN_SHAPES.items() if s == (plan.size.width, plan.size.height))
                config = types.GenerateImagesConfig(
                    aspect_ratio=ratio,
                    enhance_prompt=options.get("enhance_prompt"),
                    language=options.get("language"),
                    **common,
                )
                response = await client.aio.models.generate_images(model=model, prompt=request.prompt, config=config)
        except ImageRouterError:
            raise
        except Exception as exc:
            raise _map_error(exc, self.name) from None
        generated = list(getattr(response, "generated_images", None) or [])
        filtered = [g.rai_filtered_reason for g in generated if getattr(g, "rai_filtered_reason", None)]
        made = [g for g in generated if g.image is not None and g.image.image_bytes]
        row = self.price_row(model)
        billing = Billing(len(made) * row.rate("usd_per_image"), "images", Decimal(len(made)), self.prices.version,
                          {"images": len(made), "filtered": len(filtered)})
        if not made:
            reason = redact(str(filtered[0]))[:200] if filtered else "no image returned"
            raise ContentPolicyError(f"filtered by Google's safety filters: {reason}", provider=self.name,
                                     status_code=200, code="rai_filtered")
        images: list[GeneratedImage] = []
        problems: list[str] = []
        for g in made:
            try:
                mime, w, h = await output_image(g.image.image_bytes, provider=self.name, status_code=200)
            except MalformedResponse as exc:
                problems.append(exc.message)
                continue
            images.append(GeneratedImage(data=g.image.image_bytes, mime=mime, width=w, height=h,
                                         seed=common.get("seed"), provenance=_provenance(self, model)))
        if not images:
            raise charged(MalformedResponse(f"response images unreadable ({'; '.join(sorted(set(problems)))})",
                                            provider=self.name, status_code=200), billing)
        warnings: list[str] = []
        if filtered:
            warnings.append(f"{len(filtered)} of {request.n} images filtered by Google's safety filters (not billed)")
        if problems:
            warnings.append(f"{len(problems)} image(s) unreadable, billed by Google all the same")
        return images, [None], tuple(warnings), billing

    async def _gemini(
        self, client: genai.Client, request: ImageRequest, model: str, plan: Plan, billed: list[Billing]
    ) -> tuple[GeneratedImage, str | None]:
        from google.genai import types

        parts: list[Any] = [types.Part.from_text(text=request.prompt)]
        if request.init_image is not None:
            data = await load_bytes(request.init_image, fetcher=self._fetcher)
            parts.append(types.Part.from_bytes(data=data, mime_type=request.init_image.mime or "image/png"))
        ratio = next(r for r, s in GEMINI_SHAPES.items() if s == (plan.size.width, plan.size.height))
        config = types.GenerateContentConfig(response_modalities=["TEXT", "IMAGE"],
                                             image_config=types.ImageConfig(aspect_ratio=ratio))
        try:
            response: Any = await client.aio.models.generate_content(
                model=model, contents=[types.Content(role="user", parts=parts)], config=config)
        except Exception as exc:
            raise _map_error(exc, self.name) from None
        response_id = getattr(response, "response_id", None)
        billing = self._gemini_billing(response, model)
        if billing.cost_usd > 0:
            billed.append(billing)
        feedback = getattr(response, "prompt_feedback", None)
        block = getattr(feedback, "block_reason", None)
        candidates = list(getattr(response, "candidates", None) or [])
        inline = [p.inline_data for c in candidates for p in ((c.content.parts if c.content else None) or [])
                  if getattr(p, "inline_data", None) is not None and p.inline_data.data]
        finish = {str(getattr(c.finish_reason, "value", c.finish_reason)) for c in candidates if c.finish_reason}
        if not inline:
            if block is not None or finish & _SAFETY_FINISH:
                why = str(getattr(block, "value", block)) if block is not None else ", ".join(sorted(finish))
                raise charged(ContentPolicyError(f"blocked by Google's safety filters ({why})", provider=self.name,
                                                 status_code=200, code=why, request_id=response_id), billing)
            raise charged(MalformedResponse("response held no image", provider=self.name, status_code=200,
                                            request_id=response_id), billing)
        data = inline[0].data
        try:
            mime, w, h = await output_image(data, provider=self.name, request_id=response_id, status_code=200)
        except MalformedResponse as exc:
            raise charged(exc, billing) from None
        return GeneratedImage(data=data, mime=mime, width=w, height=h, provenance=_provenance(self, model)), \
            response_id

    def _gemini_billing(self, response: Any, model: str) -> Billing:
        """The bill from ``usage_metadata``: prompt tokens at the input rate, output image tokens at the image rate,
        other output tokens at the text rate (https://ai.google.dev/gemini-api/docs/pricing)."""
        row = self.price_row(model)
        usage = getattr(response, "usage_metadata", None)
        prompt = int(getattr(usage, "prompt_token_count", 0) or 0)
        out_total = int(getattr(usage, "candidates_token_count", 0) or 0)
        image_out = sum(int(d.token_count or 0) for d in (getattr(usage, "candidates_tokens_details", None) or [])
                        if str(getattr(d.modality, "value", d.modality)) == "IMAGE")
        text_out = max(0, out_total - image_out)
        cost = (prompt * row.rate("input_per_mtok") + image_out * row.rate("image_output_per_mtok")
                + text_out * row.rate("text_output_per_mtok")) / Decimal(1_000_000)
        return Billing(cost, "tokens", Decimal(prompt + out_total), self.prices.version,
                       {"input_tokens": prompt, "image_output_tokens": image_out, "text_output_tokens": text_out})

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aio.aclose()
        self._clients.clear()


def _watermark(provider: GoogleProvider, model: str) -> str | None:
    """SynthID: every Gemini image, and Imagen's unless the operator turned the watermark off."""
    if model in GEMINI or provider._operator["add_watermark"]:
        return SYNTHID
    return None


def _provenance(provider: GoogleProvider, model: str) -> Mapping[str, Any] | None:
    mark = _watermark(provider, model)
    return {"watermark": mark} if mark else None


_DELAY = re.compile(r"^(\d+(?:\.\d+)?)s$")


def _details(exc: Any) -> list[dict[str, Any]]:
    body = getattr(exc, "details", None)
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _map_error(exc: Exception, provider: str) -> ImageRouterError:
    """A google-genai exception as the router's error class. Google's errors are google.rpc.Status
    (https://cloud.google.com/apis/design/errors): ErrorInfo ``reason`` API_KEY_INVALID (a 400) is a refused key,
    BILLING_DISABLED (a 403) an account that cannot pay; a 429's RetryInfo ``retryDelay`` is the wait it asks for."""
    from google.genai import errors

    if isinstance(exc, errors.APIError):
        status = int(exc.code or 0)
        message = redact(str(exc.message or exc.status or ""))[:300]
        text = f"HTTP {status} {exc.status or ''}".rstrip() + (f": {message}" if message else "")
        details = _details(exc)
        reasons = {str(d.get("reason")) for d in details if "reason" in d}
        kw: dict[str, Any] = {"provider": provider, "status_code": status, "code": str(exc.status or "") or None}
        if "API_KEY_INVALID" in reasons:
            return AuthenticationError(f"HTTP {status}: the API key was refused", **kw)
        if "BILLING_DISABLED" in reasons:
            return InsufficientCredits(text, **kw)
        if status == 429:
            delays = [_DELAY.match(str(d.get("retryDelay", ""))) for d in details]
            wait = next((float(m.group(1)) for m in delays if m), None)
            return RateLimited(text, retry_after=wait, **kw)
        headers = getattr(getattr(exc, "response", None), "headers", None)
        return status_error(status, text, provider=provider, code=kw["code"], headers=headers)
    if isinstance(exc, ValueError):  # the SDK refused the request before sending it, or a body that is no JSON
        return MalformedResponse(f"request or response refused by the SDK ({type(exc).__name__})", provider=provider)
    return connection_error(exc, provider=provider)
