"""The ledger contract, run against every backend: a SQLite file and a real PostgreSQL server (tests/pg.py).

Arithmetic, budgets, tags, periods (a settable clock), the reservation TTL, report grouping, persistence,
and concurrency (100 threads over several connections, two processes) must give the same answers on both.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from router.errors import BudgetExceeded, Disposition
from router.ledger import Budget, Ledger, LedgerBackend, Period, Reservation, SpendRow, open_ledger
from tests.pg import pg_server, pg_url  # noqa: F401  (fixtures)

D = Decimal
T0 = datetime(2026, 1, 31, 23, 0, tzinfo=UTC).timestamp()
BACKENDS = ["sqlite", "postgres"]


class Clock:
    """A settable clock in Unix seconds."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Backend:
    """One ledger backend: ``spec`` is what :func:`open_ledger` takes (a file path or a postgresql:// URL)."""

    name: str
    spec: str

    def open(self, clock: Callable[[], float] = time.time, reservation_ttl_s: float = 3600.0) -> LedgerBackend:
        return open_ledger(self.spec, clock=clock, reservation_ttl_s=reservation_ttl_s)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / "ledger.sqlite3"))
    return Backend("postgres", request.getfixturevalue("pg_url"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def any_ledger(backend: Backend, clock: Clock) -> Iterator[LedgerBackend]:
    led = backend.open(clock)
    try:
        yield led
    finally:
        led.close()


def reserve(led: LedgerBackend, amount: str, *, tags: tuple[str, ...] = (), provider: str = "openai",
            model: str = "gpt-image-1", request_id: str = "req") -> Reservation:
    return led.reserve(request_id=request_id, provider=provider, model=model, amount=D(amount), tags=tags)


def charge(led: LedgerBackend, amount: str, actual: str | None = None, *, tags: tuple[str, ...] = (),
           provider: str = "openai", model: str = "gpt-image-1") -> None:
    r = reserve(led, amount, tags=tags, provider=provider, model=model)
    led.settle(r, D(actual if actual is not None else amount))


# --- the protocol -------------------------------------------------------------------


def test_open_ledger_picks_the_backend_by_spec(backend: Backend) -> None:
    led = backend.open()
    try:
        if backend.name == "postgres":
            from router.ledger_pg import PostgresLedger

            assert isinstance(led, PostgresLedger)
            assert "password" not in repr(led)
        else:
            assert isinstance(led, Ledger)
        assert open_ledger(led) is led  # a ledger object passes through
    finally:
        led.close()


def test_a_backend_without_a_queue_writes_everything_directly(any_ledger: LedgerBackend) -> None:
    any_ledger.headroom()  # budgets read: the SQLite file ledger may now queue; the PostgreSQL one never does
    held = any_ledger.reserve_behind(request_id="r1", provider="p", model="m", amount=D("0.01"))
    if held is None:  # PostgreSQL: no queue
        assert not any_ledger.private and any_ledger.queued == 0
        held = reserve(any_ledger, "0.01")
        assert not any_ledger.settle_behind(held, D("0.01"))
        any_ledger.settle(held, D("0.01"))
    else:
        assert any_ledger.settle_behind(held, D("0.01"))
    any_ledger.flush()
    assert any_ledger.queued == 0
    assert any_ledger.spent() == D("0.01")


# --- arithmetic -----------------------------------------------------------------------


def test_decimal_sums_are_exact(any_ledger: LedgerBackend) -> None:
    any_ledger.set_budget(Budget(D("1")))
    charge(any_ledger, "0.1")
    charge(any_ledger, "0.2")
    assert any_ledger.spent() == D("0.3")
    assert any_ledger.headroom() == D("0.7")
    charge(any_ledger, "0.000000001")  # one nano-dollar is kept exactly
    assert str(any_ledger.spent()) == "0.300000001"


def test_amounts_round_to_nano_dollars(any_ledger: LedgerBackend) -> None:
    r = reserve(any_ledger, "0.0000000001")  # a tenth of a nano-dollar: reserved rounds up
    assert r.amount == D("0.000000001")
    any_ledger.settle(r, D("0.0000000015"))  # actual rounds half-even: 1.5 -> 2
    assert any_ledger.spent() == D("0.000000002")


def test_reserve_settle_release_arithmetic(any_ledger: LedgerBackend) -> None:
    any_ledger.set_budget(Budget(D("1.00")))
    a = reserve(any_ledger, "0.40", request_id="a")
    b = reserve(any_ledger, "0.30", request_id="b")
    assert (a.amount, a.tags, a.request_id) == (D("0.40"), (), "a")
    assert any_ledger.headroom() == D("0.30")  # open reservations count
    assert any_ledger.spent() == 0  # but are not spend
    any_ledger.settle(a, D("0.45"), unit="image", quantity=1, details={"size": "1024x1024"})  # over the estimate
    assert any_ledger.spent() == D("0.45")
    assert any_ledger.headroom() == D("0.25")
    any_ledger.release(b, reason="ProviderTimeout")
    assert any_ledger.spent() == D("0.45")
    assert any_ledger.headroom() == D("0.55")


def test_release_records_no_charge(any_ledger: LedgerBackend) -> None:
    charge(any_ledger, "0.04", provider="openai")
    before = any_ledger.report()
    any_ledger.release(reserve(any_ledger, "0.50", provider="replicate"), reason="RateLimited")
    assert any_ledger.report() == before == [SpendRow({"provider": "openai"}, 1, D("0.04"))]
    assert any_ledger.spent() == D("0.04")


@pytest.mark.parametrize("first, second", [("settle", "settle"), ("settle", "release"),
                                           ("release", "settle"), ("release", "release")])
def test_closing_a_reservation_twice_raises(any_ledger: LedgerBackend, first: str, second: str) -> None:
    r = reserve(any_ledger, "0.04")

    def close(how: str) -> None:
        any_ledger.settle(r, D("0.04")) if how == "settle" else any_ledger.release(r)

    close(first)
    with pytest.raises(ValueError, match="already " + ("settled" if first == "settle" else "released")):
        close(second)
    assert any_ledger.spent() == (D("0.04") if first == "settle" else 0)


def test_a_reservation_from_another_ledger_is_refused(any_ledger: LedgerBackend) -> None:
    stranger = Reservation(id=10**9, request_id="elsewhere", provider="p", model="m", amount=D("0.04"), tags=(),
                           created=datetime.fromtimestamp(T0, UTC))
    with pytest.raises(ValueError, match="not in this ledger"):
        any_ledger.settle(stranger, D("0.04"))
    with pytest.raises(ValueError, match="not in this ledger"):
        any_ledger.release(stranger)


def test_negative_amounts_are_refused(any_ledger: LedgerBackend) -> None:
    with pytest.raises(ValueError):
        reserve(any_ledger, "-0.01")
    r = reserve(any_ledger, "0.01")
    with pytest.raises(ValueError):
        any_ledger.settle(r, D("-0.01"))
    any_ledger.settle(r, D("0"))  # still open after the refusal; a free result is fine
    assert any_ledger.spent() == 0


# --- budgets and tags -------------------------------------------------------------------


def test_budget_exceeded_names_the_budget_and_the_figures(any_ledger: LedgerBackend) -> None:
    any_ledger.set_budget(Budget(D("1.00"), "month", "team-a"))
    charge(any_ledger, "0.96", tags=("team-a",))
    with pytest.raises(BudgetExceeded) as info:
        reserve(any_ledger, "0.05", tags=("team-a",), request_id="r-9")
    err = info.value
    assert str(err) == ("budget month:team-a ($1.00) would be exceeded: spent $0.96, reserved $0.00, "
                        "this request needs $0.05")
    assert (err.budget, err.request_id, err.disposition) == ("month:team-a", "r-9", Disposition.FATAL)
    reserve(any_ledger, "0.04", tags=("team-a",))  # exactly to the limit is allowed
    assert any_ledger.headroom(["team-a"]) == 0


def test_budgets_are_upserted_listed_and_removed(any_ledger: LedgerBackend) -> None:
    any_ledger.set_budget(Budget(D("5"), "month"))
    any_ledger.set_budget(Budget(D("2"), "day", "team-a"))
    any_ledger.set_budget(Budget(D("3"), "month"))  # replaces the first
    any_ledger.set_budget(Budget(D("0.50"), "total", "Team-B"))
    assert any_ledger.budgets() == [Budget(D("2"), "day", "team-a"), Budget(D("3"), "month"),
                                    Budget(D("0.50"), "total", "Team-B")]
    assert [b.name for b in any_ledger.budgets()] == ["day:team-a", "month:*", "total:Team-B"]
    assert str(any_ledger.budgets()[2].limit_usd) == "0.50"  # the limit is kept as written
    any_ledger.remove_budget("month", None)
    any_ledger.remove_budget("total", "nobody")  # absent: nothing happens
    any_ledger.remove_budget("total", "Team-B")
    assert any_ledger.budgets() == [Budget(D("2"), "day", "team-a")]
    assert any_ledger.headroom() is None


@pytest.mark.parametrize("tags, fits", [
    ((), D("0.80")),  # only the global budget applies
    (("team-b",), D("0.80")),  # no budget for team-b: global only
    (("team-a",), D("0.10")),  # the tag budget is tighter
    (("team-a", "team-b"), D("0.10")),
    (("team-c",), D("0.05")),  # team-c has spent 0.15 of 0.20
])
def test_tag_budgets_and_the_global_budget(any_ledger: LedgerBackend, tags: tuple[str, ...], fits: Decimal) -> None:
    any_ledger.set_budget(Budget(D("1.00")))
    any_ledger.set_budget(Budget(D("0.10"), tag="team-a"))
    any_ledger.set_budget(Budget(D("0.20"), tag="team-c"))
    charge(any_ledger, "0.05")
    charge(any_ledger, "0.15", tags=("team-c",))
    assert any_ledger.headroom(tags) == fits
    with pytest.raises(BudgetExceeded):
        any_ledger.reserve(request_id="x", provider="p", model="m", amount=fits + D("0.01"), tags=tags)
    any_ledger.reserve(request_id="y", provider="p", model="m", amount=fits, tags=tags)
    assert any_ledger.headroom(tags) == 0


def test_the_tightest_budget_is_named(any_ledger: LedgerBackend) -> None:
    any_ledger.set_budget(Budget(D("1.00")))
    any_ledger.set_budget(Budget(D("0.10"), "day", "team-a"))
    with pytest.raises(BudgetExceeded) as info:
        reserve(any_ledger, "2.00", tags=("team-a",))
    assert info.value.budget == "day:team-a"


def test_spent_by_tag_and_period(any_ledger: LedgerBackend, clock: Clock) -> None:
    charge(any_ledger, "0.10", tags=("a",))
    charge(any_ledger, "0.20", tags=("a", "b"))
    charge(any_ledger, "0.40")
    assert [any_ledger.spent(t) for t in [(), ("a",), ("b",), ("a", "b"), ("c",)]] == [
        D("0.70"), D("0.30"), D("0.20"), D("0.20"), 0]
    clock.advance(2 * 3600)  # into February: a new day and month
    charge(any_ledger, "1", tags=("a", "b"))
    assert [any_ledger.spent(("a", "b"), p) for p in ("day", "month", "total")] == [D("1"), D("1"), D("1.20")]
    assert any_ledger.spent(period="total") == D("1.70")
    with pytest.raises(ValueError, match="period must be one of"):
        any_ledger.spent(period="week")  # type: ignore[arg-type]


def test_a_budget_set_through_another_connection_is_enforced_at_once(backend: Backend, clock: Clock) -> None:
    first, second = backend.open(clock), backend.open(clock)
    try:
        assert first.headroom() is None  # no budget yet, as first last read
        second.set_budget(Budget(D("0.10"), "day"))
        with pytest.raises(BudgetExceeded):
            reserve(first, "0.20")  # reserve reads the budgets it checks, whoever set them
        first.flush()
        assert first.watches() is True
        assert first.headroom() == D("0.10")
    finally:
        first.close()
        second.close()


# --- periods and the reservation TTL ---------------------------------------------------


@pytest.mark.parametrize("period, start, advance_s, renewed", [
    ("day", datetime(2026, 3, 14, 23, 59, 59), 1, True),
    ("day", datetime(2026, 3, 14, 0, 0, 0), 86_399, False),
    ("month", datetime(2026, 1, 31, 23, 59, 59), 1, True),
    ("month", datetime(2026, 1, 1, 0, 0, 0), 30 * 86_400 + 86_399, False),
    ("month", datetime(2026, 12, 31, 12, 0, 0), 12 * 3600, True),  # into the next year
    ("total", datetime(2026, 1, 31, 23, 59, 59), 400 * 86_400, False),
])
def test_periods_roll_over_at_utc_midnight(backend: Backend, period: Period, start: datetime, advance_s: int,
                                           renewed: bool) -> None:
    clock = Clock(start.replace(tzinfo=UTC).timestamp())
    led = backend.open(clock, reservation_ttl_s=10**9)
    try:
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
    finally:
        led.close()


@pytest.mark.parametrize("ts", [0.5, 1_700_000_000.7, 1_767_225_599.9, 1_767_225_600.0])
def test_settling_adds_to_the_buckets_the_budgets_read(backend: Backend, ts: float) -> None:
    led = backend.open(lambda: ts)
    try:
        periods: tuple[Period, ...] = ("day", "month", "total")
        for period in periods:
            led.set_budget(Budget(D("1"), period, "t1"))
        r = led.reserve(request_id="a", provider="p", model="m", amount=D("0.01"), tags=["t1", "t2"])
        led.settle(r, D("0.02"))
        for period in periods:
            for tags in ((), ("t1",), ("t2",), ("t1", "t2")):
                assert led.spent(tags, period) == D("0.02")
        assert led.headroom(["t1"]) == D("0.98")
        day = datetime.fromtimestamp(ts, UTC).date().isoformat()
        assert led.report(group_by=("day", "month")) == [SpendRow({"day": day, "month": day[:7]}, 1, D("0.02"))]
    finally:
        led.close()


def test_stale_reservations_stop_counting(backend: Backend, clock: Clock) -> None:
    led = backend.open(clock, reservation_ttl_s=600)
    try:
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
    finally:
        led.close()


def test_reservation_ttl_defaults_to_an_hour(any_ledger: LedgerBackend, clock: Clock) -> None:
    any_ledger.set_budget(Budget(D("1"), "total"))
    reserve(any_ledger, "1")
    clock.advance(3599)
    assert any_ledger.headroom() == 0
    clock.advance(1)
    assert any_ledger.headroom() == 1


def test_reservations_record_their_time(any_ledger: LedgerBackend, clock: Clock) -> None:
    r = reserve(any_ledger, "0.01", tags=("b", "a", "b"))
    assert r.created == datetime(2026, 1, 31, 23, 0, tzinfo=UTC)
    assert r.tags == ("a", "b")
    clock.advance(timedelta(days=1).total_seconds())
    assert reserve(any_ledger, "0.01").created.date().isoformat() == "2026-02-01"


# --- concurrency ------------------------------------------------------------------------


def test_100_threads_over_4_connections_cannot_overspend(backend: Backend) -> None:
    ledgers = [backend.open() for _ in range(4)]
    try:
        ledgers[0].set_budget(Budget(D("1")))
        ledgers[0].set_budget(Budget(D("0.60"), tag="team"))
        gate = threading.Barrier(16)

        def attempt(i: int) -> Reservation | None:
            led = ledgers[i % 4]
            if i < 16:
                gate.wait()
            try:
                r = reserve(led, "0.04", request_id=f"r{i}", tags=("team",) if i % 2 else ())
            except BudgetExceeded:
                return None
            if i % 3:  # settle some at once (at the estimate), while others are still reserving
                led.settle(r, D("0.04"))
            return r

        with ThreadPoolExecutor(16) as pool:
            won = [r for r in pool.map(attempt, range(100)) if r is not None]
        assert len(won) == 25
        assert sum(1 for r in won if r.tags) <= 15  # the team budget held too
        led = ledgers[0]
        assert led.headroom() == 0
        for r in won:
            if int(r.request_id[1:]) % 3 == 0:
                led.settle(r, D("0.04"))
        assert led.spent() == D("1.00")
        assert led.report(group_by=()) == [SpendRow({}, 25, D("1.00"))]
    finally:
        for led in ledgers:
            led.close()


def _process_worker(spec: str, start: multiprocessing.synchronize.Event, n: int, out: multiprocessing.Queue) -> None:
    """``n`` reserve-and-settle attempts on each of 4 connections (threads) of this process; puts the wins."""
    ledgers = [open_ledger(spec) for _ in range(4)]

    def run(led: LedgerBackend) -> int:
        won = 0
        for i in range(n):
            try:
                r = led.reserve(request_id=f"p{i}", provider="p", model="m", amount=D("0.04"))
            except BudgetExceeded:
                continue
            led.settle(r, D("0.04"))
            won += 1
        return won

    try:
        start.wait()
        with ThreadPoolExecutor(len(ledgers)) as pool:
            out.put(sum(pool.map(run, ledgers)))
    finally:
        for led in ledgers:
            led.close()


def test_two_processes_cannot_overspend(backend: Backend) -> None:
    led = backend.open()
    try:
        led.set_budget(Budget(D("1")))
    finally:
        led.close()
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(backend.spec, start, 15, out)) for _ in range(2)]
    for p in procs:
        p.start()
    start.set()
    wins = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(wins) == 25
    led = backend.open()
    try:
        assert led.spent() == D("1.00")
        assert led.report(group_by=()) == [SpendRow({}, 25, D("1.00"))]
        assert led.headroom() == 0
    finally:
        led.close()


# --- reports ----------------------------------------------------------------------------


@pytest.fixture
def history(any_ledger: LedgerBackend, clock: Clock) -> LedgerBackend:
    charge(any_ledger, "0.04", provider="openai", model="gpt-image-1", tags=("team-a",))  # Jan 31
    charge(any_ledger, "0.02", provider="openai", model="dall-e-3", tags=("team-a", "batch"))
    any_ledger.release(reserve(any_ledger, "9.00", provider="openai"))  # no charge
    clock.advance(2 * 3600)  # Feb 1
    charge(any_ledger, "0.003", provider="replicate", model="flux-schnell")
    charge(any_ledger, "0.05", "0.06", provider="openai", model="gpt-image-1", tags=("batch",))
    charge(any_ledger, "0.01", provider="Zeta", model="z", tags=("Upper",))  # byte order: upper case first
    return any_ledger


@pytest.mark.parametrize("group_by, rows", [
    (("provider",), [({"provider": "Zeta"}, 1, "0.01"), ({"provider": "openai"}, 3, "0.12"),
                     ({"provider": "replicate"}, 1, "0.003")]),
    (("provider", "model"), [({"provider": "Zeta", "model": "z"}, 1, "0.01"),
                             ({"provider": "openai", "model": "dall-e-3"}, 1, "0.02"),
                             ({"provider": "openai", "model": "gpt-image-1"}, 2, "0.10"),
                             ({"provider": "replicate", "model": "flux-schnell"}, 1, "0.003")]),
    (("tag",), [({"tag": "(untagged)"}, 1, "0.003"), ({"tag": "Upper"}, 1, "0.01"), ({"tag": "batch"}, 2, "0.08"),
                ({"tag": "team-a"}, 2, "0.06")]),
    (("day",), [({"day": "2026-01-31"}, 2, "0.06"), ({"day": "2026-02-01"}, 3, "0.073")]),
    (("month", "provider"), [({"month": "2026-01", "provider": "openai"}, 2, "0.06"),
                             ({"month": "2026-02", "provider": "Zeta"}, 1, "0.01"),
                             ({"month": "2026-02", "provider": "openai"}, 1, "0.06"),
                             ({"month": "2026-02", "provider": "replicate"}, 1, "0.003")]),
    (("provider", "provider"), [({"provider": "Zeta"}, 1, "0.01"), ({"provider": "openai"}, 3, "0.12"),
                                ({"provider": "replicate"}, 1, "0.003")]),
    ((), [({}, 5, "0.133")]),
])
def test_report_groups_settled_charges(history: LedgerBackend, group_by: tuple[str, ...],
                                       rows: list[tuple[dict[str, str], int, str]]) -> None:
    assert history.report(group_by=group_by) == [SpendRow(k, n, D(usd)) for k, n, usd in rows]


@pytest.mark.parametrize("since, until, total", [
    (datetime(2026, 2, 1, tzinfo=UTC), None, "0.073"),
    (None, datetime(2026, 2, 1, tzinfo=UTC), "0.06"),
    (datetime(2026, 2, 1), None, "0.073"),  # naive means UTC
    (datetime(2026, 1, 31, 23, 0, tzinfo=UTC), datetime(2026, 1, 31, 23, 0, 1, tzinfo=UTC), "0.06"),  # [since, until)
    (datetime(2026, 3, 1, tzinfo=UTC), None, None),
])
def test_report_since_until(history: LedgerBackend, since: datetime | None, until: datetime | None,
                            total: str | None) -> None:
    rows = history.report(since=since, until=until, group_by=())
    assert [r.usd for r in rows] == ([D(total)] if total else [])


def test_report_refuses_unknown_groupings(any_ledger: LedgerBackend) -> None:
    with pytest.raises(ValueError, match="cannot group by colour"):
        any_ledger.report(group_by=("provider", "colour"))


# --- persistence ------------------------------------------------------------------------


def test_the_ledger_persists_across_reopen(backend: Backend, clock: Clock) -> None:
    led = backend.open(clock)
    led.set_budget(Budget(D("1.00"), "month", "team-a"))
    charge(led, "0.30", tags=("team-a",), provider="openai")
    pending = reserve(led, "0.50", tags=("team-a",))
    led.close()
    clock.advance(60)
    led = backend.open(clock)
    try:
        assert led.budgets() == [Budget(D("1.00"), "month", "team-a")]
        assert led.spent(["team-a"]) == D("0.30")
        assert led.headroom(["team-a"]) == D("0.20")  # the open reservation survived too
        led.settle(pending, D("0.45"))
        assert led.report() == [SpendRow({"provider": "openai"}, 2, D("0.75"))]
        with pytest.raises(ValueError, match="already settled"):
            led.settle(pending, D("0.45"))
    finally:
        led.close()


# --- PostgreSQL only: migrations, the driver import -------------------------------------


def test_postgres_migrations_are_versioned_and_applied_once(pg_url: str) -> None:  # noqa: F811
    import psycopg

    from router.ledger_pg import MIGRATIONS, SCHEMA_VERSION, PostgresLedger

    opened: list[PostgresLedger] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            opened.append(PostgresLedger(pg_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(6)]  # six processes' worth of first opens
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [led.schema_version for led in opened] == [SCHEMA_VERSION] * 6
    for led in opened:
        led.close()
    with psycopg.connect(pg_url) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM imagerouter_schema_version ORDER BY version")]
        assert versions == [n for n, _ in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))
        conn.execute("INSERT INTO imagerouter_schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match=f"schema v{SCHEMA_VERSION + 1}; this version reads v{SCHEMA_VERSION}"):
        PostgresLedger(pg_url)


def test_postgres_stores_integer_nano_dollars_and_buckets(pg_url: str) -> None:  # noqa: F811
    import psycopg

    led = open_ledger(pg_url, clock=lambda: T0)
    r = led.reserve(request_id="a", provider="p", model="m", amount=D("0.1"), tags=["t"])
    led.settle(r, D("0.3"), unit="image", quantity=2, details={"size": "1024x1024"})
    led.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT reserved_nano, actual_nano, state, unit, quantity, details"
                            " FROM imagerouter_charges").fetchall() == [
            (100_000_000, 300_000_000, "settled", "image", "2", '{"size": "1024x1024"}')]
        assert sorted(conn.execute("SELECT bucket, tag, usd_nano, requests FROM imagerouter_totals").fetchall()) == [
            (bucket, tag, 300_000_000, 1) for bucket in ("day:2026-01-31", "month:2026-01", "total")
            for tag in ("", "t")]


def test_importing_router_does_not_import_psycopg() -> None:
    code = "import router, router.ledger, sys; assert 'psycopg' not in sys.modules, 'psycopg imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
