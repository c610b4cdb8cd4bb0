"""What the shared backends cost per request: the router on the PostgreSQL ledger + Redis state against the
embedded defaults (a SQLite file ledger + in-process state), at concurrency 1 and 200.

    .venv/bin/python benchmarks/scale.py [--requests 300] [--rounds 3] [--concurrency 1 200]
                                         [--pg-url postgresql://…] [--redis-url redis://…]

One loopback OpenAI Images endpoint in its own process (:func:`overhead.server_process`, the fixed
responder replaying the sandbox's answer) serves every client; in this process:

- ``adapter``: :class:`providers.openai.OpenAIProvider` called directly (the baseline: no routing);
- ``sqlite+local``: :class:`router.AsyncRouter` on a SQLite ledger file and in-process state (the defaults);
- ``pg+redis``: the same router on ``ledger="postgresql://…"`` and ``state="redis://…"``;
- each again ``+budget``: with a budget that applies to every request (never reached), so each request
  reserves before its call (a budget-free request's SQLite writes are queued behind it; PostgreSQL's never are);
- ``pg+local+budget`` and ``sqlite+redis+budget``: one shared piece at a time, to tell their costs apart.

Every configuration gets its own database (and its own SQLite file); the Redis ones share one server. Without
``--pg-url`` / ``--redis-url`` a throwaway PostgreSQL and redis-server are started on loopback (tests/pg.py,
tests/redis_server.py: PostgreSQL with fsync and synchronous_commit off, as in the tests; give ``--pg-url``
to measure a durable server). Rounds rotate the order of the clients (overhead.measure); "added" is a
client's percentile minus the adapter's, from the latencies pooled over every round. No test asserts on
these times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead  # benchmarks/overhead.py: the server process and the measuring loop

PROMPT = overhead.PROMPT
SIZE = "1024x1024"
BUDGET = Decimal("1000000")  # applies to every request, never reached


@contextlib.contextmanager
def services(pg_url: str | None, redis_url: str | None) -> Iterator[tuple[str, str]]:
    """The PostgreSQL server's admin URL and a Redis URL: the ones given, else throwaway loopback servers."""
    with contextlib.ExitStack() as stack:
        if pg_url is None:
            from tests.pg import running_server as running_pg

            pg_url = stack.enter_context(running_pg()).url()
        if redis_url is None:
            from tests.redis_server import running_server as running_redis

            redis_url = stack.enter_context(running_redis()).url(0)
        yield pg_url, redis_url


def _database(admin_url: str, stack: contextlib.ExitStack) -> str:
    """A fresh database on the server, dropped when ``stack`` closes; its URL."""
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')  # a generated identifier

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    stack.callback(drop)
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


async def build_clients(base_url: str, pg_admin: str, redis_url: str, workdir: Path,
                        stack: contextlib.ExitStack) -> list[overhead.Client]:
    import redis

    from providers.openai import OpenAIProvider
    from router import AsyncRouter, ImageRequest
    from router.ledger import Budget

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    width, height = (int(x) for x in SIZE.split("x"))
    request = ImageRequest(prompt=PROMPT, width=width, height=height)
    adapter = OpenAIProvider(api_key=overhead.API_KEY, base_url=base_url)

    async def call_adapter() -> object:
        return await adapter.generate(request, overhead.MODEL, timeout_s=60)

    clients = [overhead.Client("adapter", call_adapter, adapter.aclose)]
    configs = [("sqlite+local", "sqlite", None, False), ("sqlite+local+budget", "sqlite", None, True),
               ("pg+redis", "pg", redis_url, False), ("pg+redis+budget", "pg", redis_url, True),
               ("pg+local+budget", "pg", None, True), ("sqlite+redis+budget", "sqlite", redis_url, True)]
    for name, ledger_kind, state, budgeted in configs:
        ledger = _database(pg_admin, stack) if ledger_kind == "pg" else str(workdir / f"{name}.sqlite3")
        router = AsyncRouter([OpenAIProvider(api_key=overhead.API_KEY, base_url=base_url)], ledger=ledger,
                             state=state, budgets=[Budget(BUDGET, "total")] if budgeted else ())

        async def call(router: AsyncRouter = router) -> object:
            return await router.agenerate(request)

        clients.append(overhead.Client(name, call, router.aclose))
    return clients


def table(results: dict[int, dict[str, overhead.Series]]) -> str:
    lines = ["| client | concurrency | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for concurrency, series in results.items():
        base = sorted(series["adapter"].latencies)
        b50, b99 = overhead.percentile(base, 0.5), overhead.percentile(base, 0.99)
        for name, s in series.items():
            lat = sorted(s.latencies)
            p50, p99 = overhead.percentile(lat, 0.5), overhead.percentile(lat, 0.99)
            added = ("-", "-") if name == "adapter" else (f"{(p50 - b50) * 1e3:+.3f}", f"{(p99 - b99) * 1e3:+.3f}")
            lines.append(f"| {name} | {concurrency} | {p50 * 1e3:.3f} | {p99 * 1e3:.3f} | {added[0]} | {added[1]} "
                         f"| {s.requests / s.wall_s:,.0f} |")
    return "\n".join(lines)


def _server_versions(pg_admin: str, redis_url: str) -> str:
    import psycopg
    import redis

    with psycopg.connect(pg_admin) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        settings = {name: conn.execute(f"SHOW {name}").fetchone() for name in ("fsync", "synchronous_commit")}
    client = redis.Redis.from_url(redis_url)
    info = cast(dict[str, Any], client.info("server"))  # redis-py types sync and async answers as one
    client.close()
    pg = f"PostgreSQL {row[0] if row else '?'} (" + ", ".join(f"{k} {v[0] if v else '?'}"
                                                              for k, v in settings.items()) + ")"
    return f"{pg}, Redis {info.get('redis_version', '?')}"


def versions(pg_admin: str, redis_url: str) -> str:
    parts = [f"python {platform.python_version()}", f"openai {version('openai')}", f"psycopg {version('psycopg')}",
             f"redis-py {version('redis')}", _server_versions(pg_admin, redis_url)]
    return ", ".join(parts) + f"; {os.cpu_count()} CPUs, {platform.machine()}"


async def run(args: argparse.Namespace) -> int:
    load_before = os.getloadavg()
    with services(args.pg_url, args.redis_url) as (pg_admin, redis_url), \
            overhead.server_process("fixed", SIZE) as base_url, \
            tempfile.TemporaryDirectory(prefix="imagerouter-scale-") as tmp, contextlib.ExitStack() as stack:
        clients = await build_clients(base_url, pg_admin, redis_url, Path(tmp), stack)
        results: dict[int, dict[str, overhead.Series]] = {}
        try:
            for concurrency in args.concurrency:
                results[concurrency] = await overhead.measure(clients, concurrency, args.requests, args.rounds)
        finally:
            for client in clients:
                if client.close is not None:
                    await client.close()
        print(f"# scale: fixed OpenAI-shaped server in its own process, size {SIZE}, {args.requests} requests x "
              f"{args.rounds} rounds per client and concurrency; one client process")
        print(f"# {versions(pg_admin, redis_url)}")
        print(f"# load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (1 min)")
        print(table(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=300, help="requests per client, round and concurrency")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 200])
    parser.add_argument("--pg-url", help="an existing PostgreSQL server (a database is created per client)")
    parser.add_argument("--redis-url", help="an existing Redis database (flushed first)")
    args = parser.parse_args(argv)
    import importlib.util

    missing = [m for m in ("openai", "psycopg", "redis") if importlib.util.find_spec(m) is None]
    if missing:
        parser.error(f"missing {', '.join(missing)}: pip install -e '.[openai,postgres,redis,dev]'")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
