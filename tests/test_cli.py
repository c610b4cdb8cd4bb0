"""The ``pixroute`` command, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from providers.sandbox import Fault, OpenAISandbox
from router.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "three red apples on a wooden table, a sign that says SALE"


def test_route_explain_json_with_no_configuration_lists_every_provider() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "IMAGEROUTER_P"))}
    env["IMAGEROUTER_LEDGER"] = ":memory:"
    out = subprocess.run([sys.executable, "-m", "router.cli", "route", PROMPT, "--explain", "--json"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    data = json.loads(out.stdout)
    from providers.registry import available_providers

    ranked = data["chain"] + data["beyond"]
    seen = {r["provider"] for r in data["rejections"]} | {c["provider"] for c in ranked}
    assert seen == set(available_providers())
    assert data["complexity"]["features"]["counts"] >= 1 and data["complexity"]["features"]["text_to_render"] >= 1
    assert data["dry_run"] is True and data["not_configured"]["openai"] == "not configured: set OPENAI_API_KEY"
    assert all(r["reason"] for r in data["rejections"])
    offered = [r for r in data["rejections"] if r["model"] != "-"]  # "-": a provider with no model configured
    assert offered and all(set(r["terms"]) >= {"cost", "latency", "fit"} for r in offered)
    assert all(set(c["terms"]) >= {"cost", "latency", "fit"} for c in ranked)
    assert out.returncode == 0  # a dry run answers: ranked as if configured


def test_route_explain_prints_score_terms(monkeypatch: pytest.MonkeyPatch, sandbox: OpenAISandbox,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", sandbox.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", sandbox.base_url)
    assert main(["route", PROMPT, "--explain"]) == 0
    text = capsys.readouterr().out
    assert "openai/gpt-image-2" in text and "cost=" in text and "prompt complexity" in text
    assert sandbox.hits() == 0  # a dry run calls nothing


def test_generate_writes_images_and_records_spend(monkeypatch: pytest.MonkeyPatch, sandbox: OpenAISandbox,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", sandbox.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", sandbox.base_url)
    monkeypatch.setenv("IMAGEROUTER_LEDGER", str(tmp_path / "ledger.sqlite3"))
    assert main(["generate", "a cat", "--out", str(tmp_path / "out"), "--json", "--tag", "cli-test"]) == 0
    data = json.loads(capsys.readouterr().out)
    files = [Path(f) for f in data["files"]]
    assert len(files) == 1 and files[0].read_bytes()[:4] == b"\x89PNG"
    assert data["provider"] == "openai" and float(data["cost"]["actual_usd"]) > 0
    assert main(["ledger", "--by", "provider,tag", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spend"] == [{"key": {"provider": "openai", "tag": "cli-test"}, "requests": 1,
                                "usd": data["cost"]["actual_usd"]}]


def test_errors_map_to_distinct_exit_codes(monkeypatch: pytest.MonkeyPatch, sandbox: OpenAISandbox,
                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", sandbox.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", sandbox.base_url)
    out = str(tmp_path)
    assert main(["generate", "a cat", "--width", "1001", "--height", "1000", "--out", out]) == 3
    sandbox.faults.push(Fault.moderation())
    assert main(["generate", "a cat", "--out", out]) == 8
    assert main(["generate", "a cat", "--residency", "local", "--out", out]) == 6
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-the-right-key-123")
    assert main(["generate", "a cat", "--out", out]) == 4
    assert "sk-not-the-right-key-123" not in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no file written for a failed request


def test_providers_lists_configuration_state(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["providers", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    openai = next(r for r in rows if r["name"] == "openai")
    assert openai["configured"] is False and "OPENAI_API_KEY" in openai["problem"]
    assert "inpaint" in openai["models"]["gpt-image-2"]["tasks"] and "eu" in openai["models"]["gpt-image-2"]["regions"]


def test_quickstart_example_runs_offline(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "examples/quickstart.py", str(tmp_path)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "served by openai/gpt-image-2" in out.stdout and "actual $" in out.stdout
    assert (tmp_path / "lighthouse-0.png").read_bytes()[:4] == b"\x89PNG"


def test_control_and_lora_flags_parse_into_request_fields() -> None:
    from router.cli import _control, _lora
    from router.errors import InvalidRequestError

    assert _control("canny=edges.png,scale=0.8,end=0.6,preprocess=false") == {
        "kind": "canny", "image": "edges.png", "scale": 0.8, "end": 0.6, "preprocess": False}
    assert _lora("/loras/a.safetensors:0.7") == {"ref": "/loras/a.safetensors", "weight": 0.7}
    assert _lora("/loras/dir") == {"ref": "/loras/dir"}
    for bad in ("canny", "canny=x.png,strength=2"):
        with pytest.raises(InvalidRequestError, match="--control"):
            _control(bad)


def test_generate_on_the_local_backend_shows_progress_and_takes_controls_and_loras(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sd15_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("diffusers")
    from tests.conftest import png
    from tests.local_models import build_controlnet, build_lora

    cn = build_controlnet(tmp_path / "cn", "sd15")
    lora = build_lora(sd15_dir, tmp_path / "lora.safetensors")
    capsys.readouterr()  # building the fixtures prints Diffusers' loading bars; the generation prints none
    catalog = tmp_path / "models.yaml"
    catalog.write_text(f"models:\n  tiny:\n    path: {sd15_dir}\n    family: sd15\n    native: [64, 64]\n"
                       f"    min_side: 64\n    steps: 3\n    controlnets: {{canny: {cn}}}\n")
    (tmp_path / "edges.png").write_bytes(png(64, 64))
    monkeypatch.setenv("IMAGEROUTER_MODELS", str(catalog))
    code = main(["generate", "a cube", "--width", "64", "--height", "64", "--seed", "3", "--steps", "4",
                 "--control", f"canny={tmp_path / 'edges.png'},scale=0.5", "--lora", f"{lora}:0.8",
                 "--provider", "local", "--out", str(tmp_path / "out"), "--progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Loading" not in captured.err
    # stderr is not a terminal here: a line per 10 % of the steps (4 steps: 20, 50, 70, 100 %)
    assert [line.split(" (")[0] for line in captured.err.splitlines() if line.startswith("local/tiny: ")] == [
        "local/tiny: 20%", "local/tiny: 50%", "local/tiny: 70%", "local/tiny: 100%"]
    assert "local/tiny: 1 image(s)" in captured.out
    from router import read_provenance

    saved = sorted((tmp_path / "out").glob("*.png"))
    assert len(saved) == 1 and read_provenance(saved[0])["seed"] == 3


def test_progress_on_a_terminal_is_one_redrawn_bar_with_lines_for_other_events() -> None:
    import io

    from router.cli import _ProgressBar
    from router.progress import FellBack, ProgressEvent, Status

    out = io.StringIO()
    bar = _ProgressBar(out, width=4, terminal=True)
    bar(ProgressEvent("local", "m", 1, 2, 0.5))
    bar(ProgressEvent("local", "m", 2, 2, 1.0))
    bar(FellBack("local", "m", "bfl", "flux-pro-1.1"))
    bar(Status("bfl", "flux-pro-1.1", "pending", "Pending", 0.2, "t1"))
    bar.close()
    assert out.getvalue() == ("\rlocal/m [##..] 1/2 0.5s\rlocal/m [####] 2/2 1.0s\n"
                              "local/m failed; falling back to bfl/flux-pro-1.1\n"
                              "bfl/flux-pro-1.1: pending (Pending, 0.2s)\n")


def test_serve_refuses_an_open_public_bind_and_keys_makes_a_hashed_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0", "--port", "8765"]) == 3
    refusal = capsys.readouterr().err
    assert "without client keys" in refusal and "--keys" in refusal and "--allow-open" in refusal
    keys = tmp_path / "keys.toml"
    assert main(["keys", "alice", "--budget", "5", "--period", "day", "--file", str(keys)]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-ir-") and key not in keys.read_text()
    from router.keys import ServerKeys

    found = ServerKeys.from_file(keys).verify(key)
    assert found is not None and found.name == "alice"
