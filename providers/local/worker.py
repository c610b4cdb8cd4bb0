"""One worker per device: it owns the pipelines and runs GPU work off the event loop.

A single-thread executor is the device's queue, so two requests never run on one
pipeline at once. Each call still gets its own pipeline object: a shallow copy of the
cached one (the modules are shared, nothing is cast or moved) whose scheduler is a fresh
instance. ``__call__`` writes its per-call state (``_guidance_scale``, ``_interrupt``,
``_num_timesteps``…) as instance attributes, and assigning a registered component on a
pipeline rebinds that attribute and its config entry (a new dict), so all of it lands
on the copy and the cached pipeline is never mutated. (``from_pipe`` would do the same
but re-casts every module per call and logs a warning each time.) Seeds are one CPU generator per
image (``seed + i``), so a returned seed reproduces its image alone.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from providers.local.adapters import EmbeddingFile, IPAdapterFile
from providers.local.catalog import ModelEntry
from providers.local.loras import LoraFile
from providers.local.pipelines import PipelineCache, quiet_loading
from providers.local.upscale import UpscalerEntry, deadline_check, upscale
from router.errors import InvalidRequestError, ProviderTimeout

T = TypeVar("T")

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


@dataclass(frozen=True, slots=True)
class Job:
    """Everything one pipeline call needs, in plain values (PIL images for inputs)."""

    entry: ModelEntry
    task: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seeds: tuple[int, ...]
    negative_prompt: str | None = None
    scheduler: str | None = None
    strength: float | None = None
    init_image: Any = None
    mask_image: Any = None
    safety_checker: bool = True
    deadline: float = float("inf")
    """``time.monotonic()`` after which the call is interrupted."""
    controls: tuple[Control, ...] = ()
    loras: tuple[tuple[LoraFile, float], ...] = ()
    mask_blur: int = 0
    padding_mask_crop: int | None = None
    progress: Callable[[int, int], None] | None = None
    """Called on the device thread after each denoising step with (step, total)."""
    embeddings: tuple[EmbeddingFile, ...] = ()
    ip_adapter: IPAdapterFile | None = None
    ip_image: Any = None
    ip_scale: float = 1.0
    previews: tuple[int, ...] = ()
    """Denoising steps after which a latent preview is decoded (needs the model's ``preview_vae``)."""
    on_preview: Callable[[int, int, Any], None] | None = None
    """Called on the device thread with (index, step, PIL image) for each preview."""

    @property
    def control_kinds(self) -> tuple[str, ...]:
        return tuple(c.kind for c in self.controls)


@dataclass(frozen=True, slots=True)
class Control:
    """One ControlNet input, already turned into its map at the output size."""

    kind: str
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(slots=True)
class JobResult:
    """The images (PIL), their NSFW flags, and what the call cost in device time."""

    images: list[Any]
    nsfw: list[bool]
    seconds: float
    steps_run: int
    scheduler: str
    extra: dict[str, Any] = field(default_factory=dict)


def make_scheduler(current: Any, name: str | None) -> Any:
    """A fresh scheduler instance: ``name``'s class from ``current``'s config, or a copy of ``current``."""
    if name is None:
        return type(current).from_config(current.config)
    import diffusers

    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(current.config, **extra)


def call_pipeline(entry_pipe: Any, job: Job, cancel: threading.Event, base: Any = None,
                  preview_vae: Any = None) -> JobResult:
    """Run ``job`` on a per-call view of ``entry_pipe`` (shared modules, own scheduler).

    ``base`` is the model's base pipeline, whose IP-Adapter image encoder the view borrows;
    ``preview_vae`` decodes the latents of the steps ``job.previews`` names."""
    import torch

    scheduler = make_scheduler(entry_pipe.scheduler, None if job.entry.family == "flux" else job.scheduler)
    pipe = copy.copy(entry_pipe)
    pipe.scheduler = scheduler
    if job.ip_adapter is not None and base is not None and base is not entry_pipe:
        pipe.image_encoder = base.image_encoder  # views made before the IP-Adapter was loaded lack it
        pipe.feature_extractor = base.feature_extractor
    if not job.safety_checker and getattr(entry_pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    steps_run = 0

    def on_step_end(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        nonlocal steps_run
        steps_run = i + 1
        if job.progress is not None:
            job.progress(steps_run, int(getattr(p, "_num_timesteps", None) or job.steps))
        if preview_vae is not None and job.on_preview is not None and steps_run in job.previews:
            latents = kwargs.get("latents")
            if latents is not None:
                job.on_preview(job.previews.index(steps_run), steps_run, preview_image(preview_vae, latents))
        if cancel.is_set() or time.monotonic() > job.deadline:
            p._interrupt = True
        return kwargs

    gens = [torch.Generator("cpu").manual_seed(s) for s in job.seeds]
    kwargs: dict[str, Any] = {
        "prompt": job.prompt, "num_inference_steps": job.steps, "guidance_scale": job.guidance,
        "generator": gens, "num_images_per_prompt": len(job.seeds), "output_type": "pil",
        "callback_on_step_end": on_step_end,
    }
    if job.negative_prompt and job.entry.family != "flux":
        kwargs["negative_prompt"] = job.negative_prompt
    mask = job.mask_image
    if job.task == "txt2img":
        kwargs |= {"width": job.width, "height": job.height}
    else:
        kwargs["image"] = job.init_image
        kwargs["strength"] = job.strength if job.strength is not None else (0.8 if job.task == "img2img" else 1.0)
        if job.task == "inpaint":
            if job.mask_blur:
                mask = pipe.mask_processor.blur(mask, blur_factor=job.mask_blur)
            kwargs |= {"mask_image": mask, "width": job.width, "height": job.height}
            if job.padding_mask_crop:
                kwargs["padding_mask_crop"] = job.padding_mask_crop
        elif "width" in inspect.signature(pipe.__call__).parameters:  # Flux's img2img sizes from width/height
            kwargs |= {"width": job.width, "height": job.height}
        if int(job.steps * kwargs["strength"]) < 1:
            raise InvalidRequestError(f"steps × strength = {job.steps} × {kwargs['strength']} runs no denoising "
                                      "step; raise steps or strength", provider="local")
    if job.ip_adapter is not None:
        kwargs["ip_adapter_image"] = job.ip_image
    if job.controls:
        kwargs |= control_kwargs(pipe, job, gens)
    images, flags, seconds = run_timed(pipe, kwargs, cancel=cancel, deadline=job.deadline,
                                       steps_run=lambda: steps_run)
    if job.task == "inpaint":  # keep unmasked pixels exact; a flagged image stays black
        from PIL import Image

        images = [img if flag else Image.composite(img.convert("RGB"), job.init_image, mask)
                  for img, flag in zip(images, flags, strict=True)]
    return JobResult(images, flags, seconds, steps_run, type(scheduler).__name__)


def run_timed(pipe: Any, kwargs: dict[str, Any], *, cancel: threading.Event, deadline: float,
              steps_run: Callable[[], int]) -> tuple[list[Any], list[bool], float]:
    """One pipeline call: refused when cancelled or past its deadline before it starts, timed (CUDA synced);
    a call the step callback interrupted (``_interrupt``) is a :class:`ProviderTimeout`. Returns the images,
    their NSFW flags and the seconds it took."""
    import torch

    if cancel.is_set() or time.monotonic() > deadline:
        raise ProviderTimeout("cancelled before it started (deadline passed in the queue)", provider="local")
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = pipe(**kwargs)
    if str(pipe._execution_device).startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if getattr(pipe, "_interrupt", False):
        raise ProviderTimeout(f"interrupted after {steps_run()} step(s): deadline passed or cancelled",
                              provider="local")
    images = list(out.images)
    flags = [bool(f) for f in (getattr(out, "nsfw_content_detected", None) or [False] * len(images))]
    return images, flags, seconds


def preview_image(vae: Any, latents: Any) -> Any:
    """The first image's latents decoded by a tiny autoencoder, as a PIL image (a quick, rough preview)."""
    import torch
    from PIL import Image

    with torch.inference_mode():
        out = vae.decode(latents[:1].to(vae.device, vae.dtype)).sample[0]
    pixels = ((out.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels[..., :3])


def preview_steps(total: int, count: int) -> tuple[int, ...]:
    """``count`` steps spread evenly over ``total``, the last one short of the end (the end is the image)."""
    if count <= 0 or total < 2:
        return ()
    steps = sorted({max(1, round(total * (i + 1) / (count + 1))) for i in range(count)})
    return tuple(s for s in steps if s < total)


def control_kwargs(pipe: Any, job: Job, generators: list[Any]) -> dict[str, Any]:
    """The ControlNet arguments: maps, scales and windows (one value for one net, lists for several)."""
    one = len(job.controls) == 1

    def per_net(values: list[Any]) -> Any:
        return values[0] if one else values

    flux = job.entry.family == "flux"
    # The txt2img SD/SDXL ControlNet pipelines take the map as ``image``; every other one as ``control_image``.
    key = "image" if job.task == "txt2img" and not flux else "control_image"
    out: dict[str, Any] = {
        key: per_net([c.image for c in job.controls]),
        "controlnet_conditioning_scale": per_net([c.scale for c in job.controls]),
        "control_guidance_start": per_net([c.start for c in job.controls]),
        "control_guidance_end": per_net([c.end for c in job.controls]),
    }
    if flux and job.task == "txt2img":
        # Flux's ControlNet pipeline samples the map's VAE latents from the same generators before the noise;
        # drawing the noise first, as the plain pipeline does, keeps a seed's image the same with or without it.
        latents, _ = pipe.prepare_latents(len(generators), pipe.transformer.config.in_channels // 4, job.height,
                                          job.width, pipe.transformer.dtype, pipe._execution_device, generators)
        out["latents"] = latents
    return out


class DeviceWorker:
    """The only user of one device's pipelines: a one-thread queue in front of a :class:`PipelineCache`."""

    def __init__(self, device: str = "cpu", *, max_models: int = 2, vram_budget_gb: float | None = None,
                 dtype: Any = None, compile_options: Mapping[str, Any] | None = None) -> None:
        self.device = device
        self.cache = PipelineCache(device, max_models=max_models, vram_budget_gb=vram_budget_gb, dtype=dtype,
                                   compile_options=compile_options)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"imagerouter-{device}")
        self.completed = 0
        self.interrupted = 0
        """Calls stopped early (deadline or cancellation); counted on the device thread."""

    async def submit(self, fn: Callable[[PipelineCache, threading.Event], T]) -> T:
        """Run ``fn(cache, cancel)`` on the device thread; cancelling the await sets ``cancel``."""
        cancel = threading.Event()
        loop = asyncio.get_running_loop()

        def quietly(cache: PipelineCache, cancel: threading.Event) -> T:
            with quiet_loading():
                return fn(cache, cancel)

        future = loop.run_in_executor(self._executor, quietly, self.cache, cancel)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            future.add_done_callback(_retrieved)  # the interrupted call's error has no one to raise to
            raise

    async def run(self, job: Job) -> JobResult:
        """Queue one generation on this device."""

        def work(cache: PipelineCache, cancel: threading.Event) -> JobResult:
            try:
                pipe = cache.for_task(job.entry, job.task, job.control_kinds)
                base = cache.base(job.entry)
                cache.adapters(job.entry).activate(base, job.loras)
                cache.embeddings(job.entry).activate(base, job.embeddings, job.entry.family)
                cache.ip_slot(job.entry).activate(base, job.ip_adapter, job.ip_scale, cache.dtype_for(job.entry))
                preview = cache.preview_vae(job.entry) if job.previews and job.on_preview else None
                result = call_pipeline(pipe, job, cancel, base, preview)
            except ProviderTimeout:
                self.interrupted += 1
                raise
            self.completed += 1
            return result

        return await self.submit(work)

    async def upscale(self, entry: UpscalerEntry, image: Any, factor: float,
                      deadline: float = float("inf")) -> tuple[Any, float]:
        """Upscale ``image`` (PIL) on this device; returns the image and the device seconds it took."""

        def work(cache: PipelineCache, cancel: threading.Event) -> tuple[Any, float]:
            model = cache.upscaler(entry)
            t0 = time.perf_counter()
            try:
                out = upscale(model, image, factor, tile=entry.tile, overlap=entry.overlap,
                              check=deadline_check(cancel, deadline, time.monotonic))
            except ProviderTimeout:
                self.interrupted += 1
                raise
            self.completed += 1
            return out, time.perf_counter() - t0

        return await self.submit(work)

    async def warm(self, entry: ModelEntry) -> None:
        """Load ``entry`` now; for a ``compile: true`` model also run one small call at its native size,
        so that ``torch.compile`` compiles here and not inside the first request."""

        def work(cache: PipelineCache, cancel: threading.Event) -> None:
            pipe = cache.base(entry)
            if entry.compile:
                width, height = entry.native
                job = Job(entry=entry, task="txt2img", prompt="warm-up", width=width, height=height, steps=2,
                          guidance=entry.guidance, seeds=(0,), safety_checker=False)
                call_pipeline(pipe, job, cancel)

        await self.submit(work)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Read the outcome of a call nobody awaits any more, so asyncio does not report it as never retrieved."""
    if not future.cancelled():
        future.exception()
