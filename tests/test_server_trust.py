"""The server's trust boundary: the operator, not the client, decides safety settings and file access.

A client key cannot switch a safety option, cannot name a server path as a LoRA, and cannot learn from
the answers whether a path exists; a key file others may write is refused at start.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from providers.base import Billing, Capabilities, Estimate, Provider, ProviderResponse
from providers.openai import OpenAIProvider
from providers.sandbox import OpenAISandbox
from router import AsyncRouter, ImageRequest
from router.cli import main
from router.errors import InvalidRequestError
from router.keys import KeyFileError, ServerKeys, option_allowed
from router.result import GeneratedImage
from router.server import ServerThread, create_app, serve
from tests.conftest import png


class LoraTaker(Provider):
    """A provider that takes LoRAs and records every request; ``fail_with`` makes it refuse one."""

    kind = "lora-taker"

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[ImageRequest] = []
        self.fail_with: str | None = None

    def models(self) -> Sequence[str]:
        return ["lt-1"]

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(tasks=frozenset({"txt2img"}), max_n=4, max_loras=2, regions=frozenset({"local"}))

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        return Estimate(Decimal("0.01"), 0.1)

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        self.seen.append(request)
        if self.fail_with is not None:
            raise InvalidRequestError(self.fail_with, provider=self.name)
        image = GeneratedImage(png(), "image/png", 64, 64)
        return ProviderResponse([image], model, Billing(Decimal("0.01"), "image", Decimal(1)))


@dataclass
class Running:
    server: ServerThread
    keys: dict[str, str]

    def post(self, body: dict[str, Any], key: str = "plain", path: str = "/images/generations") -> httpx.Response:
        return httpx.post(
            f"{self.server.base_url}{path}",
            json=body,
            headers={"authorization": f"Bearer {self.keys[key]}"},
            timeout=30,
        )


@contextlib.contextmanager
def _running(providers: list[Provider], **app_kw: Any) -> Iterator[Running]:
    keys = ServerKeys()
    issued = {
        "plain": keys.add("plain"),  # the server's default list
        "wild": keys.add("wild", provider_options=["*"]),  # every option, but a wildcard grants no safety switch
        "quality-only": keys.add("quality-only", provider_options=["quality"]),
        "moderator": keys.add("moderator", provider_options=["openai.moderation"]),
    }
    router = AsyncRouter(providers, ledger=":memory:", max_retries=0)
    with ServerThread(create_app(router, keys=keys, close_router=True, **app_kw)) as server:
        yield Running(server, issued)


@pytest.fixture
def openai_server(sandbox: OpenAISandbox) -> Iterator[Running]:
    with _running([OpenAIProvider(api_key=sandbox.api_key, base_url=sandbox.base_url)]) as running:
        yield running


# --- safety switches ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["plain", "wild"])
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"provider_options": {"local": {"safety_checker": False}}}, "provider_options.local.safety_checker"),
        (
            {"provider_options": {"replicate": {"disable_safety_checker": True}}},
            "provider_options.replicate.disable_safety_checker",
        ),
        (
            {"provider_options": {"together": {"disable_safety_checker": True}}},
            "provider_options.together.disable_safety_checker",
        ),
        ({"provider_options": {"bfl": {"safety_tolerance": 6}}}, "provider_options.bfl.safety_tolerance"),
        ({"provider_options": {"openai": {"moderation": "low"}}}, "provider_options.openai.moderation"),
        ({"moderation": "low"}, "moderation"),  # OpenAI's own top-level field
        ({"provider_options": {"local": {"Safety-Checker": False}}}, "provider_options.local.Safety-Checker"),
    ],
)
def test_a_client_key_cannot_switch_a_safety_option(
    openai_server: Running, sandbox: OpenAISandbox, fields: dict[str, Any], param: str, key: str
) -> None:
    answer = openai_server.post({"prompt": "a cat", **fields}, key=key)
    assert answer.status_code == 403
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("option_not_allowed", param)
    assert "safety setting" in error["message"] and "operator" in error["message"]
    assert sandbox.hits() == 0


def test_the_official_client_gets_a_permission_error_for_a_safety_option(
    openai_server: Running, sandbox: OpenAISandbox
) -> None:
    client = openai.OpenAI(base_url=openai_server.server.base_url, api_key=openai_server.keys["plain"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.images.generate(prompt="a cat", moderation="low")
    assert info.value.code == "option_not_allowed" and sandbox.hits() == 0


def test_a_key_the_operator_allows_may_set_that_safety_option(openai_server: Running, sandbox: OpenAISandbox) -> None:
    answer = openai_server.post({"prompt": "a cat", "moderation": "low"}, key="moderator")
    assert answer.status_code == 200, answer.text
    sent = sandbox.requests[-1].json
    assert sent is not None and sent["moderation"] == "low"
    # only what it names: not another option, not another provider's switch
    other = openai_server.post({"prompt": "a cat", "quality": "low"}, key="moderator")
    assert other.status_code == 403 and other.json()["error"]["param"] == "quality"
    switch = openai_server.post(
        {"prompt": "a cat", "provider_options": {"local": {"safety_checker": False}}}, key="moderator"
    )
    assert switch.status_code == 403 and sandbox.hits() == 1


def test_ordinary_options_follow_the_keys_allow_list(openai_server: Running, sandbox: OpenAISandbox) -> None:
    assert openai_server.post({"prompt": "a cat", "quality": "low"}, key="quality-only").status_code == 200
    refused = openai_server.post({"prompt": "a cat", "background": "opaque"}, key="quality-only")
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "background"
    nested = openai_server.post(
        {"prompt": "a cat", "provider_options": {"openai": {"background": "opaque"}}}, key="quality-only"
    )
    assert nested.status_code == 403 and nested.json()["error"]["param"] == "provider_options.openai.background"
    assert openai_server.post({"prompt": "a cat", "background": "opaque"}, key="plain").status_code == 200
    assert sandbox.hits() == 2


def test_the_servers_default_list_applies_to_keys_without_one(sandbox: OpenAISandbox) -> None:
    provider = OpenAIProvider(api_key=sandbox.api_key, base_url=sandbox.base_url)
    with _running([provider], client_options=[]) as running:
        assert running.post({"prompt": "a cat", "quality": "low"}, key="plain").status_code == 403
        assert running.post({"prompt": "a cat", "quality": "low"}, key="quality-only").status_code == 200
    assert sandbox.hits() == 1


def test_the_servers_default_list_cannot_grant_a_safety_switch(sandbox: OpenAISandbox) -> None:
    router = AsyncRouter([OpenAIProvider(api_key=sandbox.api_key, base_url=sandbox.base_url)], ledger=":memory:")
    for entries in (["moderation"], ["local.safety_checker"], ["quality", "bfl.safety_tolerance"]):
        with pytest.raises(ValueError, match="allow them per key"):
            create_app(router, client_options=entries)


@pytest.mark.parametrize(
    ("entries", "provider", "option", "allowed"),
    [
        (["*"], "openai", "quality", True),
        (["*"], "local", "safety_checker", False),
        (["local.*"], "local", "safety_checker", False),
        (["local.*"], "local", "mask_blur", True),
        (["local.*"], "openai", "quality", False),
        (["safety_checker"], "local", "safety_checker", True),
        (["local.safety_checker"], "local", "safety_checker", True),
        (["local.safety_checker"], "other-local", "safety_checker", False),
        (["quality"], "openai", "background", False),
        ([], "openai", "quality", False),
    ],
)
def test_option_allow_lists(entries: list[str], provider: str, option: str, allowed: bool) -> None:
    assert option_allowed(frozenset(entries), provider, option) is allowed


# --- LoRA references -------------------------------------------------------------------------------------


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    root.mkdir()
    (root / "film-grain.safetensors").write_bytes(b"lora")
    (root / "styles").mkdir()
    (root / "styles" / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    (root / "empty").mkdir()
    (root / "pickled.bin").write_bytes(b"pickle")
    (root / "notes.txt").write_bytes(b"text")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"lora")
    (root / "escape.safetensors").symlink_to(outside)  # a link out of the directory is not followed
    return root


@pytest.fixture
def lora_server(lora_dir: Path) -> Iterator[tuple[Running, LoraTaker]]:
    provider = LoraTaker()
    with _running([provider], lora_dirs=[lora_dir]) as running:
        yield running, provider


MISSES = [
    "/etc/passwd",
    "/etc/nonexistent",
    "~/.ssh/id_ed25519",
    "~",
    "../outside",
    "../outside.safetensors",
    "styles/../film-grain",
    "./film-grain",
    ".",
    "..",
    "missing",
    "outside",
    "escape",
    "empty",
    "pickled.bin",
    "pickled",
    "notes.txt",
    "notes",
    "film-grain\x00",
    "C:\\Windows\\win.ini",
    "file:///etc/passwd",
]


def test_every_lora_miss_has_the_same_answer(lora_server: tuple[Running, LoraTaker], tmp_path: Path) -> None:
    running, provider = lora_server
    answers = {ref: running.post({"prompt": "a cat", "loras": [{"ref": ref, "weight": 0.5}]}) for ref in MISSES}
    assert {a.status_code for a in answers.values()} == {400}
    errors = [a.json()["error"] for a in answers.values()]
    assert len({e["message"] for e in errors}) == 1  # one text for a path that exists, one that does not, ...
    assert {(e["code"], e["param"]) for e in errors} == {("lora_not_found", "loras.0.ref")}
    message = errors[0]["message"]
    assert "name" in message and str(tmp_path) not in message and "/etc" not in message
    assert provider.seen == []


def test_a_lora_is_named_and_found_in_the_operators_directories(
    lora_server: tuple[Running, LoraTaker], lora_dir: Path
) -> None:
    running, provider = lora_server
    answer = running.post({"prompt": "a cat", "loras": [{"ref": "film-grain", "weight": 0.7}, {"ref": "styles"}]})
    assert answer.status_code == 200, answer.text
    loras = provider.seen[-1].loras
    assert [(lora.ref, lora.weight) for lora in loras] == [
        (str(lora_dir.resolve() / "film-grain.safetensors"), 0.7),
        (str(lora_dir.resolve() / "styles" / "pytorch_lora_weights.safetensors"), 1.0),
    ]
    assert running.post({"prompt": "a cat", "loras": [{"ref": "film-grain.safetensors"}]}).status_code == 200


def test_a_backend_error_about_a_lora_names_it_as_the_client_did(
    lora_server: tuple[Running, LoraTaker], lora_dir: Path
) -> None:
    running, provider = lora_server
    provider.fail_with = f"LoRA '{lora_dir.resolve() / 'film-grain.safetensors'}': was trained for sdxl"
    answer = running.post({"prompt": "a cat", "loras": [{"ref": "film-grain"}]})
    assert answer.status_code in (400, 502)
    text = answer.text
    assert "film-grain" in text and str(lora_dir) not in text and str(lora_dir.resolve()) not in text


def test_without_lora_directories_no_client_lora_is_found(sandbox: OpenAISandbox) -> None:
    provider = LoraTaker()
    with _running([provider]) as running:
        answer = running.post({"prompt": "a cat", "loras": [{"ref": "film-grain"}]})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "lora_not_found"
    assert provider.seen == []


def test_lora_directories_must_exist(tmp_path: Path) -> None:
    router = AsyncRouter([LoraTaker()], ledger=":memory:")
    with pytest.raises(ValueError, match="not a directory"):
        create_app(router, lora_dirs=[tmp_path / "nope"])


# --- the key file --------------------------------------------------------------------------------------


def _key_file(tmp_path: Path, mode: int) -> Path:
    keys = ServerKeys()
    keys.add("alice")
    path = keys.save(tmp_path / "keys.toml")
    path.chmod(mode)
    return path


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize(("mode", "who"), [(0o666, "group and others"), (0o646, "others"), (0o620, "group")])
def test_a_key_file_others_may_write_is_refused_with_the_fix(tmp_path: Path, mode: int, who: str) -> None:
    path = _key_file(tmp_path, mode)
    with pytest.raises(KeyFileError) as info:
        ServerKeys.from_file(path)
    assert f"writable by {who}" in str(info.value) and f"chmod go-w {path}" in str(info.value)
    with pytest.raises(KeyFileError, match="chmod go-w"):
        serve("127.0.0.1", 0, keys_file=path)
    path.chmod(0o600)
    assert len(ServerKeys.from_file(path)) == 1


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_serve_on_the_command_line_says_how_to_fix_the_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _key_file(tmp_path, 0o666)
    assert main(["serve", "--keys", str(path), "--port", "0"]) == 3  # a key-file error: exit 3
    err = capsys.readouterr().err
    assert "writable by group and others" in err and f"chmod go-w {path}" in err


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_saved_key_files_are_writable_by_their_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o002)  # a umask that leaves new files group-writable
    try:
        path = _key_file(tmp_path, 0o600)
        path.unlink()
        keys = ServerKeys()
        keys.add("bob")
        keys.save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        path.chmod(0o664)
        keys.save(path)  # an existing file loses group and world write
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(old)


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_key_files_keep_each_keys_provider_options(tmp_path: Path, suffix: str) -> None:
    keys = ServerKeys()
    key = keys.add("carol", provider_options=["quality", "local.safety_checker", "openai.*"])
    default = keys.add("dave")
    loaded = ServerKeys.from_file(keys.save(tmp_path / f"keys{suffix}"))
    carol, dave = loaded.verify(key), loaded.verify(default)
    assert carol is not None and carol.provider_options == {"quality", "local.safety_checker", "openai.*"}
    assert dave is not None and dave.provider_options is None


@pytest.mark.parametrize("entries", [["local/safety_checker"], ["a b"], [""], ["*.*"], "quality"])
def test_malformed_option_entries_are_refused(tmp_path: Path, entries: Any) -> None:
    path = tmp_path / "keys.toml"
    listed = repr(entries) if isinstance(entries, str) else "[" + ", ".join(f'"{e}"' for e in entries) + "]"
    path.write_text(
        f'[[keys]]\nname = "a"\nsha256 = "{"0" * 64}"\nprovider_options = {listed.replace(chr(39), chr(34))}\n'
    )
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="provider_options"):
        ServerKeys.from_file(path)


def test_the_keys_command_records_the_options_a_key_may_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.toml"
    assert (
        main(
            ["keys", "erin", "--allow-option", "quality", "--allow-option", "local.safety_checker", "--file", str(path)]
        )
        == 0
    )
    key = capsys.readouterr().out.strip()
    entry = ServerKeys.from_file(path).verify(key)
    assert entry is not None and entry.provider_options == {"quality", "local.safety_checker"}
    assert 'provider_options = ["local.safety_checker", "quality"]' in path.read_text()
