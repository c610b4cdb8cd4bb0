"""One contract for the router's state, run against both implementations: in process and a real Redis server.

Time is a fake clock handed to both (the Redis scripts take it instead of the server's), so cooldowns, TTLs
and refills are exact.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import pytest

from providers.base import Billing, ProviderResponse
from router.errors import ConfigurationError
from router.request import ImageRequest
from router.result import GeneratedImage
from router.state import Breaker, CachedResult, Latencies, RateLimits, ResultCache, RouterState, cache_key, open_state
from tests.redis_server import redis_server, redis_url  # noqa: F401


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Env:
    state: RouterState
    clock: FakeClock
    kind: str


@pytest.fixture(params=["memory", "redis"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    clock = FakeClock()
    options = dict(failure_threshold=3, cooldown_s=30.0, window=5, min_samples=3, cache_ttl_s=60.0,
                   cache_max_bytes=3_000, clock=clock)
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        state = open_state(url, prefix=f"t{uuid.uuid4().hex[:8]}", refresh_s=0.0, **options)
    else:
        state = open_state(None, **options)
    try:
        yield Env(state, clock, request.param)
    finally:
        await state.aclose()


def test_both_implementations_satisfy_the_protocols(env: Env) -> None:
    s = env.state
    assert (isinstance(s.breaker, Breaker), isinstance(s.stats, Latencies), isinstance(s.limits, RateLimits),
            isinstance(s.cache, ResultCache)) == (True, True, True, True)
    assert s.shared is (env.kind == "redis")


# --- circuit breaker -------------------------------------------------------------------------


async def _fail(breaker: Breaker, provider: str, times: int) -> list[bool]:
    admitted = []
    for _ in range(times):
        ok = await breaker.abefore_call(provider)
        admitted.append(ok)
        if ok:
            await breaker.arecord_failure(provider)
    return admitted


async def test_three_failures_open_the_circuit_and_refuse_calls(env: Env) -> None:
    b = env.state.breaker
    assert await _fail(b, "down", 5) == [True, True, True, False, False]
    assert (b.state("down"), b.available("down")) == ("open", False)
    assert (b.state("up"), await b.abefore_call("up")) == ("closed", True)


async def test_a_success_between_failures_resets_the_count(env: Env) -> None:
    b = env.state.breaker
    await _fail(b, "flaky", 2)
    assert await b.abefore_call("flaky")
    await b.arecord_success("flaky")
    assert await _fail(b, "flaky", 2) == [True, True]
    assert b.state("flaky") == "closed"


async def test_after_the_cooldown_exactly_one_probe_goes(env: Env) -> None:
    b = env.state.breaker
    await _fail(b, "down", 3)
    env.clock.advance(29.0)
    assert await b.abefore_call("down") is False
    env.clock.advance(1.5)
    await b.arefresh(["down"])
    assert (b.state("down"), b.available("down")) == ("half-open", True)
    assert [await b.abefore_call("down") for _ in range(3)] == [True, False, False]
    await b.arefresh(["down"])
    assert b.available("down") is False  # the probe is out


async def test_a_failed_probe_reopens_for_another_cooldown(env: Env) -> None:
    b = env.state.breaker
    await _fail(b, "down", 3)
    env.clock.advance(31.0)
    assert await b.abefore_call("down")
    await b.arecord_failure("down")
    assert b.state("down") == "open"
    env.clock.advance(29.0)
    assert await b.abefore_call("down") is False
    env.clock.advance(2.0)
    assert await b.abefore_call("down") is True


async def test_a_good_probe_closes_the_circuit(env: Env) -> None:
    b = env.state.breaker
    await _fail(b, "down", 3)
    env.clock.advance(31.0)
    assert await b.abefore_call("down")
    await b.arecord_success("down")
    assert (b.state("down"), [await b.abefore_call("down") for _ in range(3)]) == ("closed", [True, True, True])


async def test_a_released_probe_lets_the_next_one_go(env: Env) -> None:
    b = env.state.breaker
    await _fail(b, "down", 3)
    env.clock.advance(31.0)
    assert await b.abefore_call("down")
    await b.arelease("down")  # the request was at fault: nothing learnt about the provider
    assert b.state("down") == "half-open"
    assert await b.abefore_call("down") is True


async def test_release_soon_ends_a_probe_from_a_cancellation_path(env: Env) -> None:
    b = env.state.breaker
    await _fail(b, "down", 3)
    env.clock.advance(31.0)
    assert await b.abefore_call("down")
    b.release_soon("down")
    for _ in range(100):  # the shared implementation releases on a task; give it the loop
        if await b.abefore_call("down"):
            break
    else:
        pytest.fail("the probe was never released")


# --- latency statistics ------------------------------------------------------------------------


async def test_p50_needs_min_samples_then_is_the_median(env: Env) -> None:
    s = env.state.stats
    await s.arecord("p", "m", 1.0)
    await s.arecord("p", "m", 3.0)
    await s.arefresh([("p", "m")])
    assert s.p50("p", "m") is None
    await s.arecord("p", "m", 2.0)
    await s.arefresh([("p", "m"), ("p", "other")])
    assert (s.p50("p", "m"), s.p50("p", "other")) == (2.0, None)


async def test_only_the_last_window_samples_count(env: Env) -> None:
    s = env.state.stats
    for seconds in (100.0, 100.0, 100.0, 1.0, 2.0, 3.0, 4.0, 5.0):  # window 5: the three slow ones age out
        await s.arecord("p", "m", seconds)
    await s.arefresh([("p", "m")])
    assert (s.p50("p", "m"), s.p95("p", "m")) == (3.0, 5.0)


async def test_samples_older_than_max_age_decay_away(env: Env, request: pytest.FixtureRequest) -> None:
    clock = FakeClock()
    options = dict(window=10, min_samples=2, max_age_s=60.0, clock=clock)
    state = open_state(request.getfixturevalue("redis_url") if env.kind == "redis" else None,
                       prefix=f"t{uuid.uuid4().hex[:8]}", refresh_s=0.0, **options)
    try:
        s = state.stats
        await s.arecord("p", "m", 10.0)
        await s.arecord("p", "m", 10.0)
        clock.advance(45.0)
        await s.arecord("p", "m", 1.0)
        await s.arecord("p", "m", 1.0)
        await s.arecord("p", "m", 1.0)
        await s.arefresh([("p", "m")])
        assert s.p50("p", "m") == 1.0
        clock.advance(30.0)  # the 10 s samples are 75 s old now
        await s.arefresh([("p", "m")])
        assert s.p95("p", "m") == 1.0
        clock.advance(40.0)  # all of them
        await s.arefresh([("p", "m")])
        assert s.p50("p", "m") is None
    finally:
        await state.aclose()


# --- rate limits -----------------------------------------------------------------------------------


async def test_a_bucket_allows_rpm_at_once_then_refills(env: Env) -> None:
    lim = env.state.limits
    assert [await lim.atake("k", 60) for _ in range(60)] == [0.0] * 60
    assert await lim.atake("k", 60) == pytest.approx(1.0)
    env.clock.advance(0.5)
    assert await lim.atake("k", 60) == pytest.approx(0.5)
    env.clock.advance(1.0)
    assert (await lim.atake("k", 60), await lim.atake("other", 1), await lim.atake("other", 1)) == (
        0.0, 0.0, pytest.approx(60.0))


# --- result cache ------------------------------------------------------------------------------------


def _result(payload: bytes, provider: str = "local") -> CachedResult:
    response = ProviderResponse(
        [GeneratedImage(payload, "image/png", 64, 64, seed=7)], "tiny-sd",
        Billing(Decimal("0.004"), "image", Decimal(1)), provider_request_id="req-1", warnings=("snapped",))
    return CachedResult.from_response(provider, response)


async def test_a_stored_result_comes_back_whole_and_costs_nothing(env: Env) -> None:
    c = env.state.cache
    stored = _result(b"\x89PNG" + bytes(range(256)) * 2)
    assert await c.aput("k1", stored)
    hit = await c.aget("k1")
    assert hit == stored
    response = hit.response()
    assert (response.images[0].data, response.images[0].seed, response.model, response.billing.cost_usd,
            response.billing.unit, response.billing.details["original_usd"], response.warnings) == (
        stored.images[0].data, 7, "tiny-sd", Decimal(0), "cache", "0.004", ("snapped",))
    assert await c.aget_many(["missing", "k1"]) == [None, stored]


async def test_an_entry_expires_after_its_ttl(env: Env) -> None:
    c = env.state.cache
    await c.aput("k", _result(b"x" * 100))
    env.clock.advance(59.0)
    assert await c.aget("k") is not None
    env.clock.advance(2.0)
    assert await c.aget("k") is None


async def test_the_size_cap_drops_the_entries_closest_to_expiring(env: Env) -> None:
    c = env.state.cache  # 3,000 bytes in all
    for i in range(3):
        await c.aput(f"k{i}", _result(bytes([i]) * 700))
        env.clock.advance(1.0)
    await c.aput("k3", _result(b"z" * 700))  # needs room: k0 (the oldest) goes
    assert [r is not None for r in await c.aget_many(["k0", "k1", "k2", "k3"])] == [False, True, True, True]
    assert await c.aput("huge", _result(b"h" * 5_000)) is False
    assert await c.aget("huge") is None and await c.aget("k3") is not None


def test_an_entry_that_is_not_ours_decodes_to_nothing() -> None:
    blob = _result(b"abc").encode()
    assert (CachedResult.decode(b"not a cache entry"), CachedResult.decode(blob[:-1]),
            CachedResult.decode(blob) == _result(b"abc"), _result(b"abc").encoded_size) == (None, None, True, len(blob))


# --- cache keys (one implementation: pure) ------------------------------------------------------------


def test_only_a_seeded_request_has_a_cache_key() -> None:
    assert cache_key(ImageRequest(prompt="a fox", width=512, height=512), "local", "tiny") is None
    assert cache_key(ImageRequest(prompt="a fox", width=512, height=512, seed=1), "local", "tiny") is not None


def test_the_key_follows_what_changes_the_image_and_nothing_else() -> None:
    base = ImageRequest(prompt="a fox", width=512, height=512, seed=1)
    key = cache_key(base, "local", "tiny")
    same = [
        base.model_copy(update={"tags": frozenset({"team:a"}), "idempotency_key": "x", "deadline_s": 9.0}),
        base.model_copy(update={"provider_options": {"other": {"style": "anime"}}}),
    ]
    different = [
        base.model_copy(update={"seed": 2}), base.model_copy(update={"prompt": "a cat"}),
        base.model_copy(update={"width": 768}), base.model_copy(update={"provider_options": {"local": {"x": 1}}}),
    ]
    assert [cache_key(r, "local", "tiny") == key for r in same] == [True, True]
    assert [cache_key(r, "local", "tiny") == key for r in different] == [False] * 4
    assert (cache_key(base, "other", "tiny") == key, cache_key(base, "local", "big") == key) == (False, False)


# --- factory and outages -----------------------------------------------------------------------------


def test_open_state_refuses_an_unknown_scheme() -> None:
    with pytest.raises(ConfigurationError, match="unsupported state URL scheme 'http'"):
        open_state("http://127.0.0.1:6379")


async def test_without_redis_the_shared_state_degrades_to_knowing_nothing(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = open_state(f"redis://:secret-canary@127.0.0.1:{port}/0")
    try:
        with caplog.at_level(logging.WARNING, logger="imagerouter.state"):
            results = (await state.breaker.abefore_call("p"), await state.limits.atake("k", 1),
                       await state.cache.aget("k"), await state.cache.aput("k", _result(b"x")))
            await state.stats.arecord("p", "m", 1.0)
            await state.breaker.arecord_failure("p")
        assert results == (True, 0.0, None, False)
        assert "shared router state unavailable" in caplog.text and "secret-canary" not in caplog.text
    finally:
        await state.aclose()
