"""Local upscalers: Real-ESRGAN / SwinIR-family models loaded with ``spandrel`` from ``.safetensors``.

An upscaler is one ``.safetensors`` file named in the catalog's ``upscalers:`` section; spandrel
reads its architecture and scale from the tensors' names and shapes. Pickled ``.pth`` files are
refused before anything is read (spandrel would ``torch.load`` them). Large images run in tiles
with an overlapping margin of context that is cut away after upscaling, so memory stays bounded
and the seams carry no visible edge. A factor the model does not make natively (2× from a 4×
model) is the model's output resized with LANCZOS; a larger one runs the model again.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.errors import CatalogError, InvalidRequestError, ProviderTimeout

_PICKLED = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


class UpscalerError(InvalidRequestError):
    """An upscaler that cannot be used: missing, pickled, or not an architecture spandrel knows."""

    def __init__(self, name: str, what: str, code: str = "invalid_upscaler") -> None:
        self.upscaler = name
        super().__init__(f"upscaler {name!r}: {what}", provider="local", code=code)


@dataclass(frozen=True, slots=True)
class UpscalerEntry:
    """One local upscaler: its ``.safetensors`` file and how to run it."""

    name: str
    path: str
    tile: int = 512
    """Input tile side in pixels (0: the whole image at once)."""
    overlap: int = 32
    """Context in pixels around each tile, upscaled and then cut away."""
    quality: float = 0.6
    max_side: int = 4096
    """Largest input side accepted."""

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> UpscalerEntry:
        if not isinstance(data, Mapping):
            raise CatalogError(f"upscaler {name!r}: give its settings as keys (path: ..., tile: ...), not {data!r}")
        known = set(cls.__dataclass_fields__) - {"name"}
        unknown = set(data) - known
        if unknown:
            raise CatalogError(f"upscaler {name!r}: unknown catalog keys {sorted(unknown)}; the keys are "
                               f"{', '.join(sorted(known))}")
        if "path" not in data:
            raise CatalogError(f"upscaler {name!r}: 'path' (a local .safetensors file) is required")
        values = dict(data)
        for key in ("tile", "overlap", "max_side"):
            if key in values and (isinstance(values[key], bool) or not isinstance(values[key], int)
                                  or values[key] < 0):
                raise CatalogError(f"upscaler {name!r}: {key} must be a whole number ≥ 0, got {values[key]!r}")
        values["path"] = str(values["path"])
        return cls(name=name, **values)


def check_file(entry: UpscalerEntry) -> Path:
    """The upscaler's file: it exists and is ``.safetensors``; pickles are refused unread."""
    path = Path(entry.path).expanduser()
    if path.suffix in _PICKLED:
        raise UpscalerError(entry.name, f"{path.name} is pickled; pickles can run code and are never loaded. "
                                        "Convert it to .safetensors (load it once in a trusted environment and "
                                        "save its state dict with safetensors.torch.save_file)",
                            code="unsafe_checkpoint")
    if not path.is_file():
        raise UpscalerError(entry.name, f"no such file {path}; download it there or fix its path under upscalers "
                                        "in the catalog", code="model_not_available")
    if path.suffix != ".safetensors":
        raise UpscalerError(entry.name, f"{path.name} is not a .safetensors file")
    return path


@contextlib.contextmanager
def _without_torchvision() -> Iterator[None]:
    """Let ``import spandrel`` succeed where torchvision is absent or cannot load (a CPU-only torch with
    the CUDA torchvision wheel). Only spandrel's LaMa and RestoreFormer use torchvision, and neither is an
    upscaler: they get placeholders that raise if called; the placeholders leave ``sys.modules`` after."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    else:
        yield
        return

    def missing(*_: Any, **__: Any) -> Any:
        raise RuntimeError("torchvision is not available; this spandrel architecture needs it")

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = type("InterpolationMode", (), {"NEAREST": 0, "BILINEAR": 2})  # type: ignore[attr-defined]
    functional.rotate = missing  # type: ignore[attr-defined]
    functional.normalize = missing  # type: ignore[attr-defined]
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional  # type: ignore[attr-defined]
    root = types.ModuleType("torchvision")
    root.transforms = transforms  # type: ignore[attr-defined]
    stubs = {"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


_IMPORT_LOCK = threading.Lock()


def _spandrel() -> Any:
    with _IMPORT_LOCK:
        if "spandrel" in sys.modules:
            return sys.modules["spandrel"]
        with _without_torchvision():
            import spandrel
        return spandrel


def load(entry: UpscalerEntry, device: str) -> Any:
    """The spandrel model descriptor for ``entry``, on ``device`` in eval mode (half precision on CUDA where
    the architecture supports it)."""
    path = check_file(entry)
    from safetensors.torch import load_file

    spandrel = _spandrel()
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise UpscalerError(entry.name, f"not a readable safetensors file ({exc})"[:400]) from None
    try:
        model = spandrel.ModelLoader().load_from_state_dict(spandrel.canonicalize_state_dict(state))
    except Exception as exc:
        raise UpscalerError(entry.name, f"not an upscaler architecture spandrel knows ({type(exc).__name__}: "
                                        f"{exc})"[:400], code="unsupported_upscaler") from None
    if not isinstance(model, spandrel.ImageModelDescriptor) or model.purpose not in ("SR", "Restoration"):
        raise UpscalerError(entry.name, f"is a {model.architecture.name} model for {model.purpose}, not an upscaler",
                            code="unsupported_upscaler")
    model.to(device).eval()
    if device.startswith("cuda"):
        import torch

        if model.supports_half:
            model.to(torch.float16)
        elif model.supports_bfloat16:
            model.to(torch.bfloat16)
    return model


def passes(native: int, factor: float) -> int:
    """How many times a ``native``× model runs to reach ``factor`` (then resized down to it)."""
    if native <= 1:
        return 1
    return max(1, math.ceil(math.log(factor) / math.log(native) - 1e-9))


def output_size(width: int, height: int, factor: float) -> tuple[int, int]:
    return max(1, round(width * factor)), max(1, round(height * factor))


def upscale(model: Any, image: Any, factor: float, *, tile: int = 512, overlap: int = 32,
            check: Callable[[], None] | None = None) -> Any:
    """``image`` (PIL) upscaled by ``factor`` with ``model`` (a spandrel descriptor); ``check`` runs between
    tiles and may raise to stop (deadline, cancellation)."""
    from PIL import Image

    rgb = image.convert("RGB")
    out = rgb
    for _ in range(passes(model.scale, factor)):
        out = _run_tiled(model, out, tile, overlap, check)
    size = output_size(rgb.width, rgb.height, factor)
    return out if out.size == size else out.resize(size, Image.Resampling.LANCZOS)


def _run_tiled(model: Any, image: Any, tile: int, overlap: int, check: Callable[[], None] | None) -> Any:
    import numpy as np
    import torch
    from PIL import Image

    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    _, _, height, width = arr.shape
    scale = model.scale
    out = torch.zeros((1, 3, height * scale, width * scale), dtype=torch.float32)
    step = tile or max(height, width)
    device, dtype = model.device, model.dtype
    with torch.inference_mode():
        for y in range(0, height, step):
            for x in range(0, width, step):
                if check is not None:
                    check()
                y0, y1 = max(0, y - overlap), min(height, y + step + overlap)
                x0, x1 = max(0, x - overlap), min(width, x + step + overlap)
                piece = _padded_call(model, arr[:, :, y0:y1, x0:x1].to(device, dtype))
                h, w = min(step, height - y), min(step, width - x)
                oy, ox = (y - y0) * scale, (x - x0) * scale
                out[:, :, y * scale:(y + h) * scale, x * scale:(x + w) * scale] = \
                    piece[:, :, oy:oy + h * scale, ox:ox + w * scale].float().cpu()
    pixels = (out.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(pixels)


def _padded_call(model: Any, piece: Any) -> Any:
    """Run ``model`` on ``piece``, padding it (reflect) to the architecture's size multiple and minimum."""
    import torch.nn.functional as F

    _, _, h, w = piece.shape
    req = model.size_requirements
    multiple = max(1, req.multiple_of)
    th = max(req.minimum, math.ceil(h / multiple) * multiple)
    tw = max(req.minimum, math.ceil(w / multiple) * multiple)
    if (th, tw) != (h, w):
        mode = "reflect" if th - h < h and tw - w < w else "replicate"
        piece = F.pad(piece, (0, tw - w, 0, th - h), mode=mode)
    result = model(piece)
    return result[:, :, : h * model.scale, : w * model.scale]


def deadline_check(cancel: threading.Event, deadline: float, clock: Callable[[], float]) -> Callable[[], None]:
    """A ``check`` for :func:`upscale` that stops at the deadline or on cancellation."""

    def check() -> None:
        if cancel.is_set() or clock() > deadline:
            raise ProviderTimeout("upscale interrupted: deadline passed or cancelled", provider="local")

    return check
