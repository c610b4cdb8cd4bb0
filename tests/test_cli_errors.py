"""Every error the command meets is one ``error: <class>: <what to change>`` line on stderr and its documented
exit code; ``--verbose`` adds the explanation; ``--json`` prints one JSON object on stdout and nothing else; a
closed pipe ends the command quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from providers.sandbox import Fault, OpenAISandbox
from router.cli import main

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(err: str, cls: str) -> str:
    """The one line of ``err``, checked to be ``error: <cls>: ...``; its text after the class."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {cls}: "), err
    assert "Traceback" not in err
    return lines[0].removeprefix(f"error: {cls}: ")


def bad_policy_file(tmp: Path) -> list[str]:
    path = tmp / "bad.yaml"
    path.write_text("weights: {cost: high}\n", encoding="utf-8")
    return ["route", "a red apple", "--policy", str(path)]


def broken_yaml_policy(tmp: Path) -> list[str]:
    path = tmp / "broken.yaml"
    path.write_text("weights: [cost\n", encoding="utf-8")
    return ["route", "a red apple", "--policy", str(path)]


def duplicate_key(tmp: Path) -> list[str]:
    assert main(["keys", "alice", "--file", str(tmp / "keys.toml")]) == 0
    return ["keys", "alice", "--file", str(tmp / "keys.toml")]


# each bad input: (name, the command line made in a temporary directory, exit code, class, words the line has)
CASES: list[tuple[str, Callable[[Path], list[str]], int, str, tuple[str, ...]]] = [
    ("unknown policy name", lambda tmp: ["route", "a red apple", "--policy", "thrifty"], 3, "PolicyFileError",
     ("unknown policy 'thrifty'", "balanced", "cheapest", ".yaml")),
    ("malformed policy file", bad_policy_file, 3, "PolicyFileError", ("bad.yaml", "weights.cost")),
    ("policy file that is not YAML", broken_yaml_policy, 3, "PolicyFileError", ("broken.yaml", "cannot read")),
    ("ledger --by color", lambda tmp: ["ledger", "--by", "color"], 2, "UsageError",
     ("cannot group by color", "provider, model, tag, day, month")),
    ("--control with a word for a number", lambda tmp: ["generate", "a cube", "--control", "canny=x.png,scale=high",
                                                        "--out", str(tmp)],
     3, "RequestValidationError", ("--control", "scale takes a number", "'high'")),
    ("a duplicate key name", duplicate_key, 3, "KeyFileError", ("keys.toml", "duplicate key name 'alice'")),
    ("unknown provider", lambda tmp: ["generate", "a cat", "--provider", "opnai", "--out", str(tmp)], 3,
     "RequestValidationError", ("unknown provider 'opnai'", "openai, ray, replicate, stability, together")),
    ("unknown model", lambda tmp: ["route", "a cat", "--model", "gpt-imag-2"], 3, "RequestValidationError",
     ("unknown model 'gpt-imag-2'", "gpt-image-2", "flux-schnell")),
    ("unknown model on a pinned provider", lambda tmp: ["route", "a cat", "--provider", "openai", "--model", "sdxl"],
     3, "RequestValidationError", ("unknown model 'sdxl' on openai", "the models on openai are gpt-image-2")),
    ("a flag the command does not take", lambda tmp: ["route", "a cat", "--bogus"], 2, "UsageError",
     ("unrecognized arguments: --bogus", "pixroute route --help")),
    ("a bad --fault", lambda tmp: ["sandbox", "--fault", "openai=meltdown"], 3, "ConfigurationError",
     ("unknown fault 'meltdown' for openai", "rate_limit")),
    ("serve on a public address without keys", lambda tmp: ["serve", "--host", "0.0.0.0", "--port", "8765"], 3,
     "ConfigurationError", ("without client keys", "--keys keys.toml", "--allow-open")),
]


@pytest.mark.parametrize(("make", "code", "cls", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_error_line_with_its_exit_code(
        make: Callable[[Path], list[str]], code: int, cls: str, words: tuple[str, ...], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    argv = make(tmp_path)
    capsys.readouterr()
    assert main(argv) == code
    out = capsys.readouterr()
    line = one_error_line(out.err, cls)
    for word in words:
        assert word in line, line
    assert out.out == ""


@pytest.mark.parametrize(("make", "code", "cls"), [c[1:4] for c in CASES], ids=[c[0] for c in CASES])
def test_with_json_a_bad_input_is_one_json_object_on_stdout_and_nothing_else(
        make: Callable[[Path], list[str]], code: int, cls: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    argv = make(tmp_path)
    capsys.readouterr()
    assert main([*argv, "--json"]) == code
    out = capsys.readouterr()
    assert out.err == ""
    doc = json.loads(out.out)  # one object: json.loads refuses anything after it
    assert doc["error"] == cls and doc["exit_code"] == code and doc["message"]


def test_a_failure_is_one_line_and_verbose_adds_every_rejection(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "a cat", "--sandbox", "--residency", "mars", "--out", "unused"]) == 6
    line = one_error_line(capsys.readouterr().err, "NoRouteError")
    assert "no provider" in line and "--verbose" in line
    assert main(["generate", "a cat", "--sandbox", "--residency", "mars", "--out", "unused", "--verbose"]) == 6
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: NoRouteError: ") and not any(e.startswith("error:") for e in err[1:])
    assert "rejected:" in err and any("[residency]" in e for e in err)


def test_with_nothing_configured_the_line_says_what_to_set_or_to_try_the_sandbox(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "a cat", "--out", "unused"]) == 6
    line = one_error_line(capsys.readouterr().err, "NoRouteError")
    assert "no provider is configured" in line and "OPENAI_API_KEY" in line and "--sandbox" in line


def test_a_vendor_refusal_is_one_line_not_a_log_line_too(monkeypatch: pytest.MonkeyPatch, sandbox: OpenAISandbox,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", sandbox.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", sandbox.base_url)
    sandbox.faults.push(Fault.moderation())
    assert main(["generate", "a cat", "--out", str(tmp_path)]) == 8
    one_error_line(capsys.readouterr().err, "ContentPolicyError")


def test_a_system_error_is_one_line_too(monkeypatch: pytest.MonkeyPatch, sandbox: OpenAISandbox, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", sandbox.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", sandbox.base_url)
    occupied = tmp_path / "a-file"
    occupied.write_text("not a directory")
    assert main(["generate", "a cat", "--out", str(occupied)]) == 1
    line = capsys.readouterr().err
    assert line.startswith("error: ") and len(line.splitlines()) == 1 and str(occupied) in line


@pytest.mark.parametrize(("variable", "value", "words"), [
    ("IMAGEROUTER_PROVIDERS", "opnai", ("unknown provider 'opnai'", "openai")),
    ("IMAGEROUTER_SANDBOX", "maybe", ("IMAGEROUTER_SANDBOX='maybe'", "attach")),
    ("IMAGEROUTER_POLICY", "thrifty", ("unknown policy 'thrifty'",)),
])
def test_a_bad_setting_in_the_environment_is_one_line_exit_3(
        variable: str, value: str, words: tuple[str, ...], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["route", "a cat"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    for word in words:
        assert word in err


# --- the model catalog: shown whole, local listed as not configured ------------------------------------


@pytest.mark.parametrize(("text", "words"), [
    (None, ("cannot read it", "No such file")),
    ("models:\n  sdxl:\n    path: /m\n    stpes: 4\n", ("model 'sdxl'", "unknown catalog keys ['stpes']", "steps")),
    ("models:\n  sdxl: [\n", ("not valid YAML",)),
    ("models:\n  sdxl:\n    family: sd3\n    path: /m\n", ("unknown family 'sd3'", "sd15, sdxl, flux")),
])
def test_a_broken_catalog_leaves_local_listed_as_not_configured_with_the_whole_error(
        text: str | None, words: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    catalog = tmp_path / "models.yaml"
    if text is not None:
        catalog.write_text(text, encoding="utf-8")
    monkeypatch.setenv("IMAGEROUTER_MODELS", str(catalog))
    assert main(["providers", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # no log line about it either: providers shows it
    local = next(r for r in json.loads(captured.out) if r["name"] == "local")
    assert local["configured"] is False and local["models"] == {}
    assert local["problem"].startswith("not configured: ") and str(catalog) in local["problem"]
    for word in words:
        assert word in local["problem"], local["problem"]
    assert main(["providers"]) == 0
    assert f"local (local): {local['problem']}" in capsys.readouterr().out.splitlines()


def test_a_catalog_error_is_a_configuration_error_and_still_an_invalid_request() -> None:
    from providers.local.catalog import Catalog
    from router.errors import CatalogError, ConfigurationError, ImageRouterError, InvalidRequestError

    with pytest.raises(CatalogError) as info:
        Catalog.from_dict({"models": {"x": {"family": "sd15"}}})
    assert isinstance(info.value, ConfigurationError) and isinstance(info.value, InvalidRequestError)
    assert isinstance(info.value, ImageRouterError) and isinstance(info.value, ValueError)


def test_policy_and_key_file_errors_are_router_errors_importable_where_they_were() -> None:
    from policies.policy import PolicyFileError
    from router.errors import ConfigurationError, ImageRouterError
    from router.keys import KeyFileError

    for cls in (PolicyFileError, KeyFileError):
        assert issubclass(cls, ConfigurationError) and issubclass(cls, ImageRouterError)
        assert issubclass(cls, ValueError)


# --- help, pipes ------------------------------------------------------------------------------------------


def test_keys_help_works(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["keys", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pixroute keys") and "--budget" in out and "--file" in out


def test_keys_json_prints_one_object_with_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "bob", "--file", str(tmp_path / "keys.toml"), "--json"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["name"] == "bob" and doc["key"].startswith("sk-ir-") and out.err == ""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "IMAGEROUTER"))}
    return env | {"IMAGEROUTER_LEDGER": ":memory:", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("args", [["route", "a red apple", "--explain", "--json"], ["providers"]])
def test_a_closed_pipe_ends_the_command_quietly(args: list[str]) -> None:
    """``pixroute ... | head``: the reader is gone before the first write; no traceback, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "router.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env=_env())
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `head` that has read what it wanted
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert err == ""


def test_head_reads_the_first_line_and_the_command_exits_0() -> None:
    out = subprocess.run(["bash", "-o", "pipefail", "-c",
                          f"'{sys.executable}' -m router.cli route 'a red apple' --explain --json | head -1"],
                         capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=120)
    assert out.returncode == 0 and out.stdout == "{\n" and out.stderr == ""


# --- what the server tells a client ---------------------------------------------------------------------


def test_the_401_help_text_names_the_header_without_a_redaction_mark() -> None:
    from router import AsyncRouter
    from router.keys import ServerKeys
    from router.server import ServerThread, create_app

    keys = ServerKeys()
    keys.add("alice")
    with ServerThread(create_app(AsyncRouter([], ledger=":memory:"), keys=keys, close_router=True)) as server:
        answer = httpx.post(f"{server.base_url}/images/generations", json={"prompt": "a cat"}, timeout=30)
    assert answer.status_code == 401
    message = answer.json()["error"]["message"]
    assert "[REDACTED]" not in message and "Authorization header" in message and "Bearer <key>" in message
