"""The OpenAI-compatible server, over real HTTP: the official openai client → uvicorn → router → sandbox."""

from __future__ import annotations

import base64
import contextlib
import io
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from providers.openai import OpenAIProvider
from providers.sandbox import Fault, OpenAISandbox
from router import AsyncRouter, ImageRequest
from router.errors import (
    AllProvidersFailed,
    AuthenticationError,
    BudgetExceeded,
    ContentPolicyError,
    DeadlineExceeded,
    MalformedResponse,
    NoRouteError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    RequestValidationError,
)
from router.keys import ServerKeys, hash_key
from router.server import ServerThread, api_error, create_app, serve
from tests.conftest import png

ROOT = Path(__file__).resolve().parents[1]


class RecordingOpenAI(OpenAIProvider):
    """The real OpenAI provider, also keeping every request the router handed it."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.seen: list[ImageRequest] = []

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> Any:
        self.seen.append(request)
        return await super().generate(request, model, timeout_s=timeout_s)


@dataclass
class Served:
    server: ServerThread
    router: AsyncRouter
    providers: list[RecordingOpenAI]
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key or self.keys["alice"], max_retries=0)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.server.origin}/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@contextlib.contextmanager
def _serve(sandboxes: list[OpenAISandbox], *, with_keys: bool = True, **app_kw: Any) -> Iterator[Served]:
    providers = [
        RecordingOpenAI(name="openai" if i == 0 else f"openai-{i}", api_key=sb.api_key, base_url=sb.base_url)
        for i, sb in enumerate(sandboxes)
    ]
    router = AsyncRouter(providers, ledger=":memory:", max_retries=0)
    keys = ServerKeys()
    issued = {}
    if with_keys:
        issued = {
            "alice": keys.add("alice"),
            "broke": keys.add("broke", budget_usd="0.001", period="day"),
            "slow": keys.add("slow", rpm=2),
        }
    app = create_app(router, keys=keys, close_router=True, **app_kw)
    with ServerThread(app) as server:
        yield Served(server, router, providers, issued)


@pytest.fixture
def served(sandbox: OpenAISandbox) -> Iterator[Served]:
    with _serve([sandbox]) as s:
        yield s


def _png_of(b64: str | None) -> Image.Image:
    assert b64
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _alpha_mask(width: int, height: int) -> bytes:
    """OpenAI's convention: alpha 0 on the left half (repaint), opaque on the right (keep)."""
    img = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- generations and edits through the official client --------------------------------------


def test_openai_client_generates_images_served_by_the_sandbox(served: Served, sandbox: OpenAISandbox) -> None:
    raw = served.client().images.with_raw_response.generate(prompt="a lighthouse at dusk", size="1536x1024", n=2)
    images = raw.parse()
    assert images.data is not None and len(images.data) == 2
    assert [_png_of(d.b64_json).size for d in images.data] == [(1536, 1024)] * 2
    assert images.size == "1536x1024" and images.output_format == "png"
    assert images.usage is not None and images.usage.output_tokens > 0
    sent = sandbox.requests[-1].json
    assert sent is not None and (sent["size"], sent["n"], sent["prompt"]) == ("1536x1024", 2, "a lighthouse at dusk")
    headers = raw.headers
    assert headers["x-imagerouter-provider"] == "openai" and headers["x-imagerouter-model"] == "gpt-image-2"
    assert headers["x-imagerouter-request-id"].startswith("ir_") and headers["x-imagerouter-attempts"] == "1"
    cost = Decimal(headers["x-imagerouter-cost-usd"])
    assert cost > 0 and Decimal(headers["x-imagerouter-estimated-cost-usd"]) > 0
    # the spend is in the ledger under the key's tag
    assert served.router.ledger.spent(["key:alice"], period="day") == cost
    assert served.router.ledger.spent(["key:broke"], period="day") == 0


def test_openai_client_edits_with_a_mask(served: Served, sandbox: OpenAISandbox) -> None:
    green = png(1024, 1024, (10, 200, 10))
    raw = served.client().images.with_raw_response.edit(
        image=("in.png", green, "image/png"),
        mask=("mask.png", _alpha_mask(1024, 1024), "image/png"),
        prompt="paint a red door",
    )
    edited = raw.parse()
    assert edited.data is not None and len(edited.data) == 1
    out = _png_of(edited.data[0].b64_json).convert("RGB")
    assert out.size == (1024, 1024)
    assert out.getpixel((1000, 500)) == (10, 200, 10)  # opaque in the mask: kept
    assert out.getpixel((10, 500)) != (10, 200, 10)  # alpha 0: repainted
    upstream = sandbox.requests[-1]
    assert upstream.path == "/v1/images/edits" and upstream.form["prompt"] == "paint a red door"
    mask = Image.open(io.BytesIO(upstream.files["mask"][0]))
    assert mask.getchannel("A").getpixel((10, 500)) == 0 and mask.getchannel("A").getpixel((1000, 500)) == 255
    request = served.providers[0].seen[-1]
    assert request.task == "inpaint" and "key:alice" in request.tags
    assert raw.headers["x-imagerouter-provider"] == "openai"


def test_extra_body_fields_reach_the_router_request(served: Served) -> None:
    raw = served.client().images.with_raw_response.generate(
        prompt="a red bicycle",
        size="1024x1024",
        extra_body={
            "seed": 7,
            "negative_prompt": "blurry",
            "tags": ["team-a"],
            "max_cost_usd": "0.5",
            "quality": "low",
        },
    )
    request = served.providers[0].seen[-1]
    assert request.seed == 7 and request.negative_prompt == "blurry"
    assert request.tags == {"team-a", "key:alice"}
    assert request.constraints.max_cost_usd == Decimal("0.5")
    assert request.provider_options == {"openai": {"quality": "low"}}  # OpenAI's own setting, forwarded
    assert (request.width, request.height) == (1024, 1024)
    warnings = raw.headers.get_list("x-imagerouter-warning")
    assert any("seed ignored" in w for w in warnings) and any("negative_prompt ignored" in w for w in warnings)
    assert raw.parse().model_extra["imagerouter"]["provider"] == "openai"  # type: ignore[index]


def test_multipart_edit_carries_json_encoded_router_fields(served: Served) -> None:
    served.client().images.edit(
        image=("in.png", png(1024, 1024), "image/png"), prompt="x", n=2, extra_body={"seed": "11", "tags": '["team-b"]'}
    )
    request = served.providers[0].seen[-1]
    assert request.seed == 11 and request.n == 2 and request.tags == {"team-b", "key:alice"}
    assert request.task == "img2img"


def test_response_format_url_is_served_as_data_urls(served: Served) -> None:
    images = served.client().images.generate(prompt="a cat", response_format="url")
    assert images.data and images.data[0].url and images.data[0].url.startswith("data:image/png;base64,")
    assert images.data[0].b64_json is None
    assert Image.open(io.BytesIO(base64.b64decode(images.data[0].url.split(",", 1)[1]))).format == "PNG"


# --- models ------------------------------------------------------------------------------


def test_model_names_pin_or_route(sandbox: OpenAISandbox, sandbox2: OpenAISandbox) -> None:
    with _serve([sandbox, sandbox2]) as s:
        client = s.client()
        listed = [(m.id, m.owned_by) for m in client.models.list()]
        assert listed == [("gpt-image-2", "openai"), ("openai-1/gpt-image-2", "openai-1")]
        assert client.models.retrieve("openai-1/gpt-image-2").owned_by == "openai-1"

        raw = client.images.with_raw_response.generate(prompt="a cat", model="openai-1/gpt-image-2")
        assert raw.headers["x-imagerouter-provider"] == "openai-1" and sandbox2.hits() == 1

        raw = client.images.with_raw_response.generate(prompt="a cat", model="dall-e-3")
        assert raw.headers["x-imagerouter-model"] == "gpt-image-2"
        assert "model dall-e-3 is not offered here; routed by policy" in raw.headers.get_list("x-imagerouter-warning")
        assert s.providers[0].seen[-1].model is None


def test_unknown_model_is_a_404_when_the_server_rejects_them(sandbox: OpenAISandbox) -> None:
    with _serve([sandbox], unknown_model="reject") as s:
        with pytest.raises(openai.NotFoundError) as info:
            s.client().images.generate(prompt="a cat", model="dall-e-3")
        assert info.value.code == "model_not_found" and sandbox.hits() == 0


# --- errors in OpenAI's shape ---------------------------------------------------------------


def test_a_wrong_key_is_a_401_authentication_error(served: Served, sandbox: OpenAISandbox) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        served.client("sk-ir-not-a-key-0123456789").images.generate(prompt="a cat")
    assert info.value.status_code == 401
    assert info.value.body == {
        "message": "Incorrect API key provided.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert "not-a-key" not in info.value.response.text
    missing = httpx.post(f"{served.base_url}/images/generations", json={"prompt": "a cat"})
    assert missing.status_code == 401 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert sandbox.hits() == 0


def test_an_exhausted_key_budget_is_a_429_rate_limit_error(served: Served, sandbox: OpenAISandbox) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        served.client(served.keys["broke"]).images.generate(prompt="a cat", size="1024x1024")
    assert info.value.status_code == 429 and info.value.code == "budget_exceeded"
    assert info.value.type == "insufficient_quota" and "budget" in info.value.message
    assert sandbox.hits() == 0
    served.client().images.generate(prompt="a cat")  # the other key has no such budget


def test_an_invalid_size_is_a_400_naming_the_size(served: Served, sandbox: OpenAISandbox) -> None:
    client = served.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a cat", size="big")
    assert info.value.status_code == 400 and info.value.param == "size" and info.value.code == "invalid_value"
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a cat", size="1001x1000")  # not a multiple of 8: the request's own check
    assert info.value.param == "size" and "multiple of 8" in info.value.message
    assert isinstance(info.value.body, dict) and set(info.value.body) == {"message", "type", "param", "code"}
    assert sandbox.hits() == 0


def test_unknown_fields_and_key_tags_are_refused(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a cat", extra_body={"sneaky": 1})
    assert info.value.param == "sneaky" and info.value.code == "unknown_parameter"
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a cat", extra_body={"tags": ["key:someone-else"]})
    assert info.value.param == "tags"
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a cat", extra_body={"policy": "/etc/policy.yaml"})
    assert info.value.param == "policy"


def test_server_paths_are_never_read_as_images(served: Served, tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(64, 64))
    with pytest.raises(openai.BadRequestError) as info:
        served.client().images.generate(prompt="a cat", extra_body={"init_image": str(secret)})
    assert info.value.param == "init_image" and served.providers[0].seen == []
    with pytest.raises(openai.BadRequestError):
        served.client().images.generate(prompt="a cat", extra_body={"init_image": "https://example.com/a.png"})


def test_every_provider_failing_is_a_502(served: Served, sandbox: OpenAISandbox) -> None:
    sandbox.faults.push(Fault.server_error(500), times=None)
    with pytest.raises(openai.InternalServerError) as info:
        served.client().images.generate(prompt="a cat")
    assert info.value.status_code == 502 and info.value.code == "all_providers_failed"
    assert info.value.response.headers["x-imagerouter-request-id"].startswith("ir_")


def test_a_provider_refusing_the_servers_credentials_is_not_the_clients_401(sandbox: OpenAISandbox) -> None:
    router = AsyncRouter(
        [OpenAIProvider(api_key="sk-wrong-upstream-key-123", base_url=sandbox.base_url)], ledger=":memory:"
    )
    with ServerThread(create_app(router, close_router=True)) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="anything", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.images.generate(prompt="a cat")
    assert info.value.status_code == 502 and info.value.code == "upstream_authentication"
    assert "sk-wrong-upstream-key-123" not in info.value.response.text


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (RequestValidationError([("width", "must be a multiple of 8")]), 400, "invalid_value"),
        (BudgetExceeded("budget day:* ($1.00) would be exceeded"), 429, "budget_exceeded"),
        (NoRouteError("no provider can serve this control request"), 400, "no_route"),
        (AllProvidersFailed("every provider failed"), 502, "all_providers_failed"),
        (DeadlineExceeded("the request's deadline passed"), 504, "deadline_exceeded"),
        (AuthenticationError("HTTP 401: the API key was refused", provider="openai"), 502, "upstream_authentication"),
        (ContentPolicyError("rejected by the safety system"), 400, "content_policy_violation"),
        (RateLimited("HTTP 429"), 429, "rate_limit_exceeded"),
        (ProviderUnavailable("HTTP 503"), 502, "upstream_error"),
        (ProviderTimeout("no answer in 30s"), 502, "upstream_error"),
        (MalformedResponse("not an image"), 502, "upstream_error"),
    ],
)
def test_router_errors_map_to_openai_statuses(error: Exception, status: int, code: str) -> None:
    answer = api_error(error)  # type: ignore[arg-type]
    assert (answer.status, answer.code) == (status, code)
    if isinstance(error, RequestValidationError):
        assert answer.param == "size"


# --- limits ----------------------------------------------------------------------------------


def test_bodies_over_the_limit_are_a_413_before_reading_them(sandbox: OpenAISandbox) -> None:
    with _serve([sandbox], max_body_bytes=8192, max_image_bytes=2048) as s:
        headers = {"authorization": f"Bearer {s.keys['alice']}"}
        url = f"{s.base_url}/images/generations"
        big = httpx.post(url, json={"prompt": "x" * 10_000}, headers=headers)
        assert big.status_code == 413 and big.text == "Content Too Large"  # FastAPI's max_body_size answers

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 1024
            yield b'"}'

        chunked = httpx.post(url, content=chunks(), headers={**headers, "content-type": "application/json"})
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"

        with pytest.raises(openai.APIStatusError) as info:
            s.client().images.edit(image=("in.png", png(512, 512, (1, 2, 3)) + b"\0" * 3000, "image/png"), prompt="x")
        assert info.value.status_code == 413 and info.value.param == "image"
        assert sandbox.hits() == 0 and s.providers[0].seen == []
        small = s.client().images.generate(prompt="a cat")
        assert small.data


def test_malformed_multipart_edits_are_a_400_naming_the_problem(served: Served, sandbox: OpenAISandbox) -> None:
    url = f"{served.base_url}/images/edits"
    auth = {"authorization": f"Bearer {served.keys['alice']}"}
    image = ("in.png", png(64, 64), "image/png")

    def post(**kw: Any) -> tuple[int, dict[str, Any]]:
        answer = httpx.post(url, headers={**auth, **kw.pop("headers", {})}, **kw)
        return answer.status_code, answer.json()["error"]

    status, error = post(data={"prompt": "x"}, files=[("image", image)] * 5)
    assert status == 400 and "Too many files" in error["message"]
    status, error = post(data={"prompt": "x"}, files={"image": image, "other": image})
    assert status == 400 and error["param"] == "other" and error["code"] == "unknown_parameter"
    status, error = post(data={"prompt": "x"}, files=[("image", image), ("image[]", image)])
    assert status == 400 and "one 'image' file" in error["message"]
    status, error = post(data={"prompt": "x", "image": "not a file"}, files={"mask": image})
    assert status == 400 and error["param"] == "image" and error["code"] == "invalid_type"
    status, error = post(data={"prompt": "x"}, files={"mask": image})
    assert status == 400 and error["code"] == "missing_required_parameter"
    status, error = post(data={"prompt": "x"})  # a urlencoded form
    assert status == 400 and "multipart/form-data" in error["message"]
    status, error = post(data={"prompt": "x" * (1024 * 1024 + 1)}, files={"image": image})
    assert status == 400 and "maximum size" in error["message"]
    status, error = post(content=b"--b\r\nno headers here", headers={"content-type": "multipart/form-data"})
    assert status == 400 and "boundary" in error["message"]
    status, error = post(
        content=b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert status == 400 and '"name" must be provided' in error["message"]
    assert sandbox.hits() == 0 and served.providers[0].seen == []


# --- the other endpoints -----------------------------------------------------------------------


def test_route_is_a_dry_run_that_explains_the_decision(served: Served, sandbox: OpenAISandbox) -> None:
    answer = httpx.post(
        f"{served.base_url}/route",
        json={"prompt": "three red apples", "size": "1024x1024"},
        headers={"authorization": f"Bearer {served.keys['alice']}"},
    )
    assert answer.status_code == 200
    body = answer.json()
    assert body["decision"]["chain"][0]["provider"] == "openai" and body["decision"]["task"] == "txt2img"
    assert "chain (tried in this order)" in body["explain"]
    assert sandbox.hits() == 0 and served.router.ledger.report() == []


def test_healthz_reports_the_providers(served: Served) -> None:
    answer = httpx.get(f"{served.server.origin}/healthz")
    assert answer.json() == {"status": "ok", "providers": {"openai": {"configured": True, "circuit_open": False}}}


def test_metrics_count_requests_errors_cost_and_images(served: Served) -> None:
    before = served.metrics()
    client = served.client()
    raw = client.images.with_raw_response.generate(prompt="a cat", n=2)
    cost = float(raw.headers["x-imagerouter-cost-usd"])
    for call in (
        lambda: served.client("sk-ir-wrong-0123456789abcdef").images.generate(prompt="a cat"),
        lambda: served.client(served.keys["broke"]).images.generate(prompt="a cat"),
        lambda: client.images.generate(prompt="a cat", size="big"),
    ):
        with pytest.raises(openai.APIStatusError):
            call()
    after = served.metrics()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    gen = "/v1/images/generations"
    for status in ("200", "401", "429", "400"):
        assert delta("imagerouter_http_requests_total", endpoint=gen, method="POST", status=status) == 1
    assert delta("imagerouter_errors_total", error="InvalidAPIKey") == 1
    assert delta("imagerouter_errors_total", error="BudgetExceeded") == 1  # the budget filter left no route
    assert delta("imagerouter_errors_total", error="InvalidRequest") == 1
    assert delta("imagerouter_images_total", provider="openai") == 2
    assert delta("imagerouter_cost_usd_total", provider="openai") == pytest.approx(cost)
    assert delta("imagerouter_generations_total", provider="openai", model="gpt-image-2") == 1
    assert delta("imagerouter_http_request_duration_seconds_count", endpoint=gen) == 4


def test_without_keys_the_app_is_open_but_serve_only_binds_loopback(sandbox: OpenAISandbox) -> None:
    with _serve([sandbox], with_keys=False) as s:
        assert s.client("anything-at-all").images.generate(prompt="a cat").data
    with pytest.raises(ValueError, match="without client keys"):
        serve("0.0.0.0", 0)


# --- keys ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_key_files_hold_only_hashes_and_budgets(tmp_path: Path, suffix: str) -> None:
    keys = ServerKeys()
    key = keys.add("team-a", budget_usd="5.00", period="day", tags=["client-eu"], rpm=30)
    assert key.startswith("sk-ir-") and len(key) > 40
    path = keys.save(tmp_path / f"keys{suffix}")
    assert key not in path.read_text() and hash_key(key) in path.read_text()
    loaded = ServerKeys.from_file(path)
    entry = loaded.verify(key)
    assert entry is not None and entry.name == "team-a" and entry.tag == "key:team-a"
    assert entry.budget is not None and (entry.budget.limit_usd, entry.budget.period) == (Decimal("5.00"), "day")
    assert entry.tags == {"client-eu"} and entry.rpm == 30
    assert loaded.verify(key + "x") is None and loaded.verify("") is None


def test_key_budgets_are_set_in_the_routers_ledger(sandbox: OpenAISandbox) -> None:
    with _serve([sandbox]) as s:
        budgets = {(b.tag, b.period): b.limit_usd for b in s.router.ledger.budgets()}
        assert budgets == {("key:broke", "day"): Decimal("0.001")}


def test_a_key_file_with_a_plain_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nname = "a"\nsha256 = "sk-ir-plaintext-key"\n')
    with pytest.raises(ValueError, match="64 lower-case hex"):
        ServerKeys.from_file(path)


# --- the example ------------------------------------------------------------------------------------


def test_the_server_example_runs_offline(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "server_client.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "IMAGEROUTER_LEDGER": ":memory:", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "models: gpt-image-2 (openai)" in out
    assert "generate: served by openai/gpt-image-2" in out and "edit: served by openai/gpt-image-2" in out
    assert "warning: seed ignored" in out
    assert "sandbox calls: 1 generation, 1 edit" in out
    assert Image.open(tmp_path / "lighthouse.png").size == (1024, 1024)
    assert Image.open(tmp_path / "lighthouse-edit.png").size == (1024, 1024)


def test_the_key_file_is_authoritative_for_key_budgets_in_a_ledger_file(tmp_path: Path) -> None:
    from router.ledger import Budget, Ledger

    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        ledger.set_budget(Budget(Decimal(3), "month", "key:gone"))  # a key since removed from the file
        ledger.set_budget(Budget(Decimal(9), "month", "team-a"))  # not a key budget: left alone
        keys = ServerKeys()
        keys.add("kept", budget_usd=2, period="day")
        keys.apply_budgets(ledger)
        assert {(b.tag, b.period, b.limit_usd) for b in ledger.budgets()} == {
            ("key:kept", "day", Decimal(2)),
            ("team-a", "month", Decimal(9)),
        }


async def test_concurrent_requests_are_each_served_and_counted(served: Served, sandbox: OpenAISandbox) -> None:
    import asyncio

    client = openai.AsyncOpenAI(base_url=served.base_url, api_key=served.keys["alice"], max_retries=0)
    async with client:
        results = await asyncio.gather(
            *(client.images.with_raw_response.generate(prompt=f"cat {i}") for i in range(16))
        )
    ids = {r.headers["x-imagerouter-request-id"] for r in results}
    assert len(ids) == 16 and sandbox.hits("/v1/images/generations") == 16
    total = sum(Decimal(r.headers["x-imagerouter-cost-usd"]) for r in results)
    assert served.router.ledger.spent(["key:alice"], period="day") == total
    counted = served.metrics()[
        (
            "imagerouter_http_requests_total",
            (("endpoint", "/v1/images/generations"), ("method", "POST"), ("status", "200")),
        )
    ]
    assert counted == 16


def test_a_key_over_its_request_rate_is_a_429_with_retry_after(served: Served, sandbox: OpenAISandbox) -> None:
    slow = served.client(served.keys["slow"])
    slow.images.generate(prompt="a cat")
    slow.images.generate(prompt="a cat")
    with pytest.raises(openai.RateLimitError) as info:
        slow.images.generate(prompt="a cat")
    assert info.value.code == "rate_limit_exceeded" and "2 image requests per minute" in info.value.message
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 30
    assert sandbox.hits() == 2  # the refused request never reached a provider
    served.client().images.generate(prompt="a cat")  # other keys have their own buckets
    assert served.metrics()[("imagerouter_errors_total", (("error", "RateLimited"),))] == 1


def test_the_rate_limiter_refills_over_time() -> None:
    from router.keys import RateLimiter

    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.take("k", 60) for _ in range(60)] == [0.0] * 60
    assert limiter.take("k", 60) == pytest.approx(1.0)
    now[0] = 0.5
    assert limiter.take("k", 60) == pytest.approx(0.5)
    now[0] = 1.0
    assert limiter.take("k", 60) == 0.0 and limiter.take("other", 1) == 0.0
    with pytest.raises(ValueError, match="rpm"):
        ServerKeys().add("bad", rpm=0)
