"""A real, throwaway PostgreSQL server for the tests: ``initdb`` + ``pg_ctl`` in a temporary directory, on a
free port on 127.0.0.1, stopped (and its directory removed) at the end of the session.

Import the fixtures into a test module::

    from tests.pg import pg_server, pg_url  # noqa: F401

``pg_server`` (session) is the server; ``pg_url`` (per test) is the URL of a fresh, empty database on it.
The server binaries must be installed (Debian/Ubuntu: ``apt-get install -y postgresql``); without them the
fixture FAILS, saying so: nothing is skipped. As root (initdb refuses to run as root) the server runs as the
``postgres`` user (else ``nobody``) in a directory that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = (
    "the PostgreSQL server binaries (initdb, pg_ctl) are needed for the PostgreSQL ledger tests and were not "
    "found in PATH, /usr/lib/postgresql/*/bin, /usr/local/pgsql/bin or /usr/local/bin; install them: "
    "`apt-get install -y postgresql` (Debian/Ubuntu), `brew install postgresql` (macOS), or set PG_BIN to "
    "the directory holding them"
)


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``: $PG_BIN, PATH, then the usual install places."""
    candidates: list[str] = []
    if os.environ.get("PG_BIN"):
        candidates.append(os.environ["PG_BIN"])
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).resolve().parent))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: _version(p), reverse=True)
    candidates += [*versions, "/usr/local/pgsql/bin", "/usr/local/bin", "/usr/pgsql/bin"]
    for directory in candidates:
        d = Path(directory)
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


def _version(path: str) -> int:
    try:
        return int(Path(path).parent.name.split(".")[0])
    except ValueError:
        return 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _runner() -> tuple[list[str], pwd.struct_passwd | None]:
    """The command prefix that runs a server binary as a user initdb accepts, and that user (None: us)."""
    if os.geteuid() != 0:
        return [], None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam(name)
            runuser = shutil.which("runuser")
            if runuser:
                return [runuser, "-u", name, "--"], user
            su = shutil.which("su")
            if su:  # su needs one command string; every argument here is a plain path or option
                return [su, name, "-s", "/bin/sh", "-c"], user
    pytest.fail("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as (initdb refuses root)")


def _run(prefix: list[str], argv: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [*prefix, " ".join(argv)] if prefix and prefix[-1] == "-c" else [*prefix, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd="/")


@contextlib.contextmanager
def running_server() -> Iterator[PostgresServer]:
    """Start a throwaway server; stop it and delete its files on exit."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.fail(INSTALL_HINT)
    prefix, user = _runner()
    root = Path(tempfile.mkdtemp(prefix="imagerouter-pg-"))
    try:
        if user is not None:
            os.chown(root, user.pw_uid, user.pw_gid)
        data = root / "data"
        init = _run(prefix, [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                             "--encoding=UTF8", "--locale=C", "--no-sync"])
        if init.returncode != 0:
            pytest.fail(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        port = 0
        started = None
        for _ in range(5):  # another process may take the free port between the probe and the start
            port = _free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
            started = _run(prefix, [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
                                    "-t", "60", "-o", f"'{options}'" if prefix and prefix[-1] == "-c" else options,
                                    "start"])
            if started.returncode == 0:
                break
        if started is None or started.returncode != 0:
            log = (root / "log").read_text(errors="replace") if (root / "log").exists() else ""
            detail = f"{started.stdout}\n{started.stderr}" if started else ""
            pytest.fail(f"pg_ctl could not start PostgreSQL:\n{detail}\n{log}")
        try:
            yield PostgresServer("127.0.0.1", port, "postgres")
        finally:
            _run(prefix, [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session (fails, never skips, without the binaries)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.fail("the PostgreSQL tests need psycopg 3: pip install -e '.[dev,postgres]'")
    with running_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's server, dropped after the test."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server.url(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')  # a generated identifier
    try:
        yield pg_server.url(name)
    finally:
        with psycopg.connect(pg_server.url(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
