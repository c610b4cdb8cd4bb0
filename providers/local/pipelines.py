"""Loading Diffusers pipelines safely, and sharing one base pipeline per model across tasks.

Only safetensors are ever loaded (``use_safetensors=True``): a model whose weights are
pickled (``.bin``/``.ckpt``/``.pt``) is refused before anything is read. One base pipeline
is kept per model; img2img, inpaint and ControlNet pipelines share its modules through ``from_pipe``
(with an explicit ``dtype``, so shared modules are never upcast in place). Models beyond
the cache's budget are evicted least recently used first.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from providers.local.adapters import EmbeddingSet, IPAdapterSlot
from providers.local.catalog import ModelEntry
from providers.local.loras import AdapterSet
from providers.local.precision import torch_dtype
from providers.local.upscale import UpscalerEntry
from router.errors import InvalidRequestError

_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_TASK_PIPES = {"txt2img": "AutoPipelineForText2Image", "img2img": "AutoPipelineForImage2Image",
               "inpaint": "AutoPipelineForInpainting"}
log = logging.getLogger("imagerouter")


class ModelNotAvailable(InvalidRequestError):
    """The model's directory or weights are missing on this machine."""

    def __init__(self, model: str, what: str) -> None:
        self.model = model
        super().__init__(f"local model {model!r}: {what}", provider="local", code="model_not_available")


class UnsafeCheckpoint(InvalidRequestError):
    """The model's weights are pickled; they are never loaded (convert them to safetensors)."""

    def __init__(self, model: str, files: list[str]) -> None:
        self.model = model
        self.files = files
        super().__init__(
            f"local model {model!r}: weights are pickled ({', '.join(files[:3])}); pickles can run code, so they "
            "are never loaded. Convert them to .safetensors (e.g. load once in a trusted environment and "
            "save_pretrained(safe_serialization=True))", provider="local", code="unsafe_checkpoint")


def check_component(entry: ModelEntry, what: str, path: str) -> Path:
    """A single-model directory (ControlNet, VAE): it exists and holds safetensors, not pickles."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelNotAvailable(entry.name, f"{what} directory {root} does not exist; download it there or fix "
                                            "its path in the catalog")
    files = [p for p in root.iterdir() if p.is_file()]
    if not any(p.name.endswith(".safetensors") for p in files):
        pickled = [p.name for p in files if p.suffix in _PICKLE_SUFFIXES]
        if pickled:
            raise UnsafeCheckpoint(entry.name, pickled)
        raise ModelNotAvailable(entry.name, f"{what} directory {root} has no .safetensors weights")
    return root


def check_weights(entry: ModelEntry) -> None:
    """Refuse a missing model or pickled weights before anything is loaded."""
    if entry.vae is not None:
        check_component(entry, "VAE", entry.vae)
    if not entry.is_local_dir:
        return
    root = Path(entry.path).expanduser()
    if root.is_file():
        if root.suffix in _PICKLE_SUFFIXES:
            raise UnsafeCheckpoint(entry.name, [root.name])
        raise ModelNotAvailable(entry.name, f"{root} is a single file; give a Diffusers directory "
                                            "(save_pretrained output with model_index.json)")
    if not root.is_dir():
        raise ModelNotAvailable(entry.name, f"directory {root} does not exist; download or copy the model "
                                            "there, or fix its path in the catalog")
    index = root / "model_index.json"
    if not index.is_file():
        raise ModelNotAvailable(entry.name, f"{root} has no model_index.json; it is not a Diffusers "
                                            "pipeline directory (save one with save_pretrained)")
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelNotAvailable(entry.name, f"{index} is not valid JSON ({exc})") from None
    pickled: list[str] = []
    missing: list[str] = []
    for name, spec in components.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        if name in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler", "feature_extractor"):
            continue
        sub = root / name
        files = [p for p in sub.rglob("*") if p.is_file()] if sub.is_dir() else []
        if any(p.name.endswith(".safetensors") for p in files):
            continue
        bad = [str(p.relative_to(root)) for p in files if p.suffix in _PICKLE_SUFFIXES]
        (pickled.extend(bad) if bad else missing.append(name))
    if pickled:
        raise UnsafeCheckpoint(entry.name, pickled)
    if missing:
        raise ModelNotAvailable(entry.name, f"no .safetensors weights for {', '.join(missing)} under {root}; "
                                            "the download is incomplete — fetch the missing files")


def offline() -> bool:
    """Whether hub access is off (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE",
                                                                                 "TRANSFORMERS_OFFLINE"))


@contextmanager
def quiet_loading() -> Iterator[None]:
    """No Diffusers / Transformers loading bars on stderr while a model loads (a library's loads are not
    the user's terminal output; progress is reported as events). Their previous setting is restored."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


class PipelineCache:
    """Base pipelines by model name, and their task views (which share the base's modules).

    Least recently used models are evicted before a load that would exceed ``max_models``
    or ``vram_budget_gb`` (the sum of the catalog's ``vram_gb``); a model larger than
    the whole budget still loads, alone. The device worker is the only caller that loads.
    """

    def __init__(self, device: str = "cpu", *, max_models: int = 2, vram_budget_gb: float | None = None,
                 dtype: Any = None, compile_options: Mapping[str, Any] | None = None) -> None:
        self.device = device
        self.compile_options = dict(compile_options or {})
        """Keyword arguments for ``torch.compile`` of a ``compile: true`` model's denoiser."""
        self._dtypes: dict[str, Any] = {}
        self.max_models = max(1, max_models)
        self.vram_budget_gb = vram_budget_gb
        self._dtype = dtype
        self._default_dtype = dtype
        self._bases: OrderedDict[str, Any] = OrderedDict()
        self._vram: dict[str, float] = {}
        self._loaded: tuple[str, ...] = ()
        self._tasks: dict[tuple[str, str, tuple[str, ...]], Any] = {}
        self._controlnets: dict[tuple[str, str], Any] = {}
        self._adapters: dict[str, AdapterSet] = {}
        self._upscalers: OrderedDict[str, Any] = OrderedDict()
        self._embeddings: dict[str, EmbeddingSet] = {}
        self._ip_slots: dict[str, IPAdapterSlot] = {}
        self._previews: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.loads = 0

    @property
    def dtype(self) -> Any:
        """The provider-wide dtype: the one given, else float16 on CUDA and float32 elsewhere."""
        import torch

        if self._dtype is None:
            self._dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        return self._dtype

    def dtype_for(self, entry: ModelEntry) -> Any:
        """The dtype ``entry`` runs in here: its catalog ``dtype``, else a safe one for its family and device."""
        found = self._dtypes.get(entry.name)
        if found is None:
            found = self._dtypes[entry.name] = torch_dtype(entry, self.device, self._default_dtype)
        return found

    def loaded(self) -> list[str]:
        """The models held now, least recently used first (a snapshot; safe from any thread)."""
        return list(self._loaded)

    def base(self, entry: ModelEntry) -> Any:
        """The model's base (txt2img) pipeline, loading it on first use."""
        with self._lock:
            pipe = self._bases.get(entry.name)
            if pipe is not None:
                self._bases.move_to_end(entry.name)
                self._loaded = tuple(self._bases)
                return pipe
            self._vram[entry.name] = entry.vram_gb
            while len(self._bases) and (len(self._bases) + 1 > self.max_models or (
                    self.vram_budget_gb is not None and sum(self._vram.values()) > self.vram_budget_gb)):
                self._evict(next(iter(self._bases)))  # free room before loading
            try:
                pipe = self._load(entry)
            except BaseException:
                self._vram.pop(entry.name, None)
                raise
            self._bases[entry.name] = pipe
            self._loaded = tuple(self._bases)
            return pipe

    def for_task(self, entry: ModelEntry, task: str, controls: tuple[str, ...] = ()) -> Any:
        """The pipeline for ``task`` (txt2img/img2img/inpaint) with ControlNets for ``controls`` (kinds, in order).

        Every view shares the base's modules (``from_pipe`` with an explicit ``dtype``).
        """
        base = self.base(entry)
        if task == "txt2img" and not controls:
            return base
        key = (entry.name, task, controls)
        with self._lock:
            pipe = self._tasks.get(key)
            if pipe is None:
                import diffusers

                extra: dict[str, Any] = {}
                if controls:
                    nets = [self._controlnet(entry, kind) for kind in controls]
                    extra["controlnet"] = nets[0] if len(nets) == 1 else nets
                cls = getattr(diffusers, _TASK_PIPES[task])
                try:
                    pipe = cls.from_pipe(base, dtype=self.dtype_for(entry), **extra)
                except (ValueError, KeyError) as exc:
                    what = f"{task} with ControlNet" if controls else task
                    raise InvalidRequestError(f"local model {entry.name!r} has no {what} pipeline ({exc})",
                                              provider="local") from None
                pipe.set_progress_bar_config(disable=True)
                self._tasks[key] = pipe
            return pipe

    def adapters(self, entry: ModelEntry) -> AdapterSet:
        """The LoRA adapters loaded on the model's modules (shared by all its task views)."""
        with self._lock:
            found = self._adapters.get(entry.name)
            if found is None:
                found = self._adapters[entry.name] = AdapterSet(entry.lora_cache)
            return found

    def embeddings(self, entry: ModelEntry) -> EmbeddingSet:
        """The textual-inversion tokens loaded on the model's text encoders (shared by its task views)."""
        with self._lock:
            return self._embeddings.setdefault(entry.name, EmbeddingSet())

    def ip_slot(self, entry: ModelEntry) -> IPAdapterSlot:
        """The IP-Adapter loaded on the model's denoiser, if any."""
        with self._lock:
            return self._ip_slots.setdefault(entry.name, IPAdapterSlot())

    def loaded_upscalers(self) -> list[str]:
        return list(self._upscalers)

    def upscaler(self, entry: UpscalerEntry) -> Any:
        """The upscaler's spandrel model, loaded on first use (the ``max_models`` most recent are kept)."""
        with self._lock:
            model = self._upscalers.get(entry.name)
            if model is None:
                from providers.local.upscale import load

                while len(self._upscalers) >= self.max_models:
                    self._upscalers.popitem(last=False)
                model = self._upscalers[entry.name] = load(entry, self.device)
                self.loads += 1
            self._upscalers.move_to_end(entry.name)
            return model

    def preview_vae(self, entry: ModelEntry) -> Any:
        """``entry``'s tiny preview autoencoder (``preview_vae`` in the catalog), loaded on first use; None
        when it has none."""
        if entry.preview_vae is None:
            return None
        with self._lock:
            vae = self._previews.get(entry.name)
            if vae is None:
                from diffusers import AutoencoderTiny

                root = check_component(entry, "preview VAE", entry.preview_vae)
                try:
                    vae = AutoencoderTiny.from_pretrained(str(root), use_safetensors=True,
                                                          dtype=self.dtype_for(entry), local_files_only=True)
                except (OSError, ValueError) as exc:
                    raise ModelNotAvailable(entry.name, f"could not load the preview VAE from {root}: {exc}; set "
                                                        "preview_vae: to a TAESD directory, or leave it out"[:600]
                                            ) from None
                vae = self._previews[entry.name] = vae.to(self.device).eval()
            return vae

    def _controlnet(self, entry: ModelEntry, kind: str) -> Any:
        key = (entry.name, kind)
        net = self._controlnets.get(key)
        if net is None:
            path = entry.controlnets.get(kind)
            if path is None:
                raise InvalidRequestError(
                    f"local model {entry.name!r} has no ControlNet for {kind!r} (it has "
                    f"{', '.join(entry.controlnets) or 'none'}); add one under controlnets in the catalog",
                    provider="local", code="control_kind_unavailable")
            import diffusers

            root = check_component(entry, f"{kind} ControlNet", path)
            cls = diffusers.FluxControlNetModel if entry.family == "flux" else diffusers.ControlNetModel
            try:
                net = cls.from_pretrained(str(root), use_safetensors=True, dtype=self.dtype_for(entry),
                                          local_files_only=True)
            except (OSError, ValueError) as exc:
                raise ModelNotAvailable(entry.name, f"could not load the {kind} ControlNet from {root}: {exc}"[:600]
                                        ) from None
            net = net.to(self.device)
            self._controlnets[key] = net
        return net

    def evict(self, name: str) -> None:
        with self._lock:
            self._evict(name)

    def _evict(self, name: str) -> None:
        self._bases.pop(name, None)
        self._vram.pop(name, None)
        self._loaded = tuple(self._bases)
        for key in [k for k in self._tasks if k[0] == name]:
            del self._tasks[key]
        for cn_key in [k for k in self._controlnets if k[0] == name]:
            del self._controlnets[cn_key]
        self._adapters.pop(name, None)
        self._dtypes.pop(name, None)
        self._embeddings.pop(name, None)
        self._ip_slots.pop(name, None)
        self._previews.pop(name, None)
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _load(self, entry: ModelEntry) -> Any:
        check_weights(entry)
        from diffusers import DiffusionPipeline

        path = str(Path(entry.path).expanduser()) if entry.is_local_dir else entry.path
        dtype = self.dtype_for(entry)
        extra: dict[str, Any] = {}
        vae = self.vae_for(entry)
        if vae is not None:
            extra["vae"] = self._load_vae(entry, vae, dtype)
        try:
            pipe = DiffusionPipeline.from_pretrained(
                path, use_safetensors=True, dtype=dtype,
                local_files_only=entry.is_local_dir or offline(), **extra)
        except (OSError, ValueError) as exc:
            raise ModelNotAvailable(entry.name, f"could not load from {path}: {exc}"[:600]) from None
        self._place(entry, pipe)
        if entry.compile:
            self._compile(entry, pipe)
        pipe.set_progress_bar_config(disable=True)
        self.loads += 1
        return pipe

    def vae_for(self, entry: ModelEntry) -> str | None:
        """The replacement VAE ``entry`` loads with: its ``vae``, else its ``fp16_vae`` in float16 on CUDA."""
        import torch

        if entry.vae is not None:
            return entry.vae
        if entry.fp16_vae and self.device.startswith("cuda") and self.dtype_for(entry) == torch.float16:
            return entry.fp16_vae
        return None

    def _load_vae(self, entry: ModelEntry, ref: str, dtype: Any) -> Any:
        from diffusers import AutoencoderKL

        local = ref.startswith(("/", ".", "~")) or Path(ref).expanduser().exists() or ref.count("/") != 1
        where = str(check_component(entry, "VAE", ref)) if local else ref
        try:
            return AutoencoderKL.from_pretrained(where, use_safetensors=True, dtype=dtype,
                                                 local_files_only=local or offline())
        except (OSError, ValueError) as exc:
            key = "vae" if ref == entry.vae else "fp16_vae"
            raise ModelNotAvailable(entry.name, f"could not load the VAE {where}: {exc}; download it and set "
                                                f"{key}: to its directory, or {key}: null"[:600]) from None

    def _compile(self, entry: ModelEntry, pipe: Any) -> None:
        """``torch.compile`` the denoiser in place, so every task view sharing it runs compiled.

        Compilation itself happens on the first call; :meth:`LocalProvider.warm` makes that call
        before requests arrive. A new size, batch or LoRA set recompiles.
        """
        denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        if denoiser is None:
            log.info("local model %s: compile: true, but it has no UNet or transformer to compile", entry.name)
            return
        denoiser.compile(**self.compile_options)

    def _place(self, entry: ModelEntry, pipe: Any) -> None:
        """Move the pipeline to the device, or set up CPU offload, and apply the memory options."""
        if entry.offload and self.device.startswith("cuda"):
            if entry.offload == "model":
                pipe.enable_model_cpu_offload(device=self.device)
            else:
                pipe.enable_sequential_cpu_offload(device=self.device)
        else:
            if entry.offload:
                log.info("local model %s: offload=%s applies on CUDA only; running on %s", entry.name,
                         entry.offload, self.device)
            pipe.to(self.device)
        import torch

        vae = getattr(pipe, "vae", None)
        if vae is not None and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            log.info("local model %s: its VAE upcasts to float32 on every decode in float16; set fp16_vae: (or "
                     "vae:) to an fp16-fix VAE (e.g. madebyollin/sdxl-vae-fp16-fix) in the catalog to avoid it",
                     entry.name)
        if entry.vae_slicing and vae is not None:
            vae.enable_slicing()
        if entry.vae_tiling and vae is not None:
            vae.enable_tiling()
        if entry.attention_slicing:
            pipe.enable_attention_slicing()
