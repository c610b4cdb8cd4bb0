"""Observed latency per (provider, model): a small rolling window, read by the engine.

:class:`LatencyStats` is the in-process implementation of :class:`router.state.Latencies`; the shared one
(every process of a fleet learns from every call) is :class:`router.state.redis_state.RedisLatencies`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from statistics import median


def p50_of(samples: Sequence[float], min_samples: int) -> float | None:
    """The median of ``samples``, or None with fewer than ``min_samples``."""
    return median(samples) if len(samples) >= max(1, min_samples) else None


def p95_of(samples: Sequence[float], min_samples: int) -> float | None:
    """The 95th percentile (nearest rank) of ``samples``, or None with fewer than ``min_samples``."""
    if len(samples) < max(1, min_samples):
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


class LatencyStats:
    """The last ``window`` successful latencies of each (provider, model).

    Old observations decay two ways: only the last ``window`` count, and with ``max_age_s`` set, a sample
    older than that (by ``clock``) no longer counts. The ``a``-prefixed coroutines are the
    :class:`router.state.Latencies` protocol.
    """

    def __init__(self, window: int = 100, min_samples: int = 3, *, max_age_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.min_samples = min_samples
        self.max_age_s = max_age_s
        self._clock = clock
        self._samples: dict[tuple[str, str], deque[tuple[float, float]]] = {}  # (when, seconds), oldest first
        self._medians: dict[tuple[str, str], float] = {}
        """Medians read since the last sample (routing asks for them on every request; only without max_age_s)."""

    def record(self, provider: str, model: str, seconds: float) -> None:
        key = (provider, model)
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = deque(maxlen=self.window)
        samples.append((self._clock(), seconds))
        self._medians.pop(key, None)

    def _current(self, key: tuple[str, str]) -> list[float]:
        samples = self._samples.get(key)
        if samples is None:
            return []
        if self.max_age_s is None:
            return [s for _, s in samples]
        oldest = self._clock() - self.max_age_s
        return [s for when, s in samples if when >= oldest]

    def p50(self, provider: str, model: str) -> float | None:
        """The median, once ``min_samples`` are in; else None (the engine uses the prior)."""
        key = (provider, model)
        cached = self._medians.get(key)
        if cached is not None:
            return cached
        value = p50_of(self._current(key), self.min_samples)
        if value is not None and self.max_age_s is None:
            self._medians[key] = value
        return value

    def p95(self, provider: str, model: str) -> float | None:
        return p95_of(self._current((provider, model)), self.min_samples)

    # --- the router.state.Latencies protocol ----------------------------------------------

    async def arecord(self, provider: str, model: str, seconds: float) -> None:
        self.record(provider, model, seconds)

    async def arefresh(self, keys: Iterable[tuple[str, str]]) -> None:
        """Nothing to read: these statistics are all here."""
