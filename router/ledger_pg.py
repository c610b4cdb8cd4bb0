"""The cost ledger in PostgreSQL: the same reserve-then-settle semantics as :class:`router.ledger.Ledger`,
shared by any number of processes on any number of hosts.

    ledger = PostgresLedger("postgresql://user:secret@db.internal:5432/imagerouter")
    AsyncRouter(providers, ledger="postgresql://…")   # the same, by URL

Needs psycopg 3 (``pip install 'pixroute[postgres]'``); it is imported when a ledger is opened, never
by ``import router``.

**Why row locks, not SERIALIZABLE.** ``reserve`` runs one READ COMMITTED transaction that first locks
the budget rows that apply to the request (``SELECT … FROM imagerouter_budgets … ORDER BY period, tag
FOR UPDATE``), then, in a *separate* statement (so its snapshot is taken after the locks are held), sums
the settled buckets and the open reservations of every such budget, and inserts the reservation if all
fit. Two reservations that share a budget therefore run one after the other, whatever process or host
they come from, and the second sees the first's reservation: no overspend. Reservations that share no
budget do not wait on each other; locks are taken in one global order (period, tag), so two reserves
never deadlock. SERIALIZABLE would give the same guarantee but, under exactly the contention a budget
creates (many requests near one limit), it aborts most transactions and makes every caller retry in a
loop; the row lock queues them instead, and each waits only for the transactions ahead of it.

Settling needs no budget lock: one ``UPDATE`` closes the charge and a trigger adds it to its day, month
and total buckets (untagged and under each tag) in the same statement, so a concurrent reserve's sum
(one statement, one snapshot) sees the charge either still open or already settled, never neither.
The trigger updates the bucket rows in one global order (bucket, tag), so settles never deadlock either;
a deadlock or serialization failure reported anyway is retried (a few times) as a whole transaction.

**No write-behind queue.** Every write goes to the database directly (``reserve_behind`` answers None,
``settle_behind`` False, ``queued`` 0): a queued write would be invisible to the other hosts sharing the
budgets and lost if the process died, and the router already calls this ledger from its own thread.

**Budgets another host changes.** ``reserve`` always reads the applicable budgets under lock, so it always
enforces the current ones. ``watches`` (which lets the router skip a headroom read when no budget applies)
answers from budgets read at most ``budget_cache_s`` ago (default 1 s) and None (unknown) after that.

**Migrations** are versioned: ``imagerouter_schema_version`` holds one row per applied migration; at open,
under a transaction-scoped advisory lock (so concurrent opens do not race), the missing ones are applied
in order in that same transaction. A database at a newer version than this code knows is refused.

Schema (tables prefixed ``imagerouter_`` so a shared database can hold them beside others)::

    imagerouter_budgets(period, tag, limit_usd)        -- tag '' = every request; limit exact TEXT
    imagerouter_charges(id, request_id, provider, model,
                        reserved_nano, actual_nano,    -- BIGINT nano-dollars; actual NULL until settled
                        state, unit, quantity, details,
                        created, closed)               -- Unix seconds (double precision, the ledger's clock)
    imagerouter_charge_tags(charge_id, tag)
    imagerouter_totals(bucket, tag, usd_nano, requests) -- settled spend per 'day:…', 'month:…', 'total'

A charge's period is the UTC day and month of ``created``, read from the *client's* clock (keep the hosts'
clocks in sync, as for any shared ledger).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any

from router.errors import BudgetExceeded
from router.ledger import (
    GROUP_KEYS,
    PERIODS,
    UNTAGGED,
    Budget,
    Period,
    Reservation,
    SpendRow,
    _applies,
    _bucket,
    _fmt,
    _nano,
    _period_start,
    _tags,
    _timestamp,
    _usd,
)

if TYPE_CHECKING:
    import psycopg

SCHEMA_VERSION = 1
_MIGRATION_LOCK = 0x696D6167_6C656467  # advisory lock key ("imagledg"): one migrator at a time
_RETRIES = 5  # a whole transaction retried on deadlock / serialization failure

# The day of a Unix time, as PostgreSQL computes it: the same floor as router.ledger._day.
_DAY = "(DATE '1970-01-01' + floor({col} / 86400)::integer)"

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE imagerouter_budgets (
            period TEXT NOT NULL CHECK (period IN ('day', 'month', 'total')),
            tag TEXT NOT NULL,
            limit_usd TEXT NOT NULL,
            PRIMARY KEY (period, tag))""",
        """CREATE TABLE imagerouter_charges (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            request_id TEXT NOT NULL,
            provider TEXT NOT NULL,
            model TEXT NOT NULL,
            reserved_nano BIGINT NOT NULL CHECK (reserved_nano >= 0),
            actual_nano BIGINT CHECK (actual_nano >= 0),
            state TEXT NOT NULL CHECK (state IN ('open', 'settled', 'released')),
            unit TEXT NOT NULL DEFAULT '',
            quantity TEXT NOT NULL DEFAULT '0',
            details TEXT,
            created DOUBLE PRECISION NOT NULL,
            closed DOUBLE PRECISION)""",
        "CREATE INDEX imagerouter_charges_created ON imagerouter_charges (created)",
        "CREATE INDEX imagerouter_charges_open ON imagerouter_charges (created) WHERE state = 'open'",
        """CREATE TABLE imagerouter_charge_tags (
            charge_id BIGINT NOT NULL REFERENCES imagerouter_charges (id),
            tag TEXT NOT NULL,
            PRIMARY KEY (charge_id, tag))""",
        "CREATE INDEX imagerouter_charge_tags_tag ON imagerouter_charge_tags (tag, charge_id)",
        """CREATE TABLE imagerouter_totals (
            bucket TEXT NOT NULL,
            tag TEXT NOT NULL,
            usd_nano BIGINT NOT NULL,
            requests BIGINT NOT NULL,
            PRIMARY KEY (bucket, tag))""",
        f"""CREATE FUNCTION imagerouter_charge_settled() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE d date := {_DAY.format(col="NEW.created")};
        BEGIN
            INSERT INTO imagerouter_totals AS t (bucket, tag, usd_nano, requests)
            SELECT b.bucket, g.tag, NEW.actual_nano, 1
            FROM (VALUES ('day:' || to_char(d, 'YYYY-MM-DD')), ('month:' || to_char(d, 'YYYY-MM')), ('total'))
                     AS b (bucket),
                 (SELECT '' AS tag UNION ALL
                  SELECT ct.tag FROM imagerouter_charge_tags ct WHERE ct.charge_id = NEW.id) AS g
            ORDER BY b.bucket COLLATE "C", g.tag COLLATE "C"
            ON CONFLICT (bucket, tag) DO UPDATE
                SET usd_nano = t.usd_nano + excluded.usd_nano, requests = t.requests + 1;
            RETURN NULL;
        END $$""",
        """CREATE TRIGGER imagerouter_charges_settled AFTER UPDATE OF state ON imagerouter_charges
            FOR EACH ROW WHEN (NEW.state = 'settled' AND OLD.state = 'open')
            EXECUTE FUNCTION imagerouter_charge_settled()""",
    )),
)

_LOCK_BUDGETS = (
    "SELECT period, tag, limit_usd FROM imagerouter_budgets WHERE tag = '' OR tag = ANY(%s)"
    ' ORDER BY period COLLATE "C", tag COLLATE "C" FOR UPDATE'
)
# Settled and open spend of each budget in ONE statement (one snapshot): a settle committing meanwhile is
# seen either open or settled, never neither.
_USAGE = """SELECT b.i,
    COALESCE((SELECT t.usd_nano FROM imagerouter_totals t WHERE t.bucket = b.bucket AND t.tag = b.tag), 0),
    COALESCE((SELECT SUM(c.reserved_nano) FROM imagerouter_charges c
              WHERE c.state = 'open' AND c.created >= b.start AND c.created > %s
                AND (b.tag = '' OR EXISTS (SELECT 1 FROM imagerouter_charge_tags ct
                                           WHERE ct.charge_id = c.id AND ct.tag = b.tag))), 0)
FROM unnest(%s::integer[], %s::text[], %s::text[], %s::double precision[]) AS b (i, tag, bucket, start)"""
_SETTLE = (
    "UPDATE imagerouter_charges SET state = 'settled', actual_nano = %s, unit = %s, quantity = %s, details = %s,"
    " closed = %s WHERE id = %s AND request_id = %s AND state = 'open' RETURNING id"
)
_SETTLED = "SELECT usd_nano FROM imagerouter_totals WHERE bucket = %s AND tag = %s"


class PostgresLedger:
    """Budgets and charges in PostgreSQL at ``url`` (a libpq URL or conninfo string).

    Safe to share between threads of one process (one connection, one lock) and between any number of
    processes and hosts. ``clock`` gives Unix seconds; periods are UTC calendar days and months of it.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        reservation_ttl_s: float = 3600.0,
        budget_cache_s: float = 1.0,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if reservation_ttl_s <= 0:
            raise ValueError(f"reservation_ttl_s must be > 0, got {reservation_ttl_s}")
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "a postgresql:// ledger needs psycopg 3: pip install 'pixroute[postgres]'"
            ) from exc
        self._psycopg = psycopg
        self.url = url
        self.reservation_ttl_s = reservation_ttl_s
        self.budget_cache_s = budget_cache_s
        self._clock = clock
        self._lock = threading.Lock()
        self._budget_cache: list[Budget] | None = None
        self._budget_read = 0.0  # time.monotonic() of the last read
        self._conn: psycopg.Connection[Any] = psycopg.connect(
            url, autocommit=True, connect_timeout=max(1, round(connect_timeout_s)),
            application_name="imagerouter-ledger",
        )
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    # --- plumbing -------------------------------------------------------------------

    def _migrate(self) -> None:
        with self._lock, self._conn.transaction():
            cur = self._conn.cursor()
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS imagerouter_schema_version ("
                " version INTEGER PRIMARY KEY, applied TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            row = cur.execute("SELECT COALESCE(MAX(version), 0) FROM imagerouter_schema_version").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"ledger database has schema v{version}; this version reads v{SCHEMA_VERSION}")
            for number, statements in MIGRATIONS:
                if number > version:
                    for statement in statements:
                        cur.execute(statement)
                    cur.execute("INSERT INTO imagerouter_schema_version (version) VALUES (%s)", (number,))

    @property
    def schema_version(self) -> int:
        """The highest migration applied to the database."""
        with self._tx() as cur:
            row = cur.execute("SELECT MAX(version) FROM imagerouter_schema_version").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction on this ledger's connection (callers in other threads wait)."""
        with self._lock, self._conn.transaction():
            yield self._conn.cursor()

    def _retrying(self, fn: Callable[[psycopg.Cursor[Any]], Any]) -> Any:
        """``fn(cursor)`` in a transaction, run again from the start on a deadlock or serialization failure."""
        errors = self._psycopg.errors
        for attempt in range(_RETRIES):
            try:
                with self._tx() as cur:
                    return fn(cur)
            except (errors.DeadlockDetected, errors.SerializationFailure):
                if attempt == _RETRIES - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    # --- the write-behind queue: none -----------------------------------------------

    @property
    def private(self) -> bool:
        """False: other processes and hosts share this ledger."""
        return False

    @property
    def queued(self) -> int:
        """0: every write goes to the database directly."""
        return 0

    def reserve_behind(
        self, *, request_id: str, provider: str, model: str, amount: Decimal, tags: Iterable[str] = ()
    ) -> Reservation | None:
        """None: nothing is queued (call :meth:`reserve`)."""
        return None

    def settle_behind(
        self,
        reservation: Reservation,
        actual_usd: Decimal,
        *,
        unit: str = "",
        quantity: Decimal | float | int = 0,
        details: Mapping[str, object] | None = None,
    ) -> bool:
        """False: nothing is queued (call :meth:`settle`)."""
        return False

    def flush(self) -> None:
        """Nothing is queued; re-reads the budgets (notices budgets another process changed)."""
        self.budgets()

    def watches(self, tags: Iterable[str] = ()) -> bool | None:
        """Whether a budget applies to a request carrying ``tags``, as read at most ``budget_cache_s`` ago
        (never waits on the database); None when unknown."""
        budgets = self._budget_cache
        if budgets is None or time.monotonic() - self._budget_read > self.budget_cache_s:
            return None
        tagset = tags if isinstance(tags, tuple) else _tags(tags)
        return any(_applies(b, tagset) for b in budgets)

    # --- budgets ----------------------------------------------------------------------

    def set_budget(self, budget: Budget) -> None:
        """Add ``budget``, or replace the limit of the one with its period and tag."""
        self._budget_cache = None
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO imagerouter_budgets (period, tag, limit_usd) VALUES (%s, %s, %s)"
                " ON CONFLICT (period, tag) DO UPDATE SET limit_usd = excluded.limit_usd",
                (budget.period, budget.tag or "", str(budget.limit_usd)),
            )

    def remove_budget(self, period: Period, tag: str | None = None) -> None:
        """Remove the budget on ``period`` and ``tag`` (None: the one on every request), if any."""
        self._budget_cache = None
        with self._tx() as cur:
            cur.execute("DELETE FROM imagerouter_budgets WHERE period = %s AND tag = %s", (period, tag or ""))

    def budgets(self) -> list[Budget]:
        """Every budget, ordered by period then tag (the untagged one first)."""
        with self._tx() as cur:
            rows = cur.execute(
                'SELECT period, tag, limit_usd FROM imagerouter_budgets ORDER BY period COLLATE "C", tag COLLATE "C"'
            ).fetchall()
        budgets = [Budget(Decimal(limit), period, tag or None) for period, tag, limit in rows]
        self._budget_cache, self._budget_read = budgets, time.monotonic()
        return list(budgets)

    def headroom(self, tags: Iterable[str] = ()) -> Decimal | None:
        """What a request carrying ``tags`` may still reserve: the least, over the budgets that apply,
        of limit − (settled + open reservations) this period. None when no budget applies."""
        tagset = _tags(tags)
        now = self._clock()
        if self.watches(tagset) is False:
            return None
        applying = [b for b in self.budgets() if _applies(b, tagset)]
        if not applying:
            return None
        with self._tx() as cur:
            usage = self._usage(cur, applying, now)
        return min(b.limit_usd - _usd(settled + reserved) for b, settled, reserved in usage)

    def _usage(self, cur: psycopg.Cursor[Any], budgets: Sequence[Budget], now: float
               ) -> list[tuple[Budget, int, int]]:
        """(budget, settled, open reservations) in nano-dollars for each budget's current period, read in
        one statement."""
        rows = cur.execute(_USAGE, (
            now - self.reservation_ttl_s,
            list(range(len(budgets))),
            [b.tag or "" for b in budgets],
            [_bucket(b.period, now) for b in budgets],
            [_period_start(b.period, now) for b in budgets],
        )).fetchall()
        return [(budgets[i], int(settled), int(reserved)) for i, settled, reserved in sorted(rows)]

    # --- charges ----------------------------------------------------------------------

    def reserve(
        self, *, request_id: str, provider: str, model: str, amount: Decimal, tags: Iterable[str] = ()
    ) -> Reservation:
        """Hold ``amount`` (the estimate) against every budget that applies to ``tags``.

        Raises :class:`~router.errors.BudgetExceeded` and holds nothing when any of them would go over
        its limit. Atomic across processes and hosts: see the module's notes on locking.
        """
        nano = _nano(amount, "amount", ROUND_CEILING)
        tagset = _tags(tags)
        now = self._clock()

        def attempt(cur: psycopg.Cursor[Any]) -> int:
            locked = cur.execute(_LOCK_BUDGETS, (list(tagset),)).fetchall()  # waits for earlier reserves
            budgets = [Budget(Decimal(limit), period, tag or None) for period, tag, limit in locked]
            worst: tuple[int, Budget, int, int] | None = None  # (overrun, budget, settled, reserved)
            if budgets:
                for budget, settled, reserved in self._usage(cur, budgets, now):  # a snapshot after the locks
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
            row = cur.execute(
                "INSERT INTO imagerouter_charges (request_id, provider, model, reserved_nano, state, created)"
                " VALUES (%s, %s, %s, %s, 'open', %s) RETURNING id",
                (request_id, provider, model, nano, now),
            ).fetchone()
            assert row is not None
            if tagset:
                cur.executemany("INSERT INTO imagerouter_charge_tags (charge_id, tag) VALUES (%s, %s)",
                                [(row[0], t) for t in tagset])
            return int(row[0])

        charge_id = self._retrying(attempt)
        return Reservation(id=charge_id, request_id=request_id, provider=provider, model=model, amount=_usd(nano),
                           tags=tagset, created=datetime.fromtimestamp(now, UTC))

    def settle(
        self,
        reservation: Reservation,
        actual_usd: Decimal,
        *,
        unit: str = "",
        quantity: Decimal | float | int = 0,
        details: Mapping[str, object] | None = None,
    ) -> None:
        """Record what the provider billed for ``reservation`` (it may exceed the estimate) and close it.
        Raises ValueError if it is already settled or released."""
        nano = _nano(actual_usd, "actual_usd", ROUND_HALF_EVEN)
        blob = json.dumps(dict(details), default=str, sort_keys=True) if details else None
        values = (nano, unit, str(quantity), blob, self._clock(), reservation.id, reservation.request_id)

        def attempt(cur: psycopg.Cursor[Any]) -> None:
            if cur.execute(_SETTLE, values).fetchone() is None:
                self._refuse(cur, reservation)

        self._retrying(attempt)

    def release(self, reservation: Reservation, *, reason: str = "") -> None:
        """Close ``reservation`` with no charge (the attempt failed or was cancelled).
        Raises ValueError if it is already settled or released."""
        blob = json.dumps({"reason": reason}) if reason else None
        values = (blob, self._clock(), reservation.id, reservation.request_id)

        def attempt(cur: psycopg.Cursor[Any]) -> None:
            if cur.execute(
                "UPDATE imagerouter_charges SET state = 'released', details = %s, closed = %s"
                " WHERE id = %s AND request_id = %s AND state = 'open' RETURNING id",
                values,
            ).fetchone() is None:
                self._refuse(cur, reservation)

        self._retrying(attempt)

    @staticmethod
    def _refuse(cur: psycopg.Cursor[Any], reservation: Reservation) -> None:
        row = cur.execute(
            "SELECT state FROM imagerouter_charges WHERE id = %s AND request_id = %s",
            (reservation.id, reservation.request_id),
        ).fetchone()
        if row is None:
            raise ValueError(f"reservation {reservation.id} ({reservation.request_id}) is not in this ledger")
        raise ValueError(f"reservation {reservation.id} ({reservation.request_id}) is already {row[0]}")

    # --- reading ----------------------------------------------------------------------

    def spent(self, tags: Iterable[str] = (), period: Period = "month") -> Decimal:
        """Settled spend this ``period`` on requests carrying every tag in ``tags`` (all if none)."""
        if period not in PERIODS:
            raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
        tagset = _tags(tags)
        now = self._clock()
        with self._tx() as cur:
            if len(tagset) <= 1:
                row = cur.execute(_SETTLED, (_bucket(period, now), tagset[0] if tagset else "")).fetchone()
                return _usd(int(row[0]) if row else 0)
            row = cur.execute(
                "SELECT COALESCE(SUM(actual_nano), 0) FROM imagerouter_charges c"
                " WHERE state = 'settled' AND created >= %s AND (SELECT COUNT(*) FROM imagerouter_charge_tags t"
                " WHERE t.charge_id = c.id AND t.tag = ANY(%s)) = %s",
                (_period_start(period, now), list(tagset), len(tagset)),
            ).fetchone()
            return _usd(int(row[0]) if row else 0)

    def report(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        group_by: Sequence[str] = ("provider",),
    ) -> list[SpendRow]:
        """Settled spend and request counts between ``since`` (inclusive) and ``until`` (exclusive),
        grouped by any of provider, model, tag, day, month (UTC); the same rows as the SQLite ledger's."""
        group = list(dict.fromkeys(group_by))
        unknown = [g for g in group if g not in GROUP_KEYS]
        if unknown:
            raise ValueError(f"cannot group by {', '.join(unknown)}; choose from {', '.join(GROUP_KEYS)}")
        day = _DAY.format(col="c.created")
        columns = {
            "provider": "c.provider",
            "model": "c.model",
            "tag": f"COALESCE(t.tag, '{UNTAGGED}')",
            "day": f"to_char({day}, 'YYYY-MM-DD')",
            "month": f"to_char({day}, 'YYYY-MM')",
        }
        keys = [f'({columns[g]}) COLLATE "C"' for g in group]  # byte order, as SQLite sorts
        join = " LEFT JOIN imagerouter_charge_tags t ON t.charge_id = c.id" if "tag" in group else ""
        where, args = ["c.state = 'settled'"], []
        if since is not None:
            where.append("c.created >= %s")
            args.append(_timestamp(since))
        if until is not None:
            where.append("c.created < %s")
            args.append(_timestamp(until))
        select = ", ".join([*keys, "COUNT(*)", "COALESCE(SUM(c.actual_nano), 0)"])
        sql = f"SELECT {select} FROM imagerouter_charges c{join} WHERE {' AND '.join(where)}"
        if keys:
            positions = ", ".join(str(i + 1) for i in range(len(keys)))
            sql += f" GROUP BY {positions} ORDER BY {positions}"
        with self._tx() as cur:
            rows = cur.execute(sql, args).fetchall()  # built from this module's fixed pieces
        n = len(group)
        return [
            SpendRow(key=dict(zip(group, map(str, row[:n]), strict=True)), requests=int(row[n]),
                     usd=_usd(int(row[n + 1])))
            for row in rows
            if row[n]
        ]

    # --- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; the ledger cannot be used afterwards."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> PostgresLedger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresLedger({_redacted(self.url)!r})"


def _redacted(url: str) -> str:
    """``url`` without its password."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        parts = conninfo_to_dict(url)
    except Exception:
        return "<postgresql>"
    if "password" in parts:
        parts["password"] = "***"
    return make_conninfo("", **{k: v for k, v in parts.items() if v is not None})


__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresLedger"]
