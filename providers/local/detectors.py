"""Detector models that turn a photo into the map a ControlNet was trained on, from local weights only.

The catalog's ``detectors:`` section maps a control kind to its detector::

    detectors:
      depth: /models/dpt-hybrid-midas            # a transformers DPT depth directory (MiDaS v3)
      normal: /models/dpt-hybrid-midas           # normals derived from that depth, as controlnet-aux does
      seg: /models/upernet-convnext-small        # a transformers semantic-segmentation directory (ADE20K)
      softedge: {path: /models/ControlNetHED.safetensors, arch: hed}   # or arch: pidinet
      scribble: {path: /models/table5_pidinet.safetensors, arch: pidinet}
      lineart: /models/sk_model.safetensors
      pose: /models/body_pose_model.safetensors

``depth``, ``normal`` and ``seg`` run through ``transformers`` (``DPTForDepthEstimation``, any
``AutoModelForSemanticSegmentation``); ``softedge``/``scribble`` (HED, PiDiNet), ``lineart`` and ``pose``
(OpenPose body) run the ``controlnet-aux`` model classes and pre/post-processing on the operator's
``.safetensors`` state dicts. Nothing is downloaded (``local_files_only``), pickles are refused unread, and
nothing here imports torch, transformers or controlnet-aux until a detector is first used.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from providers.local.upscale import _PICKLED
from router.errors import CatalogError, InvalidRequestError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

ARCHS: dict[str, tuple[str, ...]] = {
    "depth": ("dpt",), "normal": ("dpt",), "seg": ("segmentation",), "softedge": ("hed", "pidinet"),
    "scribble": ("hed", "pidinet"), "lineart": ("lineart",), "pose": ("openpose",),
}
"""Per control kind, the detector architectures that make its map (the first is the default)."""
DIRECTORY_ARCHS = frozenset({"dpt", "segmentation"})
"""Architectures given as a transformers model directory; the others are one ``.safetensors`` file."""
_WHAT = {"dpt": "a transformers DPT depth model directory (e.g. Intel/dpt-hybrid-midas saved locally)",
         "segmentation": "a transformers semantic-segmentation directory (e.g. openmmlab/upernet-convnext-small)",
         "hed": "ControlNetHED as .safetensors", "pidinet": "table5_pidinet as .safetensors",
         "lineart": "sk_model as .safetensors", "openpose": "body_pose_model as .safetensors"}


def describe(kind: str) -> str:
    """What ``detectors.<kind>`` must name, for error messages."""
    return " or ".join(_WHAT[a] for a in ARCHS[kind])


class DetectorError(InvalidRequestError):
    """A configured detector that cannot be used: missing, pickled, or not the architecture it claims."""

    def __init__(self, kind: str, what: str, code: str = "invalid_detector") -> None:
        self.control_kind = kind
        super().__init__(f"detectors.{kind}: {what}", provider="local", code=code)


@dataclass(frozen=True, slots=True)
class DetectorEntry:
    """One catalog detector: the control kind it serves, its local weights and how to run it."""

    kind: str
    path: str
    arch: str
    resolution: int = 512
    """Short side the controlnet-aux detectors see (rounded to 64, their ``detect_resolution``); transformers
    models use their processor's size."""
    device: str = "cpu"

    @classmethod
    def from_dict(cls, kind: str, data: str | Mapping[str, Any]) -> DetectorEntry:
        """From a path or ``{path, arch, resolution, device}``. Errors are :class:`CatalogError`."""
        if kind not in ARCHS:
            raise CatalogError(f"detectors: no detector for control kind {kind!r} is supported; the kinds are "
                               f"{', '.join(ARCHS)}")
        if isinstance(data, (str, Path)):
            data = {"path": str(data)}
        if not isinstance(data, Mapping):
            raise CatalogError(f"detectors.{kind}: give a path or keys (path: ..., arch: ...), not {data!r}")
        known = set(cls.__dataclass_fields__) - {"kind"}
        unknown = set(data) - known
        if unknown:
            raise CatalogError(f"detectors.{kind}: unknown keys {sorted(unknown)}; the keys are "
                               f"{', '.join(sorted(known))}")
        if "path" not in data:
            raise CatalogError(f"detectors.{kind}: 'path' ({describe(kind)}) is required")
        values = dict(data)
        values["path"] = str(values["path"])
        values["arch"] = str(values.get("arch", ARCHS[kind][0])).lower()
        if values["arch"] not in ARCHS[kind]:
            raise CatalogError(f"detectors.{kind}: arch must be one of {', '.join(ARCHS[kind])}, "
                               f"got {values['arch']!r}")
        res = values.get("resolution", 512)
        if isinstance(res, bool) or not isinstance(res, int) or not 64 <= res <= 2048:
            raise CatalogError(f"detectors.{kind}: resolution must be a whole number from 64 to 2048, got {res!r}")
        values["device"] = str(values.get("device", "cpu"))
        return cls(kind=kind, **values)


class Detectors:
    """The catalog's detectors, loaded on first use and kept; :meth:`detect` is safe from several threads."""

    def __init__(self, entries: Mapping[str, DetectorEntry] | None = None) -> None:
        self.entries: dict[str, DetectorEntry] = dict(entries or {})
        self._loaded: dict[tuple[str, str, str], Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Detectors:
        """``{kind: path or {path, arch, resolution, device}}``; errors are :class:`CatalogError`."""
        if not isinstance(data, Mapping):
            raise CatalogError("catalog: 'detectors' must map control kinds (depth, pose, ...) to detector paths")
        return cls({str(k): DetectorEntry.from_dict(str(k), v) for k, v in data.items()})

    def __contains__(self, kind: object) -> bool:
        return kind in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def loads(self) -> int:
        """How many detector models have been loaded (each once per path, architecture and device)."""
        return len(self._loaded)

    def detect(self, kind: str, image: PILImage.Image) -> PILImage.Image:
        """The ``kind`` map of the RGB ``image``, at the image's size."""
        import numpy as np
        from PIL import Image

        entry = self.entries[kind]
        model = self._model(entry)
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        out = _RUN[entry.arch](model, rgb, entry)
        result = Image.fromarray(out).convert("RGB")
        return result if result.size == image.size else result.resize(image.size, Image.Resampling.BILINEAR)

    def _model(self, entry: DetectorEntry) -> Any:
        key = (entry.arch, entry.path, entry.device)
        with self._lock:  # one load per model, however many requests ask at once
            if key not in self._loaded:
                self._loaded[key] = _LOAD[entry.arch](entry)
            return self._loaded[key]


# --- loading -------------------------------------------------------------------------------


def _weights_file(entry: DetectorEntry) -> Path:
    path = Path(entry.path).expanduser()
    if path.suffix in _PICKLED:
        raise DetectorError(entry.kind, f"{path.name} is pickled; pickles can run code and are never loaded. "
                                        "Convert it to .safetensors (load it once in a trusted environment and "
                                        "save its state dict with safetensors.torch.save_file)",
                            code="unsafe_checkpoint")
    if not path.is_file():
        raise DetectorError(entry.kind, f"no such file {path}; put {_WHAT[entry.arch]} there or fix the path "
                                        "under detectors in the catalog", code="model_not_available")
    if path.suffix != ".safetensors":
        raise DetectorError(entry.kind, f"{path.name} is not a .safetensors file")
    return path


def _weights_dir(entry: DetectorEntry) -> Path:
    path = Path(entry.path).expanduser()
    if not (path / "config.json").is_file():
        raise DetectorError(entry.kind, f"{path} is not a model directory with config.json; give "
                                        f"{_WHAT[entry.arch]}", code="model_not_available")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(f.name for f in path.iterdir() if f.suffix in _PICKLED)
        why = (f"its weights ({', '.join(pickled)}) are pickled and never loaded; convert them to .safetensors"
               if pickled else "it has no .safetensors weights")
        raise DetectorError(entry.kind, f"{path}: {why}", code="unsafe_checkpoint" if pickled else
                            "model_not_available")
    return path


def _state_dict(entry: DetectorEntry) -> dict[str, Any]:
    from safetensors.torch import load_file

    path = _weights_file(entry)
    try:
        return load_file(str(path))
    except Exception as exc:
        raise DetectorError(entry.kind, f"{path.name} is not a readable safetensors file ({exc})"[:400]) from None


def _into(entry: DetectorEntry, module: Any, state: Mapping[str, Any]) -> Any:
    try:
        module.load_state_dict(dict(state))
    except RuntimeError as exc:
        raise DetectorError(entry.kind, f"{Path(entry.path).name} is not {_WHAT[entry.arch]}: "
                                        f"{str(exc).splitlines()[0]}"[:400]) from None
    return module.float().eval().to(entry.device)


_ALIAS = "_pixroute_controlnet_aux"
_IMPORT_LOCK = threading.Lock()


def _aux(module: str) -> Any:
    """``controlnet_aux.<module>``, imported under a private name without running ``controlnet_aux/__init__.py``.

    That file imports all eighteen detectors at once, and with them torchvision, timm and scikit-image, which
    HED, PiDiNet, lineart and the OpenPose body model never use; ``open_pose/__init__.py`` likewise imports
    the torchvision-bound face model. Those two packages are bare module objects pointing at their folders
    (:data:`_BARE`); the public ``controlnet_aux`` name is left alone.
    """
    with _IMPORT_LOCK:
        name = f"{_ALIAS}.{module}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.find_spec("controlnet_aux")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("controlnet-aux is not installed: pip install --no-deps "
                                      "'controlnet-aux==0.0.10' (HED, PiDiNet, lineart and OpenPose detectors)")
        root = Path(next(iter(spec.submodule_search_locations)))
        _bare(_ALIAS, root)
        for package in _BARE:
            if name.startswith(f"{_ALIAS}.{package}."):
                _bare(f"{_ALIAS}.{package}", root / package)
        with warnings.catch_warnings():  # open_pose imports scipy.ndimage.filters, deprecated in SciPy 1.x
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(name)


_BARE = ("open_pose",)
"""controlnet-aux packages whose ``__init__.py`` is skipped when a module inside them is imported."""


def _bare(package: str, folder: Path) -> None:
    if package not in sys.modules:
        stub = types.ModuleType(package)
        stub.__path__ = [str(folder)]
        stub.__package__ = package
        sys.modules[package] = stub


def _load_hed(entry: DetectorEntry) -> Any:
    hed = _aux("hed")
    return hed.HEDdetector(_into(entry, hed.ControlNetHED_Apache2(), _state_dict(entry)))


def _load_pidinet(entry: DetectorEntry) -> Any:
    pidi, model = _aux("pidi"), _aux("pidi.model")
    # The published table5_pidinet checkpoint was saved from DataParallel: its keys start with "module.".
    state = {k.removeprefix("module."): v for k, v in _state_dict(entry).items()}
    return pidi.PidiNetDetector(_into(entry, model.pidinet(), state))


def _load_lineart(entry: DetectorEntry) -> Any:
    lineart = _aux("lineart")
    model = _into(entry, lineart.Generator(3, 1, 3), _state_dict(entry))
    return lineart.LineartDetector(model, model)  # the coarse model is never asked for


def _load_openpose(entry: DetectorEntry) -> Any:
    util = _aux("open_pose.util")  # first: util and body import each other, and util must start
    body = _aux("open_pose.body")
    net = body.bodypose_model()
    state = _state_dict(entry)
    if set(state) != set(net.state_dict()):  # the CMU checkpoint names layers without their block prefix
        try:
            state = util.transfer(net, state)
        except KeyError as exc:
            raise DetectorError(entry.kind, f"{Path(entry.path).name} is not {_WHAT['openpose']}: no tensor "
                                            f"{exc}") from None
    estimator = body.Body.__new__(body.Body)  # Body(path) would torch.load a pickle
    estimator.model = _into(entry, net, state)
    return estimator


def _load_transformers(auto: str) -> Callable[[DetectorEntry], Any]:
    def load(entry: DetectorEntry) -> Any:
        import transformers

        path = _weights_dir(entry)
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
            model = getattr(transformers, auto).from_pretrained(str(path), local_files_only=True,
                                                                use_safetensors=True)
        except (OSError, ValueError, KeyError) as exc:
            raise DetectorError(entry.kind, f"{path} is not {_WHAT[entry.arch]}: {exc}"[:400]) from None
        return processor, model.float().eval().to(entry.device)

    return load


_LOAD: dict[str, Callable[[DetectorEntry], Any]] = {
    "hed": _load_hed, "pidinet": _load_pidinet, "lineart": _load_lineart, "openpose": _load_openpose,
    "dpt": _load_transformers("AutoModelForDepthEstimation"),
    "segmentation": _load_transformers("AutoModelForSemanticSegmentation"),
}


# --- running -------------------------------------------------------------------------------


def _aux_edges(model: Any, rgb: np.ndarray[Any, Any], entry: DetectorEntry) -> np.ndarray[Any, Any]:
    import numpy as np

    # controlnet-aux's own pre/post-processing; scribble is its scribble=True (NMS, blur, threshold).
    return np.asarray(model(rgb, detect_resolution=entry.resolution, image_resolution=entry.resolution,
                            output_type="np", scribble=entry.kind == "scribble"))


def _run_lineart(model: Any, rgb: np.ndarray[Any, Any], entry: DetectorEntry) -> np.ndarray[Any, Any]:
    import numpy as np

    return np.asarray(model(rgb, detect_resolution=entry.resolution, image_resolution=entry.resolution,
                            output_type="np"))


def _run_openpose(model: Any, rgb: np.ndarray[Any, Any], entry: DetectorEntry) -> np.ndarray[Any, Any]:
    """Body keypoints drawn as controlnet-aux's ``OpenposeDetector`` draws them (body only, no hands or face:
    those modules need torchvision).

    https://github.com/huggingface/controlnet_aux/blob/master/src/controlnet_aux/open_pose/__init__.py
    """
    import numpy as np
    import torch

    util, draw = _aux("util"), _aux("open_pose.util").draw_bodypose
    body = _aux("open_pose.body")
    image = util.resize_image(util.HWC3(rgb), entry.resolution)
    h, w = image.shape[:2]
    with torch.no_grad():
        candidate, subset = model(image[:, :, ::-1].copy())  # the body model reads BGR
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    for person in body.Body.format_body_result(candidate, subset):
        keypoints = [None if k is None else body.Keypoint(x=k.x / float(w), y=k.y / float(h))
                     for k in person.keypoints]
        canvas = draw(canvas, keypoints)
    return canvas


def _predict_depth(model: Any, rgb: np.ndarray[Any, Any], entry: DetectorEntry) -> np.ndarray[Any, Any]:
    """The raw relative inverse depth (MiDaS: larger is nearer) at the image's size."""
    import numpy as np
    import torch

    processor, net = model
    inputs = processor(images=rgb, return_tensors="pt").to(entry.device)
    with torch.no_grad():
        outputs = net(**inputs)
    # Back to the image's size as transformers' depth-estimation pipeline does (bicubic, in the processor).
    depth = processor.post_process_depth_estimation(outputs, target_sizes=[rgb.shape[:2]])[0]["predicted_depth"]
    return np.asarray(depth.float().cpu().numpy(), dtype=np.float32)


def _normalized(depth: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    import numpy as np

    shifted = depth - depth.min()
    peak = float(shifted.max())
    return np.asarray(shifted / peak if peak > 0 else shifted, dtype=np.float32)  # flat depth: all zero


def _run_depth(model: Any, rgb: np.ndarray[Any, Any], entry: DetectorEntry) -> np.ndarray[Any, Any]:
    """Depth min–max normalized to 0–255, as controlnet-aux's ``MidasDetector``.

    https://github.com/huggingface/controlnet_aux/blob/master/src/controlnet_aux/midas/__init__.py
    """
    import numpy as np

    return (_normalized(_predict_depth(model, rgb, entry)) * 255.0).clip(0, 255).astype(np.uint8)


def _run_normal(model: Any, rgb: np.ndarray[Any, Any], entry: DetectorEntry) -> np.ndarray[Any, Any]:
    """Normals from depth as controlnet-aux's ``MidasDetector(depth_and_normal=True)`` makes them (the map
    ControlNet 1.0's normal model was trained on): Sobel slopes of the raw depth, zeroed where the normalized
    depth is under 0.1 (background), z = 2π, unit length, written as (z, y, x) in 0–255.

    https://github.com/huggingface/controlnet_aux/blob/master/src/controlnet_aux/midas/__init__.py
    """
    import numpy as np

    depth = _predict_depth(model, rgb, entry)
    near = _normalized(depth)
    x, y = _sobel(depth, axis=1), _sobel(depth, axis=0)
    x[near < 0.1] = 0
    y[near < 0.1] = 0
    normal = np.stack([x, y, np.full_like(x, np.pi * 2.0)], axis=2)
    normal /= np.sum(normal**2.0, axis=2, keepdims=True) ** 0.5
    return np.asarray((normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)[:, :, ::-1])


def _sobel(values: np.ndarray[Any, Any], axis: int) -> np.ndarray[Any, Any]:
    """OpenCV's 3×3 Sobel derivative along ``axis`` (1: x, 0: y), with its default reflect-101 border."""
    import numpy as np

    p = np.pad(values, 1, mode="reflect")
    h, w = values.shape
    if axis == 1:
        diff = p[:, 2:] - p[:, :-2]
        return np.asarray(diff[:-2] + 2 * diff[1:-1] + diff[2:], dtype=np.float32)[:h, :w]
    diff = p[2:] - p[:-2]
    return np.asarray(diff[:, :-2] + 2 * diff[:, 1:-1] + diff[:, 2:], dtype=np.float32)[:h, :w]


def _run_segmentation(model: Any, rgb: np.ndarray[Any, Any], entry: DetectorEntry) -> np.ndarray[Any, Any]:
    """ADE20K class per pixel, painted in the ADE20K palette the seg ControlNet was trained on."""
    import numpy as np
    import torch

    processor, net = model
    inputs = processor(images=rgb, return_tensors="pt").to(entry.device)
    with torch.no_grad():
        outputs = net(**inputs)
    labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[rgb.shape[:2]])[0]
    classes = np.asarray(labels.cpu().numpy(), dtype=np.int64)
    palette = np.asarray(ADE20K_PALETTE, dtype=np.uint8).reshape(-1, 3)
    return np.asarray(palette[classes % len(palette)])


_RUN: dict[str, Callable[[Any, np.ndarray[Any, Any], DetectorEntry], np.ndarray[Any, Any]]] = {
    "hed": _aux_edges, "pidinet": _aux_edges, "lineart": _run_lineart, "openpose": _run_openpose,
    "dpt": lambda m, rgb, e: (_run_normal if e.kind == "normal" else _run_depth)(m, rgb, e),
    "segmentation": _run_segmentation,
}

# The ADE20K palette, class 0 (wall) first: mmsegmentation's ADE20KDataset.PALETTE, which ControlNet's
# UniFormer/OneFormer annotators paint with. The seg model card lists the same colours after a leading black:
# https://huggingface.co/lllyasviel/control_v11p_sd15_seg (README, "ada_palette")
ADE20K_PALETTE: tuple[int, ...] = (
    120, 120, 120, 180, 120, 120, 6, 230, 230, 80, 50, 50, 4, 200, 3, 120, 120, 80, 140, 140, 140, 204, 5, 255,
    230, 230, 230, 4, 250, 7, 224, 5, 255, 235, 255, 7, 150, 5, 61, 120, 120, 70, 8, 255, 51, 255, 6, 82,
    143, 255, 140, 204, 255, 4, 255, 51, 7, 204, 70, 3, 0, 102, 200, 61, 230, 250, 255, 6, 51, 11, 102, 255,
    255, 7, 71, 255, 9, 224, 9, 7, 230, 220, 220, 220, 255, 9, 92, 112, 9, 255, 8, 255, 214, 7, 255, 224,
    255, 184, 6, 10, 255, 71, 255, 41, 10, 7, 255, 255, 224, 255, 8, 102, 8, 255, 255, 61, 6, 255, 194, 7,
    255, 122, 8, 0, 255, 20, 255, 8, 41, 255, 5, 153, 6, 51, 255, 235, 12, 255, 160, 150, 20, 0, 163, 255,
    140, 140, 140, 250, 10, 15, 20, 255, 0, 31, 255, 0, 255, 31, 0, 255, 224, 0, 153, 255, 0, 0, 0, 255,
    255, 71, 0, 0, 235, 255, 0, 173, 255, 31, 0, 255, 11, 200, 200, 255, 82, 0, 0, 255, 245, 0, 61, 255,
    0, 255, 112, 0, 255, 133, 255, 0, 0, 255, 163, 0, 255, 102, 0, 194, 255, 0, 0, 143, 255, 51, 255, 0,
    0, 82, 255, 0, 255, 41, 0, 255, 173, 10, 0, 255, 173, 255, 0, 0, 255, 153, 255, 92, 0, 255, 0, 255,
    255, 0, 245, 255, 0, 102, 255, 173, 0, 255, 0, 20, 255, 184, 184, 0, 31, 255, 0, 255, 61, 0, 71, 255,
    255, 0, 204, 0, 255, 194, 0, 255, 82, 0, 10, 255, 0, 112, 255, 51, 0, 255, 0, 194, 255, 0, 122, 255,
    0, 255, 163, 255, 153, 0, 0, 255, 10, 255, 112, 0, 143, 255, 0, 82, 0, 255, 163, 255, 0, 255, 235, 0,
    8, 184, 170, 133, 0, 255, 0, 255, 92, 184, 0, 255, 255, 0, 31, 0, 184, 255, 0, 214, 255, 255, 0, 112,
    92, 255, 0, 0, 224, 255, 112, 224, 255, 70, 184, 160, 163, 0, 255, 153, 0, 255, 71, 255, 0, 255, 0, 163,
    255, 204, 0, 255, 0, 143, 0, 255, 235, 133, 255, 0, 255, 0, 235, 245, 0, 255, 255, 0, 122, 255, 245, 0,
    10, 190, 212, 214, 255, 0, 0, 204, 255, 20, 0, 255, 255, 255, 0, 0, 153, 255, 0, 41, 255, 0, 255, 204,
    41, 0, 255, 41, 255, 0, 173, 0, 255, 0, 245, 255, 71, 0, 255, 122, 0, 255, 0, 255, 184, 0, 92, 255,
    184, 255, 0, 0, 133, 255, 255, 214, 0, 25, 194, 194, 102, 255, 0, 92, 0, 255,
)
