"""A ComfyUI server as a provider (the Canvas rung): its own HTTP + websocket API, two ways to use it.

1. **Built-in graphs** from the unified request, core nodes only: a checkpoint (``CheckpointLoaderSimple``)
   is a model; LoRAs (``LoraLoader``, chained, weighted), prompts (``CLIPTextEncode``), ControlNets
   (``ControlNetLoader`` + ``ControlNetApplyAdvanced``, chained; ``canny`` preprocessed by the core ``Canny``
   node), txt2img (``EmptyLatentImage``, ``batch_size`` = n), img2img (``LoadImage`` + ``VAEEncode``,
   ``RepeatLatentBatch`` for n), inpaint (+ ``LoadImageMask`` + ``SetLatentNoiseMask``), ``KSampler`` (seed,
   steps, cfg, sampler/scheduler, denoise = strength), ``VAEDecode``, ``SaveImage``.
2. **Saved workflows**: API-format JSON files (ComfyUI's "Export (API)") in ``workflows_dir``, each routable as
   the model ``workflow:<file stem>``. Its ``imagerouter`` key (or a sidecar ``<stem>.imagerouter.json``)
   binds request fields to node inputs::

       "imagerouter": {"inputs": {"prompt": "6.text", "negative_prompt": "7.text", "seed": "3.seed",
                                  "width": "5.width", "height": "5.height", "n": "5.batch_size",
                                  "image": "10.image", "mask": "11.image"},
                       "params": {"style_strength": "14.strength"}, "outputs": ["9"], "quality": 0.7}

   A target is ``"<node id>.<input name>"``, ``{"node": …, "input": …}`` or a list of them. Fields:
   ``prompt negative_prompt seed steps guidance_scale strength width height n image mask control_image
   control_scale``; ``params`` are named inputs set from ``provider_options={"comfyui": {"params": {…}}}``.
   ``outputs`` lists the nodes whose images are the result (default: every saved image). Images are uploaded
   (``POST /upload/image``) and their names set on the bound ``LoadImage`` / ``LoadImageMask`` nodes.

A call: connect ``/ws?clientId=…``, ``POST /prompt`` with that client id, follow ``execution_start``,
``progress`` (→ :mod:`router.progress` events), ``executed``, ``execution_success`` / ``execution_error`` /
``execution_interrupted`` and the final ``executing`` with ``node: null``; then ``GET /history/{id}`` and each
output through ``GET /view`` from the configured server only (never a URL found in an answer), through the one
typed decode of provider outputs. If the websocket drops, the history is polled instead. At the deadline (or
when cancelled) a queued prompt is deleted from the queue and a running one interrupted (``POST /interrupt``
with its ``prompt_id``), then :class:`~router.errors.ProviderTimeout` is raised.

What the server has comes from ``GET /object_info`` (nodes, the checkpoint, LoRA and ControlNet lists, samplers,
schedulers), cached for ``refresh_ttl_s`` and refreshed in the background: ``models()`` and ``capabilities()``
never wait on the network inside an event loop. ``await provider.refresh()`` fetches it at once (outside an
event loop, the first ``models()`` fetches it synchronously).

Cost = GPU-seconds × ``usd_per_gpu_hour``, the seconds from the server's own ``execution_start`` to
``execution_success`` timestamps (the local clock where a server sends none); a failed or interrupted run is
billed the time it used. Errors: ``node_errors`` → InvalidRequestError (the next candidate is tried);
``execution_error`` → :class:`ExecutionFailed` (falls back), an out-of-memory one → ProviderUnavailable;
server down → ProviderUnavailable; deadline → interrupt + ProviderTimeout.

A checkpoint's family (``sd15``, ``sdxl``, ``sd3``, ``flux``) comes from ``families={file: family}`` or, failing
that, its file name; it sets the native size, the speed prior, the ControlNets that suit it and the skill profile
routing scores it by (``providers/profiles/comfyui.toml``, read through :attr:`ComfyUIProvider.catalog`).

Outputs carry the local backend's invisible watermark (DWT-DCT, :mod:`providers.local.watermark`): the server is
the operator's own hardware, so the mark is the operator's to set (``watermark=False`` turns it off; a request
cannot). Each output is then fetched losslessly, marked and encoded in the asked format in a worker thread.

The websocket client is ``websockets`` (``pip install 'pixroute[comfyui]'``), imported on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from providers.base import Billing, Capabilities, Estimate, Plan, Provider, ProviderResponse
from providers.vendor import charged, connection_error, output_image, status_error
from router.errors import (
    ExecutionFailed,  # defined here first: still importable from this module
    ImageRouterError,
    InvalidRequestError,
    MalformedResponse,
    ProviderTimeout,
    ProviderUnavailable,
)
from router.geometry import SizeRules, plan_size
from router.images import ImageDecodeError, decode, encode, load_bytes, mask_to_alpha_repaint, mask_to_white_repaint
from router.prices import PriceTable
from router.progress import ProgressCallback, ProgressEvent, StatusReporter, current_sink
from router.request import CONTROL_KINDS, ImageRequest, Task
from router.result import GeneratedImage

if TYPE_CHECKING:
    from PIL import Image as PILImage

log = logging.getLogger("imagerouter")

ENV_URL = "IMAGEROUTER_COMFYUI_URL"
ENV_WORKFLOWS = "IMAGEROUTER_COMFYUI_WORKFLOWS"
ENV_REGIONS = "IMAGEROUTER_COMFYUI_REGIONS"
ENV_RATE = "IMAGEROUTER_COMFYUI_USD_PER_GPU_HOUR"
WORKFLOW_PREFIX = "workflow:"
SIDECAR_SUFFIX = ".imagerouter.json"
FIELDS = frozenset({"prompt", "negative_prompt", "seed", "steps", "guidance_scale", "strength", "width", "height",
                    "n", "image", "mask", "control_image", "control_scale"})
_OPTIONS = frozenset({"sampler_name", "scheduler", "params", "canny_low", "canny_high"})
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# The request's scheduler names as ComfyUI's (sampler_name, scheduler) pairs (comfy/samplers.py names).
SAMPLERS: dict[str, tuple[str, str]] = {
    "dpmpp_2m_karras": ("dpmpp_2m", "karras"),
    "euler": ("euler", "normal"),
    "euler_a": ("euler_ancestral", "normal"),
    "unipc": ("uni_pc", "normal"),
    "ddim": ("ddim", "ddim_uniform"),
    "lcm": ("lcm", "sgm_uniform"),
}
FAMILIES: tuple[str, ...] = ("sd15", "sdxl", "sd3", "flux")
"""The checkpoint families the provider knows; each has a profile ``comfyui/<family>`` in the skill table."""
_FAMILY_TOKENS = (("flux", ("flux",)), ("sd3", ("sd3",)), ("sdxl", ("sdxl", "sd_xl", "_xl", "-xl", "xl_", "xl-")),
                  ("sd15", ("sd15", "sd1.5", "sd-1-5", "v1-5", "v1_5", "sd_1.5", "control_v11")))
_NATIVE = {"flux": (1024, 1024), "sd3": (1024, 1024), "sdxl": (1024, 1024), "sd15": (512, 512)}
_QUALITY = {"flux": 0.85, "sd3": 0.7, "sdxl": 0.65, "sd15": 0.45}
_S_PER_STEP = {"flux": 0.5, "sd3": 0.25, "sdxl": 0.12, "sd15": 0.05}  # per image at native size, before observed
_CONTROL_TOKENS: dict[str, tuple[str, ...]] = {
    "canny": ("canny",), "depth": ("depth",), "pose": ("openpose", "pose"), "scribble": ("scribble",),
    "lineart_anime": ("lineart_anime", "anime"), "lineart": ("lineart",), "softedge": ("softedge", "hed", "pidi"),
    "seg": ("seg",), "normal": ("normal",), "tile": ("tile",), "mlsd": ("mlsd",), "shuffle": ("shuffle",),
}
_PASS_THROUGH = frozenset({"tile", "shuffle"})  # kinds whose map is the image itself
_TXT2IMG_NODES = frozenset({"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
                            "SaveImage"})
_DEADLINE_MARGIN_S = 1.0  # kept back from the call's time to interrupt the prompt and report
_CLEANUP_S = 5.0


# --- what the server has -------------------------------------------------------------------------------------


def _options(spec: Any) -> tuple[str, ...]:
    """A combo input's options: ``[[…], {…}]`` (classic nodes) or ``["COMBO", {"options": […]}]`` (V3 nodes)."""
    if isinstance(spec, list) and spec:
        if isinstance(spec[0], list):
            return tuple(str(o) for o in spec[0])
        if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
            return tuple(str(o) for o in spec[1].get("options", ()))
    return ()


def _input(info: Mapping[str, Any], node: str, name: str) -> Any:
    inputs = info.get(node, {}).get("input", {})
    return inputs.get("required", {}).get(name) or inputs.get("optional", {}).get(name)


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """The parts of ``GET /object_info`` routing needs."""

    nodes: frozenset[str]
    checkpoints: tuple[str, ...] = ()
    loras: tuple[str, ...] = ()
    controlnets: tuple[str, ...] = ()
    samplers: tuple[str, ...] = ()
    schedulers: tuple[str, ...] = ()
    max_batch: int = 1
    fetched_at: float = 0.0

    @classmethod
    def parse(cls, body: Any, fetched_at: float = 0.0) -> ServerInfo:
        if not isinstance(body, dict):
            raise ValueError("/object_info is not a JSON object")
        batch = _input(body, "EmptyLatentImage", "batch_size")
        top = batch[1].get("max", 1) if isinstance(batch, list) and len(batch) > 1 and isinstance(batch[1], dict) \
            else 1
        return cls(
            nodes=frozenset(body),
            checkpoints=_options(_input(body, "CheckpointLoaderSimple", "ckpt_name")),
            loras=_options(_input(body, "LoraLoader", "lora_name")),
            controlnets=_options(_input(body, "ControlNetLoader", "control_net_name")),
            samplers=_options(_input(body, "KSampler", "sampler_name")),
            schedulers=_options(_input(body, "KSampler", "scheduler")),
            max_batch=int(top) if isinstance(top, int | float) else 1,
            fetched_at=fetched_at,
        )


def family(name: str) -> str | None:
    """A model file's family from its name (``sd_xl_base_1.0`` → sdxl), or None when the name does not say."""
    low = name.lower()
    for fam, tokens in _FAMILY_TOKENS:
        if any(t in low for t in tokens):
            return fam
    return None


@dataclass(frozen=True, slots=True)
class FamilyEntry:
    """A model and its family, as :meth:`FamilyCatalog.get` gives them."""

    name: str
    family: str


class FamilyCatalog:
    """A provider's models that have a known family, in the local catalog's shape (``name in catalog``,
    ``catalog.get(name).family``), which is what the skill-profile lookup (:func:`router.profiles.profile_for`)
    and ``eval`` read."""

    __slots__ = ("_provider",)

    def __init__(self, provider: ComfyUIProvider) -> None:
        self._provider = provider

    def _family(self, name: object) -> str | None:
        return self._provider.model_family(name) if isinstance(name, str) else None

    def __contains__(self, name: object) -> bool:
        return self._family(name) is not None

    def get(self, name: str) -> FamilyEntry:
        fam = self._family(name)
        if fam is None:
            raise KeyError(name)
        return FamilyEntry(name, fam)


# --- saved workflows -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """One node input a request field is written to."""

    node: str
    input: str


@dataclass(frozen=True)
class Workflow:
    """An API-format graph with its declared inputs."""

    name: str
    graph: Mapping[str, Any]
    inputs: Mapping[str, tuple[Target, ...]]
    params: Mapping[str, tuple[Target, ...]] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    tasks: frozenset[Task] | None = None
    control_kinds: frozenset[str] = CONTROL_KINDS
    quality: float = 0.6
    size: tuple[int, int] | None = None
    seconds: float = 10.0
    path: Path | None = None

    @property
    def model(self) -> str:
        return WORKFLOW_PREFIX + self.name

    @classmethod
    def load(cls, path: Path) -> Workflow:
        """Read ``path`` (and its sidecar); raise ValueError saying what is wrong."""
        try:
            graph = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path.name}: not readable JSON ({exc})") from None
        if not isinstance(graph, dict):
            raise ValueError(f"{path.name}: not a JSON object")
        if "nodes" in graph and "links" in graph:
            raise ValueError(f"{path.name}: a UI-format workflow; save it with ComfyUI's 'Export (API)'")
        binding = graph.pop("imagerouter", None)
        sidecar = path.with_name(path.name.removesuffix(".json") + SIDECAR_SUFFIX)
        if sidecar.exists():
            try:
                binding = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{sidecar.name}: not readable JSON ({exc})") from None
        if not isinstance(binding, dict):
            raise ValueError(f"{path.name}: no bindings; add an 'imagerouter' key or {sidecar.name}")
        for node_id, node in graph.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                    or not isinstance(node.get("inputs", {}), dict):
                raise ValueError(f"{path.name}: node {node_id!r} is not an API-format node ({{class_type, inputs}})")
        name = path.name.removesuffix(".json")

        def targets(where: str, raw: Any) -> tuple[Target, ...]:
            items = raw if isinstance(raw, list) else [raw]
            out = []
            for item in items:
                if isinstance(item, str) and "." in item:
                    node, _, inp = item.rpartition(".")
                elif isinstance(item, dict) and isinstance(item.get("node"), str | int) and isinstance(
                        item.get("input"), str):
                    node, inp = str(item["node"]), item["input"]
                else:
                    raise ValueError(f"{path.name}: {where}: a target is '<node id>.<input>' or {{node, input}}")
                if node not in graph:
                    raise ValueError(f"{path.name}: {where}: no node {node!r} in the graph")
                if inp not in graph[node].get("inputs", {}):
                    raise ValueError(f"{path.name}: {where}: node {node} ({graph[node]['class_type']}) has no "
                                     f"input {inp!r}")
                out.append(Target(node, inp))
            return tuple(out)

        raw_inputs = binding.get("inputs", {})
        unknown = sorted(set(raw_inputs) - FIELDS) if isinstance(raw_inputs, dict) else []
        if not isinstance(raw_inputs, dict) or unknown:
            raise ValueError(f"{path.name}: inputs must map request fields ({', '.join(sorted(FIELDS))}) to "
                             f"targets{'; unknown: ' + ', '.join(unknown) if unknown else ''}")
        inputs = {k: targets(f"inputs.{k}", v) for k, v in raw_inputs.items()}
        params = {k: targets(f"params.{k}", v) for k, v in (binding.get("params") or {}).items()}
        outputs = tuple(str(o) for o in binding.get("outputs", ()))
        for o in outputs:
            if o not in graph:
                raise ValueError(f"{path.name}: outputs: no node {o!r} in the graph")
        tasks = binding.get("tasks")
        size = binding.get("size")
        return cls(
            name=name, graph=graph, inputs=inputs, params=params, outputs=outputs,
            tasks=frozenset(tasks) if tasks else None,
            control_kinds=frozenset(binding.get("control_kinds", CONTROL_KINDS)),
            quality=float(binding.get("quality", 0.6)),
            size=(int(size[0]), int(size[1])) if isinstance(size, list) and len(size) == 2 else _graph_size(graph),
            seconds=float(binding.get("seconds", 10.0)),
            path=path,
        )


def _graph_size(graph: Mapping[str, Any]) -> tuple[int, int] | None:
    """The size a workflow makes as saved: the first node with constant ``width`` and ``height``."""
    for node in graph.values():
        inputs = node.get("inputs", {})
        w, h = inputs.get("width"), inputs.get("height")
        if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
            return w, h
    return None


def load_workflows(folder: Path | None) -> tuple[dict[str, Workflow], dict[str, str]]:
    """Every workflow in ``folder`` by name, and why each one that could not be loaded was not."""
    found: dict[str, Workflow] = {}
    broken: dict[str, str] = {}
    if folder is None or not folder.is_dir():
        return found, broken
    for path in sorted(folder.glob("*.json")):
        if path.name.endswith(SIDECAR_SUFFIX):
            continue
        try:
            wf = Workflow.load(path)
        except ValueError as exc:
            broken[path.name.removesuffix(".json")] = str(exc)
            log.warning("ComfyUI workflow not loaded: %s", exc)
            continue
        found[wf.name] = wf
    return found, broken


# --- the provider ----------------------------------------------------------------------------------------------


@dataclass
class _State:
    """Mutable state shared by a provider and its copies (the router copies providers to re-price them)."""

    info: ServerInfo | None = None
    error: str | None = None
    failed_at: float = -1e9
    refreshing: tuple[asyncio.AbstractEventLoop, asyncio.Task[ServerInfo]] | None = None
    http: httpx.AsyncClient | None = None
    caps: dict[str, Capabilities] = field(default_factory=dict)
    observed: dict[str, float] = field(default_factory=dict)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    workflows: dict[str, Workflow] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)


class _Deadline(Exception):
    """The call's time ran out while the server worked."""


@dataclass
class _Run:
    """One prompt's progress as the websocket reports it."""

    prompt_id: str = ""
    started_at: float | None = None  # the loop's clock at execution_start
    start_ts: int | None = None  # the server's timestamp (ms) on execution_start
    end_ts: int | None = None
    ended_at: float | None = None
    succeeded: bool = False
    done: bool = False
    executed: int = 0
    cached: list[str] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)

    def gpu_seconds(self, now: float) -> Decimal:
        if self.start_ts is not None and self.end_ts is not None:
            return Decimal(max(0, self.end_ts - self.start_ts)) / 1000
        if self.started_at is None:
            return Decimal(0)
        return Decimal(f"{max(0.0, (self.ended_at or now) - self.started_at):.3f}")


class ComfyUIProvider(Provider):
    """A ComfyUI server at ``url`` (default ``$IMAGEROUTER_COMFYUI_URL``).

    ``workflows_dir`` (default ``$IMAGEROUTER_COMFYUI_WORKFLOWS``) holds saved workflows; ``regions`` are
    where the server runs (default ``$IMAGEROUTER_COMFYUI_REGIONS``, comma-separated, else ``local``);
    ``usd_per_gpu_hour`` prices its GPU time (default ``$IMAGEROUTER_COMFYUI_USD_PER_GPU_HOUR``, else 0).
    ``controlnets`` maps a control kind to a ControlNet file on the server, where the file names do not
    say (``control_v11p_sd15_canny.pth`` says canny, for SD 1.5 checkpoints). ``models`` names checkpoints to
    offer before the server's list is first read. ``families`` declares checkpoints' (and workflows')
    families where the file names do not say (``{"dreamshaper_8.safetensors": "sd15"}``). Routing scores a
    model with a family by that family's skill profile (``comfyui/<family>``), as it does the local backend's
    models; ``quality`` sets the routing quality of a model without one (a policy's ``profiles:`` override,
    ``"comfyui/<file>": {family: sdxl, overall: 0.8}``, changes a profiled model's).

    Outputs carry an invisible watermark (``watermark_payload``, default the local backend's) unless
    ``watermark=False``; it is an operator setting, not a request option.
    """

    kind = "comfyui"
    retry_timeouts = False  # its time is your own compute: a timeout falls back, not retried

    def __init__(
        self,
        url: str | None = None,
        *,
        workflows_dir: str | os.PathLike[str] | None = None,
        regions: Iterable[str] | str | None = None,
        usd_per_gpu_hour: float | Decimal | str | None = None,
        name: str | None = None,
        prices: PriceTable | None = None,
        models: Sequence[str] = (),
        controlnets: Mapping[str, str] | None = None,
        quality: Mapping[str, float] | None = None,
        families: Mapping[str, str] | None = None,
        watermark: bool = True,
        watermark_payload: bytes | None = None,
        max_n: int = 8,
        max_loras: int = 8,
        max_side: int = 2048,
        default_steps: int = 20,
        default_cfg: float = 7.0,
        refresh_ttl_s: float = 300.0,
        retry_s: float = 5.0,
        http_timeout_s: float = 30.0,
        history_poll_s: float = 0.25,
        history_check_s: float = 10.0,
    ) -> None:
        super().__init__(name=name, prices=prices)
        raw_url = url if url is not None else os.environ.get(ENV_URL)
        self.url = raw_url.rstrip("/") if raw_url else None
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"ComfyUI url must be http(s)://host:port, got {self.url!r}")
        folder = workflows_dir if workflows_dir is not None else os.environ.get(ENV_WORKFLOWS)
        self.workflows_dir = Path(folder) if folder else None
        if regions is None:
            regions = os.environ.get(ENV_REGIONS) or "local"
        if isinstance(regions, str):
            regions = regions.split(",")
        self.regions = frozenset(r.strip().lower() for r in regions if r.strip())
        rate = usd_per_gpu_hour if usd_per_gpu_hour is not None else os.environ.get(ENV_RATE) or 0
        self.usd_per_gpu_hour = Decimal(str(rate))
        self.controlnets = dict(controlnets or {})
        unknown = sorted(set(self.controlnets) - CONTROL_KINDS)
        if unknown:
            raise ValueError(f"unknown control kinds {unknown}; use {', '.join(sorted(CONTROL_KINDS))}")
        self._declared = tuple(models)
        self._quality = dict(quality or {})
        self.families = dict(families or {})
        wrong = {k: v for k, v in self.families.items() if v not in FAMILIES}
        if wrong:
            raise ValueError(f"unknown families {wrong}; use {', '.join(FAMILIES)}")
        if not isinstance(watermark, bool):
            raise ValueError(f"watermark must be True or False, got {watermark!r}")
        if watermark_payload is not None and (not isinstance(watermark_payload, bytes) or len(watermark_payload) != 6):
            raise ValueError("watermark_payload must be 6 bytes (48 bits)")
        self.watermark = watermark
        self.watermark_payload = watermark_payload
        """None: the local backend's payload (:data:`providers.local.watermark.PAYLOAD`)."""
        self.max_n, self.max_loras, self.max_side = max_n, max_loras, max_side
        self.default_steps, self.default_cfg = default_steps, default_cfg
        self.refresh_ttl_s, self.retry_s = refresh_ttl_s, retry_s
        self.http_timeout_s, self.history_poll_s = http_timeout_s, history_poll_s
        self.history_check_s = history_check_s
        """A websocket quiet this long makes the history be read, in case a message was lost."""
        self._state = _State()
        self.reload_workflows()

    # --- configuration ----------------------------------------------------------------------------------------

    def reload_workflows(self) -> None:
        """Read ``workflows_dir`` again (files are read here, once, not on the request path)."""
        found, broken = load_workflows(self.workflows_dir)
        self._state.workflows, self._state.broken = found, broken
        self._state.caps.clear()

    def workflows(self) -> tuple[str, ...]:
        """The models the saved workflows are routed by: ``workflow:<name>``."""
        return tuple(wf.model for wf in self._state.workflows.values())

    def broken_workflows(self) -> dict[str, str]:
        """Workflow files in ``workflows_dir`` that could not be loaded, with what is wrong with each."""
        return dict(self._state.broken)

    def configuration_problem(self) -> str | None:
        if not self.url:
            return f"not configured: set {ENV_URL} to a ComfyUI server (e.g. http://127.0.0.1:8188)"
        if not _installed("websockets"):
            return "websockets is not installed: pip install 'pixroute[comfyui]'"
        self._refresh_soon()
        state = self._state
        if state.info is None and state.error is not None:
            return f"ComfyUI at {self.url} not reached: {state.error}"
        return None

    def provider_option_names(self) -> frozenset[str]:
        return _OPTIONS

    # --- what the server has ------------------------------------------------------------------------------------

    @property
    def info(self) -> ServerInfo | None:
        """The last ``/object_info`` read, or None before the first."""
        return self._state.info

    def _stale(self) -> bool:
        info = self._state.info
        return info is None or time.monotonic() - info.fetched_at > self.refresh_ttl_s

    def _client(self) -> httpx.AsyncClient:
        state = self._state
        if state.http is None:
            assert self.url is not None
            state.http = httpx.AsyncClient(base_url=self.url, timeout=self.http_timeout_s, trust_env=False,
                                           follow_redirects=False)
        return state.http

    async def warm(self) -> list[str]:
        """Read the server's nodes and models now, so the first request is routed with them."""
        if self.url:
            await self.refresh()
        return list(self.models())

    async def refresh(self) -> ServerInfo:
        """Read ``/object_info`` now (one read shared by every caller waiting on it)."""
        if not self.url:
            raise InvalidRequestError(self.configuration_problem() or "not configured", provider=self.name)
        loop = asyncio.get_running_loop()
        held = self._state.refreshing
        if held is None or held[0] is not loop or held[1].done():
            held = (loop, loop.create_task(self._fetch_info()))
            self._state.refreshing = held
        return await asyncio.shield(held[1])

    async def _fetch_info(self) -> ServerInfo:
        state = self._state
        try:
            response = await self._client().get("/object_info")
            if response.status_code != 200:
                raise status_error(response.status_code, f"/object_info answered HTTP {response.status_code}",
                                   provider=self.name)
            body = await asyncio.to_thread(json.loads, response.content)  # megabytes with many custom nodes
            info = ServerInfo.parse(body, time.monotonic())
            workflows = await asyncio.to_thread(load_workflows, self.workflows_dir)
        except ImageRouterError as exc:
            state.error, state.failed_at = exc.message, time.monotonic()
            raise
        except httpx.HTTPError as exc:
            err = connection_error(exc, provider=self.name)
            state.error, state.failed_at = err.message, time.monotonic()
            raise err from None
        except ValueError as exc:
            state.error, state.failed_at = f"unreadable /object_info ({exc})", time.monotonic()
            raise MalformedResponse(state.error, provider=self.name) from None
        state.info, state.error = info, None
        state.workflows, state.broken = workflows
        state.caps.clear()
        return info

    def _refresh_soon(self) -> None:
        """Start a background refresh when the server's list is stale; outside an event loop, read it now."""
        state = self._state
        if not self.url or not self._stale() or time.monotonic() - state.failed_at < self.retry_s:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._refresh_blocking()
            return
        held = state.refreshing
        if held is not None and held[0] is loop and not held[1].done():
            return
        task = loop.create_task(self._fetch_info())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # its failure is kept in state.error
        state.refreshing = (loop, task)

    def _refresh_blocking(self) -> None:
        """The synchronous read, for callers outside any event loop (the CLI's ``providers``)."""
        state = self._state
        try:
            with httpx.Client(base_url=self.url or "", timeout=min(self.http_timeout_s, 10.0), trust_env=False) as c:
                response = c.get("/object_info")
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            state.info = ServerInfo.parse(response.json(), time.monotonic())
            state.error = None
            state.caps.clear()
        except (httpx.HTTPError, ValueError) as exc:
            state.error, state.failed_at = f"could not read /object_info ({type(exc).__name__})", time.monotonic()

    # --- models and capabilities ----------------------------------------------------------------------------------

    def models(self) -> Sequence[str]:
        if not self.url:
            return ()
        self._refresh_soon()
        info = self._state.info
        return info.checkpoints if info is not None else self._declared

    def supports_model(self, model: str) -> bool:
        if model.startswith(WORKFLOW_PREFIX):
            return bool(self.url) and model.removeprefix(WORKFLOW_PREFIX) in self._state.workflows
        return model in self.models() or model in self._declared

    def workflow(self, model: str) -> Workflow | None:
        """The saved workflow ``model`` names (``workflow:<name>``), or None."""
        if not model.startswith(WORKFLOW_PREFIX):
            return None
        return self._state.workflows.get(model.removeprefix(WORKFLOW_PREFIX))

    def model_family(self, model: str) -> str | None:
        """``model``'s family: declared in ``families``, else read from a checkpoint's file name, else None."""
        declared = self.families.get(model)
        if declared is not None or model.startswith(WORKFLOW_PREFIX):
            return declared
        return family(model)

    @property
    def catalog(self) -> FamilyCatalog:
        """The models routing scores by their family's skill profile, in the local catalog's shape."""
        return FamilyCatalog(self)

    def capabilities(self, model: str) -> Capabilities:
        state = self._state
        caps = state.caps.get(model)
        if caps is None:
            wf = self.workflow(model)
            caps = self._workflow_caps(wf) if wf is not None else self._checkpoint_caps(model, state.info)
            state.caps[model] = caps
        return caps

    def _sizes(self, native: tuple[int, int]) -> SizeRules:
        # nodes.py EmptyLatentImage: sides 16..MAX_RESOLUTION in steps of 8; the operator's max_side caps it
        return SizeRules(multiple=8, min_side=64, max_side=self.max_side, max_pixels=self.max_side**2,
                         max_ratio=4.0, native=native)

    def _checkpoint_caps(self, model: str, info: ServerInfo | None) -> Capabilities:
        fam = self.model_family(model)
        nodes = info.nodes if info is not None else _TXT2IMG_NODES | {"LoadImage", "VAEEncode"}
        tasks: set[Task] = set()
        if nodes >= _TXT2IMG_NODES:
            tasks.add("txt2img")
            if {"LoadImage", "VAEEncode", "RepeatLatentBatch"} <= nodes:
                tasks.add("img2img")
                if {"LoadImageMask", "SetLatentNoiseMask"} <= nodes:
                    tasks.add("inpaint")
        kinds = frozenset(k for k in CONTROL_KINDS if self._controlnet_for(k, model, info) is not None) \
            if info is not None and {"ControlNetLoader", "ControlNetApplyAdvanced", "LoadImage"} <= nodes \
            else frozenset()
        if kinds and tasks:
            tasks.add("control")
        loras = len(info.loras) if info is not None else 0
        max_n = min(self.max_n, info.max_batch) if info is not None else 1
        return Capabilities(
            tasks=frozenset(tasks), sizes=self._sizes(_NATIVE.get(fam or "", (1024, 1024))),
            control_kinds=kinds, max_controls=len(kinds),
            max_loras=min(self.max_loras, loras) if "LoraLoader" in nodes else 0,
            max_n=max(1, max_n), negative_prompt=True, seed=True, steps=True, guidance=True, strength=True,
            scheduler=True, regions=self.regions,
            quality=self._quality.get(model, _QUALITY.get(fam or "", 0.5)), output_formats=frozenset(_MIME),
        )

    def _workflow_caps(self, wf: Workflow) -> Capabilities:
        bound = set(wf.inputs)
        tasks: set[Task] = {"txt2img"}
        if "image" in bound:
            tasks.add("img2img")
            if "mask" in bound:
                tasks.add("inpaint")
        if "control_image" in bound:
            tasks.add("control")
        if wf.tasks is not None:
            tasks = set(wf.tasks)
        native = wf.size or (1024, 1024)
        # unbound and saved in the graph: that one size; unbound and unknown (an init image's, say): any
        sizes = SizeRules(fixed=(native,), native=native) if wf.size and not {"width", "height"} <= bound \
            else self._sizes(native)
        control = "control_image" in bound
        return Capabilities(
            tasks=frozenset(tasks), sizes=sizes, control_kinds=wf.control_kinds if control else frozenset(),
            max_controls=1 if control else 0, max_n=min(self.max_n, 64) if "n" in bound else 1,
            negative_prompt="negative_prompt" in bound, seed="seed" in bound, steps="steps" in bound,
            guidance="guidance_scale" in bound, strength="strength" in bound, scheduler=False,
            regions=self.regions, quality=self._quality.get(wf.model, wf.quality), output_formats=frozenset(_MIME),
        )

    def _controlnet_for(self, kind: str, model: str, info: ServerInfo | None) -> str | None:
        """The ControlNet file for ``kind`` on the server that suits ``model``'s family, or None."""
        if info is None:
            return None
        chosen = self.controlnets.get(kind)
        if chosen is not None:
            return chosen if chosen in info.controlnets else None
        fam = self.model_family(model)
        fits = []
        for name in info.controlnets:
            low = name.lower()
            hit = next((t for t in _CONTROL_TOKENS[kind] if t in low), None)
            if hit is None or (kind == "lineart" and "anime" in low):
                continue
            cn_fam = self.model_family(name)
            if fam is not None and cn_fam is not None and cn_fam != fam:
                continue
            fits.append((cn_fam != fam, len(name), name))
        return min(fits)[2] if fits else None

    def plan(self, request: ImageRequest, model: str) -> Plan:
        base = super().plan(request, model)
        wf = self.workflow(model)
        extra: list[str] = []
        if wf is not None:
            if "prompt" not in wf.inputs:
                extra.append(f"prompt ignored: {model} does not bind it")
            if request.n > 1 and "n" not in wf.inputs:
                extra.append(f"n ignored: {model} does not bind it")
            if request.controls and "control_scale" not in wf.inputs and any(c.scale != 1.0 for c in request.controls):
                extra.append(f"controls scale ignored: {model} does not bind control_scale")
            if wf.size is None and not {"width", "height"} <= set(wf.inputs) and (
                    request.width is not None or request.aspect_ratio is not None):
                extra.append(f"size ignored: {model} makes the size its graph makes")
        src = request.init_image
        if request.width is None and request.aspect_ratio is None and src is not None and src.width and src.height:
            size = plan_size(src.width, src.height, None, self.capabilities(model).sizes)
            note = () if size.exact else (f"output size {size.width}x{size.height}: the nearest shape {model} "
                                          f"makes to the init image's {src.width}x{src.height}",)
            return Plan(size, base.warnings + note + tuple(extra))
        return Plan(base.size, base.warnings + tuple(extra)) if extra else base

    # --- cost ---------------------------------------------------------------------------------------------------------

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        wf = self.workflow(model)
        if wf is not None:
            seconds = self._state.observed.get(model, wf.seconds) * (request.n if "n" in wf.inputs else 1)
        else:
            fam = self.model_family(model) or ""
            size = self.plan(request, model).size
            native = _NATIVE.get(fam, (1024, 1024))
            per_step = self._state.observed.get(model, _S_PER_STEP.get(fam, 0.1))
            steps = request.steps or self.default_steps
            if request.init_image is not None:
                steps = max(1, int(steps * (request.strength if request.strength is not None else 0.8)))
            seconds = per_step * steps * request.n * size.width * size.height / (native[0] * native[1])
            seconds *= 1 + 0.4 * len(request.controls)
        quantity = Decimal(f"{seconds:.3f}")
        return Estimate(self._cost(quantity), seconds + 0.5, unit="gpu_seconds", quantity=quantity)

    def _cost(self, gpu_seconds: Decimal) -> Decimal:
        return gpu_seconds * self.usd_per_gpu_hour / Decimal(3600)

    def _billing(self, run: _Run, now: float, **details: Any) -> Billing:
        seconds = run.gpu_seconds(now)
        return Billing(
            cost_usd=self._cost(seconds), unit="gpu_seconds", quantity=seconds,
            price_table_version=f"comfyui:{self.usd_per_gpu_hour}/gpu-hour",
            details={"prompt_id": run.prompt_id, "cached_nodes": len(run.cached),
                     "timing": "server" if run.end_ts is not None and run.start_ts is not None else "client",
                     **details},
        )

    def _observe(self, model: str, request: ImageRequest, seconds: float, steps: int, width: int,
                 height: int) -> None:
        wf = self.workflow(model)
        if wf is not None:
            sample = seconds / (request.n if "n" in wf.inputs else 1)
        else:
            native = _NATIVE.get(self.model_family(model) or "", (1024, 1024))
            sample = seconds / max(1, steps) / request.n / (width * height / (native[0] * native[1]))
        old = self._state.observed.get(model)
        self._state.observed[model] = sample if old is None else 0.7 * old + 0.3 * sample

    # --- the call -----------------------------------------------------------------------------------------------------

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        if not self.url:
            raise InvalidRequestError(self.configuration_problem() or "not configured", provider=self.name,
                                      code="not_configured")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s - min(_DEADLINE_MARGIN_S, timeout_s / 5)
        sink = current_sink()
        try:
            async with asyncio.timeout_at(deadline):
                info = self._state.info if not self._stale() else await self.refresh()
                assert info is not None
                plan = self.plan(request, model)
                wf = self.workflow(model)
                if wf is None and model.startswith(WORKFLOW_PREFIX):
                    raise InvalidRequestError(f"no saved workflow {model!r}", provider=self.name)
                built = await (self._workflow_graph(request, wf, plan, deadline) if wf is not None
                               else self._builtin_graph(request, model, plan, info, deadline))
        except (TimeoutError, _Deadline):
            raise ProviderTimeout("no time left to upload the inputs and build the graph",
                                  provider=self.name) from None
        graph, outputs, seed, steps = built
        run, history = await self._execute(graph, model, deadline, sink)
        images, watermark = await self._images(run, history, outputs, request, seed, deadline)
        seconds = run.gpu_seconds(loop.time())
        if run.executed and seconds > 0:  # a run served wholly from the server's cache says nothing of its speed
            self._observe(model, request, float(seconds), steps, plan.size.width, plan.size.height)
        warnings = list(plan.warnings)
        if len(images) != request.n and (wf is None or "n" in wf.inputs):
            warnings.append(f"{len(images)} images returned, {request.n} asked")
        if watermark == "unavailable":
            warnings.append("not watermarked: invisible-watermark is not installed (pip install 'pixroute[local]'), "
                            "or construct ComfyUIProvider(watermark=False)")
        billing = self._billing(run, loop.time(), images=len(images), seed=seed, steps=steps, watermark=watermark)
        return ProviderResponse(images, model, billing, run.prompt_id, tuple(warnings))

    # --- graphs

    async def _upload(self, data: bytes, deadline: float) -> str:
        """``POST /upload/image`` (into the input folder, named by content) → the name ``LoadImage`` takes."""
        digest = hashlib.sha256(data).hexdigest()[:24]
        files = {"image": (f"imagerouter-{digest}.png", data, "image/png")}
        response = await self._http("POST", "/upload/image", deadline, files=files,
                                    data={"overwrite": "true", "type": "input"})
        body = self._json(response)
        name, sub = body.get("name"), body.get("subfolder") or ""
        if not isinstance(name, str) or not name:
            raise MalformedResponse("/upload/image answered without a file name", provider=self.name)
        return f"{sub}/{name}" if sub else name

    async def _png(self, image: Any, size: tuple[int, int] | None, convert: Callable[[PILImage.Image], Any]) -> bytes:
        data = await load_bytes(image)

        def work() -> bytes:
            img = convert(decode(data))
            if size is not None and img.size != size:
                from PIL import Image

                img = img.resize(size, Image.Resampling.LANCZOS)
            return encode(img, "png", png_compress_level=1)

        return await asyncio.to_thread(work)

    async def _builtin_graph(self, request: ImageRequest, model: str, plan: Plan, info: ServerInfo,
                             deadline: float) -> tuple[dict[str, Any], tuple[str, ...], int, int]:
        if model not in info.checkpoints:
            raise InvalidRequestError(f"checkpoint {model!r} is not on the ComfyUI server", provider=self.name,
                                      code="model_not_found")
        width, height = plan.size.width, plan.size.height
        options = request.provider_options.get(self.name, {})
        g = _Graph()
        ckpt = g.add("CheckpointLoaderSimple", ckpt_name=model)
        model_ref, clip_ref, vae = [ckpt, 0], [ckpt, 1], [ckpt, 2]
        for lora in request.loras:
            node = g.add("LoraLoader", model=model_ref, clip=clip_ref, lora_name=self._lora(lora.ref, info),
                         strength_model=lora.weight, strength_clip=lora.weight)
            model_ref, clip_ref = [node, 0], [node, 1]
        pos = [g.add("CLIPTextEncode", text=request.prompt, clip=clip_ref), 0]
        neg = [g.add("CLIPTextEncode", text=request.negative_prompt or "", clip=clip_ref), 0]
        for i, control in enumerate(request.controls):
            cn_file = self._controlnet_for(control.kind, model, info)
            if cn_file is None:
                raise InvalidRequestError(f"no ControlNet for {control.kind} on the ComfyUI server for {model}",
                                          provider=self.name, code="control_kind_unavailable")
            name = await self._upload(await self._png(control.image, (width, height),
                                                      lambda im: im.convert("RGB")), deadline)
            image_ref = [g.add("LoadImage", image=name), 0]
            if control.preprocess and control.kind == "canny":
                if "Canny" not in info.nodes:
                    raise InvalidRequestError(f"the ComfyUI server has no Canny node to preprocess controls[{i}]",
                                              provider=self.name, code="detector_not_configured")
                image_ref = [g.add("Canny", image=image_ref,
                                   low_threshold=float(options.get("canny_low", 0.4)),
                                   high_threshold=float(options.get("canny_high", 0.8))), 0]
            elif control.preprocess and control.kind not in _PASS_THROUGH:
                raise InvalidRequestError(
                    f"controls[{i}]: ComfyUI's core nodes have no {control.kind} detector; pass the {control.kind} "
                    "map with preprocess=False", provider=self.name, code="detector_not_configured")
            cn = g.add("ControlNetLoader", control_net_name=cn_file)
            applied = g.add("ControlNetApplyAdvanced", positive=pos, negative=neg, control_net=[cn, 0],
                            image=image_ref, strength=control.scale, start_percent=control.start,
                            end_percent=control.end, vae=vae)
            pos, neg = [applied, 0], [applied, 1]
        if request.init_image is None:
            latent = [g.add("EmptyLatentImage", width=width, height=height, batch_size=request.n), 0]
            denoise = 1.0
        else:
            init = await self._upload(await self._png(request.init_image, (width, height),
                                                      lambda im: im.convert("RGB")), deadline)
            latent = [g.add("VAEEncode", pixels=[g.add("LoadImage", image=init), 0], vae=vae), 0]
            denoise = request.strength if request.strength is not None else 0.8
            if request.mask_image is not None:
                # white = repaint, read from the red channel: nodes.py LoadImageMask takes a channel's value
                mask = await self._upload(await self._png(request.mask_image, (width, height),
                                                          lambda im: mask_to_white_repaint(im).convert("RGB")),
                                          deadline)
                latent = [g.add("SetLatentNoiseMask", samples=latent,
                                mask=[g.add("LoadImageMask", image=mask, channel="red"), 0]), 0]
                denoise = request.strength if request.strength is not None else 1.0
            if request.n > 1:
                latent = [g.add("RepeatLatentBatch", samples=latent, amount=request.n), 0]
        sampler, scheduler = self._sampler(request, options, info)
        seed = request.seed if request.seed is not None else random.randrange(2**32)
        steps = request.steps or self.default_steps
        sampled = g.add("KSampler", model=model_ref, seed=seed, steps=steps,
                        cfg=request.guidance_scale if request.guidance_scale is not None else self.default_cfg,
                        sampler_name=sampler, scheduler=scheduler, positive=pos, negative=neg,
                        latent_image=latent, denoise=denoise)
        decoded = g.add("VAEDecode", samples=[sampled, 0], vae=vae)
        save = g.add("SaveImage", images=[decoded, 0], filename_prefix="imagerouter/ir")
        return g.nodes, (save,), seed, steps

    def _lora(self, ref: str, info: ServerInfo) -> str:
        """The server's LoRA file a request's ref names: the file itself, or its name without the extension."""
        if ref in info.loras:
            return ref
        for name in info.loras:
            stem = name.rsplit(".", 1)[0]
            if ref in (stem, stem.rsplit("/", 1)[-1], name.rsplit("/", 1)[-1]):
                return name
        listed = ", ".join(info.loras[:10]) + (" …" if len(info.loras) > 10 else "")
        raise InvalidRequestError(f"LoRA {ref!r} is not on the ComfyUI server (it has {listed or 'none'})",
                                  provider=self.name, code="lora_not_found")

    def _sampler(self, request: ImageRequest, options: Mapping[str, Any], info: ServerInfo) -> tuple[str, str]:
        sampler, scheduler = SAMPLERS.get(request.scheduler or "", ("euler", "normal"))
        sampler = str(options.get("sampler_name", sampler))
        scheduler = str(options.get("scheduler", scheduler))
        for value, known, what in ((sampler, info.samplers, "sampler"), (scheduler, info.schedulers, "scheduler")):
            if known and value not in known:
                raise InvalidRequestError(f"the ComfyUI server has no {what} {value!r}", provider=self.name,
                                          code=f"{what}_not_found")
        return sampler, scheduler

    async def _workflow_graph(self, request: ImageRequest, wf: Workflow, plan: Plan,
                              deadline: float) -> tuple[dict[str, Any], tuple[str, ...], int, int]:
        graph: dict[str, Any] = copy.deepcopy(dict(wf.graph))
        values: dict[str, Any] = {"prompt": request.prompt}
        if request.negative_prompt is not None:
            values["negative_prompt"] = request.negative_prompt
        seed = request.seed if request.seed is not None else random.randrange(2**32)
        values["seed"] = seed  # always set: a saved seed would make (and cache) the same image every time
        for name, value in (("steps", request.steps), ("guidance_scale", request.guidance_scale),
                            ("strength", request.strength)):
            if value is not None:
                values[name] = value
        if "width" in wf.inputs or "height" in wf.inputs:
            values["width"], values["height"] = plan.size.width, plan.size.height
        values["n"] = request.n
        if request.controls:
            values["control_scale"] = request.controls[0].scale
        size = (plan.size.width, plan.size.height) if "width" in wf.inputs else None
        for name, image in (("image", request.init_image), ("mask", request.mask_image),
                            ("control_image", request.controls[0].image if request.controls else None)):
            if image is None or name not in wf.inputs:
                continue
            target = wf.inputs[name][0]
            node = graph[target.node]
            channel = node.get("inputs", {}).get("channel")
            if name == "mask" and (node.get("class_type") == "LoadImage" or channel == "alpha"):
                convert: Callable[[PILImage.Image], Any] = mask_to_alpha_repaint  # its MASK is 1 - alpha
            elif name == "mask":
                convert = lambda im: mask_to_white_repaint(im).convert("RGB")  # noqa: E731 — a channel's value
            else:
                convert = lambda im: im.convert("RGB")  # noqa: E731
            values[name] = await self._upload(await self._png(image, size, convert), deadline)
        params = request.provider_options.get(self.name, {}).get("params", {})
        if not isinstance(params, dict):
            raise InvalidRequestError(f"provider_options.{self.name}.params must be a dict", provider=self.name)
        unknown = sorted(set(params) - set(wf.params))
        if unknown:
            raise InvalidRequestError(f"{wf.model} has no params {unknown}; it declares "
                                      f"{', '.join(sorted(wf.params)) or 'none'}", provider=self.name)
        for name, targets in [*wf.inputs.items(), *wf.params.items()]:
            value = params.get(name) if name in wf.params else values.get(name)
            if value is None:
                continue
            for t in targets:
                graph[t.node].setdefault("inputs", {})[t.input] = value
        steps = int(values.get("steps") or 0)
        return graph, wf.outputs, seed, steps

    # --- the wire

    async def _http(self, method: str, path: str, deadline: float, **kw: Any) -> httpx.Response:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise _Deadline
        try:
            return await self._client().request(method, path, timeout=min(left, self.http_timeout_s), **kw)
        except httpx.TimeoutException:
            raise _Deadline from None
        except httpx.HTTPError as exc:
            raise connection_error(exc, provider=self.name) from None

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 200:
            raise status_error(response.status_code, f"{response.request.url.path} answered HTTP "
                               f"{response.status_code}: {response.text[:200]}", provider=self.name)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise MalformedResponse(f"{response.request.url.path} answered a body that is not a JSON object",
                                    provider=self.name, status_code=response.status_code)
        return body

    async def _execute(self, graph: dict[str, Any], model: str, deadline: float,
                       sink: ProgressCallback | None) -> tuple[_Run, dict[str, Any]]:
        """Queue ``graph`` and follow it to its end: the run and its history entry."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

        loop = asyncio.get_running_loop()
        client_id = uuid.uuid4().hex
        assert self.url is not None
        ws_url = "ws" + self.url.removeprefix("http") + f"/ws?clientId={client_id}"
        run = _Run()
        try:
            left = deadline - loop.time()
            if left <= 0:
                raise _Deadline
            ws = await connect(ws_url, open_timeout=min(left, self.http_timeout_s), proxy=None, max_size=2**24,
                               user_agent_header="imagerouter")
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            if isinstance(exc, TimeoutError) and loop.time() >= deadline:
                raise ProviderTimeout("the websocket did not open in time", provider=self.name) from None
            raise ProviderUnavailable(f"could not open the websocket ({type(exc).__name__})",
                                      provider=self.name) from None
        except _Deadline:
            raise ProviderTimeout("no time left to open the websocket", provider=self.name) from None
        try:
            try:
                run.prompt_id = str(uuid.uuid4())  # ours from the start: a call cancelled mid-POST can still stop it
                run.prompt_id = await self._queue_prompt(graph, client_id, run.prompt_id, deadline)
                await self._follow(ws, run, model, deadline, sink, ConnectionClosed)
                history = await self._history(run, deadline)
            except _Deadline:
                await self._abandon(run, loop)
                error = ProviderTimeout("the ComfyUI prompt did not finish in time; it was interrupted",
                                        provider=self.name, request_id=run.prompt_id or None)
                raise charged(error, self._billing(run, loop.time(), interrupted=True)) from None
            except asyncio.CancelledError:
                if run.prompt_id and not run.done:
                    task = loop.create_task(self._abandon(run, loop))
                    self._state.background.add(task)
                    task.add_done_callback(self._state.background.discard)
                raise
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 1.0)
        return run, history

    async def _queue_prompt(self, graph: dict[str, Any], client_id: str, prompt_id: str, deadline: float) -> str:
        response = await self._http("POST", "/prompt", deadline,
                                    json={"prompt": graph, "client_id": client_id, "prompt_id": prompt_id})
        if response.status_code == 400:
            raise self._refused(response)
        body = self._json(response)
        pid = body.get("prompt_id")
        if not isinstance(pid, str) or not pid:
            raise MalformedResponse("/prompt answered without a prompt_id", provider=self.name)
        return pid  # a server older than prompt_id in the body makes its own

    def _refused(self, response: httpx.Response) -> InvalidRequestError:
        """A 400 from ``/prompt``: ``{error: {type, message, details}, node_errors: {id: {errors, class_type}}}``
        as one message (execution.py ``validate_prompt``)."""
        try:
            body = response.json()
        except ValueError:
            body = {}
        error = body.get("error") if isinstance(body, dict) else None
        parts: list[str] = []
        code = None
        if isinstance(error, dict):
            code = str(error.get("type") or "") or None
            parts.append(str(error.get("message") or "invalid prompt"))
        elif isinstance(error, str):
            parts.append(error)
        node_errors = body.get("node_errors") if isinstance(body, dict) else None
        for node_id, entry in (node_errors.items() if isinstance(node_errors, dict) else ()):
            if not isinstance(entry, dict):
                continue
            reasons = "; ".join(f"{e.get('message')}: {e.get('details')}" for e in entry.get("errors", ())
                                if isinstance(e, dict))
            parts.append(f"node {node_id} ({entry.get('class_type')}): {reasons}")
        if len(parts) < 2 and isinstance(error, dict) and error.get("details"):
            parts.append(str(error["details"]))
        return InvalidRequestError("ComfyUI refused the graph: " + " | ".join(parts)[:800], provider=self.name,
                                   status_code=400, code=code)

    async def _follow(self, ws: Any, run: _Run, model: str, deadline: float, sink: ProgressCallback | None,
                      closed: type[Exception]) -> None:
        """Read the websocket until the prompt ends; poll the history if the socket goes away."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        report = StatusReporter(self.name, model, loop.time)
        report("queued", "queued", run.prompt_id)
        while not run.done:
            left = deadline - loop.time()
            if left <= 0:
                raise _Deadline
            try:
                async with asyncio.timeout(min(left, self.history_check_s)):  # not wait_for: 3.11's can lose a cancel
                    raw = await ws.recv()
            except TimeoutError:
                if loop.time() >= deadline:
                    raise _Deadline from None
                if await self._finished(run, deadline):  # a quiet socket: a message may have been lost
                    return
                continue
            except closed:
                log.info("ComfyUI websocket closed during prompt %s; polling its history", run.prompt_id)
                return
            if not isinstance(raw, str):
                continue  # binary previews
            try:
                message = json.loads(raw)
                kind, data = message.get("type"), message.get("data") or {}
            except (ValueError, AttributeError):
                continue
            if not isinstance(data, dict) or data.get("prompt_id") != run.prompt_id:
                continue
            if kind == "execution_start":
                run.started_at, run.start_ts = loop.time(), _int(data.get("timestamp"))
                report("running", kind, run.prompt_id)
            elif kind == "executing" and data.get("node") is not None:
                run.executed += 1
            elif kind == "execution_cached":
                run.cached = [str(n) for n in data.get("nodes", ())]
            elif kind == "progress" and sink is not None:
                step, total = _int(data.get("value")), _int(data.get("max"))
                if step is not None and total:
                    sink(ProgressEvent(self.name, model, step, total, loop.time() - t0))
            elif kind == "executed":
                run.outputs[str(data.get("node"))] = data.get("output")
            elif kind == "execution_success":
                run.succeeded, run.end_ts, run.ended_at = True, _int(data.get("timestamp")), loop.time()
                report("succeeded", kind, run.prompt_id)
            elif kind == "executing" and data.get("node") is None:
                run.done = True  # after the history is written (main.py prompt_worker)
                run.ended_at = run.ended_at or loop.time()
            elif kind in ("execution_error", "execution_interrupted"):
                run.done, run.end_ts, run.ended_at = True, _int(data.get("timestamp")), loop.time()
                report("failed", kind, run.prompt_id)
                raise charged(self._execution_error(kind, data, run), self._billing(run, loop.time(), failed=kind))

    def _execution_error(self, kind: str, data: Mapping[str, Any], run: _Run) -> ImageRouterError:
        node = f"node {data.get('node_id')} ({data.get('node_type')})"
        if kind == "execution_interrupted":
            return ProviderUnavailable(f"the prompt was interrupted on the server at {node}", provider=self.name,
                                       request_id=run.prompt_id, code="interrupted")
        exc_type = str(data.get("exception_type") or "")
        text = f"{node} failed: {exc_type}: {str(data.get('exception_message') or '').strip()}"[:600]
        if "OutOfMemory" in exc_type or "out of memory" in text.lower():
            return ProviderUnavailable(text, provider=self.name, request_id=run.prompt_id, code="out_of_memory")
        return ExecutionFailed(text, provider=self.name, request_id=run.prompt_id, code="execution_error",
                               node_id=str(data.get("node_id")), node_type=str(data.get("node_type")),
                               exception_type=exc_type)

    async def _finished(self, run: _Run, deadline: float) -> bool:
        """Whether the prompt's history entry says it ended."""
        body = self._json(await self._http("GET", f"/history/{run.prompt_id}", deadline))
        entry = body.get(run.prompt_id)
        return isinstance(entry, dict) and isinstance(entry.get("status"), dict) \
            and entry["status"].get("status_str") in ("success", "error")

    async def _history(self, run: _Run, deadline: float) -> dict[str, Any]:
        """``GET /history/{id}`` until the entry is there (it is written just before the last message)."""
        loop = asyncio.get_running_loop()
        wait = self.history_poll_s
        while True:
            body = self._json(await self._http("GET", f"/history/{run.prompt_id}", deadline))
            entry = body.get(run.prompt_id)
            if isinstance(entry, dict) and isinstance(entry.get("status"), dict) \
                    and entry["status"].get("status_str") in ("success", "error"):
                return self._settle(run, entry, loop.time())
            if loop.time() + wait >= deadline:
                raise _Deadline
            await asyncio.sleep(wait)
            wait = min(wait * 2, 2.0)

    def _settle(self, run: _Run, entry: dict[str, Any], now: float) -> dict[str, Any]:
        """The run completed from its history entry (for a run followed without the websocket, too)."""
        run.done = True
        messages = entry["status"].get("messages") or []
        for item in messages:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], dict)):
                continue
            kind, data = item
            ts = _int(data.get("timestamp"))
            if kind == "execution_start" and run.start_ts is None:
                run.start_ts = ts
            elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                run.end_ts = run.end_ts or ts
                if kind != "execution_success":
                    raise charged(self._execution_error(kind, data, run), self._billing(run, now, failed=kind))
            elif kind == "execution_cached" and not run.cached:
                run.cached = [str(n) for n in data.get("nodes", ())]
        if entry["status"].get("status_str") != "success":
            raise ExecutionFailed("the prompt ended in error", provider=self.name, request_id=run.prompt_id)
        run.succeeded = True
        if run.started_at is None:
            run.started_at = now
        return entry

    async def _abandon(self, run: _Run, loop: asyncio.AbstractEventLoop) -> None:
        """Stop the prompt: delete it from the queue, and interrupt it if it is the one running."""
        if not run.prompt_id:
            return
        until = loop.time() + _CLEANUP_S
        with contextlib.suppress(ImageRouterError, _Deadline):
            running = run.started_at is not None and not run.done
            if not running:
                await self._http("POST", "/queue", until, json={"delete": [run.prompt_id]})
                queue = self._json(await self._http("GET", "/queue", until))
                running = any(isinstance(i, list) and len(i) > 1 and i[1] == run.prompt_id
                              for i in queue.get("queue_running", ()))
            if running:
                await self._http("POST", "/interrupt", until, json={"prompt_id": run.prompt_id})
                run.ended_at = run.ended_at or loop.time()

    async def _images(self, run: _Run, history: dict[str, Any], wanted: Sequence[str], request: ImageRequest,
                      seed: int, deadline: float) -> tuple[list[GeneratedImage], str]:
        """The output images, each named in the history fetched from ``/view`` on the configured server, and
        what happened to the watermark: embedded, too_small, off or unavailable."""
        outputs = history.get("outputs") or run.outputs
        refs: list[dict[str, Any]] = []
        if isinstance(outputs, dict):
            nodes = [n for n in wanted if n in outputs] if wanted else sorted(outputs, key=_node_order)
            for node in nodes:
                images = (outputs[node] or {}).get("images", ()) if isinstance(outputs[node], dict) else ()
                refs += [i for i in images if isinstance(i, dict) and isinstance(i.get("filename"), str)]
        if not wanted and any(r.get("type") == "output" for r in refs):
            refs = [r for r in refs if r.get("type") == "output"]  # previews only where nothing was saved
        bill = self._billing(run, asyncio.get_running_loop().time())
        if not refs:
            raise charged(MalformedResponse("the prompt finished without an output image", provider=self.name,
                                            request_id=run.prompt_id), bill)
        fmt = request.output_format
        mark = self.watermark and _installed("imwatermark")
        try:
            viewed = await asyncio.gather(*(self._view(ref, fmt, deadline, run, mark) for ref in refs))
        except _Deadline:
            raise charged(ProviderTimeout("the outputs could not be fetched in time", provider=self.name,
                                          request_id=run.prompt_id), bill) from None
        except ImageRouterError as exc:
            raise charged(exc, bill) from None
        note = "off" if not self.watermark else "unavailable" if not mark else \
            "embedded" if any(marked for _, marked in viewed) else "too_small"
        return [dataclasses.replace(img, seed=seed) for img, _ in viewed], note

    async def _view(self, ref: Mapping[str, Any], fmt: str, deadline: float, run: _Run,
                    mark: bool) -> tuple[GeneratedImage, bool]:
        """One output from ``/view``, and whether it carries the watermark. Marked outputs are fetched as the
        server saved them (lossless) and encoded here once; unmarked ones in another format are re-encoded by
        the server."""
        params = {"filename": ref["filename"], "subfolder": str(ref.get("subfolder") or ""),
                  "type": str(ref.get("type") or "output")}
        if fmt != "png" and not mark:
            params["preview"] = f"{fmt};95"  # re-encoded by the server (server.py view_image)
        response = await self._http("GET", "/view", deadline, params=params)
        if response.status_code != 200:
            raise status_error(response.status_code, f"/view answered HTTP {response.status_code}",
                               provider=self.name, request_id=run.prompt_id)
        data = response.content
        mime, width, height = await output_image(data, provider=self.name, request_id=run.prompt_id)
        marked = False
        if mark:
            try:
                data, marked = await asyncio.to_thread(_marked, data, mime, fmt, self.watermark_payload)
            except ImageRouterError as exc:
                exc.provider, exc.request_id = exc.provider or self.name, exc.request_id or run.prompt_id
                raise
            except Exception as exc:  # the operator wants every output marked: none goes out unmarked
                raise ProviderUnavailable(f"the output could not be watermarked ({type(exc).__name__}: {exc})"[:300],
                                          provider=self.name, request_id=run.prompt_id,
                                          code="watermark_failed") from None
            mime = _MIME[fmt]
        return GeneratedImage(data=data, mime=mime, width=width, height=height), marked

    async def aclose(self) -> None:
        state = self._state
        held, state.refreshing = state.refreshing, None
        if held is not None and not held[1].done():
            held[1].cancel()
            with contextlib.suppress(BaseException):
                await held[1]
        if state.background:
            await asyncio.gather(*state.background, return_exceptions=True)
        if state.http is not None:
            await state.http.aclose()
            state.http = None


class _Graph:
    """An API-format prompt being built: node ids "1", "2", … in the order added."""

    def __init__(self) -> None:
        self.nodes: dict[str, Any] = {}

    def add(self, class_type: str, **inputs: Any) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id


_FOUND: set[str] = set()


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (a found one is remembered: the check costs ~100 µs)."""
    if module not in _FOUND:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            return False
        _FOUND.add(module)
    return True


def _marked(data: bytes, mime: str, fmt: str, payload: bytes | None) -> tuple[bytes, bool]:
    """``data`` (an output as the server saved it) with the invisible mark, encoded as ``fmt``, and whether it
    was marked (an image under 256×256 pixels is too small to carry the mark: it is only encoded as ``fmt``).
    CPU work: run it in a worker thread."""
    from providers.local.watermark import PAYLOAD, can_mark, embed

    try:
        image = decode(data, what="response image")
    except ImageDecodeError as exc:
        raise MalformedResponse(f"unusable output: {exc.message}") from None
    marked = can_mark(image)
    if marked:
        image = embed(image, payload or PAYLOAD)
    elif mime == _MIME[fmt]:
        return data, False
    return encode(image, fmt, png_compress_level=1), marked


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 30, node_id)
