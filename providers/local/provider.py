"""``LocalProvider``: Diffusers pipelines on this machine's GPU (or CPU), behind the provider contract."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from providers.base import Billing, Capabilities, Estimate, Plan, Provider, ProviderResponse
from providers.local.adapters import (
    AdapterError,
    EmbeddingFile,
    IPAdapterFile,
    check_embeddings,
    check_ip_adapter,
    resolve_embedding,
    resolve_ip_adapter,
)
from providers.local.catalog import Catalog, ModelEntry
from providers.local.controls import COMPUTED, control_map
from providers.local.loras import LoraFile, check_family, resolve
from providers.local.upscale import output_size
from providers.local.watermark import PAYLOAD, can_mark, embed
from providers.local.worker import Control, DeviceWorker, Job, JobResult, preview_steps
from router.errors import ImageRouterError, InvalidRequestError, ProviderUnavailable
from router.geometry import SizePlan, SizeRules, plan_size
from router.images import adecode, encode, load_bytes, mask_to_white_repaint
from router.prices import PriceTable
from router.progress import PartialImage, ProgressEvent, current_sink
from router.request import ImageRequest, Task
from router.result import GeneratedImage

_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Seconds per denoising step per image at the family's native size, before anything is observed.
_PRIOR_S_PER_STEP = {"sd15": 0.03, "sdxl": 0.08, "flux": 0.3}
_LOAD_PRIOR_S = {"sd15": 5.0, "sdxl": 12.0, "flux": 30.0}
_OPTIONS = frozenset({"safety_checker", "mask_blur", "padding_mask_crop", "canny_low", "canny_high", "watermark",
                      "embeddings", "ip_adapter"})
_UPSCALE_S_PER_MP = 0.5
"""Device seconds per output megapixel of an upscale, before anything is observed."""
_UPSCALE_LOAD_S = 2.0
_CONTROLNET_COST = 0.4
"""A ControlNet adds roughly this fraction of a UNet step to each step."""


_FOUND: set[str] = set()


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (a found one is remembered: ``find_spec`` costs ~100 µs a call)."""
    if module not in _FOUND and importlib.util.find_spec(module) is not None:
        _FOUND.add(module)
    return module in _FOUND


class LocalProvider(Provider):
    """Local Diffusers models from a :class:`Catalog`, served by one worker per device.

    ``usd_per_gpu_hour`` prices device time (0: local work is free). PNGs are written at
    ``png_compress_level`` 1 (fast; 6 is Pillow's smaller, slower default). At most ``max_models``
    base pipelines (and ``vram_budget_gb`` of catalog ``vram_gb``) stay loaded. The safety checker
    runs where the model ships one, unless ``safety_checker=False`` here or
    ``provider_options={"local": {"safety_checker": False}}`` on the request.

    Outputs carry an invisible watermark (DWT-DCT, :mod:`providers.local.watermark`) unless
    ``watermark=False``; a request (or a policy writing its provider options) may turn it on with
    ``provider_options={"local": {"watermark": True}}``, and off only where ``watermark_opt_out=True``.
    ``compile_options`` are ``torch.compile`` keyword arguments for ``compile: true`` models.
    """

    kind = "local"
    retry_timeouts = False  # its time is your own compute: a timeout falls back, not retried

    def __init__(
        self,
        catalog: Catalog | Mapping[str, Any] | str | Path | None = None,
        *,
        name: str | None = None,
        prices: PriceTable | None = None,
        device: str | None = None,
        usd_per_gpu_hour: float | Decimal = 0,
        max_models: int = 2,
        vram_budget_gb: float | None = None,
        dtype: Any = None,
        safety_checker: bool = True,
        seconds_per_step: Mapping[str, float] | None = None,
        png_compress_level: int = 1,
        compile_options: Mapping[str, Any] | None = None,
        watermark: bool = True,
        watermark_opt_out: bool = False,
        watermark_payload: bytes = PAYLOAD,
    ) -> None:
        super().__init__(name=name, prices=prices)
        if catalog is None:
            catalog = os.environ.get("IMAGEROUTER_MODELS") or Catalog()
        if isinstance(catalog, (str, Path)):
            catalog = Catalog.from_yaml(catalog)
        elif not isinstance(catalog, Catalog):
            catalog = Catalog.from_dict(catalog)
        self.catalog = catalog
        self.usd_per_gpu_hour = Decimal(str(usd_per_gpu_hour))
        self.safety_checker = safety_checker
        self.png_compress_level = png_compress_level
        self._device = device
        self._max_models = max_models
        self._vram_budget_gb = vram_budget_gb
        self._dtype = dtype
        self._compile_options = compile_options
        self.watermark = watermark
        self.watermark_opt_out = watermark_opt_out
        self.watermark_payload = watermark_payload
        self._worker: DeviceWorker | None = None
        self._caps: dict[str, tuple[ModelEntry, Capabilities]] = {}
        self._observed: dict[str, float] = dict(seconds_per_step or {})
        """Per model: observed seconds per step per image at native size (an EMA)."""

    # --- what it offers ------------------------------------------------------------
    def models(self) -> Sequence[str]:
        return self.catalog.names() + list(self.catalog.upscalers)

    def capabilities(self, model: str) -> Capabilities:
        if model in self.catalog.upscalers:
            u = self.catalog.upscalers[model]
            return Capabilities(
                tasks=frozenset({"upscale"}), max_n=1, regions=frozenset({"local"}), quality=u.quality,
                sizes=SizeRules(multiple=1, min_side=16, max_side=u.max_side * 8, min_pixels=0,
                                max_pixels=(u.max_side * 8) ** 2, max_ratio=16.0),
                output_formats=frozenset(_MIME))
        e = self.catalog.get(model)
        known = self._caps.get(model)
        if known is not None and known[0] is e:  # asked for every candidate of every request: build it once
            return known[1]
        caps = self._capabilities(e)
        self._caps[model] = (e, caps)
        return caps

    def _capabilities(self, e: ModelEntry) -> Capabilities:
        tasks: set[Task] = {"txt2img", "img2img", "inpaint"}
        if e.controlnets:
            tasks.add("control")
        lora = _installed("peft")
        return Capabilities(
            tasks=frozenset(tasks), control_kinds=frozenset(e.controlnets), max_controls=len(e.controlnets),
            max_loras=e.max_loras if lora else 0, embeddings=e.family != "flux", ip_adapter=e.family != "flux",
            sizes=SizeRules(multiple=e.multiple, min_side=e.min_side, max_side=e.max_side,
                            max_pixels=e.max_side * e.max_side, native=e.native),
            max_n=e.max_n, negative_prompt=e.family != "flux", seed=True, steps=True, guidance=True,
            strength=True, scheduler=e.family != "flux", regions=frozenset({"local"}), quality=e.quality,
            output_formats=frozenset(_MIME),
        )

    def provider_option_names(self) -> frozenset[str]:
        return _OPTIONS

    def configuration_problem(self) -> str | None:
        if not self.catalog.names() and not self.catalog.upscalers:
            return "no local models: set IMAGEROUTER_MODELS to a model catalog file"
        for module in ("torch", "diffusers"):
            if not _installed(module):
                return f"{module} is not installed: pip install 'pixroute[local]'"
        return None

    def plan(self, request: ImageRequest, model: str) -> Plan:
        if model in self.catalog.upscalers:
            return self._upscale_plan(request, model)
        base = super().plan(request, model)
        options = request.provider_options.get(self.name, {})
        unused = [f"provider_options.local.{name} ignored: it applies to inpainting (give a mask_image)"
                  for name in ("mask_blur", "padding_mask_crop") if name in options and request.mask_image is None]
        unused += [f"provider_options.local.{name} ignored: no canny control to compute"
                   for name in ("canny_low", "canny_high") if name in options and not any(
                       c.kind in COMPUTED and c.preprocess for c in request.controls)]
        src = request.init_image
        if request.width is None and request.aspect_ratio is None and src is not None and src.width and src.height:
            size = plan_size(src.width, src.height, None, self.capabilities(model).sizes)
            note = () if size.exact else (f"output size {size.width}x{size.height}: the nearest shape {model} "
                                          f"makes to the init image's {src.width}x{src.height}",)
            return Plan(size, base.warnings + note + tuple(unused))
        return Plan(base.size, base.warnings + tuple(unused)) if unused else base

    # --- cost and latency -------------------------------------------------------------
    @property
    def device(self) -> str:
        """The device the worker runs on (CUDA when available, else CPU); resolved on first use."""
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def _steps(self, request: ImageRequest, entry: ModelEntry) -> int:
        steps = request.steps or entry.steps
        task = base_task(request)
        if task in ("img2img", "inpaint"):
            strength = request.strength if request.strength is not None else (0.8 if task == "img2img" else 1.0)
            return max(1, int(steps * strength))
        return steps

    def seconds_per_step(self, model: str) -> float:
        """Observed seconds per step per image at native size, or the family's prior."""
        entry = self.catalog.get(model)
        return self._observed.get(model, _PRIOR_S_PER_STEP[entry.family])

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        if model in self.catalog.upscalers:
            size = self.plan(request, model).size
            seconds = _UPSCALE_S_PER_MP * size.width * size.height / 1e6
            if self._worker is None or model not in self._worker.cache.loaded_upscalers():
                seconds += _UPSCALE_LOAD_S
            quantity = Decimal(f"{seconds:.3f}")
            return Estimate(self._cost(quantity), seconds, unit="gpu_seconds", quantity=quantity)
        entry = self.catalog.get(model)
        size = self.plan(request, model).size
        scale = (size.width * size.height) / (entry.native[0] * entry.native[1])
        seconds = self.seconds_per_step(model) * self._steps(request, entry) * request.n * scale
        seconds *= 1 + _CONTROLNET_COST * len(request.controls)
        loaded = self._worker is not None and model in self._worker.cache.loaded()
        if not loaded and model not in self._observed:
            seconds += _LOAD_PRIOR_S[entry.family]
        quantity = Decimal(f"{seconds:.3f}")
        return Estimate(self._cost(quantity), seconds, unit="gpu_seconds", quantity=quantity)

    def _cost(self, gpu_seconds: Decimal) -> Decimal:
        return gpu_seconds * self.usd_per_gpu_hour / Decimal(3600)

    def _observe(self, model: str, result: JobResult, job: Job) -> None:
        entry = job.entry
        scale = (job.width * job.height) / (entry.native[0] * entry.native[1])
        work = max(1, result.steps_run) * len(job.seeds) * scale
        sample = result.seconds / work
        old = self._observed.get(model)
        self._observed[model] = sample if old is None else 0.7 * old + 0.3 * sample

    # --- the call ---------------------------------------------------------------------
    @property
    def worker(self) -> DeviceWorker:
        if self._worker is None:
            self._worker = DeviceWorker(self.device, max_models=self._max_models,
                                        vram_budget_gb=self._vram_budget_gb, dtype=self._dtype,
                                        compile_options=self._compile_options)
        return self._worker

    async def warm(self, models: Sequence[str] | None = None) -> list[str]:
        """Load ``models`` (default: the catalog's ``compile: true`` ones) before requests arrive.

        A compiled model also runs one small generation at its native size, so compilation is paid
        here, outside the request path. Returns the models warmed. Call it at startup.
        """
        names = list(models) if models is not None else [e.name for e in self.catalog if e.compile]
        for name in names[: self._max_models]:
            await self.worker.warm(self.catalog.get(name))
        return names[: self._max_models]

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        if model in self.catalog.upscalers:
            return await self._upscale(request, model, timeout_s)
        entry = self.catalog.get(model)
        plan = self.plan(request, model)
        width, height = plan.size.width, plan.size.height
        if width % entry.multiple or height % entry.multiple:
            raise InvalidRequestError(f"{model}: width and height must be multiples of {entry.multiple} "
                                      f"(got {width}x{height})", provider=self.name)
        init = mask = None
        if request.init_image is not None:
            init = await asyncio.to_thread(_rgb_at, await adecode(await load_bytes(request.init_image),
                                                                   what="init_image"), (width, height))
        if request.mask_image is not None:  # decoded and converted off the event loop
            mask = await asyncio.to_thread(mask_to_white_repaint, await adecode(await load_bytes(request.mask_image),
                                                                                what="mask_image"), (width, height))
        options = request.provider_options.get(self.name, {})
        self._wants_watermark(options)  # a refused opt-out fails before any device time is spent
        seed = request.seed if request.seed is not None else random.randrange(2**32 - request.n)
        controls = await self._controls(request, entry, (width, height), options, seed)
        loras = self._loras(request, entry)
        embeddings = self._embeddings(request, entry, options)
        ip, ip_image, ip_scale = await self._ip_adapter(request, entry, options)
        job = Job(
            entry=entry, task=base_task(request), prompt=request.prompt, width=width, height=height,
            steps=request.steps or entry.steps,
            guidance=request.guidance_scale if request.guidance_scale is not None else entry.guidance,
            seeds=tuple(seed + i for i in range(request.n)), negative_prompt=request.negative_prompt,
            scheduler=request.scheduler, strength=request.strength, init_image=init, mask_image=mask,
            safety_checker=bool(options.get("safety_checker", self.safety_checker)),
            deadline=time.monotonic() + timeout_s, controls=controls, loras=loras,
            mask_blur=_int_option(options, "mask_blur", 0),
            padding_mask_crop=_int_option(options, "padding_mask_crop", 0) or None,
            progress=self._progress(model), embeddings=embeddings, ip_adapter=ip, ip_image=ip_image,
            ip_scale=ip_scale, **self._previews(request, entry, model),
        )
        try:
            result = await self.worker.run(job)
        except ImageRouterError:
            raise
        except ValueError as exc:
            raise InvalidRequestError(f"{model}: {exc}"[:500], provider=self.name) from None
        except Exception as exc:
            raise ProviderUnavailable(f"{model} failed on {self.device}: {type(exc).__name__}: {exc}"[:500],
                                      provider=self.name) from None
        self._observe(model, result, job)
        marked, watermark_note = await self._watermark(result.images, options)
        result.images = marked
        fmt = request.output_format
        # Encoding is CPU work of tens to hundreds of ms per image: off the event loop, one thread per image.
        blobs = await asyncio.gather(*(asyncio.to_thread(encode, img, fmt, png_compress_level=self.png_compress_level)
                                       for img in result.images))
        images = [
            GeneratedImage(data=blob, mime=_MIME[fmt], width=img.width, height=img.height, seed=s, nsfw=flag)
            for blob, img, s, flag in zip(blobs, result.images, job.seeds, result.nsfw, strict=True)
        ]
        quantity = Decimal(f"{result.seconds:.3f}")
        billing = Billing(
            cost_usd=self._cost(quantity), unit="gpu_seconds", quantity=quantity,
            price_table_version=f"local:{self.usd_per_gpu_hour}/gpu-hour",
            details={"device": self.device, "steps": result.steps_run, "scheduler": result.scheduler,
                     "seconds_per_step": round(result.seconds / max(1, result.steps_run), 4),
                     "watermark": watermark_note},
        )
        warnings = plan.warnings
        if watermark_note == "unavailable":
            warnings += ("not watermarked: invisible-watermark is not installed (pip install 'pixroute[local]'), "
                         "or construct LocalProvider(watermark=False)",)
        return ProviderResponse(images=images, model=model, billing=billing, warnings=warnings)

    # --- upscaling ----------------------------------------------------------------------
    def _upscale_plan(self, request: ImageRequest, model: str) -> Plan:
        factor = request.upscale or 4.0
        warnings = [f"{name} ignored: {self.name}/{model} is an upscaler" for name, asked in (
            ("negative_prompt", request.negative_prompt), ("seed", request.seed is not None),
            ("steps", request.steps is not None), ("guidance_scale", request.guidance_scale is not None),
            ("loras", bool(request.loras))) if asked]
        src = request.init_image
        if src is None or not (src.width and src.height):
            return Plan(SizePlan(1024, 1024, None), tuple(warnings))
        width, height = output_size(src.width, src.height, factor)
        too_big = max(src.width, src.height) > self.catalog.upscalers[model].max_side
        why = (f"the input's {src.width}x{src.height} exceeds {model}'s max_side "
               f"{self.catalog.upscalers[model].max_side}") if too_big else None
        return Plan(SizePlan(width, height, None, True, why), tuple(warnings))

    async def _upscale(self, request: ImageRequest, model: str, timeout_s: float) -> ProviderResponse:
        entry = self.catalog.upscalers[model]
        if request.init_image is None or request.upscale is None:
            raise InvalidRequestError(f"{model} is an upscaler: give init_image and upscale (e.g. 2 or 4)",
                                      provider=self.name)
        if not _installed("spandrel"):
            raise ProviderUnavailable("spandrel is not installed: pip install 'pixroute[upscale]'",
                                      provider=self.name)
        options = request.provider_options.get(self.name, {})
        self._wants_watermark(options)
        plan = self.plan(request, model)
        image = await adecode(await load_bytes(request.init_image), what="init_image")
        if max(image.size) > entry.max_side:
            raise InvalidRequestError(f"{model}: the input is {image.width}x{image.height}; the largest side it "
                                      f"takes is {entry.max_side} (max_side in the catalog)", provider=self.name)
        try:
            out, seconds = await self.worker.upscale(entry, image, request.upscale,
                                                     deadline=time.monotonic() + timeout_s)
        except ImageRouterError:
            raise
        except (RuntimeError, ValueError) as exc:
            raise ProviderUnavailable(f"{model} failed on {self.device}: {type(exc).__name__}: {exc}"[:500],
                                      provider=self.name) from None
        marked, note = await self._watermark([out], options)
        fmt = request.output_format
        blob = await asyncio.to_thread(encode, marked[0], fmt, png_compress_level=self.png_compress_level)
        quantity = Decimal(f"{seconds:.3f}")
        billing = Billing(cost_usd=self._cost(quantity), unit="gpu_seconds", quantity=quantity,
                          price_table_version=f"local:{self.usd_per_gpu_hour}/gpu-hour",
                          details={"device": self.device, "upscale": request.upscale, "watermark": note})
        image_out = GeneratedImage(data=blob, mime=_MIME[fmt], width=marked[0].width, height=marked[0].height)
        return ProviderResponse(images=[image_out], model=model, billing=billing, warnings=plan.warnings)

    def _wants_watermark(self, options: Mapping[str, Any]) -> bool:
        wanted = options.get("watermark", self.watermark)
        if not isinstance(wanted, bool):
            raise InvalidRequestError(f"provider_options.local.watermark must be true or false, got {wanted!r}",
                                      provider=self.name)
        if self.watermark and not wanted and not self.watermark_opt_out:
            raise InvalidRequestError("provider_options.local.watermark: false is not allowed here: this operator "
                                      "watermarks every local output (LocalProvider(watermark_opt_out=True) "
                                      "lets requests turn it off)", provider=self.name, code="watermark_required")
        return wanted

    async def _watermark(self, images: list[Any], options: Mapping[str, Any]) -> tuple[list[Any], str]:
        """The images with the invisible mark, and what happened: embedded, off, too_small or unavailable."""
        if not self._wants_watermark(options):
            return images, "off"
        if not any(can_mark(img) for img in images):
            return images, "too_small"  # the DWT-DCT mark needs at least 256×256 pixels
        if not _installed("imwatermark"):
            return images, "unavailable"
        marked = await asyncio.gather(*(asyncio.to_thread(embed, img, self.watermark_payload) for img in images))
        return list(marked), "embedded"

    async def _controls(self, request: ImageRequest, entry: ModelEntry, size: tuple[int, int],
                        options: Mapping[str, Any], seed: int) -> tuple[Control, ...]:
        missing = sorted({c.kind for c in request.controls} - set(entry.controlnets))
        if missing:
            raise InvalidRequestError(
                f"{entry.name} has no ControlNet for {', '.join(missing)} (it has "
                f"{', '.join(entry.controlnets) or 'none'}); add one under controlnets in the catalog or drop "
                "that control", provider=self.name, code="control_kind_unavailable")
        low, high = _int_option(options, "canny_low", 100), _int_option(options, "canny_high", 200)
        out = []
        for c in request.controls:
            image = await adecode(await load_bytes(c.image), what=f"controls[{c.kind}].image")
            # Edge maps and detectors are CPU work (or a detector's own device); keep them off the event loop
            # and off the device queue. The shuffle pattern follows the request's seed.
            try:
                cmap = await asyncio.to_thread(control_map, image, c.kind, size, preprocess=c.preprocess, low=low,
                                               high=high, detectors=self.catalog.detectors, seed=seed)
            except (ImportError, RuntimeError, OSError) as exc:  # controlnet-aux missing, a failing model
                raise ProviderUnavailable(f"the {c.kind} detector failed: {type(exc).__name__}: {exc}"[:500],
                                          provider=self.name) from None
            out.append(Control(c.kind, cmap, c.scale, c.start, c.end))
        return tuple(out)

    def _loras(self, request: ImageRequest, entry: ModelEntry) -> tuple[tuple[LoraFile, float], ...]:
        if len(request.loras) > entry.max_loras:
            raise InvalidRequestError(f"{entry.name} takes at most {entry.max_loras} LoRAs, the request has "
                                      f"{len(request.loras)}", provider=self.name)
        loras = tuple((resolve(ref.ref), ref.weight) for ref in request.loras)
        check_family(loras, entry.family)
        return loras

    def _embeddings(self, request: ImageRequest, entry: ModelEntry,
                    options: Mapping[str, Any]) -> tuple[EmbeddingFile, ...]:
        """``embeddings=[{ref, token}]`` from the request (or ``provider_options.local.embeddings``)."""
        given = getattr(request, "embeddings", None) or options.get("embeddings") or ()
        if not isinstance(given, (list, tuple)):
            raise InvalidRequestError("embeddings must be a list of {ref, token}", provider=self.name)
        out = []
        for item in given:
            ref, token = _field(item, "ref"), _field(item, "token")
            if not isinstance(ref, str) or not isinstance(token, str):
                raise InvalidRequestError(f"each embedding needs ref (a .safetensors path) and token (the word the "
                                          f"prompt uses), got {item!r}"[:300], provider=self.name)
            out.append(resolve_embedding(ref, token))
        check_embeddings(out, entry.family)
        return tuple(out)

    async def _ip_adapter(self, request: ImageRequest, entry: ModelEntry,
                          options: Mapping[str, Any]) -> tuple[IPAdapterFile | None, Any, float]:
        """``ip_adapter={ref, image, scale}`` from the request (or ``provider_options.local.ip_adapter``)."""
        given = getattr(request, "ip_adapter", None) or options.get("ip_adapter")
        if given is None:
            return None, None, 1.0
        ref, image, scale = _field(given, "ref"), _field(given, "image"), _field(given, "scale")
        scale = 1.0 if scale is None else scale
        if not isinstance(ref, str) or image is None or isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise InvalidRequestError("ip_adapter needs ref (a .safetensors path), image and an optional numeric "
                                      "scale", provider=self.name)
        ip = resolve_ip_adapter(ref, entry.image_encoder)
        check_ip_adapter(ip, entry.family)
        from router.images import ImageInput

        try:
            source = image if isinstance(image, ImageInput) else ImageInput.coerce(image, what="ip_adapter.image")
        except ImageRouterError as exc:
            raise AdapterError("IP-Adapter", ref, exc.message) from None
        picture = await adecode(await load_bytes(source), what="ip_adapter.image")
        return ip, picture.convert("RGB"), float(scale)

    def _previews(self, request: ImageRequest, entry: ModelEntry, model: str) -> dict[str, Any]:
        """The preview steps and their callback for a request that asks for ``partial_images`` (with a sink to
        receive them and a ``preview_vae`` to make them); nothing otherwise."""
        sink = current_sink()
        if not request.partial_images or sink is None or entry.preview_vae is None or entry.family == "flux":
            return {}
        steps = request.steps or entry.steps
        if request.init_image is not None:  # img2img / inpaint run only the last strength × steps steps
            default = 1.0 if request.mask_image is not None else 0.8
            steps = int(steps * (request.strength if request.strength is not None else default))

        def on_preview(index: int, step: int, image: Any) -> None:
            sink(PartialImage(self.name, model, index, encode(image, "png", png_compress_level=1), "image/png",
                              step))

        return {"previews": preview_steps(steps, request.partial_images), "on_preview": on_preview}

    def _progress(self, model: str) -> Callable[[int, int], None] | None:
        sink = current_sink()
        if sink is None:
            return None
        start = time.monotonic()

        def report(step: int, total: int) -> None:
            sink(ProgressEvent(self.name, model, step, total, time.monotonic() - start))

        return report

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


def base_task(request: ImageRequest) -> str:
    """The pipeline a request runs on: inpaint with a mask, img2img with an init image, else txt2img.

    ControlNets ride on any of the three.
    """
    if request.mask_image is not None:
        return "inpaint"
    return "img2img" if request.init_image is not None else "txt2img"


def _field(item: Any, name: str) -> Any:
    """``item[name]`` for a mapping, ``item.name`` for a request model."""
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


def _int_option(options: Mapping[str, Any], name: str, default: int) -> int:
    """A whole-number ``provider_options.local`` value ≥ 0, or ``default`` when it is not given."""
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"provider_options.local.{name} must be a whole number ≥ 0, got {value!r}",
                                  provider="local")
    return value


def _rgb_at(img: Any, size: tuple[int, int]) -> Any:
    """``img`` as RGB at ``size`` (LANCZOS), for the init image (CPU work: called in a worker thread)."""
    from PIL import Image

    rgb = img.convert("RGB")
    return rgb if rgb.size == size else rgb.resize(size, Image.Resampling.LANCZOS)
