"""``router.demo.run_demo``: the offline tour routes as it says, writes real images, and speaks JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from router.demo import local_available, run_demo


def _runs(out_dir: Path, *, local: bool) -> dict[str, dict[str, Any]]:
    buf = io.StringIO()
    assert run_demo(out_dir, as_json=True, local=local, stream=buf) == 0
    doc = json.loads(buf.getvalue())
    assert doc["ok"] is True and doc["out_dir"] == str(out_dir)
    return {run["name"]: run for run in doc["runs"]}


@pytest.fixture(scope="module")
def hosted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return _runs(tmp_path_factory.mktemp("demo"), local=False)


def test_every_hosted_run_is_reported_and_the_files_decode(hosted: dict[str, dict[str, Any]]) -> None:
    assert list(hosted) == ["cheap", "quality", "eu", "fallback", "budget"]
    for name in ("cheap", "quality", "eu", "fallback"):
        run = hosted[name]
        assert run["outcome"] == "ok" and run["provider"] and run["files"], run
        for path in run["files"]:
            with Image.open(path) as img:
                img.load()
                assert img.size == (1024, 1024)
        assert run["attempts"][-1]["outcome"] == "success"
        assert run["actual_usd"] == run["attempts"][-1]["cost_usd"]


def test_the_cheap_run_takes_the_cheapest_backend_and_the_complex_one_a_stronger_one(
        hosted: dict[str, dict[str, Any]]) -> None:
    cheap, quality = hosted["cheap"], hosted["quality"]
    assert (cheap["provider"], cheap["model"]) == ("together", "black-forest-labs/FLUX.1-schnell")
    assert quality["provider"] in ("openai", "bfl")
    assert float(quality["estimated_usd"]) > float(cheap["estimated_usd"])


def test_the_eu_run_only_called_eu_hosts(hosted: dict[str, dict[str, Any]]) -> None:
    eu = hosted["eu"]
    assert eu["region"] == "eu" and set(eu["hosts"]) <= {"openai-eu", "bfl-eu"} and eu["hosts"]
    assert any("[residency]" in r for r in eu["rejections"])


def test_the_fallback_run_shows_the_failed_attempts_then_the_success(hosted: dict[str, dict[str, Any]]) -> None:
    attempts = hosted["fallback"]["attempts"]
    assert len(attempts) >= 2
    assert attempts[0]["provider"] == "stability" and attempts[0]["outcome"] == "error"
    assert attempts[0]["error"] == "ProviderUnavailable" and attempts[0]["status_code"] == 503
    assert attempts[-1]["outcome"] == "success" and attempts[-1]["provider"] != "stability"
    assert hosted["fallback"]["provider"] == attempts[-1]["provider"]
    assert all(a["cost_usd"] == "0" for a in attempts[:-1])  # failed calls cost nothing


def test_the_budget_run_is_refused_with_the_budget_reason(hosted: dict[str, dict[str, Any]]) -> None:
    budget = hosted["budget"]
    assert budget["outcome"] == "refused" and budget["error"] in ("NoRouteError", "BudgetExceeded")
    assert budget["hosts"] == {} and budget["files"] == []  # nothing was called or billed
    assert budget["rejections"] and all("[budget]" in r for r in budget["rejections"])


def test_text_mode_prints_each_run(tmp_path: Path) -> None:
    buf = io.StringIO()
    assert run_demo(tmp_path, local=False, stream=buf) == 0
    text = buf.getvalue()
    for name in ("cheap", "quality", "eu", "fallback", "budget"):
        assert f"== {name}:" in text
    assert "attempt 1: stability/stable-image-core retry 0 -> ProviderUnavailable" in text
    assert "region eu" in text
    assert "refused: BudgetExceeded" in text or "refused: NoRouteError" in text
    assert f"wrote {tmp_path / 'cheap-0.png'}" in text


@pytest.mark.skipif(not local_available(), reason="torch and diffusers are not installed")
def test_the_local_run_serves_a_private_request_from_a_tiny_model(tmp_path: Path) -> None:
    runs = _runs(tmp_path, local=True)
    local = runs["local"]
    assert (local["provider"], local["model"], local["region"]) == ("local", "tiny-sd15", "local")
    assert local["hosts"] == {} and local["policy"] == "private"
    assert (tmp_path / "models" / "tiny-sd15" / "model_index.json").exists()
    with Image.open(local["files"][0]) as img:
        assert img.size == (64, 64)
