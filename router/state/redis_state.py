"""The shared implementations of :mod:`router.state`, in Redis (redis-py's asyncio client).

Every change is one Lua script, so it is atomic across any number of processes and hosts: Redis runs a
script to completion before any other command (https://redis.io/docs/latest/develop/interact/programmability/eval-intro/).
Times come from the Redis server's clock (``TIME``), so hosts need not agree on theirs; tests may inject a
clock instead (seconds, passed to the scripts).

- Breaker: a hash per provider (``failures``, ``opened_at``) and a probe lease taken with
  ``SET key token NX PX lease`` inside the admission script (https://redis.io/docs/latest/commands/set/):
  in half-open state one caller in the whole fleet holds it. A lease whose holder died expires after
  ``probe_lease_s`` (default: 180 s, the router's attempt timeout), then another probe may go.
- Latencies: a list per (provider, model) of the last ``window`` samples, newest first (``LPUSH`` + ``LTRIM``).
- Rate limits: a token bucket per key name, refilled continuously (the in-process bucket's arithmetic).
- Result cache: an entry per key with ``PX`` = its TTL, plus an index (sorted set by expiry), the entries'
  sizes and their total, so the cap holds across processes; run Redis with a ``noeviction`` or ``volatile-*``
  policy so it never drops the bookkeeping keys.

Routing reads (``available``, ``p50``, ``p95``) answer from a local view, brought up to date by ``arefresh``
(at most every ``refresh_s`` per key) and by this process's own writes. When Redis cannot be reached, each
call logs a warning and acts as if nothing were known (calls admitted, no samples, cache misses, no limit),
so a Redis outage degrades routing, never stops it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from policies.stats import p50_of, p95_of
from router.health import State
from router.state import CachedResult, RouterState
from router.state.local import DEFAULT_CACHE_MAX_BYTES, DEFAULT_CACHE_TTL_S

log = logging.getLogger("imagerouter.state")
T = TypeVar("T")

DEFAULT_PROBE_LEASE_S = 180.0
DEFAULT_REFRESH_S = 0.5
_STATE_TTL_MS = 86_400_000  # an idle circuit or statistic is forgotten after a day

# The current time in ms: ARGV[1] when the caller passes a clock, else the server's.
_NOW = """
local function num(x) return string.format('%.17g', x) end
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Every breaker script returns {code, opened_at or '', now, probe held by anyone (0/1)}.
_BREAKER_ADMIT = _NOW + """
local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_at'))
local code = 1
if opened then
  if now - opened < tonumber(ARGV[2]) then
    code = 0
  elseif redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then
    code = 2
  else
    code = 0
  end
end
return {code, opened and num(opened) or '', num(now), redis.call('EXISTS', KEYS[2])}
"""

_BREAKER_FAILURE = _NOW + """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
local opened = redis.call('HGET', KEYS[1], 'opened_at')
if opened or failures >= tonumber(ARGV[2]) then
  opened = num(now)
  redis.call('HSET', KEYS[1], 'opened_at', opened)
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, opened or '', num(now), redis.call('EXISTS', KEYS[2])}
"""

_BREAKER_SUCCESS = _NOW + """
redis.call('DEL', KEYS[1])
if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return {1, '', num(now), redis.call('EXISTS', KEYS[2])}
"""

_BREAKER_RELEASE = _NOW + """
if ARGV[2] ~= '' and redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return {1, redis.call('HGET', KEYS[1], 'opened_at') or '', num(now), redis.call('EXISTS', KEYS[2])}
"""

# KEYS: circuit hash and probe key per provider, in pairs. Returns {now, opened_at, probing, opened_at, ...}.
_BREAKER_READ = _NOW + """
local out = {num(now)}
for i = 1, #KEYS, 2 do
  out[#out + 1] = redis.call('HGET', KEYS[i], 'opened_at') or ''
  out[#out + 1] = redis.call('EXISTS', KEYS[i + 1])
end
return out
"""

_STATS_RECORD = _NOW + """
redis.call('LPUSH', KEYS[1], num(now) .. ' ' .. ARGV[2])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[3]) - 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return num(now)
"""

# KEYS: one list per (provider, model). Returns {now, samples of the first, samples of the second, ...}.
_STATS_READ = _NOW + """
local out = {num(now)}
for i = 1, #KEYS do out[#out + 1] = redis.call('LRANGE', KEYS[i], 0, tonumber(ARGV[2]) - 1) end
return out
"""

# The in-process bucket's arithmetic (router.keys.RateLimiter) in ms; returns the wait in seconds, as text.
_BUCKET_TAKE = _NOW + """
local rpm = tonumber(ARGV[2])
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(held[1]) or rpm
local at = tonumber(held[2]) or now
tokens = math.min(rpm, tokens + math.max(0, now - at) * rpm / 60000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) * 60 / rpm end
redis.call('HSET', KEYS[1], 'tokens', num(tokens), 'at', num(now))
redis.call('PEXPIRE', KEYS[1], 61000)
return num(wait)
"""

# KEYS: 1 index (zset member -> expiry ms), 2 sizes (hash), 3 total, 4 the entry.
# ARGV: 1 now, 2 member, 3 value, 4 ttl ms, 5 max bytes, 6 the entries' key prefix.
_CACHE_PUT = _NOW + """
local size = string.len(ARGV[3])
local cap = tonumber(ARGV[5])
if size > cap then return 0 end
local function drop(m)
  local s = tonumber(redis.call('HGET', KEYS[2], m))
  if s then
    redis.call('DECRBY', KEYS[3], s)
    redis.call('HDEL', KEYS[2], m)
  end
  redis.call('ZREM', KEYS[1], m)
  redis.call('DEL', ARGV[6] .. m)
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do drop(m) end
drop(ARGV[2])
while tonumber(redis.call('GET', KEYS[3]) or '0') + size > cap do
  local first = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #first == 0 then break end
  drop(first[1])
end
redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[4])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], size)
redis.call('INCRBY', KEYS[3], size)
return 1
"""

# KEYS: 1 index, then the entries. ARGV: 1 now, then the members. An entry past its expiry is a miss.
_CACHE_GET = _NOW + """
local out = {}
for i = 2, #KEYS do
  local expires = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]))
  if expires and expires > now then
    out[#out + 1] = redis.call('GET', KEYS[i]) or ''
  else
    out[#out + 1] = ''
  end
end
return out
"""


class _Redis:
    """One client and its scripts, shared by the four parts of a state; and the clock they use."""

    def __init__(self, client: aioredis.Redis, prefix: str, clock: Callable[[], float] | None) -> None:
        self.client = client
        self.prefix = prefix
        self.clock = clock
        self._offset_ms: float | None = None  # server time minus time.monotonic(), in ms
        self._warned = False
        self.scripts = {name: client.register_script(text) for name, text in (
            ("admit", _BREAKER_ADMIT), ("failure", _BREAKER_FAILURE), ("success", _BREAKER_SUCCESS),
            ("release", _BREAKER_RELEASE), ("circuits", _BREAKER_READ), ("record", _STATS_RECORD),
            ("samples", _STATS_READ), ("take", _BUCKET_TAKE), ("put", _CACHE_PUT), ("get", _CACHE_GET))}

    def now_arg(self) -> str:
        """ARGV[1] of every script: the injected clock's time in ms, or '' for the server's."""
        return "" if self.clock is None else repr(self.clock() * 1000.0)

    def saw(self, server_now_ms: float) -> None:
        if self.clock is None:
            self._offset_ms = server_now_ms - time.monotonic() * 1000.0

    def now_ms(self) -> float:
        """The current time on the scripts' clock, as far as this process knows it."""
        if self.clock is not None:
            return self.clock() * 1000.0
        return time.monotonic() * 1000.0 + (self._offset_ms or 0.0)

    async def run(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self.scripts[script](keys=list(keys), args=[self.now_arg(), *args])

    async def guarded(self, what: str, call: Awaitable[T], fallback: T) -> T:
        """``call``'s result; ``fallback`` when Redis fails (logged: the error's kind, never its text, which
        may name the server)."""
        try:
            result = await call
        except (RedisError, OSError) as exc:
            log.warning("shared router state unavailable (%s while %s): acting as if nothing were known",
                        type(exc).__name__, what)
            self._warned = True
            return fallback
        if self._warned:
            log.warning("shared router state reachable again")
            self._warned = False
        return result


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBreaker:
    """Circuit breakers shared through Redis: the rules of :class:`router.health.CircuitBreaker`, with the
    failures of every process counted together and one half-open probe at a time across the fleet."""

    def __init__(self, conn: _Redis, failure_threshold: int = 3, cooldown_s: float = 30.0, *,
                 probe_lease_s: float = DEFAULT_PROBE_LEASE_S, refresh_s: float = DEFAULT_REFRESH_S) -> None:
        self._r = conn
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.probe_lease_s = probe_lease_s
        self.refresh_s = refresh_s
        self._token = uuid.uuid4().hex  # this process's probe leases
        self._leases: set[str] = set()  # providers whose probe lease this process holds
        self._view: dict[str, tuple[float | None, bool, float]] = {}  # provider -> (opened_at ms, probing, read at)
        self._tasks: set[asyncio.Task[None]] = set()

    def _keys(self, provider: str) -> list[str]:
        base = f"{self._r.prefix}:cb:{{{provider}}}"
        return [base, base + ":probe"]

    def _learn(self, provider: str, reply: Sequence[Any]) -> int:
        code, opened, now, probing = int(reply[0]), _text(reply[1]), float(_text(reply[2])), int(reply[3])
        self._r.saw(now)
        self._view[provider] = (float(opened) if opened else None, bool(probing), time.monotonic())
        return code

    def state(self, provider: str) -> State:
        known = self._view.get(provider)
        if known is None or known[0] is None:
            return "closed"
        return "open" if self._r.now_ms() - known[0] < self.cooldown_s * 1000.0 else "half-open"

    def available(self, provider: str) -> bool:
        state = self.state(provider)
        return state == "closed" or (state == "half-open" and not self._view[provider][1])

    async def arefresh(self, providers: Iterable[str]) -> None:
        """Read the circuits of ``providers`` not read in the last ``refresh_s`` (one round trip)."""
        due = [p for p in dict.fromkeys(providers)
               if (known := self._view.get(p)) is None or time.monotonic() - known[2] >= self.refresh_s]
        if not due:
            return
        keys = [k for p in due for k in self._keys(p)]
        reply = await self._r.guarded("reading circuits", self._r.run("circuits", keys, []), None)
        if reply is None:
            return
        self._r.saw(float(_text(reply[0])))
        read_at = time.monotonic()
        for i, provider in enumerate(due):
            opened = _text(reply[1 + 2 * i])
            self._view[provider] = (float(opened) if opened else None, bool(int(reply[2 + 2 * i])), read_at)

    async def abefore_call(self, provider: str) -> bool:
        """Admit a call: closed, or half-open and this caller won the fleet's one probe lease."""
        reply = await self._r.guarded("admitting a call", self._r.run(
            "admit", self._keys(provider),
            [repr(self.cooldown_s * 1000.0), self._token, int(self.probe_lease_s * 1000)]), None)
        if reply is None:
            return True  # nothing known: admit (a Redis outage must not stop every provider)
        code = self._learn(provider, reply)
        if code == 2:
            self._leases.add(provider)
        return code != 0

    def _lease(self, provider: str) -> str:
        if provider in self._leases:
            self._leases.discard(provider)
            return self._token
        return ""

    async def arecord_failure(self, provider: str) -> None:
        reply = await self._r.guarded("recording a failure", self._r.run(
            "failure", self._keys(provider),
            [self.failure_threshold, self._lease(provider), _STATE_TTL_MS]), None)
        if reply is not None:
            self._learn(provider, reply)

    async def arecord_success(self, provider: str) -> None:
        reply = await self._r.guarded("recording a success", self._r.run(
            "success", self._keys(provider), [self._lease(provider)]), None)
        if reply is not None:
            self._learn(provider, reply)

    async def arelease(self, provider: str) -> None:
        token = self._lease(provider)
        if not token:
            return  # no probe of ours to end: nothing to tell the fleet
        reply = await self._r.guarded("releasing a probe", self._r.run(
            "release", self._keys(provider), [token]), None)
        if reply is not None:
            self._learn(provider, reply)

    def release_soon(self, provider: str) -> None:
        """:meth:`arelease` started without waiting (from cancellation paths); with no running loop the
        lease simply expires after ``probe_lease_s``."""
        if provider not in self._leases:
            return
        try:
            task = asyncio.get_running_loop().create_task(self.arelease(provider))
        except RuntimeError:
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class RedisLatencies:
    """The last ``window`` latencies of each (provider, model), recorded by every process of the fleet;
    with ``max_age_s``, samples older than that no longer count."""

    def __init__(self, conn: _Redis, window: int = 100, min_samples: int = 3, *, max_age_s: float | None = None,
                 refresh_s: float = DEFAULT_REFRESH_S) -> None:
        self._r = conn
        self.window = window
        self.min_samples = min_samples
        self.max_age_s = max_age_s
        self.refresh_s = refresh_s
        self._view: dict[tuple[str, str], tuple[list[tuple[float, float]], float]] = {}  # (when ms, s) newest first

    def _key(self, provider: str, model: str) -> str:
        return f"{self._r.prefix}:lat:{{{provider}}}:{model}"

    def _current(self, provider: str, model: str) -> list[float]:
        known = self._view.get((provider, model))
        if known is None:
            return []
        if self.max_age_s is None:
            return [s for _, s in known[0]]
        oldest = self._r.now_ms() - self.max_age_s * 1000.0
        return [s for when, s in known[0] if when >= oldest]

    def p50(self, provider: str, model: str) -> float | None:
        return p50_of(self._current(provider, model), self.min_samples)

    def p95(self, provider: str, model: str) -> float | None:
        return p95_of(self._current(provider, model), self.min_samples)

    async def arecord(self, provider: str, model: str, seconds: float) -> None:
        ttl = _STATE_TTL_MS if self.max_age_s is None else max(1000, int(self.max_age_s * 1000))
        now = await self._r.guarded("recording a latency", self._r.run(
            "record", [self._key(provider, model)], [repr(float(seconds)), self.window, ttl]), None)
        if now is None:
            return
        self._r.saw(float(_text(now)))
        samples, read_at = self._view.get((provider, model), ([], time.monotonic()))
        self._view[(provider, model)] = ([(float(_text(now)), float(seconds)), *samples][:self.window], read_at)

    async def arefresh(self, keys: Iterable[tuple[str, str]]) -> None:
        """Read the samples of ``keys`` not read in the last ``refresh_s`` (one round trip)."""
        due = [k for k in dict.fromkeys(keys)
               if (known := self._view.get(k)) is None or time.monotonic() - known[1] >= self.refresh_s]
        if not due:
            return
        reply = await self._r.guarded("reading latencies", self._r.run(
            "samples", [self._key(*k) for k in due], [self.window]), None)
        if reply is None:
            return
        self._r.saw(float(_text(reply[0])))
        read_at = time.monotonic()
        for key, raw in zip(due, reply[1:], strict=True):
            samples = []
            for item in raw:
                when, _, seconds = _text(item).partition(" ")
                samples.append((float(when), float(seconds)))
            self._view[key] = (samples, read_at)


class RedisRateLimits:
    """A token bucket per key name in Redis, taken from in one script: the limit holds across every worker."""

    def __init__(self, conn: _Redis) -> None:
        self._r = conn

    async def atake(self, name: str, rpm: int) -> float:
        wait = await self._r.guarded("taking a rate-limit token", self._r.run(
            "take", [f"{self._r.prefix}:rl:{{{name}}}"], [rpm]), None)
        return 0.0 if wait is None else float(_text(wait))


class RedisResultCache:
    """Cached results in Redis, each for ``ttl_s``, all together under ``max_bytes`` (the encoded entries);
    when a new entry needs room, the entries closest to expiring are dropped first."""

    def __init__(self, conn: _Redis, ttl_s: float = DEFAULT_CACHE_TTL_S,
                 max_bytes: int = DEFAULT_CACHE_MAX_BYTES) -> None:
        self._r = conn
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        base = f"{conn.prefix}:cache:{{c}}"
        self._entry_prefix = base + ":e:"
        self._books = [base + ":index", base + ":sizes", base + ":total"]

    async def aget(self, key: str) -> CachedResult | None:
        return (await self.aget_many([key]))[0]

    async def aget_many(self, keys: Sequence[str]) -> list[CachedResult | None]:
        if not keys:
            return []
        blobs = await self._r.guarded("reading the result cache", self._r.run(
            "get", [self._books[0], *(self._entry_prefix + k for k in keys)], keys), None)
        if blobs is None:
            return [None] * len(keys)
        return [CachedResult.decode(b) if b else None for b in blobs]

    async def aput(self, key: str, value: CachedResult) -> bool:
        stored = await self._r.guarded("storing in the result cache", self._r.run(
            "put", [*self._books, self._entry_prefix + key],
            [key, value.encode(), max(1, int(self.ttl_s * 1000)), self.max_bytes, self._entry_prefix]), 0)
        return bool(stored)

    @property
    def client(self) -> aioredis.Redis:
        return self._r.client


def redis_state(url: str, *, prefix: str = "imagerouter", failure_threshold: int = 3, cooldown_s: float = 30.0,
                probe_lease_s: float = DEFAULT_PROBE_LEASE_S, refresh_s: float = DEFAULT_REFRESH_S,
                window: int = 100, min_samples: int = 3, max_age_s: float | None = None,
                cache_ttl_s: float = DEFAULT_CACHE_TTL_S, cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
                clock: Callable[[], float] | None = None) -> RouterState:
    """State shared through the Redis server at ``url`` (nothing connects until the first call).

    ``prefix`` namespaces the keys (two fleets on one server use two prefixes); ``clock`` (seconds) replaces
    the server's clock, for tests.
    """
    client = aioredis.Redis.from_url(url)
    conn = _Redis(client, prefix, clock)
    return RouterState(
        breaker=RedisBreaker(conn, failure_threshold, cooldown_s, probe_lease_s=probe_lease_s, refresh_s=refresh_s),
        stats=RedisLatencies(conn, window, min_samples, max_age_s=max_age_s, refresh_s=refresh_s),
        limits=RedisRateLimits(conn),
        cache=RedisResultCache(conn, cache_ttl_s, cache_max_bytes),
        shared=True,
        _closers=[client.aclose],
    )
