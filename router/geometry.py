"""Output shapes: exact sizes, aspect ratios and how each backend's limits adapt them."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SizeRules:
    """What shapes a model produces: free sizes within limits, or a fixed list."""

    multiple: int = 8
    min_side: int = 256
    max_side: int = 2048
    min_pixels: int = 0
    max_pixels: int = 2048 * 2048
    max_ratio: float = 4.0  # long side / short side
    fixed: tuple[tuple[int, int], ...] = ()  # when set, only these shapes
    native: tuple[int, int] = (1024, 1024)  # the shape used when a request names none

    def allows(self, w: int, h: int) -> bool:
        if self.fixed:
            return (w, h) in self.fixed
        return (
            w % self.multiple == 0 and h % self.multiple == 0
            and self.min_side <= min(w, h) and max(w, h) <= self.max_side
            and self.min_pixels <= w * h <= self.max_pixels
            and max(w, h) / min(w, h) <= self.max_ratio
        )

    def within_range(self, w: int, h: int) -> bool:
        """Whether w×h lies inside the model's range, so that adapting it only rounds (to the multiple, or
        to the nearest fixed shape). A fixed set's range reaches up to its largest shape and across its
        aspect ratios; below its smallest shape a request is rounded up to the nearest one."""
        ratio = max(w, h) / min(w, h)
        if self.fixed:
            return (max(w, h) <= max(max(s) for s in self.fixed) and w * h <= max(a * b for a, b in self.fixed)
                    and ratio <= max(max(s) / min(s) for s in self.fixed) * 1.02)
        return (self.min_side <= min(w, h) and max(w, h) <= self.max_side
                and self.min_pixels <= w * h <= self.max_pixels and ratio <= self.max_ratio)

    def describe(self) -> str:
        """The range in words, for a rejection reason: "sides 256-2048 px in multiples of 8, up to 4.2 MP"."""
        if self.fixed:
            return "one of " + ", ".join(f"{w}x{h}" for w, h in self.fixed)
        parts = [f"sides {self.min_side}-{self.max_side} px" + (f" in multiples of {self.multiple}"
                                                                  if self.multiple > 1 else "")]
        if self.max_pixels < self.max_side**2:
            parts.append(f"at most {self.max_pixels / 1e6:.2f} MP")
        if self.min_pixels > self.min_side**2:
            parts.append(f"at least {self.min_pixels / 1e6:.2f} MP")
        if self.max_ratio < self.max_side / self.min_side:
            parts.append(f"long side at most {self.max_ratio:g}x the short")
        return ", ".join(parts)

    def nearest(self, w: int, h: int) -> tuple[int, int]:
        """The producible shape closest to w×h (aspect ratio first, then area)."""
        if self.allows(w, h):
            return w, h
        if self.fixed:
            return min(self.fixed, key=lambda s: (abs(math.log((s[0] / s[1]) / (w / h))), abs(s[0] * s[1] - w * h)))
        ratio = min(max(w / h, 1 / self.max_ratio), self.max_ratio)
        return self._snap(ratio, self._area_within(ratio, w * h))

    def for_ratio(self, ratio: float) -> tuple[int, int]:
        """The canonical shape for an aspect ratio, at about the native area."""
        if self.fixed:
            return min(self.fixed, key=lambda s: (abs(math.log((s[0] / s[1]) / ratio)), -s[0] * s[1]))
        ratio = min(max(ratio, 1 / self.max_ratio), self.max_ratio)
        return self._snap(ratio, self._area_within(ratio, self.native[0] * self.native[1]))

    def _area_within(self, ratio: float, area: float) -> float:
        """``area`` brought within what the pixel and side limits leave at ``ratio`` (a 1440-px side caps a
        16:9 shape at 1440x810), so a wide or tall request lands on a wide or tall shape, not the default."""
        elongation = max(ratio, 1 / ratio)
        high = min(self.max_pixels, self.max_side**2 / elongation)
        low = max(self.min_pixels, self.min_side**2 * elongation)
        return min(max(area, low), high)

    def _snap(self, ratio: float, area: float) -> tuple[int, int]:
        m = self.multiple
        best: tuple[float, tuple[int, int]] | None = None
        w0 = math.sqrt(area * ratio)
        for dw in range(-3, 4):
            w = max(m, (round(w0 / m) + dw) * m)
            for h in {max(m, math.floor(w / ratio / m) * m), max(m, math.ceil(w / ratio / m) * m)}:
                if not self.allows(w, h):
                    continue
                err = abs(math.log((w / h) / ratio)) * 4 + abs(math.log((w * h) / area))
                if best is None or err < best[0]:
                    best = (err, (w, h))
        return best[1] if best else self.native


def parse_ratio(text: str) -> float:
    a, b = text.split(":")
    return int(a) / int(b)


@dataclass(frozen=True, slots=True)
class SizePlan:
    """The shape a backend will produce for a request, and why it differs, if it does."""

    width: int
    height: int
    warning: str | None = None
    exact: bool = True  # False when the backend cannot make the shape that was asked for
    out_of_range: str | None = None  # why the size asked lies outside what the model makes (then it is refused)


def plan_size(
    width: int | None, height: int | None, aspect_ratio: str | None, rules: SizeRules
) -> SizePlan:
    """Where a request's size or ratio lands on a backend's size rules."""
    if width is not None and height is not None:
        if rules.allows(width, height):
            return SizePlan(width, height)
        w, h = rules.nearest(width, height)
        if not rules.within_range(width, height):
            return SizePlan(w, h, f"size {width}x{height} is outside this model's range ({rules.describe()})", False,
                            out_of_range=f"{width}x{height} is outside its range: {rules.describe()}")
        return SizePlan(w, h, f"size {width}x{height} adapted to {w}x{h}: the nearest shape this model makes "
                              f"({rules.describe()})", False)
    if aspect_ratio is not None:
        w, h = rules.for_ratio(parse_ratio(aspect_ratio))
        got = w / h
        if abs(math.log(got / parse_ratio(aspect_ratio))) > 0.02:
            return SizePlan(w, h, f"aspect ratio {aspect_ratio} adapted to {w}x{h} (ratio {got:.2f})", False)
        return SizePlan(w, h)
    return SizePlan(*rules.native)
