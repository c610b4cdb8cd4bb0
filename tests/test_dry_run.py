"""A dry run that answers: with no keys, `route` ranks every provider as if configured and marks each with
what to set, while `generate` still never calls a provider that is not configured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from policies.decision import CHAIN_LIMIT
from providers.openai import OpenAIProvider
from providers.registry import available_providers
from providers.sandbox import OpenAISandbox
from router import NoRouteError, Router
from router.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a sign that says OPEN, three red apples on a table"
KEYS = {"openai": "OPENAI_API_KEY", "stability": "STABILITY_API_KEY", "replicate": "REPLICATE_API_TOKEN",
        "together": "TOGETHER_API_KEY", "bfl": "BFL_API_KEY", "xai": "XAI_API_KEY", "fal": "FAL_KEY",
        "ideogram": "IDEOGRAM_API_KEY",
        "google": "GEMINI_API_KEY (or GOOGLE_API_KEY), or give GoogleProvider project= and locations= for Vertex AI"}
_SETTINGS = ("OPENAI", "STABILITY", "REPLICATE", "TOGETHER", "BFL", "GEMINI", "GOOGLE", "XAI", "FAL", "IDEOGRAM",
             "IMAGEROUTER")


def keyless_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SETTINGS)}
    return env | {"IMAGEROUTER_LEDGER": ":memory:"}


@pytest.fixture
def no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(_SETTINGS):
            monkeypatch.delenv(name)
    monkeypatch.setenv("IMAGEROUTER_LEDGER", ":memory:")


def pixroute() -> list[str]:
    """The installed command, or the module where the package runs from its source tree."""
    script = Path(sys.executable).with_name("pixroute")
    return [str(script)] if script.exists() else [sys.executable, "-m", "router.cli"]


def test_a_keyless_route_explain_shows_a_ranked_chain() -> None:
    out = subprocess.run([*pixroute(), "route", PROMPT, "--explain"], capture_output=True, text=True, cwd=ROOT,
                         env=keyless_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"dry run: {len(KEYS)} provider(s) not configured ({', '.join(sorted(KEYS))})")
    assert lines[1] == "with the configuration as it is now: no configured provider can serve this request"
    start = lines.index("chain (tried in this order):")
    first, mark = lines[start + 1], lines[start + 2]
    assert first.startswith("  1. ") and " score " in first and "est $" in first
    provider = first.split()[1].split("/")[0]
    assert mark.strip() == f"not configured: set {KEYS[provider]}"
    ranked = [line for line in lines if line.startswith("  ") and ". " in line and " score " in line]
    assert len(ranked) > 4 and f"{CHAIN_LIMIT}, max_chain 4:" in lines  # the whole ranking, past the chain
    for key in KEYS.values():
        assert f"not configured: set {key}" in out.stdout
    assert "local/-: [not-configured] no local models" in out.stdout  # nothing to rank without a catalog


def test_a_keyless_route_json_ranks_every_offered_model(no_keys: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", PROMPT, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["dry_run"] is True and data["configured_chain"] == []
    assert data["not_configured"] == {name: f"not configured: set {key}" for name, key in KEYS.items()}
    ranked = data["chain"] + data["beyond"]
    assert len(data["chain"]) == data["max_chain"] == 4 and data["beyond"]
    assert [c["rank"] for c in ranked] == list(range(1, len(ranked) + 1))
    assert all(c["configuration_problem"] == f"not configured: set {KEYS[c['provider']]}" for c in ranked)
    assert {c["status"] for c in data["beyond"]} == {CHAIN_LIMIT}
    assert [c["score"] for c in ranked] == sorted((c["score"] for c in ranked), reverse=True)
    seen = {c["provider"] for c in ranked} | {r["provider"] for r in data["rejections"]}
    assert seen == set(available_providers())
    # what is left out is left out for what it cannot do, not for a missing key
    assert {r["code"] for r in data["rejections"] if r["model"] != "-"} == {"capability"}


def test_route_configured_only_is_the_decision_generate_makes(no_keys: None,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["route", PROMPT, "--json", "--configured-only"]) == 6  # no route: the exit code says so
    data = json.loads(capsys.readouterr().out)
    assert data["dry_run"] is False and data["chain"] == [] and data["beyond"] == []
    assert {r["code"] for r in data["rejections"]} == {"not-configured"}
    assert main(["route", PROMPT]) == 0
    chosen = capsys.readouterr().out.strip()
    assert chosen.endswith("[not configured: set " + KEYS[chosen.split("/")[0]] + "]")


def test_router_route_ranks_a_keyless_provider_and_generate_refuses_it(
        no_keys: None, sandbox: OpenAISandbox) -> None:
    keyless = OpenAIProvider(base_url=sandbox.base_url)
    with Router([keyless], ledger=":memory:") as router:
        dry = router.route(PROMPT)
        real = router.route(PROMPT, assume_configured=False)
        with pytest.raises(NoRouteError) as refused:
            router.generate(PROMPT)
    assert [(c.provider, c.model, c.configuration_problem) for c in dry.chain] == [
        ("openai", "gpt-image-2", "not configured: set OPENAI_API_KEY")]
    assert dry.not_configured == {"openai": "not configured: set OPENAI_API_KEY"} and dry.configured_chain == []
    assert dry.explain().startswith("dry run: 1 provider(s) not configured (openai)")
    assert real.chain == [] and [r.code for r in real.rejections] == ["not-configured"]
    assert [r.code for r in refused.value.rejections] == ["not-configured"]
    assert sandbox.hits() == 0  # the walk never calls a provider that is not configured


def test_with_some_keys_the_dry_run_says_where_generate_goes_and_generate_goes_there(
        no_keys: None, sandbox: OpenAISandbox, sandbox2: OpenAISandbox) -> None:
    keyless = OpenAIProvider(base_url=sandbox.base_url)  # registered first: it wins the tie
    backup = OpenAIProvider(name="openai-backup", api_key=sandbox2.api_key, base_url=sandbox2.base_url)
    with Router([keyless, backup], ledger=":memory:") as router:
        dry = router.route("a cat", width=1024, height=1024)
        result = router.generate("a cat", width=1024, height=1024)
    assert [c.provider for c in dry.chain] == ["openai", "openai-backup"]
    assert [c.provider for c in dry.configured_chain] == ["openai-backup"]
    assert "with the configuration as it is now: openai-backup/gpt-image-2 first" in dry.explain()
    assert result.provider == "openai-backup" and [a.provider for a in result.attempts] == ["openai-backup"]
    assert [(r.provider, r.code) for r in result.decision.rejections] == [("openai", "not-configured")]
    assert sandbox.hits() == 0 and sandbox2.hits() == 1
