"""Control maps for ControlNet: each kind's map made the way that ControlNet's training maps were made.

``canny`` is computed here (OpenCV when installed, else a NumPy Canny), white edges on black.
``shuffle`` is a content shuffle (controlnet-aux's ``ContentShuffleDetector``), seeded. ``tile``
takes the image itself. ``softedge`` and ``scribble`` (HED / PiDiNet), ``lineart``, ``depth``
(MiDaS DPT), ``normal`` (from that depth), ``seg`` (ADE20K) and ``pose`` (OpenPose) need a detector
model named under ``detectors:`` in the local catalog (:mod:`providers.local.detectors`); without one
they raise :class:`DetectorNotConfigured` rather than feed a photo to a ControlNet that expects a map.
``mlsd`` and ``lineart_anime`` have no detector here: give the map with ``preprocess=False``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from providers.local.detectors import ARCHS, describe
from router.errors import InvalidRequestError

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from providers.local.detectors import Detectors

COMPUTED = frozenset({"canny"})
IDENTITY = frozenset({"tile"})
NEEDS_DETECTOR = frozenset({"depth", "pose", "seg", "normal", "softedge", "scribble", "lineart", "mlsd",
                            "lineart_anime"})


class DetectorNotConfigured(InvalidRequestError):
    """The control kind needs a detector model to turn a photo into its map, and none is configured."""

    def __init__(self, kind: str) -> None:
        self.control_kind = kind
        if kind in ARCHS:
            how = (f"set detectors.{kind} in the local model catalog (IMAGEROUTER_MODELS) to {describe(kind)}, "
                   "or compute the map yourself and pass it with preprocess=False")
        else:
            how = "no detector for it is supported here: compute the map yourself and pass it with preprocess=False"
        super().__init__(f"control kind {kind!r} needs a {kind} detector to turn a photo into a {kind} map, and "
                         f"none is configured; {how}", provider="local", code="detector_not_configured")


def control_map(image: PILImage.Image, kind: str, size: tuple[int, int], *, preprocess: bool = True,
                low: int = 100, high: int = 200, detectors: Detectors | None = None,
                seed: int = 0) -> PILImage.Image:
    """The RGB control image for ``kind`` at ``size`` (width, height).

    ``detectors`` make the maps that need a model; ``seed`` fixes the ``shuffle`` pattern.
    """
    from PIL import Image

    rgb = image.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    if not preprocess or kind in IDENTITY:
        return rgb
    if kind == "shuffle":
        return content_shuffle(rgb, seed)
    if kind in NEEDS_DETECTOR:
        if detectors is None or kind not in detectors:
            raise DetectorNotConfigured(kind)
        return detectors.detect(kind, rgb)
    gray = np.asarray(rgb.convert("L"), dtype=np.float32)
    edges = canny(gray, low, high)
    return Image.fromarray(np.where(edges, 255, 0).astype(np.uint8)).convert("RGB")


def content_shuffle(image: PILImage.Image, seed: int) -> PILImage.Image:
    """``image`` with its content moved along a smooth random flow field, as controlnet-aux's
    ``ContentShuffleDetector`` (the shuffle ControlNet's training preprocessor) does, seeded.

    Each output pixel samples the source at (x, y) drawn from two bicubically upsampled noise grids,
    min–max stretched over the whole image; the grid cell is half the short side (f=256 at the
    detector's 512). https://github.com/huggingface/controlnet_aux/blob/master/src/controlnet_aux/shuffle/__init__.py
    """
    from PIL import Image

    src = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = src.shape[:2]
    rng = np.random.default_rng(seed)
    cell = max(2, min(h, w) // 2)
    x = _noise_disk(rng, h, w, cell) * float(w - 1)
    y = _noise_disk(rng, h, w, cell) * float(h - 1)
    return Image.fromarray(_bilinear(src, x, y).round().clip(0, 255).astype(np.uint8))


def _noise_disk(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray[Any, Any]:
    """controlnet-aux's ``make_noise_disk``: uniform noise on a coarse grid, upsampled bicubically, cropped,
    stretched to 0–1."""
    from PIL import Image

    coarse = rng.uniform(0.0, 1.0, size=(h // cell + 2, w // cell + 2)).astype(np.float32)
    big = np.asarray(Image.fromarray(coarse).resize((w + 2 * cell, h + 2 * cell),
                                                               Image.Resampling.BICUBIC), dtype=np.float64)
    noise = big[cell:cell + h, cell:cell + w]
    noise -= noise.min()
    return noise / max(float(noise.max()), 1e-8)


def _bilinear(src: np.ndarray[Any, Any], x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``src`` sampled at the float coordinates (x, y) with bilinear weights (``cv2.remap`` INTER_LINEAR)."""
    h, w = src.shape[:2]
    x0 = np.clip(np.floor(x).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(y).astype(np.int64), 0, h - 1)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    top = src[y0, x0] * (1 - fx) + src[y0, x1] * fx
    bottom = src[y1, x0] * (1 - fx) + src[y1, x1] * fx
    return np.asarray(top * (1 - fy) + bottom * fy)


def canny(gray: np.ndarray[Any, Any], low: float, high: float) -> np.ndarray[Any, Any]:
    """Canny edges of a grayscale image (0–255 floats) as a boolean array."""
    try:
        import cv2
    except ImportError:
        return _canny_numpy(gray, low, high)
    return np.asarray(cv2.Canny(gray.astype(np.uint8), low, high)) > 0


def _canny_numpy(gray: np.ndarray[Any, Any], low: float, high: float) -> np.ndarray[Any, Any]:
    smooth = _blur(gray, 1.4)
    pad = np.pad(smooth, 1, mode="edge")
    gx = (pad[:-2, 2:] + 2 * pad[1:-1, 2:] + pad[2:, 2:]) - (pad[:-2, :-2] + 2 * pad[1:-1, :-2] + pad[2:, :-2])
    gy = (pad[2:, :-2] + 2 * pad[2:, 1:-1] + pad[2:, 2:]) - (pad[:-2, :-2] + 2 * pad[:-2, 1:-1] + pad[:-2, 2:])
    mag = np.hypot(gx, gy)
    # Non-maximum suppression along the gradient direction, quantized to 0/45/90/135 degrees.
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = ((angle + 22.5) // 45).astype(np.int8) % 4
    m = np.pad(mag, 1)
    h, w = mag.shape
    neighbours = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = np.zeros_like(mag, dtype=bool)
    for s, ((dy1, dx1), (dy2, dx2)) in neighbours.items():
        a = m[1 + dy1:1 + dy1 + h, 1 + dx1:1 + dx1 + w]
        b = m[1 + dy2:1 + dy2 + h, 1 + dx2:1 + dx2 + w]
        keep |= (sector == s) & (mag > a) & (mag >= b)
    thin = np.where(keep, mag, 0.0)
    strong = thin >= high
    weak = thin >= low
    # Hysteresis: grow the strong edges through connected weak pixels until nothing changes.
    edges = strong
    while True:
        grown = _dilate(edges, 1) & weak
        if np.array_equal(grown, edges):
            return edges
        edges = grown


def _dilate(mask: np.ndarray[Any, Any], radius: int) -> np.ndarray[Any, Any]:
    padded = np.pad(mask, radius)
    h, w = mask.shape
    out = np.zeros_like(mask, dtype=bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def _blur(values: np.ndarray[Any, Any], sigma: float) -> np.ndarray[Any, Any]:
    radius = max(1, int(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    pad = np.pad(values.astype(np.float32), radius, mode="edge")
    rows = sum(k * pad[:, i:i + values.shape[1]] for i, k in enumerate(kernel))
    return np.asarray(sum(k * rows[i:i + values.shape[0], :] for i, k in enumerate(kernel)))
