"""The routing simulation (``benchmarks/routing_sim.py``) on a small sample: every preset keeps every hard
constraint, the real router serves through its fakes without touching the network, and the report has its
tables. Figures themselves (savings, p99) are the benchmark's business, not asserted here."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A few GenEval-shaped rows, used when ../shared/data/geneval is not beside the repository.
ROWS = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {
        "tag": "two_object",
        "include": [{"class": "cow", "count": 1}, {"class": "cake", "count": 1}],
        "prompt": "a photo of a cow and a cake",
    },
    {"tag": "counting", "include": [{"class": "clock", "count": 3}], "prompt": "a photo of three clocks"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {
        "tag": "color_attr",
        "include": [{"class": "bus", "count": 1, "color": "blue"}, {"class": "dog", "count": 1, "color": "white"}],
        "prompt": "a photo of a blue bus and a white dog",
    },
    {
        "tag": "position",
        "include": [{"class": "cup", "count": 1}, {"class": "sink", "count": 1}],
        "prompt": "a photo of a cup left of a sink",
    },
]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("routing_sim", ROOT / "benchmarks" / "routing_sim.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sim = _load()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Any:
    geneval = sim.GENEVAL
    if not geneval.exists():
        geneval = tmp_path_factory.mktemp("geneval") / "evaluation_metadata.jsonl"
        geneval.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    real_connect = socket.socket.connect

    def loopback_only(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"the simulation tried to connect to {address!r}")
        return real_connect(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", loopback_only)
        return sim.simulate(requests=200, router_requests=60, seed=3, down_modes=("error",), geneval=geneval)


def test_every_preset_keeps_every_hard_constraint(report: Any) -> None:
    for name, st in report.engine.items():
        assert st.requests == 200
        assert st.routed + st.no_route == 200
        assert sum(st.violations.values()) == 0, (name, st.examples)
        assert st.false_refusals == 0, (name, st.examples)


def test_the_router_serves_within_constraints_healthy_and_with_a_provider_down(report: Any) -> None:
    for name, runs in report.router.items():
        healthy, *down = runs
        assert healthy.down is None
        assert healthy.requests == 60
        for st in runs:
            assert sum(st.violations.values()) == 0, (name, st.scenario, st.examples)
        if healthy.served:
            assert down and down[0].down == healthy.served_by.most_common(1)[0][0]
            assert down[0].served_by[down[0].down] == 0  # a provider that fails every call serves nothing


def test_the_simulation_is_deterministic_for_a_seed() -> None:
    requests = sim.draw_requests(20, 5, ROWS)
    again = sim.draw_requests(20, 5, ROWS)
    assert [r.request.prompt for r in requests] == [r.request.prompt for r in again]
    a, b = sim.Faults(1), sim.Faults(1)
    assert [a.draw("k", "p", "m", 4.0) for _ in range(5)] == [b.draw("k", "p", "m", 4.0) for _ in range(5)]


def test_the_report_states_goals_beside_figures(report: Any) -> None:
    text = sim.render(report, "python benchmarks/routing_sim.py --requests 200")
    assert text.startswith("# benchmarks/routing_sim.py")
    assert "Command: `python benchmarks/routing_sim.py --requests 200`" in text
    assert "## Cost, skills and constraints" in text and "## Failure:" in text
    assert "≥ 60%" in text and "goal ≥ 99.9 %" in text and "goal ≤ 1.5×" in text
    for name in sim.PRESETS:
        assert f"| {name} | " in text
        assert f"| {name} | healthy |" in text
    balanced = next(line for line in text.splitlines() if line.startswith("| balanced | ") and "healthy" not in line)
    assert ": met" in balanced or "**not met**" in balanced
