"""Nothing blocks the event loop: validation reads image headers only, heavy work runs on other threads,
and a file ledger waiting on another process's write lock leaves the loop ticking.

Structural checks only (which thread ran what, whether the loop advanced while something waited);
benchmarks/loop_stall.py measures the stalls themselves.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import sqlite3
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageFile

import router.images as images
import router.server as server
from providers.base import Billing, Capabilities, Estimate, Provider, ProviderResponse
from router import AsyncRouter, ImageRequest, RequestValidationError
from router.images import ImageDecodeError, decode
from router.ledger import Budget, Ledger
from router.result import GeneratedImage
from router.server import create_app
from tests.conftest import png


def noise_png(width: int, height: int) -> bytes:
    """A PNG of random pixels: it barely compresses, so its bytes are about 3 × width × height."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def corrupt_pixels(data: bytes) -> bytes:
    """The PNG with its compressed pixel data overwritten: the header still reads, decoding fails."""
    at = data.index(b"IDAT") + 4
    return data[:at] + b"\xff" * 64 + data[at + 64:]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width`` × ``height``, and no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = struct.pack(">I", 0) + b"IDAT" + struct.pack(">I", zlib.crc32(b"IDAT"))
    return b"\x89PNG\r\n\x1a\n" + chunk + idat


class Canned(Provider):
    """A provider answering at once with the same image; records the thread and requests it saw."""

    kind = "canned"

    def __init__(self, answer: bytes, size: tuple[int, int]) -> None:
        super().__init__()
        self.answer, self.size = answer, size
        self.seen: list[ImageRequest] = []

    def models(self) -> Sequence[str]:
        return ["canned-1"]

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(tasks=frozenset({"txt2img", "img2img", "inpaint"}), max_n=4)

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        return Estimate(Decimal("0.01"), 0.1)

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        self.seen.append(request)
        image = GeneratedImage(self.answer, "image/png", *self.size)
        return ProviderResponse([image] * request.n, model, Billing(Decimal("0.01"), "image", Decimal(request.n)))


class ThreadLog:
    """Wraps module functions to record the thread each call ran on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.calls: dict[str, list[int]] = {}

    def watch(self, module: Any, name: str) -> None:
        original: Callable[..., Any] = getattr(module, name)
        calls = self.calls.setdefault(name, [])

        def recorded(*args: Any, **kw: Any) -> Any:
            calls.append(threading.get_ident())
            return original(*args, **kw)

        self.monkeypatch.setattr(module, name, recorded)


# --- validation reads headers only ------------------------------------------------------------


def test_validation_reads_the_header_and_never_decodes_the_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = corrupt_pixels(png(256, 128))
    with pytest.raises(ImageDecodeError, match="cannot be decoded"):
        decode(broken)  # the pixel data really is unreadable ...
    loads: list[object] = []
    original = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> Any:
        loads.append(self)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    b64 = base64.b64encode(broken).decode()
    for form in (broken, b64, f"data:image/png;base64,{b64}"):
        request = ImageRequest(prompt="x", init_image=form, mask_image=form)
        assert request.init_image is not None and request.mask_image is not None
        assert (request.init_image.width, request.init_image.height, request.init_image.mime) == (256, 128,
                                                                                                   "image/png")
        assert request.init_image.data == broken
    assert loads == []  # ... and validation never tried to decode it


def test_the_pixel_cap_still_holds_from_the_header_alone() -> None:
    huge = png_header_only(9000, 9000)  # 81 MP claimed in a 45-byte file
    assert len(huge) < 100
    with pytest.raises(RequestValidationError, match="pixel cap") as info:
        ImageRequest(prompt="x", init_image=huge)
    assert info.value.field == "init_image"
    assert ImageRequest(prompt="x", init_image=png_header_only(3000, 3000)).init_image is not None


async def test_heavy_image_forms_are_validated_off_the_loop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    log = ThreadLog(monkeypatch)
    log.watch(images, "probe")
    loop_thread = threading.get_ident()
    data = noise_png(64, 32)  # its base64 is too long to be mistaken for a path
    path = tmp_path / "in.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    heavy = [b64, f"data:image/png;base64,{b64}", path, str(path), Image.new("RGB", (64, 32))]
    for form in heavy:
        request = await ImageRequest.afrom_kwargs("x", init_image=form)
        assert request.init_image is not None and request.init_image.width == 64
    request = await ImageRequest.afrom_kwargs("x", controls=[{"kind": "canny", "image": b64}])
    assert request.controls[0].image.width == 64
    assert len(log.calls["probe"]) == len(heavy) + 1 and loop_thread not in log.calls["probe"]
    # bytes cost a header read: validated inline, no thread hop
    log.calls["probe"].clear()
    await ImageRequest.afrom_kwargs("x", init_image=data, width=512, height=512)
    assert log.calls["probe"] == [loop_thread]


# --- the server's decoding and encoding run on worker threads -------------------------------------


@pytest.fixture
def big_png() -> bytes:
    data = noise_png(400, 400)
    assert len(data) > server._INLINE_BYTES  # large enough for the worker-thread path
    return data


def _app(provider: Canned, **kw: Any) -> tuple[AsyncRouter, Any]:
    router = AsyncRouter([provider], ledger=":memory:", max_retries=0)
    return router, create_app(router, **kw)


async def test_server_decodes_and_encodes_large_images_off_the_loop(monkeypatch: pytest.MonkeyPatch,
                                                                     big_png: bytes) -> None:
    log = ThreadLog(monkeypatch)
    for name in ("_build", "_answer_parts", "_client_image", "_edit"):
        log.watch(server, name)
    log.watch(images, "probe")
    provider = Canned(big_png, (400, 400))
    router, app = _app(provider)
    loop_thread = threading.get_ident()
    b64 = base64.b64encode(big_png).decode()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        answer = await client.post("/v1/images/generations", json={
            "prompt": "x", "n": 2, "init_image": b64, "mask_image": f"data:image/png;base64,{b64}"})
        assert answer.status_code == 200, answer.text
        assert int(answer.headers["content-length"]) == len(answer.content)
        body = answer.json()
        assert [base64.b64decode(d["b64_json"]) for d in body["data"]] == [big_png, big_png]
        assert body["size"] == "400x400" and body["imagerouter"]["provider"] == "canned"
        request = provider.seen[-1]
        assert request.init_image is not None and request.mask_image is not None
        assert request.init_image.data == big_png and request.mask_image.data == big_png

        edit = await client.post("/v1/images/edits", data={"prompt": "y", "response_format": "url"},
                                 files={"image": ("in.png", big_png, "image/png")})
        assert edit.status_code == 200, edit.text
        url = edit.json()["data"][0]["url"]
        assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == big_png
        assert provider.seen[-1].init_image is not None and provider.seen[-1].init_image.data == big_png
    await router.aclose()
    for name in ("_build", "_answer_parts", "_client_image", "_edit", "probe"):
        assert log.calls[name], name
        assert loop_thread not in log.calls[name], name


async def test_small_bodies_are_answered_inline_with_the_same_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    log = ThreadLog(monkeypatch)
    log.watch(server, "_answer_parts")
    small = png(64, 64)
    provider = Canned(small, (64, 64))
    router, app = _app(provider)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        answer = await client.post("/v1/images/generations", json={"prompt": "x", "response_format": "url"})
    await router.aclose()
    assert answer.status_code == 200 and int(answer.headers["content-length"]) == len(answer.content)
    assert answer.json()["data"] == [{"url": "data:image/png;base64," + base64.b64encode(small).decode()}]
    assert log.calls["_answer_parts"] == [threading.get_ident()]


async def test_a_large_body_with_a_bad_image_is_still_a_400(big_png: bytes) -> None:
    router, app = _app(Canned(png(), (64, 64)))
    b64 = base64.b64encode(big_png).decode()
    bad = b64[:1000] + "=" + b64[1001:]  # padding in the middle
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        answer = await client.post("/v1/images/generations", json={"prompt": "x", "init_image": bad})
        not_json = await client.post("/v1/images/generations", content=b'{"prompt": "' + b"x" * 300_000,
                                     headers={"content-type": "application/json"})
    await router.aclose()
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "init_image"
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]


@pytest.mark.parametrize("body", [
    {"prompt": "x", "init_image": "A" * 70_000, "mask_image": "data:image/png;base64," + "B" * 70_000},
    {"prompt": "q\"uo\\te" * 20_000, "controls": [{"kind": "canny", "image": "C" * 70_000}], "tags": ["a\"b"]},
    {"prompt": "é" * 40_000, "init_image": "\\/" * 40_000, "n": 1, "k": [1.5, None, True, {"x": "y"}]},
    {"x" * 70_000: "long key", "init_image": ["D" * 70_000], "v": "E" * 70_000},
])
def test_the_large_body_parser_reads_what_json_reads(body: dict[str, Any]) -> None:
    raw = json.dumps(body, ensure_ascii=False).encode()
    parsed = server._loads(raw)

    def plain(value: Any) -> Any:
        if isinstance(value, server._Span):
            return value.text()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    assert plain(parsed) == body
    spans = [v for v in (parsed.get("init_image"), parsed.get("mask_image"),
                         *(c.get("image") for c in parsed.get("controls", ()))) if isinstance(v, server._Span)]
    expected = sum(1 for k in ("init_image", "mask_image") if isinstance(body.get(k), str)
                   and "\\" not in body[k]) + len(body.get("controls", ()))
    assert len(spans) == expected  # long image strings without escapes stay in the body, unparsed
    assert not isinstance(parsed.get("v"), server._Span)  # any other field gets its string


# --- a file ledger waiting on another process's write lock ------------------------------------------


@pytest.fixture
def write_lock(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    path = tmp_path / "ledger.sqlite"
    yield path, sqlite3.connect(path, isolation_level=None, check_same_thread=False)


async def test_the_loop_keeps_ticking_while_the_ledger_waits_for_the_write_lock(
        write_lock: tuple[Path, sqlite3.Connection]) -> None:
    path, other = write_lock
    provider = Canned(png(), (64, 64))
    router = AsyncRouter([provider], ledger=path, max_retries=0, budgets=[Budget(Decimal("5"), "day")])
    other.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
    # a safety net: were the loop blocked in the ledger, it would stay blocked until this releases the lock
    safety = threading.Timer(20.0, lambda: other.execute("COMMIT") if other.in_transaction else None)
    safety.start()
    try:
        task = asyncio.create_task(router.agenerate("a cat"))
        ticks = 0
        for _ in range(30):
            await asyncio.sleep(0.002)
            ticks += 1
        assert ticks == 30 and not task.done()  # the loop ran on while the request waited ...
        assert provider.seen == []  # ... at its reservation (a budget watches it), before the provider
        other.execute("COMMIT")
        result = await task
    finally:
        safety.cancel()
        other.close()
    assert result.provider == "canned" and len(provider.seen) == 1
    assert router.ledger.spent(period="day") == Decimal("0.01")
    await router.aclose()


async def test_a_request_no_budget_watches_never_waits_on_the_ledger(
        write_lock: tuple[Path, sqlite3.Connection]) -> None:
    path, other = write_lock
    provider = Canned(png(), (64, 64))
    router = AsyncRouter([provider], ledger=path, max_retries=0)
    await router.agenerate("warm up")  # the ledger has read its budgets (none)
    other.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
    safety = threading.Timer(20.0, lambda: other.execute("COMMIT") if other.in_transaction else None)
    safety.start()
    try:
        result = await asyncio.wait_for(router.agenerate("a cat"), 10)  # served while the lock is held
        # its reservation and settlement wait (queued, or on the ledger thread) until the lock is free
        assert other.execute("SELECT COUNT(*) FROM charges").fetchone()[0] <= 1  # the warm-up's, at most
        other.execute("COMMIT")
    finally:
        safety.cancel()
        other.close()
    assert result.provider == "canned" and len(provider.seen) == 2
    assert router.ledger.spent(period="day") == Decimal("0.02")  # a read applies what was queued first
    await router.aclose()
    reopened = Ledger(path)
    assert reopened.spent(period="day") == Decimal("0.02") and reopened.report()[0].requests == 2
    reopened.close()


async def test_the_route_endpoint_asks_the_ledger_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = Canned(png(), (64, 64))
    router, app = _app(provider)
    seen: list[int] = []
    original = router.route

    def route(*args: Any, **kw: Any) -> Any:
        seen.append(threading.get_ident())
        return original(*args, **kw)

    monkeypatch.setattr(router, "route", route)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        answer = await client.post("/v1/route", json={"prompt": "x"})
    await router.aclose()
    assert answer.status_code == 200 and answer.json()["decision"]
    assert seen and threading.get_ident() not in seen
