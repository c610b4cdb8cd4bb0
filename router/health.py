"""Per-provider circuit breakers: stop calling a provider that keeps failing, probe it later.

:class:`CircuitBreaker` is the in-process implementation of :class:`router.state.Breaker`; the shared one
(every process of a fleet sees the same circuits) is :class:`router.state.redis_state.RedisBreaker`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

State = Literal["closed", "open", "half-open"]


@dataclass(slots=True)
class _Circuit:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False


class CircuitBreaker:
    """``failure_threshold`` consecutive provider failures open a provider's circuit for
    ``cooldown_s``; then one probe is let through (half-open): success closes it, failure
    reopens it. Only the provider's own faults count (5xx, timeouts, malformed bodies),
    never errors caused by the request.

    The ``a``-prefixed coroutines are the :class:`router.state.Breaker` protocol (the same calls, awaited,
    so the router treats this breaker and the shared one alike).
    """

    def __init__(
        self, failure_threshold: int = 3, cooldown_s: float = 30.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def state(self, provider: str) -> State:
        c = self._circuits.get(provider)
        if c is None or c.opened_at is None:
            return "closed"
        if self._clock() - c.opened_at < self.cooldown_s:
            return "open"
        return "half-open"

    def available(self, provider: str) -> bool:
        """True when a call may go to ``provider`` now (closed, or half-open with no probe out)."""
        state = self.state(provider)
        return state == "closed" or (state == "half-open" and not self._circuits[provider].probing)

    def before_call(self, provider: str) -> bool:
        """Claim a call slot; False when the circuit refuses the call."""
        if not self.available(provider):
            return False
        if self.state(provider) == "half-open":
            self._circuits[provider].probing = True
        return True

    def record_success(self, provider: str) -> None:
        self._circuits.pop(provider, None)

    def record_failure(self, provider: str) -> None:
        c = self._circuits.setdefault(provider, _Circuit())
        c.failures += 1
        c.probing = False
        if c.opened_at is not None or c.failures >= self.failure_threshold:
            c.opened_at = self._clock()

    def release(self, provider: str) -> None:
        """End a call that says nothing about the provider's health (the request was at fault)."""
        c = self._circuits.get(provider)
        if c is not None:
            c.probing = False

    # --- the router.state.Breaker protocol ---------------------------------------------

    async def arefresh(self, providers: Iterable[str]) -> None:
        """Nothing to read: this breaker's state is all here."""

    async def abefore_call(self, provider: str) -> bool:
        return self.before_call(provider)

    async def arecord_success(self, provider: str) -> None:
        self.record_success(provider)

    async def arecord_failure(self, provider: str) -> None:
        self.record_failure(provider)

    async def arelease(self, provider: str) -> None:
        self.release(provider)

    def release_soon(self, provider: str) -> None:
        """:meth:`release` from a path that may not await (cancellation)."""
        self.release(provider)
