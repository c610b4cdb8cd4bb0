"""The local Diffusers backend as a Ray Serve GPU pool, and the provider (kind ``ray``) that reaches it over HTTP.

**The pool** (:class:`GpuPool`, deployed by :func:`build_app` / :func:`serve_gpu`, CLI ``pixroute serve-gpu
--catalog models.yaml``): each replica is one :class:`~providers.local.LocalProvider` on one device (a replica
asks Ray for ``num_gpus: 1`` when the cluster has GPUs, so there is one replica per GPU; on a CPU-only cluster
one CPU replica). Replicas autoscale between one and the GPU count on the queue: Serve's
``target_ongoing_requests`` is set to a full batch per replica. Compatible requests are batched with
``serve.batch``: txt2img on the same model, size, steps, guidance, scheduler and safety-checker setting, with
or without a negative prompt, and nothing that changes the pipeline's weights (no LoRA, embedding,
IP-Adapter or ControlNet). Each group of compatible requests becomes ONE pipeline call: one prompt and one
CPU generator per image (``seed + i``), exactly as the request would run alone. Anything else runs alone
through ``LocalProvider.generate``. Each batch's size is logged (Serve's ``ray.serve`` logger, the replica's
log), kept for ``GET /v1/models`` and returned with every response. A request alone in its batch runs the
local backend's own call and gets its bytes exactly; batched images equal the solo run's up to float rounding
(batched kernels sum in another order: at most one grey level per pixel, the bound the local backend's own
``n > 1`` calls have). On CPU the bytes also depend on torch's thread count (Ray gives a one-CPU replica one).

HTTP (a plain ``__call__(request)`` ingress, https://docs.ray.io/en/latest/serve/http-guide.html):
``GET /v1/models`` (models, full capabilities, option names, observed seconds per step) and
``POST /v1/generate`` (``{"model", "timeout_s", "request": {...}}``, images inline as base64; the pool never
fetches a URL). Errors answer ``{"error": {"kind", "message", "code"}}`` with 400 / 422 / 429 / 503 / 504.
A pool given a ``token`` answers only requests that carry it (``Authorization: Bearer <token>``; 401 otherwise);
:func:`serve_gpu` refuses a host other than loopback without one unless ``allow_open``.

**The provider** (:class:`RayPoolProvider`): models and capabilities come from the pool's ``GET /v1/models``
(cached, refreshed in the background, never awaited inside ``models()``); the bill is the GPU-seconds the
pool reports (a batch's device time shared by images) × ``usd_per_gpu_hour``.

Ray is imported only inside the pool's replicas and :func:`build_app` / :func:`serve_gpu`
(``pip install 'pixroute[ray]'``); importing this module does not import it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hmac
import itertools
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from providers.base import Billing, Capabilities, Estimate, Plan, Provider, ProviderResponse
from providers.local.catalog import Catalog
from providers.local.worker import Job, JobResult, call_pipeline, make_scheduler, run_timed
from providers.vendor import ApiKey, connection_error, output_image, status_error
from router.errors import (
    ConfigurationError,
    ContentPolicyError,
    ImageRouterError,
    InvalidRequestError,
    MalformedResponse,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from router.fetch import is_loopback_host
from router.geometry import SizeRules
from router.images import ImageInput, adata_url, encode, load_bytes
from router.prices import PriceTable
from router.request import ImageRequest
from router.result import GeneratedImage

if TYPE_CHECKING:
    from providers.local.provider import LocalProvider

ENV_URL = "IMAGEROUTER_RAY_URL"
ENV_RATE = "IMAGEROUTER_RAY_USD_PER_GPU_HOUR"
ENV_REGIONS = "IMAGEROUTER_RAY_REGIONS"
ENV_TOKEN = "IMAGEROUTER_RAY_TOKEN"
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_WIRE_FIELDS = ("prompt", "negative_prompt", "width", "height", "aspect_ratio", "size_mode", "n", "steps",
                "guidance_scale", "seed", "scheduler", "output_format", "strength", "upscale")
"""The request fields the pool reads as they are; images travel as base64, provider options as the local's."""
_ERRORS: dict[str, tuple[type[ImageRouterError], int]] = {
    "InvalidRequestError": (InvalidRequestError, 400),
    "ContentPolicyError": (ContentPolicyError, 422),
    "RateLimited": (RateLimited, 429),
    "ProviderTimeout": (ProviderTimeout, 504),
    "ProviderUnavailable": (ProviderUnavailable, 503),
}


# --- the wire --------------------------------------------------------------------------------------------------


def caps_to_wire(caps: Capabilities) -> dict[str, Any]:
    """Every field of ``caps`` as JSON values (sets sorted, tuples as lists), for :func:`caps_from_wire`."""
    out: dict[str, Any] = {}
    for f in fields(caps):
        value = getattr(caps, f.name)
        if isinstance(value, frozenset):
            value = sorted(value)
        elif isinstance(value, SizeRules):
            value = {g.name: getattr(value, g.name) for g in fields(value)}
        out[f.name] = value
    return out


def caps_from_wire(data: Mapping[str, Any]) -> Capabilities:
    """The :class:`Capabilities` a pool described; unknown keys (a newer pool) are ignored."""
    known = {f.name for f in fields(Capabilities)}
    values = {k: v for k, v in data.items() if k in known}
    for name in ("tasks", "control_kinds", "regions", "output_formats"):
        if name in values:
            values[name] = frozenset(values[name])
    if "sizes" in values:
        sizes = dict(values["sizes"])
        sizes["fixed"] = tuple(tuple(s) for s in sizes.get("fixed", ()))
        if "native" in sizes:
            sizes["native"] = tuple(sizes["native"])
        values["sizes"] = SizeRules(**{k: v for k, v in sizes.items() if k in {f.name for f in fields(SizeRules)}})
    return Capabilities(**values)


async def request_to_wire(request: ImageRequest, options: Mapping[str, Any]) -> dict[str, Any]:
    """The request as the pool reads it: its generation fields, every image as a base64 data URL (a URL is
    downloaded here, through the safe fetcher), and ``options`` as the local backend's provider options."""

    async def image(value: ImageInput) -> str:
        return await adata_url(await load_bytes(value))

    body: dict[str, Any] = {name: getattr(request, name) for name in _WIRE_FIELDS}
    if request.init_image is not None:
        body["init_image"] = await image(request.init_image)
    if request.mask_image is not None:
        body["mask_image"] = await image(request.mask_image)
    body["controls"] = [{"kind": c.kind, "image": await image(c.image), "scale": c.scale, "start": c.start,
                         "end": c.end, "preprocess": c.preprocess} for c in request.controls]
    body["loras"] = [{"ref": r.ref, "weight": r.weight} for r in request.loras]
    body["embeddings"] = [{"ref": e.ref, "token": e.token} for e in request.embeddings]
    if request.ip_adapter is not None:
        ip = request.ip_adapter
        body["ip_adapter"] = {"ref": ip.ref, "image": await image(ip.image), "scale": ip.scale}
    body["provider_options"] = {"local": dict(options)} if options else {}
    return body


def request_from_wire(body: Any) -> ImageRequest:
    """The pool's reading of a wire request: validated like any request; an image given as a URL is refused."""
    if not isinstance(body, Mapping):
        raise InvalidRequestError("request must be a JSON object")
    request = ImageRequest.model_validate(dict(body))
    images = [request.init_image, request.mask_image, *(c.image for c in request.controls),
              request.ip_adapter.image if request.ip_adapter is not None else None]
    if any(i is not None and i.url is not None for i in images):
        raise InvalidRequestError("images must be sent inline (base64); the pool does not fetch URLs")
    return request


def error_to_wire(exc: ImageRouterError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body for ``exc``: its kind (one the provider maps back), message and code."""
    kind = next((name for name, (cls, _) in _ERRORS.items() if type(exc) is cls), None)
    if kind is None:
        kind = next((name for name, (cls, _) in _ERRORS.items() if isinstance(exc, cls)), "ProviderUnavailable")
    return _ERRORS[kind][1], {"error": {"kind": kind, "message": exc.message, "code": exc.code}}


def error_from_wire(status: int, body: Any, *, provider: str) -> ImageRouterError:
    """The router's error for a pool's error answer; an answer not in the pool's shape goes by its status."""
    err = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(err, Mapping) or err.get("kind") not in _ERRORS:
        return status_error(status, f"the pool answered HTTP {status}", provider=provider)
    cls = _ERRORS[str(err["kind"])][0]
    message = str(err.get("message") or f"HTTP {status}")[:500]
    code = err.get("code") if isinstance(err.get("code"), str) else None
    return cls(message, provider=provider, status_code=status, code=code)


# --- batching (in the replica) ------------------------------------------------------------------------------


def batch_key(request: ImageRequest, job: Job) -> tuple[Any, ...] | None:
    """What requests must share to run in one pipeline call, or None for one that runs alone."""
    if request.task != "txt2img" or request.loras or request.embeddings or request.ip_adapter is not None:
        return None
    if {"embeddings", "ip_adapter"} & set(request.provider_options.get("local", {})):
        return None
    e = job.entry
    # SDXL encodes a missing negative prompt as zeros and an empty one as text: they do not mix.
    return (e.name, job.width, job.height, job.steps, job.guidance, job.scheduler, job.safety_checker,
            job.negative_prompt is None)


def call_batch(entry_pipe: Any, jobs: Sequence[Job], cancel: threading.Event) -> list[JobResult]:
    """Run compatible ``jobs`` as one pipeline call: a prompt and a CPU generator per image, each image made as
    its job would make it alone (same seed, same noise). The device time is shared by images."""
    import torch

    first = jobs[0]
    family = first.entry.family
    pipe = copy.copy(entry_pipe)  # a per-call view: shared modules, own scheduler (see providers.local.worker)
    pipe.scheduler = make_scheduler(entry_pipe.scheduler, None if family == "flux" else first.scheduler)
    if not first.safety_checker and getattr(entry_pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    deadline = max(j.deadline for j in jobs)
    steps_run = 0

    def on_step_end(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        nonlocal steps_run
        steps_run = i + 1
        if cancel.is_set() or time.monotonic() > deadline:
            p._interrupt = True
        return kwargs

    kwargs: dict[str, Any] = {
        "prompt": [j.prompt for j in jobs for _ in j.seeds],
        "generator": [torch.Generator("cpu").manual_seed(s) for j in jobs for s in j.seeds],
        "num_images_per_prompt": 1, "num_inference_steps": first.steps, "guidance_scale": first.guidance,
        "width": first.width, "height": first.height, "output_type": "pil", "callback_on_step_end": on_step_end,
    }
    if first.negative_prompt is not None and family != "flux":
        kwargs["negative_prompt"] = [j.negative_prompt or "" for j in jobs for _ in j.seeds]
    images, flags, seconds = run_timed(pipe, kwargs, cancel=cancel, deadline=deadline, steps_run=lambda: steps_run)
    results, at = [], 0
    for job in jobs:
        k = len(job.seeds)
        results.append(JobResult(images[at:at + k], flags[at:at + k], seconds * k / len(images), steps_run,
                                 type(pipe.scheduler).__name__))
        at += k
    return results


@dataclass(slots=True)
class _Item:
    """One request waiting for a batch: its job, options, and the key it batches by."""

    request: ImageRequest
    job: Job
    key: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class BatchInfo:
    """Which pipeline call served a request: its id, how many requests and images it ran."""

    id: int
    requests: int
    images: int


class GpuPool:
    """One Ray Serve replica: a :class:`LocalProvider` on this replica's device, batching compatible requests.

    Deploy it with :func:`build_app` (this class is a plain class; Serve wraps it there, so importing this
    module does not import Ray). ``local_options`` are :class:`LocalProvider` keyword arguments.
    """

    def __init__(self, catalog: str | Mapping[str, Any], *, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.05, max_batch_images: int = 16,
                 local_options: Mapping[str, Any] | None = None, token: str | None = None) -> None:
        from ray import serve

        from providers.local.provider import LocalProvider

        self._token = f"Bearer {token}".encode() if token else None
        self.local: LocalProvider = LocalProvider(catalog, **dict(local_options or {}))
        self.max_batch_images = max_batch_images
        self._ids = itertools.count(1)
        self.batch_sizes: list[int] = []
        """The number of requests of each pipeline call this replica ran, in order."""
        # Serve's own logger: its lines land in the replica's log (https://docs.ray.io/en/latest/serve/monitoring.html).
        self._logger = logging.getLogger("ray.serve")

        async def run(items: list[_Item]) -> list[tuple[JobResult, BatchInfo] | ImageRouterError]:
            return await self._run_batch(items)

        # https://docs.ray.io/en/latest/serve/api/doc/ray.serve.batch.html: calls of ``self._batched(item)`` are
        # queued until max_batch_size arrive or batch_wait_timeout_s passes; ``run`` gets them as one list.
        self._batched = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)(run)

    async def __call__(self, request: Any) -> Any:
        """The HTTP ingress: a Starlette request in, a JSON response out."""
        from starlette.responses import JSONResponse, Response

        path = request.url.path.rstrip("/")
        given = request.headers.get("authorization", "").encode()
        if self._token is not None and not hmac.compare_digest(given, self._token):
            return JSONResponse({"error": {"kind": "AuthenticationError", "message": "a token is required",
                                           "code": "unauthorized"}}, status_code=401)
        if request.method == "GET" and path == "/v1/models":
            return JSONResponse(self.describe())
        if request.method == "POST" and path == "/v1/generate":
            try:
                try:
                    body = await request.json()
                except ValueError:
                    raise InvalidRequestError("the body is not JSON") from None
                answer = await self.generate(body)
                # megabytes of base64 images: serialized off the replica's event loop, where batches form
                return Response(await asyncio.to_thread(json.dumps, answer), media_type="application/json")
            except ImageRouterError as exc:
                status, payload = error_to_wire(exc)
                return JSONResponse(payload, status_code=status)
        return JSONResponse({"error": {"kind": "InvalidRequestError", "message": f"no route {request.method} "
                                       f"{path or '/'}", "code": "not_found"}}, status_code=404)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/models`` answers: each model's capabilities and observed speed, and the device."""
        local = self.local
        models = {}
        for name in local.models():
            entry = local.catalog.get(name) if name in local.catalog else None
            models[name] = {"capabilities": caps_to_wire(local.capabilities(name)),
                            "family": entry.family if entry is not None else None,
                            "native": list(entry.native) if entry is not None else None,
                            "default_steps": entry.steps if entry is not None else None,
                            "seconds_per_step": local.seconds_per_step(name) if entry is not None else None}
        return {"models": models, "options": sorted(local.provider_option_names()), "device": local.device,
                "batch_sizes": self.batch_sizes[-100:]}

    async def generate(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """One ``POST /v1/generate``: batched with compatible requests, or alone."""
        model, timeout_s = body.get("model"), body.get("timeout_s", 600)
        if not isinstance(model, str) or isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
            raise InvalidRequestError("the body needs model (a name) and timeout_s (seconds)")
        request = request_from_wire(body.get("request"))
        if model in self.local.catalog:
            job = self._job(request, model, float(timeout_s))
            key = batch_key(request, job)
            if key is not None:
                outcome = await self._batched(_Item(request, job, key))
                if isinstance(outcome, ImageRouterError):
                    raise outcome
                result, info = outcome
                return await self._answer(request, model, job, result, info)
        response = await self.local.generate(request, model, timeout_s=float(timeout_s))
        info = BatchInfo(next(self._ids), 1, len(response.images))
        self._log(info)
        return await response_to_wire(response, info)

    def _job(self, request: ImageRequest, model: str, timeout_s: float) -> Job:
        """The txt2img job ``LocalProvider.generate`` would build for ``request`` (its checks included)."""
        local, entry = self.local, self.local.catalog.get(model)
        size = local.plan(request, model).size
        if size.width % entry.multiple or size.height % entry.multiple:
            raise InvalidRequestError(f"{model}: width and height must be multiples of {entry.multiple} "
                                      f"(got {size.width}x{size.height})")
        options = request.provider_options.get("local", {})
        local._wants_watermark(options)  # a refused opt-out fails before any device time is spent
        seed = request.seed if request.seed is not None else random.randrange(2**32 - request.n)
        return Job(entry=entry, task="txt2img", prompt=request.prompt, width=size.width, height=size.height,
                   steps=request.steps or entry.steps,
                   guidance=request.guidance_scale if request.guidance_scale is not None else entry.guidance,
                   seeds=tuple(seed + i for i in range(request.n)), negative_prompt=request.negative_prompt,
                   scheduler=request.scheduler,
                   safety_checker=bool(options.get("safety_checker", local.safety_checker)),
                   deadline=time.monotonic() + timeout_s)

    async def _run_batch(self, items: list[_Item]) -> list[tuple[JobResult, BatchInfo] | ImageRouterError]:
        """Serve's batch: grouped by key, each group (up to ``max_batch_images`` images) one pipeline call."""
        out: list[tuple[JobResult, BatchInfo] | ImageRouterError | None] = [None] * len(items)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.key, []).append(i)
        for members in groups.values():
            for chunk in _chunks(members, [len(items[i].job.seeds) for i in members], self.max_batch_images):
                jobs = [items[i].job for i in chunk]
                info = BatchInfo(next(self._ids), len(jobs), sum(len(j.seeds) for j in jobs))
                try:
                    results = await self._device_batch(jobs)
                except ImageRouterError as exc:
                    for i in chunk:
                        out[i] = exc
                    continue
                self._log(info)
                for i, result in zip(chunk, results, strict=True):
                    out[i] = (result, info)
        return [o if o is not None else ProviderUnavailable("not run", provider="local") for o in out]

    async def _device_batch(self, jobs: list[Job]) -> list[JobResult]:
        """``jobs`` on the replica's device thread, with the model's adapters off (the batch is plain)."""
        entry = jobs[0].entry

        def work(cache: Any, cancel: threading.Event) -> list[JobResult]:
            pipe = cache.for_task(entry, "txt2img", ())
            base = cache.base(entry)
            cache.adapters(entry).activate(base, ())
            cache.embeddings(entry).activate(base, (), entry.family)
            cache.ip_slot(entry).activate(base, None, 1.0, cache.dtype_for(entry))
            if len(jobs) == 1:  # the local backend's own call: a lone request gets its bytes exactly
                return [call_pipeline(pipe, jobs[0], cancel, base)]
            return call_batch(pipe, jobs, cancel)

        local = self.local
        try:
            return await local.worker.submit(work)
        except ImageRouterError:
            raise
        except ValueError as exc:
            raise InvalidRequestError(f"{entry.name}: {exc}"[:500], provider="local") from None
        except Exception as exc:
            raise ProviderUnavailable(f"{entry.name} failed on {local.device}: {type(exc).__name__}: {exc}"[:500],
                                      provider="local") from None

    async def _answer(self, request: ImageRequest, model: str, job: Job, result: JobResult,
                      info: BatchInfo) -> dict[str, Any]:
        """A batched job's response, finished the way ``LocalProvider.generate`` finishes its own."""
        local = self.local
        options = request.provider_options.get("local", {})
        local._observe(model, result, job)
        marked, note = await local._watermark(result.images, options)
        fmt = request.output_format
        blobs = await asyncio.gather(*(asyncio.to_thread(encode, img, fmt, png_compress_level=local.png_compress_level)
                                       for img in marked))
        images = [GeneratedImage(data=blob, mime=_MIME[fmt], width=img.width, height=img.height, seed=s, nsfw=flag)
                  for blob, img, s, flag in zip(blobs, marked, job.seeds, result.nsfw, strict=True)]
        quantity = Decimal(f"{result.seconds:.3f}")
        billing = Billing(cost_usd=Decimal(0), unit="gpu_seconds", quantity=quantity,
                          details={"device": local.device, "steps": result.steps_run, "scheduler": result.scheduler,
                                   "watermark": note})
        warnings = local.plan(request, model).warnings
        if note == "unavailable":
            warnings += ("not watermarked: invisible-watermark is not installed on the pool",)
        return await response_to_wire(ProviderResponse(images=images, model=model, billing=billing,
                                                       warnings=warnings), info)

    def _log(self, info: BatchInfo) -> None:
        self.batch_sizes.append(info.requests)
        self._logger.info("batch %d: %d request(s), %d image(s)", info.id, info.requests, info.images)


def _chunks(members: list[int], sizes: list[int], cap: int) -> Iterable[list[int]]:
    """``members`` in order, cut so that each chunk's ``sizes`` add up to at most ``cap`` (one member at least)."""
    chunk: list[int] = []
    total = 0
    for member, size in zip(members, sizes, strict=True):
        if chunk and total + size > cap:
            yield chunk
            chunk, total = [], 0
        chunk.append(member)
        total += size
    if chunk:
        yield chunk


async def response_to_wire(response: ProviderResponse, info: BatchInfo) -> dict[str, Any]:
    """A response as JSON: images in base64 (encoded off the event loop), the device seconds (the provider prices
    them), the batch."""
    encoded = await asyncio.gather(*(asyncio.to_thread(base64.b64encode, i.data) for i in response.images))
    return {
        "model": response.model,
        "images": [{"data": data.decode("ascii"), "mime": i.mime, "width": i.width, "height": i.height,
                    "seed": i.seed, "nsfw": i.nsfw} for data, i in zip(encoded, response.images, strict=True)],
        "gpu_seconds": str(response.billing.quantity),
        "details": response.billing.details,
        "warnings": list(response.warnings),
        "batch": {"id": info.id, "requests": info.requests, "images": info.images},
    }


# --- deploying -------------------------------------------------------------------------------------------------


def deployment_options(gpus: int, *, max_batch_size: int = 8) -> dict[str, Any]:
    """Serve options: one replica per GPU (``num_gpus: 1`` each, autoscaled between 1 and ``gpus`` on queue
    length), or one CPU replica where there is no GPU.

    Autoscaling keeps about one full batch per replica (``target_ongoing_requests``); each replica accepts two
    batches' worth (one running, one forming), the rest wait in Serve's queue.
    https://docs.ray.io/en/latest/serve/advanced-guides/advanced-autoscaling.html
    """
    actor = {"num_gpus": 1} if gpus > 0 else {"num_cpus": 1}
    return {"ray_actor_options": actor, "max_ongoing_requests": 2 * max_batch_size,
            "autoscaling_config": {"min_replicas": 1, "initial_replicas": max(1, gpus), "max_replicas": max(1, gpus),
                                   "target_ongoing_requests": max_batch_size}}


def build_app(catalog: str | Path | Mapping[str, Any], *, gpus: int | None = None, max_batch_size: int = 8,
              batch_wait_timeout_s: float = 0.05, max_batch_images: int = 16,
              local_options: Mapping[str, Any] | None = None, token: str | None = None) -> Any:
    """The Serve application for ``catalog`` (a YAML path, read on each replica, or a mapping). ``gpus``
    defaults to the connected Ray cluster's GPU count."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConfigurationError("the GPU pool needs Ray Serve: pip install 'pixroute[ray]'") from None

    if gpus is None:
        gpus = int(ray.cluster_resources().get("GPU", 0))
    source: str | dict[str, Any] = str(Path(catalog).resolve()) if isinstance(catalog, (str, Path)) else dict(catalog)
    deployment = serve.deployment(name="GpuPool", **deployment_options(gpus, max_batch_size=max_batch_size))(GpuPool)
    return deployment.bind(source, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                           max_batch_images=max_batch_images, local_options=dict(local_options or {}), token=token)


def serve_gpu(catalog_path: str | Path, host: str = "127.0.0.1", port: int = 8100, *, address: str | None = None,
              max_batch_size: int = 8, batch_wait_timeout_s: float = 0.05, token: str | None = None,
              allow_open: bool = False, blocking: bool = True) -> str:
    """Start the pool for ``catalog_path`` on Ray (``address``/``$RAY_ADDRESS``, else a local instance) and
    serve it at ``http://host:port``; returns that URL (blocks until interrupted when ``blocking``).

    ``token`` (default ``$IMAGEROUTER_RAY_TOKEN``) is the bearer token clients must send; a host other than
    loopback is refused without one unless ``allow_open``."""
    token = token if token is not None else os.environ.get(ENV_TOKEN) or None
    if not token and not allow_open and not is_loopback_host(host):
        raise ConfigurationError(f"refusing to serve the GPU pool on {host} without a token: set {ENV_TOKEN}, "
                                 "or pass --allow-open to serve it to anyone")
    Catalog.from_yaml(catalog_path)  # a bad catalog fails here, not in every replica
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ConfigurationError("the GPU pool needs Ray Serve: pip install 'pixroute[ray]'") from None
    ray.init(address=address or os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    app = build_app(catalog_path, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                    token=token)
    url = f"http://{host}:{port}"
    serve.run(app, name="pixroute-gpu", route_prefix="/", blocking=blocking)
    return url




# --- the provider ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """What the pool said it has, and when (``time.monotonic()``)."""

    models: dict[str, dict[str, Any]]
    options: frozenset[str]
    device: str
    fetched_at: float

    @classmethod
    def parse(cls, body: Any, fetched_at: float) -> PoolInfo:
        if not isinstance(body, Mapping) or not isinstance(body.get("models"), Mapping):
            raise ValueError("no 'models' object")
        models = {str(k): dict(v) for k, v in body["models"].items() if isinstance(v, Mapping)}
        for name, m in models.items():
            if not isinstance(m.get("capabilities"), Mapping):
                raise ValueError(f"model {name}: no capabilities")
            m["caps"] = caps_from_wire(m["capabilities"])
        return cls(models, frozenset(str(o) for o in body.get("options", ())), str(body.get("device", "")),
                   fetched_at)


class RayPoolProvider(Provider):
    """A Ray Serve GPU pool (:func:`serve_gpu`) at ``url`` (default ``$IMAGEROUTER_RAY_URL``).

    ``usd_per_gpu_hour`` prices the device seconds the pool reports (default
    ``$IMAGEROUTER_RAY_USD_PER_GPU_HOUR``, else 0); ``regions`` say where the pool runs (default
    ``$IMAGEROUTER_RAY_REGIONS``, comma-separated, else ``local``). The pool's model list is cached for
    ``refresh_ttl_s``. Request options for the pool's local backend go in ``provider_options[<this name>]``.
    ``token`` (default ``$IMAGEROUTER_RAY_TOKEN``) is sent as a bearer token where the pool asks for one.
    """

    kind = "ray"
    retry_timeouts = False  # its time is your own compute: a timeout falls back, not retried

    def __init__(self, url: str | None = None, *, name: str | None = None, prices: PriceTable | None = None,
                 usd_per_gpu_hour: float | Decimal | str | None = None, regions: Iterable[str] | str | None = None,
                 http_timeout_s: float = 30.0, refresh_ttl_s: float = 300.0, retry_s: float = 5.0,
                 token: str | None = None) -> None:
        super().__init__(name=name, prices=prices)
        self.token = ApiKey(token, ENV_TOKEN)
        raw = url if url is not None else os.environ.get(ENV_URL)
        self.url = raw.rstrip("/") if raw else None
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"the pool's url must be http(s)://host:port, got {self.url!r}")
        rate = usd_per_gpu_hour if usd_per_gpu_hour is not None else os.environ.get(ENV_RATE) or 0
        self.usd_per_gpu_hour = Decimal(str(rate))
        if regions is None:
            regions = os.environ.get(ENV_REGIONS) or "local"
        if isinstance(regions, str):
            regions = regions.split(",")
        self.regions = frozenset(r.strip().lower() for r in regions if r.strip())
        self.http_timeout_s, self.refresh_ttl_s, self.retry_s = http_timeout_s, refresh_ttl_s, retry_s
        self._info: PoolInfo | None = None
        self._error: str | None = None
        self._failed_at = -float("inf")
        self._refreshing: tuple[asyncio.AbstractEventLoop, asyncio.Task[PoolInfo]] | None = None
        self._http: httpx.AsyncClient | None = None

    # --- what the pool has -------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        token = self.token.value()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.url or "", timeout=self.http_timeout_s, trust_env=False,
                                           follow_redirects=False, headers=self._headers())
        return self._http

    async def warm(self) -> list[str]:
        """Read the pool's models and capabilities now, so the first request is routed with them."""
        await self.refresh()
        return list(self.models())

    async def refresh(self) -> PoolInfo:
        """Read the pool's ``GET /v1/models`` now (one read shared by every caller waiting on it)."""
        if not self.url:
            raise InvalidRequestError(self.configuration_problem() or "not configured", provider=self.name)
        loop = asyncio.get_running_loop()
        held = self._refreshing
        if held is None or held[0] is not loop or held[1].done():
            held = (loop, loop.create_task(self._fetch_info()))
            self._refreshing = held
        return await asyncio.shield(held[1])

    async def _fetch_info(self) -> PoolInfo:
        try:
            response = await self._client().get("/v1/models")
            if response.status_code != 200:
                raise status_error(response.status_code, f"/v1/models answered HTTP {response.status_code}",
                                   provider=self.name)
            info = PoolInfo.parse(response.json(), time.monotonic())
        except ImageRouterError as exc:
            self._error, self._failed_at = exc.message, time.monotonic()
            raise
        except httpx.HTTPError as exc:
            err = connection_error(exc, provider=self.name)
            self._error, self._failed_at = err.message, time.monotonic()
            raise err from None
        except (ValueError, TypeError, KeyError) as exc:
            self._error, self._failed_at = f"unreadable /v1/models ({exc})"[:300], time.monotonic()
            raise MalformedResponse(self._error, provider=self.name) from None
        self._info, self._error = info, None
        return info

    def _refresh_soon(self) -> None:
        """Start a background read when the list is stale; outside an event loop, read it now."""
        info = self._info
        fresh = info is not None and time.monotonic() - info.fetched_at <= self.refresh_ttl_s
        if not self.url or fresh or time.monotonic() - self._failed_at < self.retry_s:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            try:
                with httpx.Client(base_url=self.url, timeout=min(self.http_timeout_s, 10.0), trust_env=False,
                                  headers=self._headers()) as c:
                    response = c.get("/v1/models")
                response.raise_for_status()
                self._info, self._error = PoolInfo.parse(response.json(), time.monotonic()), None
            except (httpx.HTTPError, ValueError, TypeError, KeyError) as exc:
                self._error = f"could not read /v1/models ({type(exc).__name__})"
                self._failed_at = time.monotonic()
            return
        held = self._refreshing
        if held is not None and held[0] is loop and not held[1].done():
            return
        task = loop.create_task(self._fetch_info())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its failure is kept in self._error
        self._refreshing = (loop, task)

    def configuration_problem(self) -> str | None:
        if not self.url:
            return f"not configured: set {ENV_URL} to a GPU pool (pixroute serve-gpu), e.g. http://127.0.0.1:8100"
        self._refresh_soon()
        if self._info is None and self._error is not None:
            return f"GPU pool at {self.url} not reached: {self._error}"
        return None

    def models(self) -> Sequence[str]:
        self._refresh_soon()
        return list(self._info.models) if self._info is not None else []

    def _model(self, model: str) -> dict[str, Any]:
        info = self._info
        if info is None or model not in info.models:
            raise InvalidRequestError(f"the GPU pool has no model {model!r}", provider=self.name)
        return info.models[model]

    def capabilities(self, model: str) -> Capabilities:
        caps: Capabilities = self._model(model)["caps"]
        return replace(caps, regions=self.regions)

    def provider_option_names(self) -> frozenset[str]:
        return self._info.options if self._info is not None else frozenset()

    # --- cost ------------------------------------------------------------------------------------------------------

    def _cost(self, gpu_seconds: Decimal) -> Decimal:
        return gpu_seconds * self.usd_per_gpu_hour / Decimal(3600)

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        m = self._model(model)
        size = self.plan(request, model).size
        native = m.get("native") or [size.width, size.height]
        per_step = m.get("seconds_per_step") or 0.1  # the pool reports its observed speed, or its prior
        steps = request.steps or m.get("default_steps") or 30
        if request.init_image is not None and request.upscale is None:
            default = 1.0 if request.mask_image is not None else 0.8
            steps = max(1, int(steps * (request.strength if request.strength is not None else default)))
        seconds = float(per_step) * int(steps) * request.n * size.width * size.height / (native[0] * native[1])
        quantity = Decimal(f"{seconds:.3f}")
        return Estimate(self._cost(quantity), seconds, unit="gpu_seconds", quantity=quantity)

    # --- the call -------------------------------------------------------------------------------------------------

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        if self._info is None:
            await self.refresh()
        plan: Plan = self.plan(request, model)
        body = {"model": model, "timeout_s": timeout_s,
                "request": await request_to_wire(request, request.provider_options.get(self.name, {}))}
        try:
            response = await self._client().post("/v1/generate", json=body, timeout=timeout_s + 5.0)
        except httpx.HTTPError as exc:
            raise connection_error(exc, provider=self.name) from None
        try:  # megabytes of base64 images: parsed off the event loop
            answer = await asyncio.to_thread(json.loads, response.content)
        except ValueError:
            answer = None
        if response.status_code != 200:
            raise error_from_wire(response.status_code, answer, provider=self.name)
        if not isinstance(answer, Mapping) or not isinstance(answer.get("images"), list):
            raise MalformedResponse("the pool answered a body without images", provider=self.name)
        images = [await self._image(i) for i in answer["images"]]
        try:
            quantity = Decimal(str(answer["gpu_seconds"]))
        except (KeyError, ArithmeticError):
            quantity = Decimal(-1)
        if not quantity.is_finite() or quantity < 0:
            raise MalformedResponse("the pool's answer has no valid gpu_seconds", provider=self.name)
        details = dict(answer.get("details") or {}) | {"batch": answer.get("batch")}
        billing = Billing(cost_usd=self._cost(quantity), unit="gpu_seconds", quantity=quantity,
                          price_table_version=f"ray:{self.usd_per_gpu_hour}/gpu-hour", details=details)
        warnings = tuple(dict.fromkeys(plan.warnings + tuple(str(w) for w in answer.get("warnings") or ())))
        return ProviderResponse(images=images, model=model, billing=billing, warnings=warnings)

    async def _image(self, item: Any) -> GeneratedImage:
        try:
            data = await asyncio.to_thread(base64.b64decode, item["data"], validate=True)
        except (KeyError, TypeError, ValueError):
            raise MalformedResponse("the pool sent an image that is not base64", provider=self.name) from None
        mime, width, height = await output_image(data, provider=self.name)
        seed = item.get("seed")
        return GeneratedImage(data=data, mime=mime, width=width, height=height,
                              seed=seed if isinstance(seed, int) else None, nsfw=bool(item.get("nsfw")))

    async def aclose(self) -> None:
        held, self._refreshing = self._refreshing, None
        if held is not None and not held[1].done():
            held[1].cancel()
            with contextlib.suppress(BaseException):
                await held[1]
        if self._http is not None:
            await self._http.aclose()
            self._http = None
