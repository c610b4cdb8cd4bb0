"""The server's limits and shapes: bodies capped before they are buffered, the bodies in flight capped
across requests, Starlette's multipart limits, strictly typed fields, the schema served, and each
failure with its own status (no route 400, budget 429, upstream 502, deadline 504).

benchmarks/server_memory.py measures the memory these limits hold the server to.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from providers.base import Billing, Capabilities, Estimate, Provider, ProviderResponse
from providers.openai import OpenAIProvider
from providers.sandbox import Fault, OpenAISandbox
from router import AsyncRouter, ImageRequest
from router.keys import ServerKeys
from router.result import GeneratedImage
from router.server import ServerThread, _BodyBytes, create_app
from tests.conftest import png


class Gate(Provider):
    """Answers once ``opened`` is set; records the requests it holds."""

    kind = "gate"

    def __init__(self) -> None:
        super().__init__()
        self.opened = threading.Event()
        self.seen: list[ImageRequest] = []

    def models(self) -> Sequence[str]:
        return ["gate-1"]

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(tasks=frozenset({"txt2img"}), max_n=4)

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        return Estimate(Decimal("0.01"), 0.1)

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        self.seen.append(request)
        while not self.opened.is_set():
            await asyncio.sleep(0.005)
        image = GeneratedImage(png(), "image/png", 64, 64)
        return ProviderResponse([image], model, Billing(Decimal("0.01"), "image", Decimal(1)))


@dataclass
class Running:
    server: ServerThread
    app: Any
    key: str

    @property
    def url(self) -> str:
        return f"{self.server.base_url}/images/generations"

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}

    def post(self, body: dict[str, Any], path: str = "/images/generations") -> httpx.Response:
        return httpx.post(f"{self.server.base_url}{path}", json=body, headers=self.auth, timeout=30)

    @property
    def held(self) -> int:
        held: int = self.app.state.imagerouter.bodies.held
        return held


@contextlib.contextmanager
def _running(providers: list[Provider], **app_kw: Any) -> Iterator[Running]:
    keys = ServerKeys()
    key = keys.add("alice")
    router = AsyncRouter(providers, ledger=":memory:", max_retries=0)
    app = create_app(router, keys=keys, close_router=True, **app_kw)
    with ServerThread(app) as server:
        yield Running(server, app, key)


@pytest.fixture
def running(sandbox: OpenAISandbox) -> Iterator[Running]:
    with _running([OpenAIProvider(api_key=sandbox.api_key, base_url=sandbox.base_url)]) as r:
        yield r


# --- strictly typed fields ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"n": "2"}, "n", "invalid_type"),
        ({"n": True}, "n", "invalid_type"),
        ({"n": 2.0}, "n", "invalid_type"),
        ({"n": 0}, "n", "invalid_value"),
        ({"stream": "true"}, "stream", "invalid_type"),
        ({"stream": 1}, "stream", "invalid_type"),
        ({"partial_images": "1"}, "partial_images", "invalid_type"),
        ({"partial_images": True}, "partial_images", "invalid_type"),
        ({"partial_images": 4}, "partial_images", "invalid_value"),
        ({"response_format": "png"}, "response_format", "invalid_value"),
        ({"response_format": 1}, "response_format", "invalid_value"),
        ({"prompt": 7}, "prompt", "invalid_type"),
        ({"controls": [{"kind": "canny", "image": 5}]}, "controls.0.image", "invalid_value"),
        ({"loras": [{"ref": "x", "extra": 1}]}, "loras.0.extra", "unknown_parameter"),
        ({"provider_options": {"openai": "low"}}, "provider_options.openai", "invalid_type"),
    ],
)
def test_loosely_typed_fields_are_refused(
    running: Running, sandbox: OpenAISandbox, fields: dict[str, Any], param: str, code: str
) -> None:
    answer = running.post({"prompt": "a cat", **fields})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert sandbox.hits() == 0


def test_stream_false_and_partial_images_zero_are_a_plain_answer(running: Running, sandbox: OpenAISandbox) -> None:
    answer = running.post(
        {"prompt": "a cat", "stream": False, "n": 2, "partial_images": 0, "response_format": "b64_json"}
    )
    assert answer.status_code == 200 and len(answer.json()["data"]) == 2 and sandbox.hits() == 1


def test_multipart_text_is_read_as_the_typed_value(running: Running, sandbox: OpenAISandbox) -> None:
    answer = httpx.post(
        f"{running.server.base_url}/images/edits",
        headers=running.auth,
        timeout=30,
        data={"prompt": "x", "n": "2", "stream": "false"},
        files={"image": ("in.png", png(1024, 1024), "image/png")},
    )
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"]) == 2
    bad = httpx.post(
        f"{running.server.base_url}/images/edits",
        headers=running.auth,
        timeout=30,
        data={"prompt": "x", "n": "two"},
        files={"image": ("in.png", png(256, 256), "image/png")},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
    assert sandbox.hits() == 1


# --- each failure its status --------------------------------------------------------------------------


def test_a_request_no_provider_can_serve_is_a_400_with_the_rejections(running: Running, sandbox: OpenAISandbox) -> None:
    body = {
        "prompt": "a cat",
        "controls": [
            {"kind": "canny", "image": "data:image/png;base64," + __import__("base64").b64encode(png(64, 64)).decode()}
        ],
    }
    answer = running.post(body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "no_route" and error["type"] == "invalid_request_error"
    assert error["rejections"] and {r["provider"] for r in error["rejections"]} == {"openai"}
    assert all(r["code"] and r["reason"] for r in error["rejections"])
    client = openai.OpenAI(base_url=running.server.base_url, api_key=running.key)  # retries on, as shipped
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(prompt="a cat", extra_body={"controls": body["controls"]})
    assert info.value.code == "no_route"
    assert sandbox.hits() == 0


def test_a_deadline_that_passes_is_a_504(running: Running, sandbox: OpenAISandbox) -> None:
    sandbox.faults.push(Fault.timeout(5.0))
    answer = running.post({"prompt": "a cat", "deadline_s": 0.3})
    assert answer.status_code == 504 and answer.json()["error"]["code"] == "deadline_exceeded"


# --- the body cap ---------------------------------------------------------------------------------------


def _read_answer(sock: socket.socket) -> str:
    """One HTTP answer read off ``sock``: the head, then as many bytes as its Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536)
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_a_declared_length_over_the_cap_is_refused_before_any_body_is_sent(sandbox: OpenAISandbox) -> None:
    provider = OpenAIProvider(api_key=sandbox.api_key, base_url=sandbox.base_url)
    with _running([provider], max_body_bytes=4096) as r:
        for path in ("/v1/images/generations", "/v1/images/edits", "/v1/route"):
            with socket.create_connection((r.server.host, r.server.port), timeout=10) as sock:
                sock.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {r.key}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 50000000000\r\n\r\n".encode()
                )
                answer = _read_answer(sock)  # answered with no body byte sent
            assert answer.startswith("HTTP/1.1 413"), answer  # Starlette's own answer (FastAPI's max_body_size)
            assert answer.endswith("Content Too Large")
        assert r.held == 0
    assert sandbox.hits() == 0


def test_a_chunked_body_is_counted_as_it_arrives(sandbox: OpenAISandbox) -> None:
    provider = OpenAIProvider(api_key=sandbox.api_key, base_url=sandbox.base_url)
    heads = {  # each body well formed as far as it goes, so only its size can stop it
        "/images/generations": (b'{"prompt": "', "application/json"),
        "/images/edits": (
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n\r\n',
            "multipart/form-data; boundary=b",
        ),
    }
    with _running([provider], max_body_bytes=4096) as r:
        for path, (head, kind) in heads.items():

            def chunks(head: bytes = head) -> Iterator[bytes]:  # no Content-Length: counted while reading
                yield head
                for _ in range(8):
                    yield b"x" * 1024

            answer = httpx.post(
                f"{r.server.base_url}{path}", content=chunks(), headers={**r.auth, "content-type": kind}
            )
            assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
        assert r.held == 0
    assert sandbox.hits() == 0


def test_multipart_limits_are_starlettes(running: Running, sandbox: OpenAISandbox) -> None:
    image = ("in.png", png(64, 64), "image/png")
    many = {f"f{i}": "x" for i in range(101)}
    answer = httpx.post(
        f"{running.server.base_url}/images/edits",
        headers=running.auth,
        data={"prompt": "x", **many},
        files={"image": image},
    )
    assert answer.status_code == 400 and "Too many fields" in answer.json()["error"]["message"]
    answer = httpx.post(
        f"{running.server.base_url}/images/edits",
        headers=running.auth,
        data={"prompt": "x", "seed": "1"},
        files=[("image", image), ("mask", image), ("image", image), ("mask", image), ("image", image)],
    )
    assert answer.status_code == 400 and "Too many files" in answer.json()["error"]["message"]
    assert sandbox.hits() == 0 and running.held == 0


# --- the bodies in flight ----------------------------------------------------------------------------------


def test_bodies_in_flight_are_capped_across_requests() -> None:
    gate = Gate()
    with (
        _running([gate], max_body_bytes=4096, max_inflight_body_bytes=6000, body_wait_s=0.2) as r,
        ThreadPoolExecutor(max_workers=1) as pool,
    ):
        large = {"prompt": "a" * 3000}
        first = pool.submit(r.post, large)  # holds ~3 KB of the 6 KB while the provider waits
        while not gate.seen:
            time.sleep(0.005)
        busy = r.post(large)  # does not fit beside it: waits, then is refused
        assert busy.status_code == 503
        assert busy.json()["error"]["code"] == "server_busy" and busy.headers["retry-after"] == "2"
        gate.opened.set()
        assert first.result().status_code == 200
        assert r.post(large).status_code == 200  # room again
        assert r.held == 0
    assert len(gate.seen) == 2


def test_a_small_request_fits_beside_a_large_one() -> None:
    gate = Gate()
    with _running([gate], max_body_bytes=4096, body_wait_s=5.0) as r, ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(r.post, {"prompt": "a" * 3000})
        while not gate.seen:
            time.sleep(0.005)
        second = pool.submit(r.post, {"prompt": "a cat"})  # ~20 bytes: fits in what is left
        while len(gate.seen) < 2:
            time.sleep(0.005)
        gate.opened.set()
        assert first.result().status_code == 200 and second.result().status_code == 200


@pytest.mark.parametrize(
    ("steps", "granted"),
    [
        # (request, size) in arrival order, then releases; granted: who holds bytes at the end
        ([("a", 60), ("b", 50), ("c", 10), ("release", "a")], {"b", "c"}),  # c waits behind b (first come)
        ([("a", 60), ("c", 10)], {"a", "c"}),  # nobody waiting: c fits and goes in
        ([("a", 100), ("b", 100), ("release", "a")], {"b"}),
        ([("a", 30), ("b", 80), ("c", 80), ("release", "a")], {"b"}),  # c still waits behind nothing that fits
    ],
)
async def test_body_bytes_are_granted_first_come_first_served(steps: list[tuple[str, Any]], granted: set[str]) -> None:
    bodies = _BodyBytes(100)
    sizes: dict[str, int] = {}
    tasks: dict[str, asyncio.Task[bool]] = {}
    for name, value in steps:
        if name == "release":
            bodies.release(sizes[value])
            await tasks.pop(value)
        else:
            sizes[name] = value
            tasks[name] = asyncio.create_task(bodies.acquire(value, 60.0))
        for _ in range(3):
            await asyncio.sleep(0)
    held = {name for name, task in tasks.items() if task.done() and task.result()}
    assert held == granted
    assert bodies.held == sum(sizes[n] for n in held)
    for task in tasks.values():
        task.cancel()


async def test_a_waiter_that_gives_up_leaves_nothing_held() -> None:
    bodies = _BodyBytes(100)
    assert await bodies.acquire(80, 1.0)
    assert not await bodies.acquire(50, 0.01)  # timed out
    waiting = asyncio.create_task(bodies.acquire(50, 60.0))
    await asyncio.sleep(0)
    waiting.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await waiting
    small = asyncio.create_task(bodies.acquire(20, 60.0))
    await asyncio.sleep(0)
    assert small.done() and small.result()  # nobody left in front of it
    bodies.release(80)
    bodies.release(20)
    assert bodies.held == 0


def test_the_inflight_cap_holds_at_least_one_maximal_body() -> None:
    with pytest.raises(ValueError, match="at least max_body_bytes"):
        create_app(AsyncRouter([Gate()], ledger=":memory:"), max_body_bytes=4096, max_inflight_body_bytes=4000)


# --- the schema ----------------------------------------------------------------------------------------------


def test_the_openapi_schema_describes_the_typed_requests(running: Running) -> None:
    schema = httpx.get(f"{running.server.origin}/openapi.json").json()
    generations = schema["paths"]["/v1/images/generations"]["post"]
    body = generations["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ImageGenerationRequest"}
    fields = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": 16}.items() <= fields["n"]["anyOf"][0].items()
    assert fields["stream"]["anyOf"][0]["type"] == "boolean"
    assert fields["response_format"]["anyOf"][0]["enum"] == ["b64_json", "url"]
    assert "ControlBody" in schema["components"]["schemas"] and "LoraBody" in schema["components"]["schemas"]
    edits = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert edits == {"$ref": "#/components/schemas/ImageEditRequest"}
    image = schema["components"]["schemas"]["ImageEditRequest"]["properties"]["image"]
    assert image["format"] == "binary"
    assert set(generations["responses"]) >= {"200", "400", "401", "403", "413", "429", "502", "503", "504"}
    assert schema["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ModelList"
    }
    docs = httpx.get(f"{running.server.origin}/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
