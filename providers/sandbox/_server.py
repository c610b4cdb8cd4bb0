"""A loopback HTTP server for emulating a vendor API in tests: the part no vendor owns.

:class:`SandboxServer` serves HTTP/1.1 (keep-alive) on 127.0.0.1 at a free port from
a background thread, one daemon thread per connection. It parses each request
(JSON, urlencoded or multipart bodies), records it, consults the :class:`FaultPlan`
and hands the request to the vendor subclass, which implements :meth:`handle` and
:meth:`render_fault`. Two fault kinds are served here for every vendor: ``timeout``
(wait, then answer normally) and ``disconnect`` (close the connection unanswered). Every vendor
also serves the :data:`HOSTILE_IMAGE_FAULTS`: its usual answer, billed, carrying a hostile image
(:func:`hostile_image`) instead of the one it made.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import functools
import hashlib
import http
import io
import json
import logging
import secrets
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Self

from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

REDACTED = "[REDACTED]"
_TEXT_TYPES = ("text/", "application/json")


# --- faults -----------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One failure to serve instead of a normal answer; each vendor renders it in its own shape.

    ``kind`` names the failure; the other fields are its parameters, ``None`` where the
    vendor's usual value applies. Build faults with the class-method constructors.
    """

    kind: str
    status: int | None = None
    retry_after: float | None = None
    seconds: float | None = None
    code: str | None = None
    param: str | None = None
    message: str | None = None
    body: bytes | None = None

    @classmethod
    def rate_limit(cls, retry_after: float | None = None) -> Fault:
        """429; ``retry_after`` (seconds) is sent as the vendor's retry hint, none if ``None``."""
        if retry_after is not None and retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        return cls("rate_limit", status=429, retry_after=retry_after)

    @classmethod
    def server_error(cls, status: int = 500) -> Fault:
        """A 5xx answer."""
        if not 500 <= status <= 599:
            raise ValueError(f"server_error needs a 5xx status, not {status}")
        return cls("server_error", status=status)

    @classmethod
    def timeout(cls, seconds: float = 30.0) -> Fault:
        """Hold the request ``seconds`` before answering it normally (the client should give up first)."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        return cls("timeout", seconds=seconds)

    @classmethod
    def disconnect(cls) -> Fault:
        """Close the connection without answering."""
        return cls("disconnect")

    @classmethod
    def moderation(cls, message: str | None = None) -> Fault:
        """The vendor's content-policy refusal."""
        return cls("moderation", message=message)

    @classmethod
    def malformed(cls, body: bytes | None = None) -> Fault:
        """200 with a body that breaks the vendor's contract (by default truncated JSON)."""
        return cls("malformed", status=200, body=body)

    @classmethod
    def insufficient_credits(cls) -> Fault:
        """The account is out of credit or quota (402 or the vendor's equivalent)."""
        return cls("insufficient_credits")

    @classmethod
    def insufficient_quota(cls) -> Fault:
        """Alias of :meth:`insufficient_credits`, in OpenAI's words."""
        return cls.insufficient_credits()

    @classmethod
    def invalid_request(cls, param: str | None = None, message: str | None = None, code: str | None = None) -> Fault:
        """The vendor's 400 for a request it will not serve."""
        return cls("invalid_request", status=400, param=param, message=message, code=code)

    @classmethod
    def auth(cls) -> Fault:
        """The vendor's answer to a refused key, whatever key was sent."""
        return cls("auth", status=401)

    @classmethod
    def hostile_image(cls, kind: str) -> Fault:
        """A normal answer, billed as usual, whose image is hostile (:func:`hostile_image`): ``bomb_image``,
        ``truncated_image``, ``wrong_format_image`` or ``huge_image``."""
        if kind not in HOSTILE_IMAGE_FAULTS:
            raise ValueError(f"unknown hostile image {kind!r}; use one of {sorted(HOSTILE_IMAGE_FAULTS)}")
        return cls(kind)


GENERIC_FAULT_KINDS = frozenset({"timeout", "disconnect"})

HOSTILE_IMAGE_FAULTS = frozenset({"bomb_image", "truncated_image", "wrong_format_image", "huge_image"})
"""Faults every vendor sandbox serves: the answer is made and billed as usual, but the image in it is hostile."""


# --- hostile images -----------------------------------------------------------------------

_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def hostile_image(kind: str) -> bytes:
    """The bytes a hostile-image fault serves instead of the image (the corpus of RELIABILITY.md):

    - ``bomb_image``: a 64x64 PNG carrying a zTXt chunk that inflates to 32 MiB (33 KB on the wire);
    - ``truncated_image``: a 256x256 PNG whose pixel data stops half-way; its chunks, CRCs and IEND are
      intact, so only decoding the pixels finds it out;
    - ``wrong_format_image``: a FITS file (an image format, but not PNG, JPEG or WEBP);
    - ``huge_image``: a PNG claiming 50,000 x 50,000 pixels, in 65 bytes.
    """
    if kind == "huge_image":
        header = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
        return (
            _PNG_SIG + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b"")
        )
    if kind == "bomb_image":
        squeeze = zlib.compressobj(9)
        text = b"".join(squeeze.compress(bytes(1 << 20)) for _ in range(32)) + squeeze.flush()
        small = io.BytesIO()
        Image.new("RGB", (64, 64), (90, 120, 200)).save(small, format="PNG")
        plain = small.getvalue()
        ihdr_end = len(_PNG_SIG) + 25
        return plain[:ihdr_end] + _png_chunk(b"zTXt", b"Comment\0\0" + text) + plain[ihdr_end:]
    if kind == "truncated_image":
        noise = hashlib.shake_256(b"truncated_image").digest(256 * 256 * 3)
        full = io.BytesIO()
        Image.frombytes("RGB", (256, 256), noise).save(full, format="PNG")
        data, pos, ihdr, idat = full.getvalue(), len(_PNG_SIG), b"", b""
        while pos < len(data):
            (length,) = struct.unpack(">I", data[pos : pos + 4])
            ctype, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
            ihdr, idat = (body, idat) if ctype == b"IHDR" else (ihdr, idat + body if ctype == b"IDAT" else idat)
            pos += 12 + length
        return (
            _PNG_SIG
            + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", idat[: len(idat) // 2])
            + _png_chunk(b"IEND", b"")
        )
    if kind == "wrong_format_image":
        cards = (
            "SIMPLE  =                    T",
            "BITPIX  =                    8",
            "NAXIS   =                    2",
            "NAXIS1  =                   64",
            "NAXIS2  =                   64",
            "END",
        )
        header = "".join(f"{card:<80}" for card in cards).ljust(2880).encode("ascii")
        return header + bytes(2880 * 2)
    raise ValueError(f"unknown hostile image {kind!r}; use one of {sorted(HOSTILE_IMAGE_FAULTS)}")


@dataclass
class _PlanEntry:
    fault: Fault
    remaining: int | None
    path: str | None


class FaultPlan:
    """Faults queued for the next matching requests, first pushed first served; thread-safe."""

    def __init__(self, kinds: Iterable[str] | None = None) -> None:
        self._kinds = frozenset(kinds) | GENERIC_FAULT_KINDS if kinds is not None else None
        self._entries: list[_PlanEntry] = []
        self._lock = threading.Lock()

    def push(self, fault: Fault, *, times: int | None = 1, path: str | None = None) -> None:
        """Serve ``fault`` to the next ``times`` requests (``None``: every one until :meth:`clear`).

        ``path`` limits it to requests for that exact path (``/v1/images/edits``).
        """
        if times is not None and times < 1:
            raise ValueError("times must be >= 1, or None for every request")
        if self._kinds is not None and fault.kind not in self._kinds:
            raise ValueError(f"this sandbox does not serve {fault.kind!r} faults; it serves {sorted(self._kinds)}")
        with self._lock:
            self._entries.append(_PlanEntry(fault, times, path))

    def clear(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            self._entries.clear()

    def take(self, path: str) -> Fault | None:
        """The fault for a request to ``path``, consuming one use of it; ``None`` if none applies."""
        with self._lock:
            for i, entry in enumerate(self._entries):
                if entry.path is not None and entry.path != path:
                    continue
                if entry.remaining is not None:
                    entry.remaining -= 1
                    if entry.remaining == 0:
                        del self._entries[i]
                return entry.fault
        return None

    def __len__(self) -> int:
        """How many pushes are still pending."""
        with self._lock:
            return len(self._entries)


# --- requests and responses ----------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """A file part of a multipart body."""

    name: str
    filename: str | None
    content_type: str
    data: bytes


@dataclass
class Request:
    """A parsed request as a vendor handler sees it (headers unredacted, names lower-case)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    media_type: str
    json: Any = None
    fields: list[tuple[str, str]] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    body_error: str | None = None
    request_id: str = ""

    @property
    def form(self) -> dict[str, str]:
        """Text fields by name; the last wins where a name repeats."""
        return dict(self.fields)

    def uploads_named(self, *names: str) -> list[Upload]:
        """The uploads under any of ``names``, in the order sent."""
        return [u for u in self.uploads if u.name in names]


@dataclass
class RecordedRequest:
    """What the sandbox received, for assertions. Secret headers read ``[REDACTED]``.

    ``status`` is the status answered (``None`` while in flight, or when the
    connection was dropped unanswered); ``fault`` the fault it was served.
    """

    method: str
    path: str
    headers: dict[str, str]
    json: dict[str, Any] | None
    form: dict[str, str]
    files: dict[str, list[bytes]]
    query: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    fault: Fault | None = None
    request_id: str = ""
    received_at: float = 0.0


@dataclass
class Response:
    """What a handler answers; ``Content-Length`` and connection headers are added for it."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
        body = json.dumps(payload, separators=(",", ":")).encode()
        return cls(status, body, {"content-type": "application/json", **(headers or {})})


def parse_body(request: Request) -> None:
    """Fill ``json`` / ``fields`` / ``uploads`` from the body by its media type."""
    if not request.body:
        return
    if request.media_type == "application/json" or request.media_type.endswith("+json"):
        try:
            request.json = json.loads(request.body)
        except (UnicodeDecodeError, ValueError) as exc:
            request.body_error = f"invalid JSON: {exc}"
    elif request.media_type == "application/x-www-form-urlencoded":
        try:
            request.fields = urllib.parse.parse_qsl(request.body.decode(), keep_blank_values=True)
        except UnicodeDecodeError as exc:
            request.body_error = f"invalid form encoding: {exc}"
    elif request.media_type == "multipart/form-data":
        _parse_multipart(request)


def _parse_multipart(request: Request) -> None:
    head = f"Content-Type: {request.headers.get('content-type', '')}\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.body)
    if not msg.is_multipart() or not msg.get_boundary():
        request.body_error = "multipart body without a boundary"
        return
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            request.body_error = "multipart part without a name"
            return
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        ctype = part.get_content_type()
        if filename is None and ctype.startswith(_TEXT_TYPES):
            try:
                request.fields.append((name, data.decode(part.get_content_charset() or "utf-8")))
            except (LookupError, UnicodeDecodeError):
                request.body_error = f"multipart field {name!r} is not valid text"
                return
        else:
            request.uploads.append(Upload(name, filename, ctype, data))
    if msg.defects:
        request.body_error = f"malformed multipart body ({type(msg.defects[0]).__name__})"


# --- the server ------------------------------------------------------------------------


VENDOR_FAULTS = frozenset(
    {"rate_limit", "server_error", "moderation", "malformed", "insufficient_credits", "invalid_request", "auth"}
)
"""The fault kinds every vendor sandbox renders in its own shape (plus timeout and disconnect, handled here)."""


class SandboxError(Exception):
    """An error answer in the vendor's own shape: raise it from a route, the server sends ``response()``."""

    def response(self) -> Response:
        raise NotImplementedError


class SandboxServer:
    """Base of the vendor sandboxes: a real HTTP/1.1 server on 127.0.0.1 in a background thread.

    Subclasses set ``base_path`` and ``fault_kinds`` (``VENDOR_FAULTS`` and their own) and implement
    :meth:`handle` (raising a :class:`SandboxError` subclass for error answers) and
    :meth:`render_fault`; they may override :meth:`authenticate` and :meth:`decorate`.
    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    base_path: ClassVar[str] = ""
    fault_kinds: ClassVar[frozenset[str]] = frozenset()
    secret_headers: ClassVar[frozenset[str]] = frozenset(
        {"authorization", "proxy-authorization", "x-api-key", "api-key", "x-key", "cookie"}
    )
    max_body_bytes: ClassVar[int] = 256 * 1024 * 1024

    def __init__(self) -> None:
        self.faults = FaultPlan(self.fault_kinds)
        self._log: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle

    def start(self) -> Self:
        """Bind a free port on 127.0.0.1 and serve from a daemon thread; a no-op while running."""
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _HTTPServer(self)
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, name=f"{type(self).__name__}", daemon=True
        )
        self._httpd = httpd
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and release the port."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.drop_connections(wait_s=2.0)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._httpd is not None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError(f"{type(self).__name__} is not running: call start() or use it in a with block")
        return int(self._httpd.server_address[1])

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The API root clients are configured with: the origin plus ``base_path``."""
        return self.origin + self.base_path

    @property
    def connections(self) -> int:
        """TCP connections accepted since start (keep-alive reuse keeps this low)."""
        return self._httpd.accepted if self._httpd is not None else 0

    # --- the request log

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received, oldest first."""
        with self._lock:
            return list(self._log)

    def hits(self, path: str | None = None) -> int:
        """How many requests arrived, for ``path`` only if given."""
        with self._lock:
            return sum(1 for r in self._log if path is None or r.path == path)

    def clear_requests(self) -> None:
        """Forget the requests received so far."""
        with self._lock:
            self._log.clear()

    # --- vendor hooks

    def authenticate(self, request: Request) -> Response | None:
        """The refusal for a request with bad credentials, else ``None``. Runs before faults."""
        return None

    def handle(self, request: Request) -> Response:
        """Answer a request that no fault intercepted."""
        raise NotImplementedError

    def render_fault(self, fault: Fault, request: Request) -> Response:
        """The vendor's answer for ``fault`` (any kind but ``timeout`` and ``disconnect``)."""
        raise NotImplementedError

    def render_internal_error(self, request: Request, exc: BaseException) -> Response:
        """The answer when a handler raised: a 500."""
        return Response.json(500, {"error": f"sandbox handler failed: {type(exc).__name__}"})

    def decorate(self, request: Request, response: Response, elapsed_s: float) -> None:
        """Add the vendor's per-response headers (request ids, timings) in place."""

    # --- the dispatch, on the connection's thread

    def _dispatch(self, request: Request) -> Response | None:
        started = time.perf_counter()
        try:
            parse_body(request)
        except Exception as exc:  # a body the standard parsers choke on is the client's problem, not a crash
            request.body_error = f"unreadable body ({type(exc).__name__})"
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            headers={k: REDACTED if k in self.secret_headers else v for k, v in request.headers.items()},
            json=request.json if isinstance(request.json, dict) else None,
            form=request.form,
            files=_files_by_name(request.uploads),
            query=dict(request.query),
            request_id=request.request_id,
            received_at=time.monotonic(),
        )
        with self._lock:
            self._log.append(record)
        try:
            response = self.authenticate(request)
            if response is None:
                fault = self.faults.take(request.path)
                record.fault = fault
                if fault is not None and fault.kind == "disconnect":
                    return None
                if fault is not None and fault.kind == "timeout":
                    if self._stopping.wait(fault.seconds or 0.0):
                        return None
                    fault = None
                try:
                    response = self.render_fault(fault, request) if fault is not None else self.handle(request)
                except SandboxError as err:
                    response = err.response()
        except Exception as exc:
            log.exception("%s: handler failed for %s %s", type(self).__name__, request.method, request.path)
            response = self.render_internal_error(request, exc)
        self.decorate(request, response, time.perf_counter() - started)
        record.status = response.status
        return response


def _files_by_name(uploads: list[Upload]) -> dict[str, list[bytes]]:
    files: dict[str, list[bytes]] = {}
    for upload in uploads:
        files.setdefault(upload.name, []).append(upload.data)
    return files


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, sandbox: SandboxServer) -> None:
        self.sandbox = sandbox
        self.accepted = 0
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._closed = threading.Condition(self._open_lock)
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
            self.accepted += 1
        super().process_request(request, client_address)

    def close_request(self, request: Any) -> None:
        super().close_request(request)
        with self._open_lock:
            self._open.discard(request)
            self._closed.notify_all()

    def drop_connections(self, wait_s: float) -> None:
        """Shut every open connection down and wait for their threads to let go of them."""
        with self._open_lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._closed.wait_for(lambda: not self._open, timeout=wait_s)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("sandbox connection error from %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout = 300
    server: _HTTPServer

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def __getattr__(self, name: str) -> Any:
        # The stdlib answers a verb without a ``do_<VERB>`` method with its own 501 HTML page. Every other
        # verb (HEAD, OPTIONS, TRACE, made-up ones) goes to the vendor instead, whose router refuses what
        # it does not serve in its own error shape; a HEAD answer is sent without its body (see _write).
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        body = self._read_body(headers)
        if body is None:
            return
        split = urllib.parse.urlsplit(self.path)
        request = Request(
            method=self.command,
            path=split.path,
            query=dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True)),
            headers=headers,
            body=body,
            media_type=headers.get("content-type", "").split(";", 1)[0].strip().lower(),
            request_id=secrets.token_hex(16),
        )
        response = self.server.sandbox._dispatch(request)
        if response is None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._write(response)

    def _read_body(self, headers: dict[str, str]) -> bytes | None:
        limit = self.server.sandbox.max_body_bytes
        try:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                return self._read_chunked(limit)
            length = int(headers.get("content-length", "0") or "0")
        except ValueError:
            self.close_connection = True
            self._write(Response(400, b"bad Content-Length or chunked body"))
            return None
        if length > limit:
            self.close_connection = True
            self._write(Response(413, f"body over the sandbox's {limit}-byte limit".encode()))
            return None
        data = self.rfile.read(length) if length > 0 else b""
        if len(data) < length:
            self.close_connection = True
            return None
        return data

    def _read_chunked(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            size = int(self.rfile.readline(1024).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            total += size
            if total > limit:
                raise ValueError("chunked body over the limit")
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _write(self, response: Response) -> None:
        phrase = http.HTTPStatus(response.status).phrase if response.status in _STATUSES else ""
        lines = [f"HTTP/1.1 {response.status} {phrase}", f"date: {self.date_time_string()}"]
        lines += [f"{k}: {v}" for k, v in response.headers.items() if k.lower() not in _FRAMING]
        lines.append(f"content-length: {len(response.body)}")
        if self.close_connection:
            lines.append("connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self.wfile.write(head if self.command == "HEAD" else head + response.body)
        except OSError:
            self.close_connection = True


_STATUSES = frozenset(s.value for s in http.HTTPStatus)
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})


def synthetic_image(prompt: str, seed: int, size: tuple[int, int]) -> Image.Image:
    """A deterministic stand-in for a generated image: a flat colour and a disc from a hash of (seed, prompt)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    bg = (digest[0], digest[1], digest[2])
    fg = (255 - digest[0], 255 - digest[1], 255 - digest[2])
    w, h = size
    img = Image.new("RGB", size, bg)
    r = min(w, h) * (0.15 + digest[8] / 255 * 0.2)
    cx, cy = w * (0.3 + digest[6] / 255 * 0.4), h * (0.3 + digest[7] / 255 * 0.4)
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    return img
