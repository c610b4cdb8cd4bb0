"""The cost ledger: reserve a request's estimated cost, settle what the provider billed.

The router calls :meth:`Ledger.reserve` with the estimate before it calls a provider,
:meth:`Ledger.settle` with the actual cost after, and :meth:`Ledger.release` when the
attempt failed (no charge for work not done). ``reserve`` checks every applicable
budget and inserts the reservation in one ``BEGIN IMMEDIATE`` transaction, so neither
concurrent coroutines and threads (one ``threading.Lock`` per ledger) nor processes
sharing the file can overspend a budget together.

Money is :class:`~decimal.Decimal` USD throughout and is stored as integer
nano-dollars (1e-9 USD): reservations round up to the next nano-dollar, actual costs
to the nearest; sums are integer arithmetic, so 0.1 + 0.2 is exactly 0.3.

A charge belongs to the UTC calendar day and month of its reservation (``created``,
read from the ledger's clock). An open reservation counts against budgets until it is
settled or released, or until it is ``reservation_ttl_s`` old (default one hour): a
crashed process must not hold a budget forever. A late settlement is still recorded.

Schema (SQLite, ``PRAGMA user_version = 1``; WAL journal for files)::

    budgets(period, tag, limit_usd)       -- tag '' = every request; limit as exact TEXT
    charges(id, request_id, provider, model,
            reserved_nano, actual_nano,    -- integer nano-dollars; actual NULL until settled
            state,                         -- 'open' | 'settled' | 'released'
            unit, quantity, details,       -- billing facts; quantity TEXT, details JSON
            created, closed)               -- Unix seconds (REAL)
    charge_tags(charge_id, tag)           -- one row per tag of a charge
    totals(bucket, tag, usd_nano, requests)
        -- settled spend per period bucket ('day:2026-05-09', 'month:2026-05', 'total')
        -- and tag ('' = all charges), kept in step by settle() so a budget check
        -- costs a primary-key lookup however long the ledger grows

WAL needs a local filesystem: do not share a ledger file over NFS/SMB.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import json
import math
import os
import secrets
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, get_args

import platformdirs

from router.errors import BudgetExceeded

Period = Literal["day", "month", "total"]
PERIODS: tuple[Period, ...] = get_args(Period)
GROUP_KEYS = ("provider", "model", "tag", "day", "month")
UNTAGGED = "(untagged)"  # the report's tag key for charges that carry no tag

_SCALE = 10**9  # nano-dollars per dollar
_DAY_S = 86_400
_EPOCH = date(1970, 1, 1)
_SCHEMA_VERSION = 2  # 2: totals kept by a trigger on settling
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS budgets (
        period TEXT NOT NULL CHECK (period IN ('day', 'month', 'total')),
        tag TEXT NOT NULL,
        limit_usd TEXT NOT NULL,
        PRIMARY KEY (period, tag)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS charges (
        id INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        reserved_nano INTEGER NOT NULL,
        actual_nano INTEGER,
        state TEXT NOT NULL CHECK (state IN ('open', 'settled', 'released')),
        unit TEXT NOT NULL DEFAULT '',
        quantity TEXT NOT NULL DEFAULT '0',
        details TEXT,
        created REAL NOT NULL,
        closed REAL)""",
    "CREATE INDEX IF NOT EXISTS charges_created ON charges (created)",
    "CREATE INDEX IF NOT EXISTS charges_open ON charges (created) WHERE state = 'open'",
    """CREATE TABLE IF NOT EXISTS charge_tags (
        charge_id INTEGER NOT NULL REFERENCES charges (id),
        tag TEXT NOT NULL,
        PRIMARY KEY (charge_id, tag)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS totals (
        bucket TEXT NOT NULL,
        tag TEXT NOT NULL,
        usd_nano INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        PRIMARY KEY (bucket, tag)) WITHOUT ROWID""",
    # Settling a charge adds it to its day, month and total, untagged and under each tag, in the same
    # statement: one UPDATE settles atomically with no transaction around it.
    """CREATE TRIGGER IF NOT EXISTS charges_settled AFTER UPDATE OF state ON charges
        WHEN NEW.state = 'settled' AND OLD.state = 'open'
    BEGIN
        INSERT INTO totals (bucket, tag, usd_nano, requests)
        SELECT b.bucket, g.tag, NEW.actual_nano, 1
        FROM (SELECT 'day:' || date(CAST(NEW.created / 86400 AS INTEGER) * 86400, 'unixepoch') AS bucket
              UNION ALL SELECT 'month:' || strftime('%Y-%m', CAST(NEW.created / 86400 AS INTEGER) * 86400,
                                                   'unixepoch')
              UNION ALL SELECT 'total') AS b,
             (SELECT '' AS tag UNION ALL SELECT tag FROM charge_tags WHERE charge_id = NEW.id) AS g
        WHERE true
        ON CONFLICT (bucket, tag) DO UPDATE SET usd_nano = usd_nano + excluded.usd_nano, requests = requests + 1;
    END""",
)

_OPEN_ALL = "SELECT COALESCE(SUM(reserved_nano), 0) FROM charges WHERE state = 'open' AND created >= ? AND created > ?"
_OPEN_TAG = (
    "SELECT COALESCE(SUM(c.reserved_nano), 0) FROM charges c"
    " JOIN charge_tags t ON t.charge_id = c.id AND t.tag = ?"
    " WHERE c.state = 'open' AND c.created >= ? AND c.created > ?"
)
_SETTLED = "SELECT usd_nano FROM totals WHERE bucket = ? AND tag = ?"
_INSERT_CHARGE = (
    "INSERT INTO charges (id, request_id, provider, model, reserved_nano, state, created)"
    " VALUES (?, ?, ?, ?, ?, 'open', ?)"
)
_SETTLE = (
    "UPDATE charges SET state = 'settled', actual_nano = ?, unit = ?, quantity = ?, details = ?, closed = ?"
    " WHERE id = ? AND request_id = ? AND state = 'open'"
)
_MAX_PENDING = 512  # queued writes applied at once, at the latest


@dataclass(frozen=True, slots=True)
class Budget:
    """A spending limit per UTC ``period``; ``tag=None`` applies to every request,
    a tag budget only to requests carrying that tag."""

    limit_usd: Decimal
    period: Period = "month"
    tag: str | None = None

    def __post_init__(self) -> None:
        limit = _decimal(self.limit_usd, "limit_usd")
        if limit < 0:
            raise ValueError(f"a budget's limit must be ≥ 0, got {limit}")
        if self.period not in PERIODS:
            raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {self.period!r}")
        if self.tag is not None and not self.tag:
            raise ValueError("a budget's tag must be a non-empty string, or None for every request")
        object.__setattr__(self, "limit_usd", limit)

    @property
    def name(self) -> str:
        """``period:tag``, with ``*`` for a budget on every request (``month:team-a``, ``day:*``)."""
        return f"{self.period}:{self.tag or '*'}"


@dataclass(frozen=True, slots=True)
class Reservation:
    """An open hold on ``amount`` USD for one provider attempt; settle or release it once."""

    id: int
    request_id: str
    provider: str
    model: str
    amount: Decimal
    tags: tuple[str, ...]
    created: datetime


@dataclass(frozen=True, slots=True)
class SpendRow:
    """Settled spend for one group of :meth:`Ledger.report`."""

    key: dict[str, str]
    requests: int
    usd: Decimal


class LedgerBackend(Protocol):
    """What the router, the server and the CLI use of a ledger: :class:`Ledger` (SQLite, embedded) and
    :class:`router.ledger_pg.PostgresLedger` (PostgreSQL, shared across hosts) both provide it.

    The write-behind part (``private``, ``watches``, ``reserve_behind``, ``settle_behind``, ``flush``,
    ``queued``) lets a backend defer writes no budget watches; a backend without a queue answers
    ``reserve_behind`` with None, ``settle_behind`` with False and ``queued`` with 0.
    """

    @property
    def private(self) -> bool: ...

    @property
    def queued(self) -> int: ...

    def set_budget(self, budget: Budget) -> None: ...

    def remove_budget(self, period: Period, tag: str | None = None) -> None: ...

    def budgets(self) -> list[Budget]: ...

    def headroom(self, tags: Iterable[str] = ()) -> Decimal | None: ...

    def watches(self, tags: Iterable[str] = ()) -> bool | None: ...

    def reserve(
        self, *, request_id: str, provider: str, model: str, amount: Decimal, tags: Iterable[str] = ()
    ) -> Reservation: ...

    def reserve_behind(
        self, *, request_id: str, provider: str, model: str, amount: Decimal, tags: Iterable[str] = ()
    ) -> Reservation | None: ...

    def settle(
        self,
        reservation: Reservation,
        actual_usd: Decimal,
        *,
        unit: str = "",
        quantity: Decimal | float | int = 0,
        details: Mapping[str, object] | None = None,
    ) -> None: ...

    def settle_behind(
        self,
        reservation: Reservation,
        actual_usd: Decimal,
        *,
        unit: str = "",
        quantity: Decimal | float | int = 0,
        details: Mapping[str, object] | None = None,
    ) -> bool: ...

    def release(self, reservation: Reservation, *, reason: str = "") -> None: ...

    def flush(self) -> None: ...

    def spent(self, tags: Iterable[str] = (), period: Period = "month") -> Decimal: ...

    def report(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        group_by: Sequence[str] = ("provider",),
    ) -> list[SpendRow]: ...

    def close(self) -> None: ...


def open_ledger(
    spec: LedgerBackend | str | os.PathLike[str] | None = None,
    *,
    clock: Callable[[], float] = time.time,
    reservation_ttl_s: float = 3600.0,
) -> LedgerBackend:
    """The ledger ``spec`` names: a ``postgresql://`` (or ``postgres://``) URL opens a
    :class:`~router.ledger_pg.PostgresLedger` (needs the ``postgres`` extra); a path or ``":memory:"``
    a SQLite :class:`Ledger`; None the SQLite file in the user's data dir. A ledger object is returned as is."""
    if spec is not None and not isinstance(spec, str | os.PathLike):
        return spec
    if isinstance(spec, str) and spec.startswith(("postgresql://", "postgres://")):
        from router.ledger_pg import PostgresLedger

        return PostgresLedger(spec, clock=clock, reservation_ttl_s=reservation_ttl_s)
    return Ledger(spec, clock=clock, reservation_ttl_s=reservation_ttl_s)


class Ledger:
    """Budgets and charges in SQLite: a file (default: the user's data dir), or ``":memory:"``.

    Safe to share between coroutines and threads of one process, and between
    processes opening the same file. ``clock`` gives Unix seconds; periods are UTC
    calendar days and months of it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        reservation_ttl_s: float = 3600.0,
    ) -> None:
        if reservation_ttl_s <= 0:
            raise ValueError(f"reservation_ttl_s must be > 0, got {reservation_ttl_s}")
        self.path: Path | str = default_path() if path is None else (
            ":memory:" if os.fspath(path) == ":memory:" else Path(path)
        )
        self.reservation_ttl_s = reservation_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._budget_cache: list[Budget] | None = None
        self._data_version = -1
        # Writes no budget watches (a reservation when no budget applies to its tags, and its settlement) are
        # queued and applied in one batch before anything reads: see reserve_behind(). An in-memory database
        # is private to this connection (nobody else changes its budgets, nothing to lose in a crash), so
        # its queue is applied lazily; a file's queue is applied by whoever calls flush() (the router's
        # ledger thread, right after queueing). ``_pending_lock`` guards only the queue and is never held
        # across I/O, so queueing never waits on SQLite.
        self._private = self.path == ":memory:"
        self._pending: list[tuple[str, tuple[object, ...]]] = []
        self._queued_open: dict[int, str] = {}
        self._pending_lock = threading.Lock()
        self._next_id = 0
        if isinstance(self.path, Path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False, cached_statements=64
        )
        try:
            self._setup()
        except BaseException:
            self._conn.close()
            raise
        if not self._private:  # queued writes reach the file even if nobody closes the ledger
            atexit.register(_flush_at_exit, weakref.ref(self))

    @property
    def private(self) -> bool:
        """True for an in-memory ledger: no file, no other connection, nothing that can block."""
        return self._private

    def _setup(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA busy_timeout = 30000")
        if isinstance(self.path, Path):
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        with self._tx() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise RuntimeError(f"ledger {self.path} has schema v{version}; this version reads v{_SCHEMA_VERSION}")
            for statement in _SCHEMA:
                c.execute(statement)
            c.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            self._next_id = c.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM charges").fetchone()[0]

    @contextmanager
    def _tx(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._flushed()
            conn.execute(f"BEGIN {mode}")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _flushed(self) -> sqlite3.Connection:
        """The connection, with every queued write applied (in its own transaction). Call with the lock held."""
        conn = self._conn
        with self._pending_lock:
            pending, self._pending = self._pending, []
        if pending:
            try:
                conn.execute("BEGIN IMMEDIATE")
                for sql, group in itertools.groupby(pending, key=lambda item: item[0]):
                    conn.executemany(sql, [params for _, params in group])
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                with self._pending_lock:  # nothing is lost: put them back, ahead of what came since
                    self._pending[:0] = pending
                raise
        return conn

    def flush(self) -> None:
        """Apply every queued write now (and notice budgets another process changed meanwhile)."""
        with self._lock:
            self._budgets(self._flushed())

    @property
    def queued(self) -> int:
        """How many writes wait in the queue."""
        return len(self._pending)

    def _queue(self, *writes: tuple[str, tuple[object, ...]]) -> None:
        with self._pending_lock:
            self._pending.extend(writes)
        if self._private and len(self._pending) >= _MAX_PENDING:
            with self._lock:
                self._flushed()

    def _budgets(self, c: sqlite3.Connection) -> list[Budget]:
        """The budgets, re-read only when this connection changed a budget or another one changed the
        database (``data_version``). Call with ``self._lock`` held."""
        if self._private and self._budget_cache is not None:
            return self._budget_cache
        version = c.execute("PRAGMA data_version").fetchone()[0]
        if self._budget_cache is None or version != self._data_version:
            self._budget_cache = _load_budgets(c)
            self._data_version = version
        return self._budget_cache

    # --- budgets ------------------------------------------------------------------

    def set_budget(self, budget: Budget) -> None:
        """Add ``budget``, or replace the limit of the one with its period and tag."""
        self._budget_cache = None
        with self._tx() as c:
            c.execute(
                "INSERT INTO budgets (period, tag, limit_usd) VALUES (?, ?, ?)"
                " ON CONFLICT (period, tag) DO UPDATE SET limit_usd = excluded.limit_usd",
                (budget.period, budget.tag or "", str(budget.limit_usd)),
            )

    def remove_budget(self, period: Period, tag: str | None = None) -> None:
        """Remove the budget on ``period`` and ``tag`` (None: the one on every request), if any."""
        self._budget_cache = None
        with self._tx() as c:
            c.execute("DELETE FROM budgets WHERE period = ? AND tag = ?", (period, tag or ""))

    def budgets(self) -> list[Budget]:
        """Every budget, ordered by period then tag (the untagged one first)."""
        with self._tx("DEFERRED") as c:
            return _load_budgets(c)

    def headroom(self, tags: Iterable[str] = ()) -> Decimal | None:
        """What a request carrying ``tags`` may still reserve: the least, over the budgets
        that apply to it, of limit − (settled + open reservations) this period.

        None when no budget applies. Negative when actual costs overran their estimates.
        """
        tagset = _tags(tags)
        now = self._clock()
        if self.watches(tagset) is False:
            return None  # the common case, answered without the database
        with self._lock:
            if not any(_applies(b, tagset) for b in self._budgets(self._conn)):
                return None
        with self._tx("DEFERRED") as c:
            usage = [self._usage(c, b, now) for b in self._budgets(c) if _applies(b, tagset)]
        if not usage:
            return None
        return min(b.limit_usd - _usd(settled + reserved) for b, settled, reserved in usage)

    def watches(self, tags: Iterable[str] = ()) -> bool | None:
        """Whether a budget applies to a request carrying ``tags``, as last read (never waits on the
        database); None when unknown (budgets changed here and not re-read yet). Another process's new
        budget is noticed at the next read or :meth:`flush`."""
        budgets = self._budget_cache
        if budgets is None:
            return None
        tagset = tags if isinstance(tags, tuple) else _tags(tags)
        return any(_applies(b, tagset) for b in budgets)

    # --- charges ------------------------------------------------------------------

    def reserve_behind(
        self, *, request_id: str, provider: str, model: str, amount: Decimal, tags: Iterable[str] = ()
    ) -> Reservation | None:
        """A reservation queued to be written later, without waiting on the database, when no budget
        applies to ``tags`` (as last read) and the queue has room; None otherwise (then call
        :meth:`reserve`). Its settlement is queued too; anything that reads applies the queue first."""
        tagset = _tags(tags)
        if self.watches(tagset) is not False or len(self._pending) >= _MAX_PENDING:
            return None
        nano = _nano(amount, "amount", ROUND_CEILING)
        now = self._clock()
        with self._pending_lock:
            if self._private:
                charge_id, self._next_id = self._next_id, self._next_id + 1
            else:  # other processes insert into the same file: an id nobody else will pick
                charge_id = secrets.randbits(62) + 2**62
            self._queued_open[charge_id] = request_id
        self._queue(
            (_INSERT_CHARGE, (charge_id, request_id, provider, model, nano, now)),
            *(("INSERT INTO charge_tags VALUES (?, ?)", (charge_id, t)) for t in tagset),
        )
        return Reservation(id=charge_id, request_id=request_id, provider=provider, model=model,
                           amount=_usd(nano), tags=tagset, created=datetime.fromtimestamp(now, UTC))

    def settle_behind(
        self,
        reservation: Reservation,
        actual_usd: Decimal,
        *,
        unit: str = "",
        quantity: Decimal | float | int = 0,
        details: Mapping[str, object] | None = None,
    ) -> bool:
        """Queue the settlement of a reservation made by :meth:`reserve_behind`; False (nothing done) for any
        other reservation (then call :meth:`settle`)."""
        with self._pending_lock:
            if self._queued_open.get(reservation.id) != reservation.request_id:
                return False
            del self._queued_open[reservation.id]
        self._queue((_SETTLE, self._settle_values(reservation, actual_usd, unit, quantity, details)))
        return True

    def _settle_values(self, reservation: Reservation, actual_usd: Decimal, unit: str,
                       quantity: Decimal | float | int, details: Mapping[str, object] | None) -> tuple[object, ...]:
        nano = _nano(actual_usd, "actual_usd", ROUND_HALF_EVEN)
        blob = json.dumps(dict(details), default=str, sort_keys=True) if details else None
        return (nano, unit, str(quantity), blob, self._clock(), reservation.id, reservation.request_id)

    def reserve(
        self, *, request_id: str, provider: str, model: str, amount: Decimal, tags: Iterable[str] = ()
    ) -> Reservation:
        """Hold ``amount`` (the estimate) against every budget that applies to ``tags``.

        Raises :class:`~router.errors.BudgetExceeded` and holds nothing when any of them
        would go over its limit.
        """
        if self._private and (queued := self.reserve_behind(
            request_id=request_id, provider=provider, model=model, amount=amount, tags=tags
        )) is not None:
            return queued
        nano = _nano(amount, "amount", ROUND_CEILING)
        tagset = _tags(tags)
        now = self._clock()
        if not tagset:
            with self._lock:
                if not self._budgets(self._flushed()):  # no budget to check: one INSERT is atomic on its own
                    charge_id = self._insert_charge(self._conn, request_id, provider, model, nano, now)
                    return Reservation(id=charge_id, request_id=request_id, provider=provider, model=model,
                                       amount=_usd(nano), tags=(), created=datetime.fromtimestamp(now, UTC))
        with self._tx() as c:
            worst: tuple[int, Budget, int, int] | None = None  # (overrun, budget, settled, reserved)
            for budget in self._budgets(c):
                if _applies(budget, tagset):
                    _, settled, reserved = self._usage(c, budget, now)
                    over = settled + reserved + nano - _nano(budget.limit_usd, "limit", ROUND_FLOOR)
                    if over > 0 and (worst is None or over > worst[0]):
                        worst = (over, budget, settled, reserved)
            if worst is not None:
                _, budget, settled, reserved = worst
                raise BudgetExceeded(
                    f"budget {budget.name} ({_fmt(budget.limit_usd)}) would be exceeded: spent {_fmt(_usd(settled))}, "
                    f"reserved {_fmt(_usd(reserved))}, this request needs {_fmt(_usd(nano))}",
                    budget=budget.name,
                    request_id=request_id,
                )
            charge_id = self._insert_charge(c, request_id, provider, model, nano, now)
            if tagset:
                c.executemany("INSERT INTO charge_tags VALUES (?, ?)", [(charge_id, t) for t in tagset])
        return Reservation(
            id=charge_id, request_id=request_id, provider=provider, model=model, amount=_usd(nano),
            tags=tagset, created=datetime.fromtimestamp(now, UTC),
        )

    def _insert_charge(self, c: sqlite3.Connection, request_id: str, provider: str, model: str, nano: int,
                       now: float) -> int:
        cur = c.execute(_INSERT_CHARGE, (None, request_id, provider, model, nano, now))  # after a flush: no clash
        assert cur.lastrowid is not None
        self._next_id = cur.lastrowid + 1
        return cur.lastrowid

    def settle(
        self,
        reservation: Reservation,
        actual_usd: Decimal,
        *,
        unit: str = "",
        quantity: Decimal | float | int = 0,
        details: Mapping[str, object] | None = None,
    ) -> None:
        """Record what the provider billed for ``reservation`` (it may exceed the estimate)
        and close it. Raises ValueError if it is already settled or released."""
        if self.settle_behind(reservation, actual_usd, unit=unit, quantity=quantity, details=details):
            return
        values = self._settle_values(reservation, actual_usd, unit, quantity, details)
        with self._lock:
            conn = self._flushed()
            if conn.execute(_SETTLE + " RETURNING id", values).fetchone() is None:
                self._close(conn, reservation)  # raises, saying why

    def release(self, reservation: Reservation, *, reason: str = "") -> None:
        """Close ``reservation`` with no charge (the attempt failed or was cancelled).
        Raises ValueError if it is already settled or released."""
        now = self._clock()
        blob = json.dumps({"reason": reason}) if reason else None
        with self._tx() as c:
            self._close(c, reservation)
            with self._pending_lock:
                self._queued_open.pop(reservation.id, None)
            c.execute(
                "UPDATE charges SET state = 'released', details = ?, closed = ? WHERE id = ?",
                (blob, now, reservation.id),
            )

    def _close(self, c: sqlite3.Connection, reservation: Reservation) -> float:
        row = c.execute(
            "SELECT state, created FROM charges WHERE id = ? AND request_id = ?",
            (reservation.id, reservation.request_id),
        ).fetchone()
        if row is None:
            raise ValueError(f"reservation {reservation.id} ({reservation.request_id}) is not in this ledger")
        if row[0] != "open":
            raise ValueError(f"reservation {reservation.id} ({reservation.request_id}) is already {row[0]}")
        return float(row[1])

    def _usage(self, c: sqlite3.Connection, budget: Budget, now: float) -> tuple[Budget, int, int]:
        """(budget, settled, open reservations) in nano-dollars for the current period."""
        tag = budget.tag or ""
        row = c.execute(_SETTLED, (_bucket(budget.period, now), tag)).fetchone()
        window = (_period_start(budget.period, now), now - self.reservation_ttl_s)
        if budget.tag is None:
            reserved = c.execute(_OPEN_ALL, window).fetchone()[0]
        else:
            reserved = c.execute(_OPEN_TAG, (tag, *window)).fetchone()[0]
        return budget, (row[0] if row else 0), reserved

    # --- reading ------------------------------------------------------------------

    def spent(self, tags: Iterable[str] = (), period: Period = "month") -> Decimal:
        """Settled spend this ``period`` on requests carrying every tag in ``tags`` (all if none)."""
        if period not in PERIODS:
            raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
        tagset = _tags(tags)
        now = self._clock()
        with self._tx("DEFERRED") as c:
            if len(tagset) <= 1:
                row = c.execute(_SETTLED, (_bucket(period, now), tagset[0] if tagset else "")).fetchone()
                return _usd(row[0] if row else 0)
            marks = ", ".join("?" * len(tagset))
            row = c.execute(
                "SELECT COALESCE(SUM(actual_nano), 0) FROM charges c WHERE state = 'settled' AND created >= ?"
                f" AND (SELECT COUNT(*) FROM charge_tags t WHERE t.charge_id = c.id AND t.tag IN ({marks})) = ?",
                (_period_start(period, now), *tagset, len(tagset)),
            ).fetchone()
            return _usd(row[0])

    def report(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        group_by: Sequence[str] = ("provider",),
    ) -> list[SpendRow]:
        """Settled spend and request counts between ``since`` (inclusive) and ``until``
        (exclusive), grouped by any of provider, model, tag, day, month (UTC).

        Grouped by tag, a charge counts once under each of its tags (``(untagged)`` if none).
        Naive datetimes are taken as UTC.
        """
        group = list(dict.fromkeys(group_by))
        unknown = [g for g in group if g not in GROUP_KEYS]
        if unknown:
            raise ValueError(f"cannot group by {', '.join(unknown)}; choose from {', '.join(GROUP_KEYS)}")
        day = "CAST(c.created / 86400 AS INTEGER) * 86400"
        columns = {
            "provider": "c.provider",
            "model": "c.model",
            "tag": f"COALESCE(t.tag, '{UNTAGGED}')",
            "day": f"date({day}, 'unixepoch')",
            "month": f"strftime('%Y-%m', {day}, 'unixepoch')",
        }
        keys = [columns[g] for g in group]
        join = " LEFT JOIN charge_tags t ON t.charge_id = c.id" if "tag" in group else ""
        where, args = ["c.state = 'settled'"], []
        if since is not None:
            where.append("c.created >= ?")
            args.append(_timestamp(since))
        if until is not None:
            where.append("c.created < ?")
            args.append(_timestamp(until))
        select = ", ".join([*keys, "COUNT(*)", "COALESCE(SUM(c.actual_nano), 0)"])
        sql = f"SELECT {select} FROM charges c{join} WHERE {' AND '.join(where)}"
        if keys:
            sql += f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}"
        with self._tx("DEFERRED") as c:
            rows = c.execute(sql, args).fetchall()
        n = len(group)
        return [
            SpendRow(key=dict(zip(group, map(str, row[:n]), strict=True)), requests=row[n], usd=_usd(row[n + 1]))
            for row in rows
            if row[n]
        ]

    # --- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        """Close the database; the ledger cannot be used afterwards."""
        with self._lock:
            self._flushed().close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"


def _flush_at_exit(ref: weakref.ref[Ledger]) -> None:
    ledger = ref()
    if ledger is not None and ledger.queued:
        with contextlib.suppress(sqlite3.Error):
            ledger.flush()


def default_path() -> Path:
    """``ledger.sqlite3`` in the user's data directory for imagerouter."""
    return Path(platformdirs.user_data_dir("imagerouter")) / "ledger.sqlite3"


# --- helpers ----------------------------------------------------------------------


def _load_budgets(c: sqlite3.Connection) -> list[Budget]:
    rows = c.execute("SELECT period, tag, limit_usd FROM budgets ORDER BY period, tag").fetchall()
    return [Budget(Decimal(limit), period, tag or None) for period, tag, limit in rows]


def _applies(budget: Budget, tags: tuple[str, ...]) -> bool:
    return budget.tag is None or budget.tag in tags


def _tags(tags: Iterable[str]) -> tuple[str, ...]:
    if isinstance(tags, str):
        raise TypeError("tags must be an iterable of strings, not one string")
    out = tuple(sorted(set(tags)))
    if any(not isinstance(t, str) or not t for t in out):
        raise ValueError(f"tags must be non-empty strings, got {out!r}")
    return out


def _decimal(value: object, what: str) -> Decimal:
    if isinstance(value, float):
        value = repr(value)  # the shortest decimal that round-trips: 0.1 -> Decimal("0.1")
    try:
        d = Decimal(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, ArithmeticError):
        raise TypeError(f"{what} must be a Decimal amount in USD, got {value!r}") from None
    if not d.is_finite():
        raise ValueError(f"{what} must be finite, got {d}")
    return d


def _nano(value: object, what: str, rounding: str) -> int:
    d = _decimal(value, what)
    if d < 0:
        raise ValueError(f"{what} must be ≥ 0, got {d}")
    return int((d * _SCALE).to_integral_value(rounding=rounding))


def _usd(nano: int) -> Decimal:
    return Decimal(nano) / _SCALE


def _fmt(usd: Decimal) -> str:
    cents = usd.quantize(Decimal("0.01"))
    return f"${cents}" if cents == usd else f"${usd.normalize():f}"


def _day(ts: float) -> int:
    return math.floor(ts / _DAY_S)


def _bucket(period: Period, ts: float) -> str:
    return "total" if period == "total" else _day_bucket(period, _day(ts))


@functools.lru_cache(maxsize=64)
def _day_bucket(period: Period, day: int) -> str:
    d = _EPOCH + timedelta(days=day)
    return f"day:{d.isoformat()}" if period == "day" else f"month:{d:%Y-%m}"


def _period_start(period: Period, ts: float) -> float:
    if period == "total":
        return -math.inf
    if period == "day":
        return float(_day(ts) * _DAY_S)
    first = (_EPOCH + timedelta(days=_day(ts))).replace(day=1)
    return float((first - _EPOCH).days * _DAY_S)


def _timestamp(when: datetime) -> float:
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


__all__ = [
    "GROUP_KEYS", "PERIODS", "Budget", "Ledger", "LedgerBackend", "Period", "Reservation", "SpendRow", "default_path",
    "open_ledger",
]
