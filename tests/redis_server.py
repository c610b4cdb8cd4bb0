"""A real, throwaway Redis server for the tests: ``redis-server`` in a temporary directory, on a free port on
127.0.0.1, stopped (and its directory removed) at the end of the session.

Import the fixtures into a test module::

    from tests.redis_server import redis_server, redis_url  # noqa: F401

``redis_server`` (session) is the server; ``redis_url`` (per test) is its URL on a database emptied for the
test. The binary must be installed (Debian/Ubuntu: ``apt-get install -y redis-server``); without it the
fixture FAILS, saying so: nothing is skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = (
    "redis-server is needed for the shared-state tests and was not found in PATH or /usr/bin, /usr/local/bin, "
    "/usr/sbin; install it: `apt-get install -y redis-server` (Debian/Ubuntu), `brew install redis` (macOS), "
    "or set REDIS_SERVER to the binary"
)


@dataclass(frozen=True)
class RedisServer:
    host: str
    port: int

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"


def find_binary() -> Path | None:
    """``redis-server``: $REDIS_SERVER, PATH, then the usual install places."""
    candidates = [os.environ.get("REDIS_SERVER", ""), shutil.which("redis-server") or "",
                  "/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    """Whether a Redis server answers PING on 127.0.0.1:``port`` (the inline protocol: no client needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _start(binary: Path, root: Path, port: int) -> subprocess.Popen[bytes]:
    # No persistence, loopback only, protected mode on: a server that forgets everything when it stops.
    argv = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root), "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes", "--databases", "16",
            "--maxmemory-policy", "noeviction", "--logfile", str(root / "redis.log")]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            cwd=root)


@contextlib.contextmanager
def running_server() -> Iterator[RedisServer]:
    """Start a throwaway server; stop it and delete its files on exit."""
    binary = find_binary()
    if binary is None:
        pytest.fail(INSTALL_HINT)
    root = Path(tempfile.mkdtemp(prefix="imagerouter-redis-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(5):  # another process may take the free port between the probe and the start
            port = _free_port()
            process = _start(binary, root, port)
            for _ in range(300):  # up to 30 s on a loaded machine
                if process.poll() is not None or _ping(port):
                    break
                time.sleep(0.1)
            if process.poll() is None and _ping(port):
                break
            process.kill()
            process.wait()
            process = None
        if process is None:
            log = (root / "redis.log").read_text(errors="replace") if (root / "redis.log").exists() else ""
            pytest.fail(f"redis-server could not start:\n{log}")
        yield RedisServer("127.0.0.1", port)
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real Redis server for the whole session (fails, never skips, without the binary)."""
    try:
        import redis  # noqa: F401
    except ImportError:
        pytest.fail("the shared-state tests need redis-py: pip install -e '.[dev,redis]'")
    with running_server() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session server's URL, its database 0 emptied before and after the test."""
    import redis

    client = redis.Redis(host=redis_server.host, port=redis_server.port, db=0)
    try:
        client.flushdb()
        yield redis_server.url(0)
    finally:
        client.flushdb()
        client.close()
