"""Observed latency per (provider, model): a small rolling window, read by the engine."""

from __future__ import annotations

from collections import deque
from statistics import median


class LatencyStats:
    """The last ``window`` successful latencies of each (provider, model)."""

    def __init__(self, window: int = 100, min_samples: int = 3) -> None:
        self.window = window
        self.min_samples = min_samples
        self._samples: dict[tuple[str, str], deque[float]] = {}
        self._medians: dict[tuple[str, str], float] = {}
        """Medians read since the last sample (routing asks for them on every request)."""

    def record(self, provider: str, model: str, seconds: float) -> None:
        key = (provider, model)
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = deque(maxlen=self.window)
        samples.append(seconds)
        self._medians.pop(key, None)

    def p50(self, provider: str, model: str) -> float | None:
        """The median, once ``min_samples`` are in; else None (the engine uses the prior)."""
        key = (provider, model)
        cached = self._medians.get(key)
        if cached is not None:
            return cached
        samples = self._samples.get(key)
        if samples is None or len(samples) < self.min_samples:
            return None
        value = self._medians[key] = median(samples)
        return value

    def p95(self, provider: str, model: str) -> float | None:
        samples = self._samples.get((provider, model))
        if samples is None or len(samples) < self.min_samples:
            return None
        ordered = sorted(samples)
        return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
