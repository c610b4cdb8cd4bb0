"""The fleet's must-shows for state shared through a real Redis server: 4 worker processes
(:mod:`tests.state_worker`) against loopback sandboxes.

- a provider 100 % down is called 3 times across the fleet, then its circuit is open in every process;
  while open nobody calls it; after each cooldown exactly one probe goes, fleet-wide;
- a key's rate limit holds across the processes (±1);
- the same seeded request made by two processes is generated (and paid) once; an unseeded one never hits.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from providers.sandbox import Fault, OpenAISandbox
from providers.sandbox.together import TogetherSandbox
from tests.redis_server import redis_server, redis_url  # noqa: F401
from tests.state_worker import OPENAI_KEY, TOGETHER_KEY

ROOT = Path(__file__).resolve().parent.parent
COOLDOWN_S = 2.0
WORKERS = 4


class Fleet:
    """Worker processes sharing one Redis state; each answers one JSON line per command."""

    def __init__(self, url: str, openai_url: str, together_url: str) -> None:
        prefix = f"fleet{uuid.uuid4().hex[:8]}"
        self._files = contextlib.ExitStack()
        self._errs: list[IO[bytes]] = []
        self.procs: list[subprocess.Popen[str]] = []
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for _ in range(WORKERS):
            err = self._files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 (closed with the fleet)
            self._errs.append(err)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.state_worker", url, prefix, openai_url, together_url, str(COOLDOWN_S)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env))
        for i in range(WORKERS):
            assert self._read(i) == {"ready": True}

    def _read(self, i: int) -> dict[str, Any]:
        stdout = self.procs[i].stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            self._errs[i].seek(0)
            pytest.fail(f"worker {i} ended:\n{self._errs[i].read().decode(errors='replace')[-4000:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _send(self, i: int, cmd: dict[str, Any]) -> None:
        stdin = self.procs[i].stdin
        assert stdin is not None
        stdin.write(json.dumps(cmd) + "\n")
        stdin.flush()

    def ask(self, i: int, cmd: dict[str, Any]) -> dict[str, Any]:
        self._send(i, cmd)
        return self._read(i)

    def ask_all(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        """``cmd`` sent to every worker at once (they run it concurrently), then every answer."""
        for i in range(WORKERS):
            self._send(i, cmd)
        return [self._read(i) for i in range(WORKERS)]

    def close(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is None:
                try:
                    self._send(i, {"op": "quit"})
                    proc.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait()
        self._files.close()


@pytest.fixture
def down() -> Iterator[OpenAISandbox]:
    with OpenAISandbox(api_key=OPENAI_KEY) as sb:
        sb.faults.push(Fault.server_error(503), times=None)
        yield sb


@pytest.fixture
def together() -> Iterator[TogetherSandbox]:
    with TogetherSandbox(api_key=TOGETHER_KEY) as sb:
        yield sb


@pytest.fixture
def fleet(redis_url: str, down: OpenAISandbox, together: TogetherSandbox) -> Iterator[Fleet]:  # noqa: F811
    f = Fleet(redis_url, down.base_url, together.origin)
    try:
        yield f
    finally:
        f.close()


def _wait_for_half_open(fleet: Fleet) -> None:
    """Poll (no assertion on time) until the cooldown has passed."""
    for _ in range(int(COOLDOWN_S * 10) * 5):
        if fleet.ask(0, {"op": "state"})["state"] == "half-open":
            return
        time.sleep(0.1)
    pytest.fail("the circuit never left the open state")


def test_a_dead_provider_is_called_three_times_fleet_wide_then_one_probe_per_cooldown(
        fleet: Fleet, down: OpenAISandbox) -> None:
    # One request at a time, round-robin over the 4 processes: with a breaker per process this costs
    # 3 calls per process (12); shared, the fleet stops after 3.
    went = [fleet.ask(i % WORKERS, {"op": "call", "n": 1})["called"] for i in range(2 * WORKERS)]
    assert (went, down.hits()) == ([1, 1, 1, 0, 0, 0, 0, 0], 3)
    assert [a["state"] for a in fleet.ask_all({"op": "state"})] == ["open"] * WORKERS

    bursts = fleet.ask_all({"op": "call", "n": 10})  # open: nobody calls
    assert (sum(a["called"] for a in bursts), down.hits()) == (0, 3)

    for cooldown in range(2):  # after each cooldown, 40 concurrent attempts across 4 processes: one probe
        _wait_for_half_open(fleet)
        bursts = fleet.ask_all({"op": "call", "n": 10})
        assert (sum(a["called"] for a in bursts), down.hits()) == (1, 4 + cooldown)
        assert [a["state"] for a in fleet.ask_all({"op": "state"})] == ["open"] * WORKERS  # the probe failed


def test_a_keys_rate_limit_holds_across_processes(fleet: Fleet) -> None:
    rpm = 30  # a token refills every 2 s: the burst cannot gain more than one
    admitted = sum(a["admitted"] for a in fleet.ask_all({"op": "take", "n": 20, "rpm": rpm}))
    assert rpm <= admitted <= rpm + 1  # 80 asked across 4 processes; per-process buckets would admit 80


def test_the_same_seeded_request_is_paid_once_across_processes(fleet: Fleet, together: TogetherSandbox) -> None:
    first = fleet.ask(0, {"op": "generate", "seed": 42})
    second = fleet.ask(1, {"op": "generate", "seed": 42})
    generations = [r for r in together.requests if r.method == "POST"]
    assert (first["hit"], second["hit"], second["cost"], len(generations)) == (False, True, "0", 1)
    assert second["sha256"] == first["sha256"] and first["cost"] != "0"


def test_an_unseeded_request_never_hits_the_cache(fleet: Fleet, together: TogetherSandbox) -> None:
    answers = [fleet.ask(i, {"op": "generate", "seed": None}) for i in (0, 1, 0)]
    generations = [r for r in together.requests if r.method == "POST"]
    assert ([a["hit"] for a in answers], len(generations)) == ([False, False, False], 3)
    assert all(a["cost"] != "0" for a in answers)
