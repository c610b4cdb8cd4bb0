"""The cost ledger: reserve-then-settle arithmetic, budgets, periods, concurrency, persistence."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import platformdirs
import pytest

import router.ledger as ledger_module
from router.errors import BudgetExceeded, Disposition
from router.ledger import Budget, Ledger, Period, Reservation, SpendRow

D = Decimal
T0 = datetime(2026, 1, 31, 23, 0, tzinfo=UTC).timestamp()


class Clock:
    """A settable clock in Unix seconds."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(clock: Clock) -> Iterator[Ledger]:
    with Ledger(":memory:", clock=clock) as led:
        yield led


def reserve(led: Ledger, amount: str, *, tags: tuple[str, ...] = (), provider: str = "openai",
            model: str = "gpt-image-1", request_id: str = "req") -> Reservation:
    return led.reserve(request_id=request_id, provider=provider, model=model, amount=D(amount), tags=tags)


def charge(led: Ledger, amount: str, actual: str | None = None, **kw: object) -> None:
    led.settle(reserve(led, amount, **kw), D(actual if actual is not None else amount))  # type: ignore[arg-type]


# --- arithmetic -------------------------------------------------------------------


def test_decimal_sums_are_exact(ledger: Ledger) -> None:
    ledger.set_budget(Budget(D("1")))
    charge(ledger, "0.1")
    charge(ledger, "0.2")
    assert ledger.spent() == D("0.3")
    assert ledger.headroom() == D("0.7")
    charge(ledger, "0.000000001")  # one nano-dollar is kept exactly
    assert ledger.spent() == D("0.300000001")
    assert str(ledger.spent()) == "0.300000001"


def test_reserve_settle_release_arithmetic(ledger: Ledger) -> None:
    ledger.set_budget(Budget(D("1.00")))
    a = reserve(ledger, "0.40", request_id="a")
    b = reserve(ledger, "0.30", request_id="b")
    assert (a.amount, a.tags, a.request_id) == (D("0.40"), (), "a")
    assert ledger.headroom() == D("0.30")  # open reservations count
    assert ledger.spent() == 0  # but are not spend
    ledger.settle(a, D("0.45"), unit="image", quantity=1, details={"size": "1024x1024"})  # over the estimate
    assert ledger.spent() == D("0.45")
    assert ledger.headroom() == D("0.25")
    ledger.release(b, reason="ProviderTimeout")
    assert ledger.spent() == D("0.45")
    assert ledger.headroom() == D("0.55")


def test_release_records_no_charge(ledger: Ledger) -> None:
    charge(ledger, "0.04", provider="openai")
    before = ledger.report()
    ledger.release(reserve(ledger, "0.50", provider="replicate"), reason="RateLimited")
    assert ledger.report() == before == [SpendRow({"provider": "openai"}, 1, D("0.04"))]
    assert ledger.spent() == D("0.04")


@pytest.mark.parametrize("first, second", [("settle", "settle"), ("settle", "release"),
                                           ("release", "settle"), ("release", "release")])
def test_closing_a_reservation_twice_raises(ledger: Ledger, first: str, second: str) -> None:
    r = reserve(ledger, "0.04")

    def close(how: str) -> None:
        ledger.settle(r, D("0.04")) if how == "settle" else ledger.release(r)

    close(first)
    with pytest.raises(ValueError, match="already"):
        close(second)
    assert ledger.spent() == (D("0.04") if first == "settle" else 0)


def test_a_reservation_from_another_ledger_is_refused(ledger: Ledger, clock: Clock) -> None:
    with Ledger(":memory:", clock=clock) as other:
        r = reserve(other, "0.04", request_id="elsewhere")
    with pytest.raises(ValueError, match="not in this ledger"):
        ledger.settle(r, D("0.04"))


@pytest.mark.parametrize("kwargs, error", [
    ({"limit_usd": D("-1")}, ValueError),
    ({"limit_usd": D("NaN")}, ValueError),
    ({"limit_usd": D("1"), "period": "week"}, ValueError),
    ({"limit_usd": D("1"), "tag": ""}, ValueError),
    ({"limit_usd": "lots"}, TypeError),
])
def test_invalid_budgets_are_refused(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        Budget(**kwargs)  # type: ignore[arg-type]


def test_negative_amounts_are_refused(ledger: Ledger) -> None:
    with pytest.raises(ValueError):
        reserve(ledger, "-0.01")
    r = reserve(ledger, "0.01")
    with pytest.raises(ValueError):
        ledger.settle(r, D("-0.01"))
    ledger.settle(r, D("0"))  # still open after the refusal; a free result is fine
    assert ledger.spent() == 0


# --- budgets ----------------------------------------------------------------------


def test_budget_exceeded_names_the_budget_and_the_figures(ledger: Ledger) -> None:
    ledger.set_budget(Budget(D("1.00"), "month", "team-a"))
    charge(ledger, "0.96", tags=("team-a",))
    with pytest.raises(BudgetExceeded) as info:
        reserve(ledger, "0.05", tags=("team-a",), request_id="r-9")
    err = info.value
    assert str(err) == ("budget month:team-a ($1.00) would be exceeded: spent $0.96, reserved $0.00, "
                        "this request needs $0.05")
    assert (err.budget, err.request_id, err.disposition) == ("month:team-a", "r-9", Disposition.FATAL)
    reserve(ledger, "0.04", tags=("team-a",))  # exactly to the limit is allowed
    assert ledger.headroom(["team-a"]) == 0


def test_budgets_are_upserted_listed_and_removed(ledger: Ledger) -> None:
    ledger.set_budget(Budget(D("5"), "month"))
    ledger.set_budget(Budget(D("2"), "day", "team-a"))
    ledger.set_budget(Budget(D("3"), "month"))  # replaces the first
    assert ledger.budgets() == [Budget(D("2"), "day", "team-a"), Budget(D("3"), "month")]
    assert [b.name for b in ledger.budgets()] == ["day:team-a", "month:*"]
    ledger.remove_budget("month", None)
    ledger.remove_budget("total", "nobody")  # absent: nothing happens
    assert ledger.budgets() == [Budget(D("2"), "day", "team-a")]
    assert ledger.headroom() is None


@pytest.mark.parametrize("tags, headroom, fits", [
    ((), D("0.80"), D("0.80")),  # only the global budget applies
    (("team-b",), D("0.80"), D("0.80")),  # no budget for team-b: global only
    (("team-a",), D("0.10"), D("0.10")),  # the tag budget is tighter
    (("team-a", "team-b"), D("0.10"), D("0.10")),
    (("team-c",), D("0.05"), D("0.05")),  # team-c has spent 0.15 of 0.20
])
def test_tag_budgets_and_the_global_budget(ledger: Ledger, tags: tuple[str, ...], headroom: Decimal,
                                           fits: Decimal) -> None:
    ledger.set_budget(Budget(D("1.00")))
    ledger.set_budget(Budget(D("0.10"), tag="team-a"))
    ledger.set_budget(Budget(D("0.20"), tag="team-c"))
    charge(ledger, "0.05")
    charge(ledger, "0.15", tags=("team-c",))
    assert ledger.headroom(tags) == headroom
    with pytest.raises(BudgetExceeded):
        ledger.reserve(request_id="x", provider="p", model="m", amount=fits + D("0.01"), tags=tags)
    ledger.reserve(request_id="y", provider="p", model="m", amount=fits, tags=tags)
    assert ledger.headroom(tags) == 0


def test_the_tightest_budget_is_named(ledger: Ledger) -> None:
    ledger.set_budget(Budget(D("1.00")))
    ledger.set_budget(Budget(D("0.10"), "day", "team-a"))
    with pytest.raises(BudgetExceeded) as info:
        reserve(ledger, "2.00", tags=("team-a",))
    assert info.value.budget == "day:team-a"


def test_spent_by_tag_and_period(ledger: Ledger, clock: Clock) -> None:
    charge(ledger, "0.10", tags=("a",))
    charge(ledger, "0.20", tags=("a", "b"))
    charge(ledger, "0.40")
    assert [ledger.spent(t) for t in [(), ("a",), ("b",), ("a", "b"), ("c",)]] == [
        D("0.70"), D("0.30"), D("0.20"), D("0.20"), 0]
    clock.advance(2 * 3600)  # into February: a new day and month
    charge(ledger, "1", tags=("a", "b"))
    assert [ledger.spent(("a", "b"), p) for p in ("day", "month", "total")] == [D("1"), D("1"), D("1.20")]
    assert ledger.spent(period="total") == D("1.70")


# --- periods ----------------------------------------------------------------------


@pytest.mark.parametrize("period, start, advance_s, renewed", [
    ("day", datetime(2026, 3, 14, 23, 59, 59), 1, True),
    ("day", datetime(2026, 3, 14, 0, 0, 0), 86_399, False),
    ("month", datetime(2026, 1, 31, 23, 59, 59), 1, True),
    ("month", datetime(2026, 1, 1, 0, 0, 0), 30 * 86_400 + 86_399, False),
    ("month", datetime(2026, 12, 31, 12, 0, 0), 12 * 3600, True),  # into the next year
    ("total", datetime(2026, 1, 31, 23, 59, 59), 400 * 86_400, False),
])
def test_periods_roll_over_at_utc_midnight(period: Period, start: datetime, advance_s: int, renewed: bool) -> None:
    clock = Clock(start.replace(tzinfo=UTC).timestamp())
    with Ledger(":memory:", clock=clock, reservation_ttl_s=10**9) as led:
        led.set_budget(Budget(D("1"), period))
        charge(led, "0.75")
        open_one = reserve(led, "0.25")
        assert led.headroom() == 0
        clock.advance(advance_s)
        assert led.headroom() == (D("1") if renewed else 0)
        assert led.spent(period=period) == (0 if renewed else D("0.75"))
        led.settle(open_one, D("0.25"))  # settles into the period it was reserved in
        assert led.spent(period=period) == (0 if renewed else D("1"))
        assert led.spent(period="total") == D("1")


def test_stale_reservations_stop_counting(clock: Clock) -> None:
    with Ledger(":memory:", clock=clock, reservation_ttl_s=600) as led:
        led.set_budget(Budget(D("1"), "total"))
        crashed = reserve(led, "0.90")
        clock.advance(599)
        with pytest.raises(BudgetExceeded):
            reserve(led, "0.20")
        clock.advance(1)
        assert led.headroom() == D("1")
        reserve(led, "0.20")
        led.settle(crashed, D("0.90"))  # a late settlement still records what was billed
        assert led.spent(period="total") == D("0.90")
        assert led.headroom() == D("-0.10")  # the late charge overran the budget: visible, not hidden


def test_reservation_ttl_defaults_to_an_hour(ledger: Ledger, clock: Clock) -> None:
    ledger.set_budget(Budget(D("1"), "total"))
    reserve(ledger, "1")
    clock.advance(3599)
    assert ledger.headroom() == 0
    clock.advance(1)
    assert ledger.headroom() == 1


# --- concurrency ------------------------------------------------------------------


async def test_100_concurrent_coroutines_cannot_overspend(ledger: Ledger) -> None:
    ledger.set_budget(Budget(D("1")))

    async def attempt(i: int) -> Reservation | None:
        await asyncio.sleep(0)
        try:
            r = reserve(ledger, "0.04", request_id=f"r{i}")
        except BudgetExceeded:
            return None
        await asyncio.sleep(0.001 * (i % 5))  # the provider call: reservations overlap
        ledger.settle(r, D("0.03") if i % 2 else D("0.04"))
        return r

    results = await asyncio.gather(*(attempt(i) for i in range(100)))
    won = [r for r in results if r is not None]
    assert len(won) == 25
    expected = sum((D("0.03") if int(r.request_id[1:]) % 2 else D("0.04") for r in won), D(0))
    assert ledger.spent() == expected <= D("1")
    assert ledger.report(group_by=()) == [SpendRow({}, 25, expected)]


def test_100_concurrent_threads_cannot_overspend(ledger: Ledger) -> None:
    ledger.set_budget(Budget(D("1")))
    gate = threading.Barrier(16)

    def attempt(i: int) -> Reservation | None:
        if i < 16:
            gate.wait()
        try:
            return reserve(ledger, "0.04", request_id=f"r{i}")
        except BudgetExceeded:
            return None

    with ThreadPoolExecutor(16) as pool:
        won = [r for r in pool.map(attempt, range(100)) if r is not None]
    assert len(won) == 25
    assert ledger.headroom() == 0
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda r: ledger.settle(r, D("0.04")), won))
    assert ledger.spent() == D("1.00")
    assert ledger.headroom() == 0


def _process_worker(path: str, start: multiprocessing.synchronize.Event, n: int, out: multiprocessing.Queue) -> None:
    won = 0
    with Ledger(path) as led:
        start.wait()
        for i in range(n):
            try:
                r = led.reserve(request_id=f"p{i}", provider="p", model="m", amount=D("0.04"))
            except BudgetExceeded:
                continue
            led.settle(r, D("0.04"))
            won += 1
    out.put(won)


def test_two_processes_on_one_file_cannot_overspend(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite3")
    with Ledger(path) as led:
        led.set_budget(Budget(D("1")))
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(path, start, 60, out)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    wins = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(wins) == 25
    with Ledger(path) as led:
        assert led.spent() == D("1.00")
        assert led.report(group_by=()) == [SpendRow({}, 25, D("1.00"))]


# --- reports ----------------------------------------------------------------------


@pytest.fixture
def history(ledger: Ledger, clock: Clock) -> Ledger:
    charge(ledger, "0.04", provider="openai", model="gpt-image-1", tags=("team-a",))  # Jan 31
    charge(ledger, "0.02", provider="openai", model="dall-e-3", tags=("team-a", "batch"))
    ledger.release(reserve(ledger, "9.00", provider="openai"))  # no charge
    clock.advance(2 * 3600)  # Feb 1
    charge(ledger, "0.003", provider="replicate", model="flux-schnell")
    charge(ledger, "0.05", "0.06", provider="openai", model="gpt-image-1", tags=("batch",))
    return ledger


@pytest.mark.parametrize("group_by, rows", [
    (("provider",), [({"provider": "openai"}, 3, "0.12"), ({"provider": "replicate"}, 1, "0.003")]),
    (("provider", "model"), [({"provider": "openai", "model": "dall-e-3"}, 1, "0.02"),
                             ({"provider": "openai", "model": "gpt-image-1"}, 2, "0.10"),
                             ({"provider": "replicate", "model": "flux-schnell"}, 1, "0.003")]),
    (("tag",), [({"tag": "(untagged)"}, 1, "0.003"), ({"tag": "batch"}, 2, "0.08"), ({"tag": "team-a"}, 2, "0.06")]),
    (("day",), [({"day": "2026-01-31"}, 2, "0.06"), ({"day": "2026-02-01"}, 2, "0.063")]),
    (("month", "provider"), [({"month": "2026-01", "provider": "openai"}, 2, "0.06"),
                             ({"month": "2026-02", "provider": "openai"}, 1, "0.06"),
                             ({"month": "2026-02", "provider": "replicate"}, 1, "0.003")]),
    ((), [({}, 4, "0.123")]),
])
def test_report_groups_settled_charges(history: Ledger, group_by: tuple[str, ...],
                                       rows: list[tuple[dict[str, str], int, str]]) -> None:
    assert history.report(group_by=group_by) == [SpendRow(k, n, D(usd)) for k, n, usd in rows]


@pytest.mark.parametrize("since, until, total", [
    (datetime(2026, 2, 1, tzinfo=UTC), None, "0.063"),
    (None, datetime(2026, 2, 1, tzinfo=UTC), "0.06"),
    (datetime(2026, 2, 1), None, "0.063"),  # naive means UTC
    (datetime(2026, 3, 1, tzinfo=UTC), None, None),
])
def test_report_since_until(history: Ledger, since: datetime | None, until: datetime | None,
                            total: str | None) -> None:
    rows = history.report(since=since, until=until, group_by=())
    assert [r.usd for r in rows] == ([D(total)] if total else [])


def test_report_refuses_unknown_groupings(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="cannot group by colour"):
        ledger.report(group_by=("provider", "colour"))


# --- files --------------------------------------------------------------------------


def test_a_file_ledger_persists_across_reopen(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "nested" / "dir" / "ledger.sqlite3"
    with Ledger(path, clock=clock) as led:
        led.set_budget(Budget(D("1.00"), "month", "team-a"))
        charge(led, "0.30", tags=("team-a",), provider="openai")
        pending = reserve(led, "0.50", tags=("team-a",))
    assert path.is_file()
    clock.advance(60)
    with Ledger(str(path), clock=clock) as led:
        assert led.budgets() == [Budget(D("1.00"), "month", "team-a")]
        assert led.spent(["team-a"]) == D("0.30")
        assert led.headroom(["team-a"]) == D("0.20")  # the open reservation survived too
        led.settle(pending, D("0.45"))
        assert led.report() == [SpendRow({"provider": "openai"}, 2, D("0.75"))]
        with pytest.raises(ValueError):
            led.settle(pending, D("0.45"))
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT actual_nano, state FROM charges ORDER BY id").fetchall() == [
            (300_000_000, "settled"), (450_000_000, "settled")]
    raw.close()


@pytest.mark.skipif(sys.platform != "linux", reason="XDG_DATA_HOME is how platformdirs places data on Linux")
def test_the_default_path_is_in_the_user_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    with Ledger() as led:
        charge(led, "0.01")
    expected = tmp_path / "xdg" / "imagerouter" / "ledger.sqlite3"
    assert led.path == expected
    assert expected.is_file()


def test_the_default_path_follows_platformdirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake_user_data_dir(appname: str) -> str:
        seen.append(appname)
        return str(tmp_path / "data" / appname)

    monkeypatch.setattr(platformdirs, "user_data_dir", fake_user_data_dir)
    with Ledger() as led:
        assert led.path == tmp_path / "data" / "imagerouter" / "ledger.sqlite3"
    assert seen == ["imagerouter"]
    assert ledger_module.default_path().is_file()


def test_a_closed_ledger_cannot_be_used(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite3")
    led.close()
    with pytest.raises(sqlite3.ProgrammingError):
        led.spent()


def test_reservations_record_their_time(ledger: Ledger, clock: Clock) -> None:
    r = reserve(ledger, "0.01", tags=("b", "a", "b"))
    assert r.created == datetime.fromtimestamp(T0, UTC) == datetime(2026, 1, 31, 23, 0, tzinfo=UTC)
    assert r.tags == ("a", "b")
    clock.advance(timedelta(days=1).total_seconds())
    assert reserve(ledger, "0.01").created.date().isoformat() == "2026-02-01"


@pytest.mark.parametrize("ts", [0.5, 1_700_000_000.7, 1_767_225_599.9, 1_767_225_600.0])
def test_settling_adds_to_the_same_buckets_the_budgets_read(ts: float) -> None:
    from router.ledger import _bucket

    ledger = Ledger(":memory:", clock=lambda: ts)
    r = ledger.reserve(request_id="a", provider="p", model="m", amount=Decimal("0.01"), tags=["t1", "t2"])
    ledger.settle(r, Decimal("0.02"))
    rows = sorted(ledger._conn.execute("SELECT bucket, tag, usd_nano, requests FROM totals").fetchall())
    assert rows == sorted((_bucket(p, ts), t, 20_000_000, 1) for p in ("day", "month", "total")
                          for t in ("", "t1", "t2"))
    with pytest.raises(ValueError, match="already settled"):
        ledger.settle(r, Decimal("0.02"))
    assert ledger.spent(["t1"], "day") == Decimal("0.02")


def test_a_version_1_ledger_file_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    Ledger(path).close()
    with sqlite3.connect(path) as conn:  # make it look like a v1 file: no trigger
        conn.execute("DROP TRIGGER charges_settled")
        conn.execute("PRAGMA user_version = 1")
    ledger = Ledger(path)
    r = ledger.reserve(request_id="a", provider="p", model="m", amount=Decimal("0.01"))
    ledger.settle(r, Decimal("0.03"))
    assert ledger.spent() == Decimal("0.03")
    ledger.close()


def test_an_in_memory_ledger_applies_queued_writes_before_any_read() -> None:
    ledger = Ledger(":memory:")
    reservations = [ledger.reserve(request_id=f"r{i}", provider="p", model="m", amount=Decimal("0.01"))
                    for i in range(3)]
    assert ledger._pending  # no budget watches these: their writes wait
    ledger.settle(reservations[0], Decimal("0.02"))
    ledger.settle(reservations[1], Decimal("0.03"))
    ledger.release(reservations[2], reason="failed")
    with pytest.raises(ValueError, match="already settled"):
        ledger.settle(reservations[0], Decimal("0.02"))
    assert ledger.spent() == Decimal("0.05")
    assert [(r.key, r.requests, r.usd) for r in ledger.report()] == [({"provider": "p"}, 2, Decimal("0.05"))]
    ledger.set_budget(Budget(Decimal("0.06"), "day"))  # from now on, a budget watches every request
    with pytest.raises(BudgetExceeded):
        ledger.reserve(request_id="r9", provider="p", model="m", amount=Decimal("0.02"))
    ids = {r.id for r in reservations} | {ledger.reserve(request_id="r10", provider="p", model="m",
                                                         amount=Decimal("0.01")).id}
    assert len(ids) == 4


def test_queued_writes_are_bounded_and_ids_stay_unique() -> None:
    ledger = Ledger(":memory:")
    seen = set()
    for i in range(1200):
        r = ledger.reserve(request_id=f"r{i}", provider="p", model="m", amount=Decimal("0.001"))
        seen.add(r.id)
        ledger.settle(r, Decimal("0.001"))
        assert len(ledger._pending) < 512
    assert len(seen) == 1200 and ledger.spent() == Decimal("1.2")


def test_a_file_ledger_queues_unwatched_writes_until_flushed(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    assert ledger.watches(("team",)) is None  # budgets not read yet: nothing is queued blind
    assert ledger.reserve_behind(request_id="r0", provider="p", model="m", amount=D("0.01")) is None
    assert ledger.headroom(("team",)) is None  # reads the budgets: none
    assert ledger.watches(("team",)) is False
    held = ledger.reserve_behind(request_id="r1", provider="p", model="m", amount=D("0.01"), tags=("team",))
    assert held is not None and held.tags == ("team",) and held.id >= 2**62  # no clash with other processes
    assert ledger.settle_behind(held, D("0.02"), unit="images", quantity=1)
    other = Ledger(path)
    assert other.spent() == D(0)  # not written yet
    assert ledger.queued == 3  # the charge, its tag, its settlement
    ledger.flush()
    assert ledger.queued == 0
    assert other.spent() == D("0.02") and other.spent(("team",)) == D("0.02")
    direct = ledger.reserve(request_id="r2", provider="p", model="m", amount=D("0.01"))
    assert not ledger.settle_behind(direct, D("0.01"))  # only queued reservations settle behind
    ledger.settle(direct, D("0.01"))
    assert other.spent() == D("0.03")
    other.close()
    ledger.close()


def test_a_budget_set_by_another_process_stops_the_queueing_at_the_next_flush(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger, other = Ledger(path), Ledger(path)
    assert ledger.headroom() is None and ledger.watches() is False
    other.set_budget(Budget(D("1"), "day"))
    ledger.flush()  # notices the other process's change
    assert ledger.watches() is True
    assert ledger.reserve_behind(request_id="r1", provider="p", model="m", amount=D("0.01")) is None
    with pytest.raises(BudgetExceeded):
        ledger.reserve(request_id="r2", provider="p", model="m", amount=D("2"))
    ledger.close()
    other.close()


def test_queued_writes_survive_a_failed_flush_and_a_queued_reservation_can_be_released(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    ledger.headroom()
    held = ledger.reserve_behind(request_id="r1", provider="p", model="m", amount=D("0.01"))
    assert held is not None
    lock = sqlite3.connect(path, isolation_level=None, timeout=0)
    lock.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    ledger._conn.execute("PRAGMA busy_timeout = 50")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        ledger.flush()
    assert ledger.queued == 1  # put back, not lost
    lock.execute("COMMIT")
    lock.close()
    ledger.release(held, reason="failed")  # applies the queue first, then releases
    assert ledger.queued == 0 and ledger.spent() == D(0)
    with pytest.raises(ValueError, match="already released"):
        ledger.release(held)
    ledger.close()
