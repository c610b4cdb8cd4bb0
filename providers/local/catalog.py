"""The local model catalog: which Diffusers models exist on this machine and how to run them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from providers.local.detectors import Detectors
from providers.local.upscale import UpscalerEntry
from router.errors import CatalogError, InvalidRequestError

Family = Literal["sd15", "sdxl", "flux"]
FAMILIES: tuple[Family, ...] = ("sd15", "sdxl", "flux")
DTYPES = ("auto", "float16", "bfloat16", "float32")
FP16_UNSAFE: frozenset[str] = frozenset({"flux"})
"""Families whose float16 overflows (NaN / black images): they run in bfloat16 on CUDA."""
SDXL_FP16_VAE = "madebyollin/sdxl-vae-fp16-fix"

_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd15": {"steps": 30, "guidance": 7.5, "native": (512, 512), "vram_gb": 4.0, "quality": 0.45},
    "sdxl": {"steps": 30, "guidance": 5.0, "native": (1024, 1024), "vram_gb": 10.0, "quality": 0.65,
             "fp16_vae": SDXL_FP16_VAE},
    "flux": {"steps": 28, "guidance": 3.5, "native": (1024, 1024), "vram_gb": 24.0, "quality": 0.85},
}


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One local model: where its weights are, its family and its defaults."""

    name: str
    path: str
    """A local Diffusers directory (``model_index.json`` + component folders) or a hub id."""
    family: Family = "sd15"
    steps: int = 30
    guidance: float = 7.5
    native: tuple[int, int] = (512, 512)
    controlnets: Mapping[str, str] = field(default_factory=dict)
    vram_gb: float = 4.0
    quality: float = 0.5
    min_side: int = 256
    max_side: int = 2048
    max_n: int = 8
    max_loras: int = 4
    lora_cache: int = 8
    """LoRA adapters kept loaded on this model (least recently used removed first)."""
    vae: str | None = None
    """A replacement VAE directory, used in every dtype."""
    fp16_vae: str | None = None
    """The VAE used instead of the model's when it runs in float16 on CUDA (a directory or hub id). SDXL's
    default is the fp16-fix VAE, whose decode needs no float32 upcast; ``null`` keeps the model's own."""
    preview_vae: str | None = None
    """A tiny autoencoder directory (TAESD-style ``AutoencoderTiny``; TAESD for SD 1.5, TAESDXL for SDXL) that
    decodes the latents into the previews a request asks for with ``partial_images``; none: no previews."""
    dtype: str = "auto"
    """``auto`` (float16 on CUDA, bfloat16 for families whose float16 is unsafe, float32 on CPU) or a name."""
    compile: bool = False
    image_encoder: str | None = None
    """The CLIP image encoder directory IP-Adapters use on this model (default: ``image_encoder/`` beside the
    IP-Adapter file)."""
    """``torch.compile`` the denoiser after loading; :meth:`LocalProvider.warm` pays the compilation up front."""
    offload: Literal["model", "sequential"] | None = None
    """CPU offload on CUDA: whole models (``model``) or layer by layer (``sequential``, least memory)."""
    vae_slicing: bool = False
    vae_tiling: bool = False
    attention_slicing: bool = False

    @property
    def multiple(self) -> int:
        """Width and height must be multiples of this (16 for Flux's 2×2 patches)."""
        return 16 if self.family == "flux" else 8

    @property
    def is_local_dir(self) -> bool:
        """Whether ``path`` names a filesystem location rather than a hub id."""
        p = self.path
        return p.startswith(("/", ".", "~")) or Path(p).expanduser().exists() or p.count("/") != 1

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> ModelEntry:
        """Build from a mapping; family defaults fill what is left out. Errors are :class:`CatalogError`."""
        if not isinstance(data, Mapping):
            raise CatalogError(f"model {name!r}: give its settings as keys under its name (path: ..., "
                               f"family: ...), not {type(data).__name__} {data!r}")
        family = str(data.get("family", "sd15")).lower()
        if family not in FAMILIES:
            raise CatalogError(f"model {name!r}: unknown family {family!r}; use one of {', '.join(FAMILIES)}")
        known = set(cls.__dataclass_fields__) - {"name"}
        unknown = set(data) - known
        if unknown:
            raise CatalogError(f"model {name!r}: unknown catalog keys {sorted(unknown)}; "
                               f"the keys are {', '.join(sorted(known))}")
        if "path" not in data:
            raise CatalogError(f"model {name!r}: 'path' (a local directory or hub id) is required")
        values: dict[str, Any] = dict(_DEFAULTS[family]) | dict(data)
        values["family"] = family
        try:
            values["native"] = tuple(int(v) for v in values["native"])
        except (TypeError, ValueError):
            raise CatalogError(f"model {name!r}: native must be [width, height], e.g. [512, 512], "
                               f"got {values['native']!r}") from None
        if len(values["native"]) != 2:
            raise CatalogError(f"model {name!r}: native must be [width, height], got {values['native']!r}")
        values["controlnets"] = {str(k): str(v) for k, v in dict(values.get("controlnets") or {}).items()}
        values["path"] = str(values["path"])
        values["dtype"] = str(values.get("dtype", "auto")).lower()
        if values["dtype"] not in DTYPES:
            raise CatalogError(f"model {name!r}: dtype must be one of {', '.join(DTYPES)}, got {values['dtype']!r}")
        if not isinstance(values.get("compile", False), bool):
            raise CatalogError(f"model {name!r}: compile must be true or false, got {values['compile']!r}")
        if values.get("offload") not in (None, "model", "sequential"):
            raise CatalogError(f"model {name!r}: offload must be 'model', 'sequential' or absent, "
                               f"got {values['offload']!r}")
        return cls(name=name, **values)


class Catalog:
    """The models a :class:`~providers.local.LocalProvider` serves, best default first."""

    def __init__(self, entries: list[ModelEntry] | None = None,
                 upscalers: list[UpscalerEntry] | None = None, detectors: Detectors | None = None) -> None:
        self._entries: dict[str, ModelEntry] = {e.name: e for e in entries or []}
        self.detectors: Detectors = detectors if detectors is not None else Detectors()
        """The ``detectors:`` section: per control kind, the local detector model that makes its map."""
        self.upscalers: dict[str, UpscalerEntry] = {u.name: u for u in upscalers or []}
        """The ``upscalers:`` section: ``.safetensors`` upscalers served for the ``upscale`` task."""
        both = set(self._entries) & set(self.upscalers)
        if both:
            raise CatalogError(f"catalog: {sorted(both)} named both as a model and as an upscaler; rename one")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Catalog:
        """``{"models": {...}, "upscalers": {...}, "detectors": {kind: path or {...}}}`` or ``{name: {...}}``."""
        if not isinstance(data, Mapping):
            raise CatalogError(f"catalog: expected 'models:' mapping names to settings, got {type(data).__name__}")
        upscalers = data.get("upscalers") or {}
        detectors = Detectors.from_dict(data.get("detectors") or {})
        models = data.get("models", {k: v for k, v in data.items() if k not in ("upscalers", "detectors")})
        if not isinstance(models, Mapping):
            raise CatalogError("catalog: 'models' must map model names to settings")
        if not isinstance(upscalers, Mapping):
            raise CatalogError("catalog: 'upscalers' must map upscaler names to settings (path: x.safetensors)")
        return cls([ModelEntry.from_dict(str(k), cast(Mapping[str, Any], v)) for k, v in models.items()],
                   [UpscalerEntry.from_dict(str(k), cast(Mapping[str, Any], v)) for k, v in upscalers.items()],
                   detectors)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Catalog:
        """Read a YAML catalog file (same shape as :meth:`from_dict`); errors (:class:`CatalogError`) name it."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise CatalogError(f"model catalog {path}: cannot read it ({exc.strerror or type(exc).__name__}); "
                               "IMAGEROUTER_MODELS names a YAML file with a 'models:' mapping") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise CatalogError(f"model catalog {path}: not valid YAML{at} "
                               f"({getattr(exc, 'problem', None) or type(exc).__name__})") from None
        try:
            return cls.from_dict(data)
        except CatalogError as exc:
            raise CatalogError(f"model catalog {path}: {exc.message.removeprefix('catalog: ')}") from None

    def get(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            have = ", ".join(self._entries) or "none"
            raise InvalidRequestError(f"no local model {name!r}: unknown name; the catalog has {have}") from None

    def upscaler(self, name: str) -> UpscalerEntry:
        try:
            return self.upscalers[name]
        except KeyError:
            raise InvalidRequestError(f"no local upscaler {name!r}; the catalog has "
                                      f"{', '.join(self.upscalers) or 'none'} under upscalers") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
