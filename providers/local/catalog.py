"""The local model catalog: which Diffusers models exist on this machine and how to run them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from router.errors import InvalidRequestError

Family = Literal["sd15", "sdxl", "flux"]
FAMILIES: tuple[Family, ...] = ("sd15", "sdxl", "flux")

_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd15": {"steps": 30, "guidance": 7.5, "native": (512, 512), "vram_gb": 4.0, "quality": 0.45},
    "sdxl": {"steps": 30, "guidance": 5.0, "native": (1024, 1024), "vram_gb": 10.0, "quality": 0.65},
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
    """A replacement VAE directory, e.g. the fp16-fix SDXL VAE, so fp16 decoding needs no fp32 upcast."""
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
        """Build from a mapping; family defaults fill what is left out."""
        family = str(data.get("family", "sd15")).lower()
        if family not in FAMILIES:
            raise InvalidRequestError(f"model {name!r}: unknown family {family!r}; use one of {', '.join(FAMILIES)}")
        known = set(cls.__dataclass_fields__) - {"name"}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequestError(f"model {name!r}: unknown catalog keys {sorted(unknown)}")
        if "path" not in data:
            raise InvalidRequestError(f"model {name!r}: 'path' (a local directory or hub id) is required")
        values: dict[str, Any] = dict(_DEFAULTS[family]) | dict(data)
        values["family"] = family
        values["native"] = tuple(int(v) for v in values["native"])
        values["controlnets"] = {str(k): str(v) for k, v in dict(values.get("controlnets") or {}).items()}
        values["path"] = str(values["path"])
        if values.get("offload") not in (None, "model", "sequential"):
            raise InvalidRequestError(f"model {name!r}: offload must be 'model', 'sequential' or absent, "
                                      f"got {values['offload']!r}")
        return cls(name=name, **values)


class Catalog:
    """The models a :class:`~providers.local.LocalProvider` serves, best default first."""

    def __init__(self, entries: list[ModelEntry] | None = None) -> None:
        self._entries: dict[str, ModelEntry] = {e.name: e for e in entries or []}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Catalog:
        """``{"models": {name: {...}}}`` or ``{name: {...}}``."""
        models = data.get("models", data)
        if not isinstance(models, Mapping):
            raise InvalidRequestError("catalog: 'models' must map model names to settings")
        return cls([ModelEntry.from_dict(str(k), cast(Mapping[str, Any], v)) for k, v in models.items()])

    @classmethod
    def from_yaml(cls, path: str | Path) -> Catalog:
        """Read a YAML catalog file (same shape as :meth:`from_dict`)."""
        import yaml

        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return cls.from_dict(data)

    def get(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise InvalidRequestError(
                f"no local model {name!r}; the catalog has {', '.join(self._entries) or 'none'}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
