"""The safe fetcher refuses the SSRF corpus and hostile images, fast and with a typed error."""

from __future__ import annotations

import io
import socket
import threading
import tracemalloc
import zlib
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from PIL import Image

from router.errors import InvalidRequestError, ProviderUnavailable
from router.fetch import SafeFetcher, UnsafeURLError
from router.images import ImageDecodeError, decode
from tests.conftest import png

SSRF_CORPUS = [
    "http://127.0.0.1/a.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/a.png",
    "http://[fd00::1]/a.png",
    "http://0x7f.1/a.png",
    "http://2130706433/a.png",
    "http://[::ffff:127.0.0.1]/a.png",
    "http://0.0.0.0/a.png",
    "http://224.0.0.1/a.png",
    "http://internal.example/a.png",  # resolves to 10.x below
    "file:///etc/passwd",
    "gopher://127.0.0.1:70/_x",
    "ftp://example.com/a.png",
    "/etc/passwd",
]


async def fake_dns(host: str, port: int) -> Sequence[str]:
    """Names from a table; nothing asks the system's DNS (addresses in any spelling never reach a resolver)."""
    table = {"internal.example": ["10.1.2.3"], "public.example": ["127.0.0.1"]}
    if host not in table:
        raise OSError(f"{host} does not resolve")
    return table[host]


@pytest.mark.parametrize("url", SSRF_CORPUS)
async def test_ssrf_corpus_is_refused(url: str) -> None:
    with pytest.raises(UnsafeURLError):
        await SafeFetcher(resolver=fake_dns).fetch(url)


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}

    def do_GET(self) -> None:
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, dict]]:
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}
    handler = type("H", (_Handler,), {"routes": routes})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://public.example:{srv.server_address[1]}", routes
    srv.shutdown()


async def test_fetches_an_image_from_an_allowed_host(server: tuple[str, dict]) -> None:
    base, routes = server
    routes["/ok.png"] = (200, {"Content-Type": "image/png"}, png(8, 8))
    data = await SafeFetcher(resolver=fake_dns, allow_loopback=True).fetch(f"{base}/ok.png")
    assert data == png(8, 8)


async def test_a_redirect_to_an_internal_address_is_refused(server: tuple[str, dict]) -> None:
    base, routes = server
    routes["/r"] = (302, {"Location": "http://10.0.0.5/secret.png"}, b"")
    with pytest.raises(UnsafeURLError, match="private"):
        await SafeFetcher(resolver=fake_dns, allow_loopback=True).fetch(f"{base}/r")


async def test_byte_cap_applies_while_streaming(server: tuple[str, dict]) -> None:
    base, routes = server
    routes["/big.png"] = (200, {}, png(8, 8) + b"\0" * 5000)
    with pytest.raises(InvalidRequestError, match="cap"):
        await SafeFetcher(resolver=fake_dns, allow_loopback=True, max_bytes=1000).fetch(f"{base}/big.png")


def _bomb_png(side: int) -> bytes:
    """A valid PNG header claiming side×side pixels, with a tiny compressed body."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _ztxt_bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    raw = buf.getvalue()
    import struct

    payload = b"k\0\0" + zlib.compress(b"A" * 20_000_000, 9)
    chunk = struct.pack(">I", len(payload)) + b"zTXt" + payload + struct.pack(">I", zlib.crc32(b"zTXt" + payload))
    return raw[:33] + chunk + raw[33:]


@pytest.mark.parametrize(
    "data",
    [_bomb_png(50_000), _ztxt_bomb(), png(64, 64)[:60], b"SIMPLE  =                    T" + b" " * 2850],
    ids=["50k-by-50k", "ztxt-bomb", "truncated", "fits"],
)
def test_hostile_images_fail_with_a_typed_error_in_bounded_memory(data: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError):
            decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 1024 * 1024  # refused from the header, or at Pillow's 1 MB text-chunk cap


async def test_a_connection_failure_is_a_typed_error() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with pytest.raises(ProviderUnavailable, match="ConnectError"):
        await SafeFetcher(resolver=fake_dns, allow_loopback=True).fetch(f"http://public.example:{port}/a.png")


async def test_a_public_url_that_is_not_an_image_is_refused(server: tuple[str, dict]) -> None:
    base, routes = server
    routes["/page"] = (200, {"Content-Type": "text/html"}, b"<html>hello</html>")
    with pytest.raises(ImageDecodeError, match="not a PNG, JPEG or WEBP"):
        await SafeFetcher(resolver=fake_dns, allow_loopback=True).fetch(f"{base}/page")
