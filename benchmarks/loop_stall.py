"""The worst event-loop stall while a file ledger waits on another process's write lock, and while
9-megapixel images are validated, decoded and encoded: before (the same work done the old way, on the
loop) and after (the router and server as they are), interleaved in one run.

    .venv/bin/python benchmarks/loop_stall.py [--rounds 3] [--hold 1.5] [--side 3000] [--out FILE]

A ticker coroutine sleeps 1 ms in a loop and records how late each wake-up is; a scenario's stall is
the worst lateness while its work runs (p99 over the ticks beside it). Goal: worst ≤ 10 ms.

(a) ledger: a second process holds the ledger file's write lock (``BEGIN IMMEDIATE``) for ``--hold``
    seconds. before: ``Ledger.reserve`` + ``settle`` called on the loop (what the router did);
    after: 20 concurrent ``AsyncRouter.agenerate`` calls with that file ledger and a canned provider.
(b) images: a ``--side``² noise PNG (27 MB at 3000², 36 MB as base64).
    - SDK, bytes: ``agenerate(init_image=<bytes>)``; before: validation decoded every pixel on the loop.
    - SDK, base64: before: ``ImageRequest.from_kwargs`` on the loop (what ``agenerate`` did);
      after: ``agenerate`` as it is (it validates through ``ImageRequest.afrom_kwargs``, in a worker thread).
    - server, JSON: ``POST /v1/images/generations`` with the image as base64 and the same image as the
      answer, driven as ASGI on this loop (the client's side costs nothing); before: the old handler's
      steps on the loop (json.loads, b64decode, full decode, b64encode, json.dumps).
    - server, multipart: ``POST /v1/images/edits`` with the image as a file; before: Starlette's
      multipart parser and the full decode on the loop, the answer encoded as above.
No test asserts on these times.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from providers.base import Billing, Capabilities, Estimate, Provider, ProviderResponse
from router.images import decode
from router.ledger import Ledger
from router.request import ImageRequest
from router.result import GeneratedImage

PERIOD_S = 0.001


class Canned(Provider):
    """Answers at once with a fixed image; never decodes what it is sent."""

    kind = "canned"

    def __init__(self, answer: bytes, side: int) -> None:
        super().__init__()
        self.answer, self.side = answer, side

    def models(self) -> Sequence[str]:
        return ["canned-1"]

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(tasks=frozenset({"txt2img", "img2img", "inpaint"}))

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        return Estimate(Decimal("0.01"), 0.1)

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        image = GeneratedImage(self.answer, "image/png", self.side, self.side)
        return ProviderResponse([image], model, Billing(Decimal("0.01"), "image", Decimal(1)))


# --- the ticker ----------------------------------------------------------------------------------


@dataclass
class Stalls:
    lags: list[float] = field(default_factory=list)
    worsts: list[float] = field(default_factory=list)
    """The worst lag of each run added."""

    def add(self, other: Stalls) -> None:
        self.lags += other.lags
        self.worsts.append(max(other.lags, default=0.0))

    @property
    def median_worst_ms(self) -> float:
        ordered = sorted(self.worsts)
        return ordered[len(ordered) // 2] * 1000 if ordered else 0.0

    @property
    def worst_ms(self) -> float:
        return max(self.lags, default=0.0) * 1000

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.lags)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000 if ordered else 0.0


@contextlib.asynccontextmanager
async def ticking() -> AsyncIterator[Stalls]:
    """Records how late each 1 ms sleep wakes up while the body runs."""
    stalls = Stalls()
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            start = time.perf_counter()
            await asyncio.sleep(PERIOD_S)
            stalls.lags.append(max(0.0, time.perf_counter() - start - PERIOD_S))

    task = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    try:
        yield stalls
    finally:
        await asyncio.sleep(0.005)  # a tick late because of the body's last step is counted
        done.set()
        await task


async def measure(work: Callable[[], Awaitable[object]]) -> tuple[Stalls, float]:
    async with ticking() as stalls:
        start = time.perf_counter()
        await work()
        elapsed = time.perf_counter() - start
    return stalls, elapsed


# --- (a) the ledger's write lock held by another process -----------------------------------------

_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


@contextlib.contextmanager
def write_lock_held(path: Path, hold_s: float) -> Any:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(hold_s)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "locked":
            raise RuntimeError("the lock holder did not start")
        yield
    finally:
        proc.wait(timeout=hold_s + 30)


async def ledger_before(path: Path, hold_s: float) -> tuple[Stalls, float]:
    ledger = Ledger(path)
    try:
        with write_lock_held(path, hold_s):
            async def work() -> None:
                for i in range(20):
                    reservation = ledger.reserve(request_id=f"before-{i}", provider="canned", model="canned-1",
                                                 amount=Decimal("0.01"))
                    ledger.settle(reservation, Decimal("0.01"), unit="image", quantity=1)
            return await measure(work)
    finally:
        ledger.close()


async def ledger_after(path: Path, hold_s: float, png: bytes, side: int) -> tuple[Stalls, float]:
    from router import AsyncRouter

    router = AsyncRouter([Canned(png, side)], ledger=path, max_retries=0)
    try:
        with write_lock_held(path, hold_s):
            async def work() -> None:
                await asyncio.gather(*(router.agenerate("a lighthouse") for _ in range(20)))
            return await measure(work)
    finally:
        await router.aclose()
        router.ledger.close()


# --- (b) 9-megapixel images ------------------------------------------------------------------------


def noise_png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


async def asgi_call(app: Any, path: str, body: bytes, content_type: str) -> tuple[int, int]:
    """One request to ``app`` on this loop, its body in 64 KiB chunks as uvicorn delivers it; the answer is
    counted, not kept. Returns the status and the answer's size."""
    position = 0
    status, size = 0, 0

    async def receive() -> dict[str, Any]:
        nonlocal position
        if position < len(body) or position == 0:
            chunk = body[position:position + 65536]
            position += 65536
            return {"type": "http.request", "body": chunk, "more_body": position < len(body)}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, size
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            size += len(message.get("body", b""))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    return status, size


def multipart_body(png: bytes) -> tuple[bytes, str]:
    boundary = "----loopstall7d1b"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nrepaint it\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode()
    return head + png + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def old_answer(png: bytes) -> bytes:
    """The old server's answer: base64 and JSONResponse's json.dumps, in one piece each."""
    b64 = base64.b64encode(png).decode()
    return json.dumps({"data": [{"b64_json": b64}]}, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass
class Case:
    scenario: str
    variant: str
    run: Callable[[], Awaitable[object]]
    stalls: Stalls = field(default_factory=Stalls)
    seconds: list[float] = field(default_factory=list)


def image_cases(png: bytes, side: int) -> tuple[list[Case], Callable[[], Awaitable[None]]]:
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartParser

    from router import AsyncRouter
    from router.server import create_app

    b64 = base64.b64encode(png).decode()
    router = AsyncRouter([Canned(png, side)], ledger=":memory:", max_retries=0)
    app = create_app(router)
    json_body = json.dumps({"prompt": "x", "init_image": b64}).encode()
    form_body, form_type = multipart_body(png)

    async def sdk_bytes_before() -> None:
        decode(png, what="init_image")  # the old validation decoded every pixel
        await router.agenerate("x", init_image=png)

    async def sdk_bytes_after() -> None:
        await router.agenerate("x", init_image=png)

    async def sdk_b64_before() -> None:
        await router.agenerate(ImageRequest.from_kwargs("x", init_image=b64))  # validated on the loop, as before

    async def sdk_b64_after() -> None:
        await router.agenerate("x", init_image=b64)

    async def json_before() -> None:
        body = json.loads(json_body)
        data = base64.b64decode(body["init_image"].strip(), validate=True)
        decode(data, what="init_image")
        old_answer(png)

    async def json_after() -> None:
        status, _ = await asgi_call(app, "/v1/images/generations", json_body, "application/json")
        assert status == 200, status

    async def form_before() -> None:
        async def stream() -> AsyncGenerator[bytes, None]:
            for i in range(0, len(form_body), 65536):
                yield form_body[i:i + 65536]

        headers = Headers({"content-type": form_type})
        form = await MultiPartParser(headers, stream(), max_files=4, max_fields=100).parse()
        upload = form["image"]
        assert isinstance(upload, UploadFile)
        decode(await upload.read(), what="init_image")
        await form.close()
        old_answer(png)

    async def form_after() -> None:
        status, _ = await asgi_call(app, "/v1/images/edits", form_body, form_type)
        assert status == 200, status

    cases = [
        Case("(b) SDK: agenerate(init_image=PNG bytes)", "before: full decode", sdk_bytes_before),
        Case("(b) SDK: agenerate(init_image=PNG bytes)", "after: header only", sdk_bytes_after),
        Case("(b) SDK: init_image as base64", "before: from_kwargs on the loop", sdk_b64_before),
        Case("(b) SDK: init_image as base64", "after: agenerate (afrom_kwargs)", sdk_b64_after),
        Case("(b) server: POST /v1/images/generations (JSON)", "before: old handler's steps", json_before),
        Case("(b) server: POST /v1/images/generations (JSON)", "after", json_after),
        Case("(b) server: POST /v1/images/edits (multipart)", "before: old handler's steps", form_before),
        Case("(b) server: POST /v1/images/edits (multipart)", "after", form_after),
    ]
    return cases, router.aclose


# --- the run -------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> list[Case]:
    t0 = time.perf_counter()
    png = noise_png(args.side)
    print(f"# {args.side}x{args.side} noise PNG: {len(png) / 1e6:.1f} MB ({time.perf_counter() - t0:.1f}s to make)",
          file=sys.stderr)
    idle = Case("idle loop (noise floor)", "-", lambda: asyncio.sleep(0.5))
    ledger_cases = [Case("(a) ledger: write lock held by another process", f"before: Ledger.reserve on the loop "
                         f"(lock held {args.hold:g}s)", lambda: asyncio.sleep(0)),
                    Case("(a) ledger: write lock held by another process", "after: 20 × agenerate, file ledger",
                         lambda: asyncio.sleep(0))]
    cases, close = image_cases(png, args.side)
    try:
        for case in cases:  # warm-up: imports, first-call costs
            await case.run()
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                stalls, seconds = await measure(idle.run)
                idle.stalls.add(stalls)
                idle.seconds.append(seconds)
                if r == 0:  # one round of (a): each holds the lock for --hold seconds
                    for case, runner in zip(ledger_cases, (
                            lambda: ledger_before(Path(tmp) / "before.sqlite", args.hold),
                            lambda: ledger_after(Path(tmp) / "after.sqlite", args.hold, png, args.side)),
                            strict=True):
                        stalls, seconds = await runner()
                        case.stalls.add(stalls)
                        case.seconds.append(seconds)
                order = cases if r % 2 == 0 else [c for pair in zip(cases[1::2], cases[::2], strict=True) for c in pair]
                for case in order:
                    stalls, seconds = await measure(case.run)
                    case.stalls.add(stalls)
                    case.seconds.append(seconds)
                print(f"# round {r + 1}/{args.rounds} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    finally:
        await close()
    return [idle, *ledger_cases, *cases]


def table(cases: list[Case], args: argparse.Namespace) -> str:
    import PIL

    lines = [
        f"# loop stall: {args.side}x{args.side} noise PNG, {args.rounds} rounds of (b), ledger lock held "
        f"{args.hold:g}s in (a); ticker period {PERIOD_S * 1000:g} ms",
        f"# python {platform.python_version()}, Pillow {PIL.__version__}; {os.cpu_count()} CPUs, "
        f"{platform.machine()}",
        "| scenario | variant | worst stall ms | median of runs' worst ms | p99 ms | ticks | work s (median) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        median = sorted(c.seconds)[len(c.seconds) // 2] if c.seconds else 0.0
        lines.append(f"| {c.scenario} | {c.variant} | {c.stalls.worst_ms:.1f} | {c.stalls.median_worst_ms:.1f} | "
                     f"{c.stalls.p99_ms:.1f} | {len(c.stalls.lags)} | {median:.3f} |")
    return "\n".join(lines)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hold", type=float, default=1.5, help="seconds the other process holds the write lock")
    parser.add_argument("--side", type=int, default=3000, help="the test image is side x side pixels")
    parser.add_argument("--out", type=Path, help="also write the table, the command and the machine here")
    args = parser.parse_args()
    text = table(asyncio.run(main(args)), args)
    print(text)
    if args.out:
        command = "python benchmarks/loop_stall.py " + " ".join(sys.argv[1:])
        args.out.write_text(f"# benchmarks/loop_stall.py ({date.today().isoformat()})\n\nCommand: `{command}`\n\n"
                            f"```\n{text}\n```\n")


if __name__ == "__main__":
    cli()
