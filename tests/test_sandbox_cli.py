"""The sandboxes one flag away: ``pixroute sandbox`` (environment lines, ``--fault``, ``-- COMMAND``), ``--sandbox``
on the commands, and ``IMAGEROUTER_SANDBOX`` for code. Keys are fake and say so; nothing leaves loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from providers.sandbox import Fault
from router import Router
from router.cli import build_parser, main
from router.config import UnavailableProvider, providers_from_env, router_kwargs_from_env
from router.errors import ConfigurationError
from router.sandboxes import SANDBOX_ENV, Sandboxes, parse_fault, sandbox_mode, sandboxed_kinds

ROOT = Path(__file__).resolve().parents[1]
HOSTED = ("openai", "stability", "replicate", "together", "bfl")
KEYS = {"openai": "OPENAI_API_KEY", "stability": "STABILITY_API_KEY", "replicate": "REPLICATE_API_TOKEN",
        "together": "TOGETHER_API_KEY", "bfl": "BFL_API_KEY"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENAI", "STABILITY", "REPLICATE", "TOGETHER", "BFL", "IMAGEROUTER"))}
    return env | {"PYTHONPATH": str(ROOT), "IMAGEROUTER_LEDGER": ":memory:"} | extra


def _loopback(url: str) -> bool:
    return urlsplit(url).hostname == "127.0.0.1"


# --- pixroute sandbox ----------------------------------------------------------------------------------


def test_the_sandbox_command_prints_lines_that_other_processes_use(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "router.cli", "sandbox", "--json", "--fault",
                             "together=server_error:503,times=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env())
    assert proc.stdout is not None
    try:
        doc = json.loads(proc.stdout.readline())
        env = doc["env"]
        assert env[SANDBOX_ENV] == "attach" and doc["faults"] == ["together=server_error:503,times=1"]
        for kind, key in KEYS.items():
            assert "FAKE" in env[key] and "sandbox" in env[key]
            assert _loopback(env[f"{kind.upper()}_BASE_URL"])
        out = subprocess.run([sys.executable, "-m", "router.cli", "generate", "a lighthouse", "--provider", "together",
                              "--out", str(tmp_path / "out"), "--json"],
                             capture_output=True, text=True, cwd=tmp_path, env=_env(**env), timeout=120)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        trail = [(a["provider"], a["outcome"], a["status_code"]) for a in result["attempts"]]
        assert trail == [("together", "error", 503), ("together", "success", None)]  # the fault, once; a retry
        assert Path(result["files"][0]).read_bytes()[:4] == b"\x89PNG"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_the_sandbox_command_prints_export_lines_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "router.cli", "sandbox"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=_env())
    assert proc.stdout is not None and proc.stderr is not None
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("export ") and all(line.startswith("export ") for line in lines)
        assert "fake keys: nothing reaches a vendor" in proc.stderr.readline()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_sandbox_runs_one_command_with_its_lines_and_returns_its_code(tmp_path: Path) -> None:
    script = "import os, sys; print(os.environ['OPENAI_BASE_URL']); sys.exit(4)"
    out = subprocess.run([sys.executable, "-m", "router.cli", "sandbox", "--", sys.executable, "-c", script],
                         capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
    assert out.returncode == 4 and _loopback(out.stdout.strip()) and out.stderr == ""


def test_a_fault_rehearses_a_fallback_through_the_command(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "router.cli", "generate", "a lighthouse at dusk", "--policy", "cheapest",
               "--provider", "stability", "--out", str(tmp_path), "--json"]
    out = subprocess.run([sys.executable, "-m", "router.cli", "sandbox", "--fault", "stability=moderation", "--",
                          *command], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=120)
    assert out.returncode == 8  # ContentPolicyError's exit code: the fault reached the command
    assert json.loads(out.stdout)["error"] == "ContentPolicyError"


@pytest.mark.parametrize(("spec", "kind", "fault", "times"), [
    ("openai=rate_limit", "openai", Fault.rate_limit(), None),
    ("openai=rate_limit:2", "openai", Fault.rate_limit(retry_after=2.0), None),
    ("stability=server_error:503,times=2", "stability", Fault.server_error(503), 2),
    ("bfl=timeout:5", "bfl", Fault.timeout(5.0), None),
    ("together=bomb_image", "together", Fault("bomb_image"), None),
    ("replicate=model_error", "replicate", Fault("model_error"), None),
])
def test_fault_specs(spec: str, kind: str, fault: Fault, times: int | None) -> None:
    assert parse_fault(spec) == (kind, fault, times)


@pytest.mark.parametrize(("spec", "words"), [
    ("openai", "write PROVIDER=KIND"),
    ("nosuch=rate_limit", "unknown sandbox 'nosuch'"),
    ("openai=meltdown", "unknown fault 'meltdown' for openai"),
    ("openai=rate_limit:soon", "'soon' is not a number"),
    ("openai=auth:3", "auth takes no argument"),
    ("openai=auth,times=0", "times=N"),
])
def test_bad_fault_specs_say_what_to_write(spec: str, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words):
        parse_fault(spec)


# --- --sandbox on the commands ------------------------------------------------------------------------


def test_generate_with_sandbox_writes_an_image_from_a_sandbox(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "a lighthouse", "--sandbox", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["provider"] in sandboxed_kinds()
    assert Path(result["files"][0]).read_bytes()[:4] == b"\x89PNG"


def test_route_with_sandbox_honours_residency_through_the_regional_stand_ins(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", "a portrait of a lighthouse keeper", "--sandbox", "--residency", "eu", "--json"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["chain"] and {c["provider"] for c in decision["chain"]} <= {"openai", "bfl"}
    assert not set(decision["not_configured"]) & set(HOSTED)  # every sandboxed provider is configured


def test_providers_with_sandbox_lists_every_hosted_provider_configured(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["providers", "--sandbox", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert all(rows[k]["configured"] for k in HOSTED)
    assert rows["local"]["configured"] is False and "IMAGEROUTER_MODELS" in rows["local"]["problem"]


def test_every_command_that_calls_providers_takes_sandbox() -> None:
    parser = build_parser()
    for command in (["generate", "x"], ["route", "x"], ["serve"], ["providers"], ["demo"]):
        assert parser.parse_args([*command, "--sandbox"]).sandbox is True


def test_serve_with_sandbox_answers_from_the_sandboxes(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--sandbox", "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=_env())
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/images/generations",
                            json={"prompt": "a red apple", "size": "1024x1024"}, timeout=60)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-imagerouter-provider"] in sandboxed_kinds()
    assert answer.json()["data"][0]["b64_json"]


# --- for code: IMAGEROUTER_SANDBOX, router_kwargs_from_env(sandbox=True) -------------------------------


def test_the_environment_switch_starts_the_sandboxes_for_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SANDBOX_ENV, "1")
    monkeypatch.delenv("IMAGEROUTER_LEDGER")
    with Router.from_env() as router:
        assert router.ledger.path == ":memory:"  # make-believe spend stays out of the real ledger
        result = router.generate("a red apple", provider="openai", width=1024, height=1024)
    assert result.provider == "openai" and result.cost.actual_usd > 0


def test_router_kwargs_from_env_takes_sandbox() -> None:
    kw = router_kwargs_from_env({}, sandbox=True)
    providers = {p.name: p for p in kw["providers"]}
    assert all(providers[k].configuration_problem() is None for k in HOSTED)
    assert kw["ledger"] == ":memory:"
    assert sandbox_mode({}, True) == "start" and sandbox_mode({SANDBOX_ENV: "0"}) is None


def test_attached_providers_refuse_a_url_that_is_not_on_loopback() -> None:
    env = {SANDBOX_ENV: "attach", "OPENAI_BASE_URL": "https://images.example.invalid/v1",
           "OPENAI_API_KEY": "sk-real-key-1234", "BFL_BASE_URL": "http://127.0.0.1:9/"}
    providers = {p.name: p for p in providers_from_env(env)}
    openai = providers["openai"]
    assert isinstance(openai, UnavailableProvider) and openai.models() == ()
    assert "not a sandbox on loopback" in (openai.configuration_problem() or "")
    assert "STABILITY_BASE_URL is not" in (providers["stability"].configuration_problem() or "")
    assert providers["bfl"].configuration_problem() is None  # a loopback URL: the sandbox's fake key is used


def test_a_fleet_of_some_sandboxes_with_a_regional_host_of_its_own() -> None:
    with Sandboxes(("openai",), region_hosts={"openai": ("eu",)}) as fleet:
        assert set(fleet.hosts) == {"openai", "openai-eu"}
        env = fleet.env()
        assert set(env) == {"OPENAI_API_KEY", "OPENAI_BASE_URL", SANDBOX_ENV}
        with Router([fleet.provider("openai")], ledger=":memory:") as router:
            router.generate("a red apple", width=1024, height=1024, residency={"eu"})
        assert fleet.hits() == {"openai": 0, "openai-eu": 1}
    assert not fleet.running


def test_a_plugin_without_a_sandbox_stays_off_in_sandbox_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from providers import registry

    found = dict(registry.BUILTIN) | {"acme": "providers.openai:OpenAIProvider"}  # a plugin that calls a vendor
    monkeypatch.setattr("router.config.available_providers", lambda: found)
    providers = {p.name: p for p in providers_from_env({}, sandbox=True)}
    assert isinstance(providers["acme"], UnavailableProvider)
    assert providers["acme"].configuration_problem() == (
        "not configured: acme has no sandbox, and IMAGEROUTER_SANDBOX is set")
    assert not isinstance(providers["local"], UnavailableProvider)
