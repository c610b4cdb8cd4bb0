"""Control maps for ControlNet: computed from a photo where no detector model is needed, else passed through.

``canny`` (OpenCV when installed, else a NumPy Canny), ``scribble`` (thick edges),
``lineart`` (thin edges) and ``softedge`` (blurred edges) are computed here, as white
lines on black, the way those ControlNets were trained. ``tile`` and ``shuffle`` take
the image itself. ``depth``, ``pose``, ``seg``, ``normal`` and ``mlsd`` need a detector
model: give the map you computed with ``preprocess=False``; with ``preprocess=True`` they
raise :class:`DetectorNotConfigured` rather than feed a photo to a ControlNet that
expects a map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from router.errors import InvalidRequestError

if TYPE_CHECKING:
    from PIL import Image as PILImage

COMPUTED = frozenset({"canny", "scribble", "lineart", "softedge"})
IDENTITY = frozenset({"tile", "shuffle"})
NEEDS_DETECTOR = frozenset({"depth", "pose", "seg", "normal", "mlsd", "lineart_anime"})


class DetectorNotConfigured(InvalidRequestError):
    """The control kind needs a detector model to turn a photo into its map, and none is configured."""

    def __init__(self, kind: str) -> None:
        self.control_kind = kind
        super().__init__(
            f"control kind {kind!r} needs a {kind} detector to turn a photo into a {kind} map, and none is "
            f"configured; compute the map yourself and pass it with preprocess=False", provider="local",
            code="detector_not_configured")


def control_map(image: PILImage.Image, kind: str, size: tuple[int, int], *, preprocess: bool = True,
                low: int = 100, high: int = 200) -> PILImage.Image:
    """The RGB control image for ``kind`` at ``size`` (width, height)."""
    from PIL import Image

    rgb = image.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    if not preprocess or kind in IDENTITY:
        return rgb
    if kind in NEEDS_DETECTOR:
        raise DetectorNotConfigured(kind)
    gray = np.asarray(rgb.convert("L"), dtype=np.float32)
    edges = canny(gray, low, high)
    if kind == "scribble":
        edges = _dilate(edges, 2)
    elif kind == "softedge":
        edges = _blur(edges.astype(np.float32) * 255.0, 1.5) > 24
    return Image.fromarray(np.where(edges, 255, 0).astype(np.uint8)).convert("RGB")


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
