"""The router's shared state: one protocol per concern, each with an in-process (the default) and a Redis
implementation (``state="redis://…"``):

- circuit breakers: :class:`router.health.CircuitBreaker` | :class:`~router.state.redis_state.RedisBreaker`
- latency statistics: :class:`policies.stats.LatencyStats` | :class:`~router.state.redis_state.RedisLatencies`
- per-key rate limits: :class:`~router.state.local.LocalRateLimits` | :class:`~router.state.redis_state.RedisRateLimits`
- result cache: :class:`~router.state.local.LocalResultCache` | :class:`~router.state.redis_state.RedisResultCache`

:func:`open_state` builds all four from a URL (None: in process). Routing reads the breaker and the
statistics synchronously (``available``, ``p50``, ``p95``): the shared implementations answer those from a
local view that ``arefresh`` brings up to date, while every write and the call admission itself
(``abefore_call``) go to Redis, atomically, so the fleet agrees on who may call.

Importing this package never imports ``redis``; only :func:`open_state` with a Redis URL does.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel

from providers.base import Billing, ProviderResponse
from router.errors import ConfigurationError
from router.health import State
from router.images import ImageInput
from router.result import GeneratedImage

if TYPE_CHECKING:
    from router.request import ImageRequest

__all__ = [
    "Breaker", "CachedResult", "Latencies", "RateLimits", "ResultCache", "RouterState", "cache_key", "open_state",
]


@runtime_checkable
class Breaker(Protocol):
    """Circuit breakers per provider (see :class:`router.health.CircuitBreaker` for the rules).

    ``state`` and ``available`` are the last known view (for routing, no I/O); ``abefore_call`` is the
    authoritative admission: in half-open state exactly one caller, fleet-wide, gets the probe.
    """

    failure_threshold: int
    cooldown_s: float

    def state(self, provider: str) -> State: ...

    def available(self, provider: str) -> bool: ...

    async def arefresh(self, providers: Iterable[str]) -> None: ...

    async def abefore_call(self, provider: str) -> bool: ...

    async def arecord_success(self, provider: str) -> None: ...

    async def arecord_failure(self, provider: str) -> None: ...

    async def arelease(self, provider: str) -> None: ...

    def release_soon(self, provider: str) -> None: ...


@runtime_checkable
class Latencies(Protocol):
    """Observed latencies per (provider, model): ``p50``/``p95`` read the last known view (no I/O)."""

    window: int
    min_samples: int

    def p50(self, provider: str, model: str) -> float | None: ...

    def p95(self, provider: str, model: str) -> float | None: ...

    async def arecord(self, provider: str, model: str, seconds: float) -> None: ...

    async def arefresh(self, keys: Iterable[tuple[str, str]]) -> None: ...


@runtime_checkable
class RateLimits(Protocol):
    """A token bucket per key name: ``rpm`` requests at once, refilled at ``rpm`` per minute."""

    async def atake(self, name: str, rpm: int) -> float:
        """0 when ``name`` may make a request now (and it is counted); else the seconds until it may."""
        ...


@runtime_checkable
class ResultCache(Protocol):
    """Results of seeded requests by :func:`cache_key`, each kept ``ttl_s``, all together under ``max_bytes``
    (the entries closest to expiring go first)."""

    ttl_s: float
    max_bytes: int

    async def aget(self, key: str) -> CachedResult | None: ...

    async def aget_many(self, keys: Sequence[str]) -> list[CachedResult | None]: ...

    async def aput(self, key: str, value: CachedResult) -> bool:
        """Store ``value``; False when it is larger than the whole cache."""
        ...


@dataclass(frozen=True, slots=True)
class CachedResult:
    """What a cache hit gives back: the images and the response's facts (the original cost for reference)."""

    provider: str
    model: str
    images: tuple[GeneratedImage, ...]
    original_usd: Decimal
    provider_request_id: str | None = None
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_response(cls, provider: str, response: ProviderResponse) -> CachedResult:
        return cls(provider, response.model, tuple(response.images), response.billing.cost_usd,
                   response.provider_request_id, tuple(response.warnings))

    def response(self) -> ProviderResponse:
        """A :class:`ProviderResponse` billed at $0 (unit ``cache``), for the router to return as it is."""
        billing = Billing(Decimal(0), "cache", Decimal(0), details={
            "cache": "hit", "original_usd": str(self.original_usd)})
        return ProviderResponse(list(self.images), self.model, billing, self.provider_request_id, self.warnings)

    @property
    def nbytes(self) -> int:
        return sum(len(img.data) for img in self.images)

    # A cache entry is b"IRC1", the metadata's length (4 bytes, big-endian), the metadata as JSON, then
    # the images' bytes one after another. Nothing executable is ever stored or loaded (no pickle).
    _MAGIC = b"IRC1"

    def _header(self) -> bytes:
        meta = {
            "provider": self.provider, "model": self.model, "original_usd": str(self.original_usd),
            "provider_request_id": self.provider_request_id, "warnings": list(self.warnings),
            "images": [{"size": len(i.data), "mime": i.mime, "width": i.width, "height": i.height, "seed": i.seed,
                        "nsfw": i.nsfw} for i in self.images],
        }
        return json.dumps(meta, separators=(",", ":")).encode()

    def encode(self) -> bytes:
        head = self._header()
        return b"".join([self._MAGIC, struct.pack(">I", len(head)), head, *(i.data for i in self.images)])

    @property
    def encoded_size(self) -> int:
        """``len(self.encode())``, without copying the images: what the entry counts against a cache's cap."""
        return 8 + len(self._header()) + self.nbytes

    @classmethod
    def decode(cls, blob: bytes) -> CachedResult | None:
        """The entry in ``blob``; None when it is not one (another version's format, a truncated value)."""
        if len(blob) < 8 or blob[:4] != cls._MAGIC:
            return None
        (size,) = struct.unpack(">I", blob[4:8])
        try:
            meta = json.loads(blob[8:8 + size])
            offset = 8 + size
            images = []
            for im in meta["images"]:
                end = offset + int(im["size"])
                if end > len(blob):
                    return None
                images.append(GeneratedImage(blob[offset:end], im["mime"], int(im["width"]), int(im["height"]),
                                             im["seed"], bool(im["nsfw"])))
                offset = end
            return cls(meta["provider"], meta["model"], tuple(images), Decimal(meta["original_usd"]),
                       meta["provider_request_id"], tuple(meta["warnings"]))
        except (ValueError, KeyError, TypeError):
            return None


_NOT_IN_KEY = frozenset({"constraints", "tags", "idempotency_key", "deadline_s", "model", "provider",
                         "partial_images", "provider_options"})
"""Request fields that do not change the images: routing limits, accounting, delivery (``provider_options``
enter the key only for the provider that reads them; ``model`` and ``provider`` as the backend that served)."""


def cache_key(request: ImageRequest, provider: str, model: str) -> str | None:
    """The result cache's key for ``request`` served by ``provider``/``model``; None when the request names no
    seed (an unseeded request is never served from the cache). Input images enter by their bytes' SHA-256
    (or their URL); the key is a SHA-256, so no prompt text is stored in a key."""
    if request.seed is None:
        return None
    fields = {name: _normal(getattr(request, name)) for name in type(request).model_fields if name not in _NOT_IN_KEY}
    fields["provider_options"] = _normal(request.provider_options.get(provider, {}))
    text = json.dumps({"v": 1, "provider": provider, "model": model, "request": fields},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _normal(value: Any) -> Any:
    """``value`` as plain JSON data, the same for equal requests."""
    if isinstance(value, ImageInput):
        if value.data is not None:
            return {"sha256": hashlib.sha256(value.data).hexdigest()}
        return {"url": value.url}
    if isinstance(value, BaseModel):
        return {k: _normal(getattr(value, k)) for k in type(value).model_fields}
    if isinstance(value, Mapping):
        return {str(k): _normal(v) for k, v in value.items()}
    if isinstance(value, frozenset | set):
        return sorted(_normal(v) for v in value)
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    return value


@dataclass
class RouterState:
    """The four kinds of state a router (and its server) share: see the module's table."""

    breaker: Breaker
    stats: Latencies
    limits: RateLimits
    cache: ResultCache
    shared: bool = False
    """True when the state lives outside this process (every process with the same URL sees it)."""
    _closers: list[Any] = field(default_factory=list, repr=False)

    async def aclose(self) -> None:
        for close in self._closers:
            await close()
        self._closers.clear()


def open_state(url: str | RouterState | None = None, **options: Any) -> RouterState:
    """The router's state: in process for None, shared through Redis for a ``redis://``, ``rediss://`` or
    ``unix://`` URL (needs the ``redis`` package: ``pip install 'pixroute[redis]'``), or ``url`` itself when
    it is already a :class:`RouterState`.

    ``options``: ``failure_threshold``, ``cooldown_s`` (breaker); ``window``, ``min_samples``, ``max_age_s``
    (statistics); ``cache_ttl_s``, ``cache_max_bytes`` (result cache); for Redis also ``prefix`` (key
    namespace, default ``imagerouter``), ``probe_lease_s`` and ``refresh_s`` (see
    :mod:`router.state.redis_state`).
    """
    if isinstance(url, RouterState):
        return url
    if url is None or url == "":
        from router.state.local import local_state

        return local_state(**options)
    scheme = url.partition("://")[0].lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(f"unsupported state URL scheme {scheme!r}: use redis://, rediss:// or unix://, "
                                 "or leave it unset for in-process state")
    try:
        from router.state.redis_state import redis_state
    except ImportError:
        raise ConfigurationError("state in Redis needs the redis package: pip install 'pixroute[redis]'") from None
    return redis_state(url, **options)
