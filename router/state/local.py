"""The in-process implementations of :mod:`router.state`: one process's breakers, statistics, limits and cache."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from policies.stats import LatencyStats
from router.health import CircuitBreaker
from router.keys import RateLimiter
from router.state import CachedResult, RouterState

DEFAULT_CACHE_TTL_S = 24 * 3600.0
DEFAULT_CACHE_MAX_BYTES = 256 * 2**20


class LocalRateLimits:
    """:class:`router.keys.RateLimiter`'s token buckets behind the :class:`router.state.RateLimits` protocol."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.limiter = RateLimiter(clock)

    async def atake(self, name: str, rpm: int) -> float:
        return self.limiter.take(name, rpm)


class LocalResultCache:
    """Cached results in this process's memory, each for ``ttl_s``, all together under ``max_bytes``
    (image bytes); when a new entry needs room, the entries closest to expiring are dropped first."""

    def __init__(self, ttl_s: float = DEFAULT_CACHE_TTL_S, max_bytes: int = DEFAULT_CACHE_MAX_BYTES, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: dict[str, tuple[float, int, CachedResult]] = {}  # key -> (expires, size, value)
        self.nbytes = 0

    async def aget(self, key: str) -> CachedResult | None:
        return self.get(key)

    async def aget_many(self, keys: Sequence[str]) -> list[CachedResult | None]:
        return [self.get(k) for k in keys]

    async def aput(self, key: str, value: CachedResult) -> bool:
        return self.put(key, value)

    def get(self, key: str) -> CachedResult | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._drop(key)
            return None
        return entry[2]

    def put(self, key: str, value: CachedResult) -> bool:
        size = value.encoded_size  # the same measure as the Redis cache's
        if size > self.max_bytes:
            return False
        now = self._clock()
        for k in [k for k, (expires, _, _) in self._entries.items() if expires <= now]:
            self._drop(k)
        self._drop(key)
        while self._entries and self.nbytes + size > self.max_bytes:
            self._drop(min(self._entries, key=lambda k: self._entries[k][0]))
        self._entries[key] = (now + self.ttl_s, size, value)
        self.nbytes += size
        return True

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[1]


def local_state(*, failure_threshold: int = 3, cooldown_s: float = 30.0, window: int = 100, min_samples: int = 3,
                max_age_s: float | None = None, cache_ttl_s: float = DEFAULT_CACHE_TTL_S,
                cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES, clock: Callable[[], float] = time.monotonic,
                prefix: str | None = None, probe_lease_s: float | None = None,
                refresh_s: float | None = None) -> RouterState:
    """In-process state. ``prefix``, ``probe_lease_s`` and ``refresh_s`` only matter to the shared state
    (accepted here so one set of options configures either)."""
    return RouterState(
        breaker=CircuitBreaker(failure_threshold, cooldown_s, clock=clock),
        stats=LatencyStats(window, min_samples, max_age_s=max_age_s, clock=clock),
        limits=LocalRateLimits(clock),
        cache=LocalResultCache(cache_ttl_s, cache_max_bytes, clock=clock),
    )
