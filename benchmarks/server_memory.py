"""The server's memory while clients send it maximal bodies at once: peak RSS against the body cap.

    .venv/bin/python benchmarks/server_memory.py [--body-mib 64] [--clients 10] [--scenarios route,generations,edits]
                                                 [--out FILE]

Each row starts ``pixroute serve`` (the real command: uvicorn, in its own process) on 127.0.0.1, with the
``openai`` provider pointed at the offline :class:`~providers.sandbox.OpenAISandbox` running in this process
(so the sandbox's memory is not counted), warms it up with one small request per endpoint, reads its idle
RSS, then sends ``--clients`` maximal bodies at once from as many threads and reads the server's peak RSS
(``VmHWM`` in ``/proc/<pid>/status``: the kernel's exact high-water mark, not a sample; Linux only).

- ``route``: ``POST /v1/route``, a JSON body of the body cap: a noise PNG as an ``init_image`` data URL (the
  server reads, parses and decodes the body and routes it; nothing is called);
- ``generations``: ``POST /v1/images/generations``, the same body, served by the sandbox (the image is
  uploaded to it as an OpenAI edit);
- ``edits``: ``POST /v1/images/edits``, multipart, a noise PNG as large as the image cap allows (files spool
  to disk past 1 MiB, then are read back whole).

Each scenario runs with the in-flight cap at its default (one maximal body: ``--max-inflight-body-bytes``
left out) and with it at clients × body cap (no cap in effect), to show what the cap holds back. Requests
that wait for room wait up to ``--body-wait-s 600``: every request is served, none refused.

Goal: peak RSS growth (peak − idle) below 2 × the body cap with the default in-flight cap. No test asserts
on these figures.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from providers.sandbox import OpenAISandbox  # noqa: E402
from router.images import MAX_IMAGE_BYTES  # noqa: E402

MIB = 1024 * 1024
GOAL = 2.0  # peak RSS growth / body cap


def noise_png(target_bytes: int) -> bytes:
    """A PNG of random pixels about ``target_bytes`` long, and no longer (noise barely compresses)."""
    side = int((target_bytes / 3) ** 0.5)
    while True:
        buf = io.BytesIO()
        Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, format="PNG", compress_level=1)
        if buf.tell() <= target_bytes:
            return buf.getvalue()
        side -= 16


def json_body(cap: int) -> bytes:
    """A generations body as close under ``cap`` bytes as a PNG allows: the image as a data URL."""
    head = '{"prompt": "repaint it in ink", "size": "1024x1024", "init_image": "data:image/png;base64,'
    image = noise_png((cap - len(head) - 2) * 3 // 4 - 64)
    body = (head + base64.b64encode(image).decode() + '"}').encode()
    assert len(body) <= cap, (len(body), cap)
    return body


def multipart_body(cap: int, image_cap: int) -> tuple[bytes, str]:
    boundary = "----servermemory7d1b"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nrepaint it in ink\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="size"\r\n\r\n1024x1024\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    image = noise_png(min(image_cap, cap - len(head) - len(tail)) - 64)
    return head + image + tail, f"multipart/form-data; boundary={boundary}"


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


@contextlib.contextmanager
def server(sandbox: OpenAISandbox, cap: int, inflight: int | None) -> Iterator[tuple[str, int]]:
    """``pixroute serve`` in a child process; yields its origin and pid."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [
        sys.executable,
        "-m",
        "router.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ledger",
        ":memory:",
        "--max-body-bytes",
        str(cap),
        "--body-wait-s",
        "600",
        "--log-level",
        "warning",
    ]
    if inflight is not None:
        args += ["--max-inflight-body-bytes", str(inflight)]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "OPENAI_API_KEY": sandbox.api_key,
        "OPENAI_BASE_URL": sandbox.base_url,
        "IMAGEROUTER_PROVIDERS": "openai",
        "IMAGEROUTER_LEDGER": ":memory:",
    }
    proc = subprocess.Popen(args, cwd=ROOT, env=env)
    origin = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{origin}/healthz", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.1)
        yield origin, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Row:
    scenario: str
    variant: str
    body_bytes: int
    inflight: int
    idle_kib: int
    peak_kib: int
    statuses: Counter[int]
    seconds: float


def run(
    scenario: str,
    sandbox: OpenAISandbox,
    cap: int,
    inflight: int | None,
    clients: int,
    bodies: dict[str, tuple[bytes, str]],
) -> Row:
    path = {"route": "/v1/route", "generations": "/v1/images/generations", "edits": "/v1/images/edits"}[scenario]
    body, content_type = bodies["edits" if scenario == "edits" else "json"]
    small_png = base64.b64encode(noise_png(20_000)).decode()
    with server(sandbox, cap, inflight) as (origin, pid):
        with httpx.Client(base_url=origin, timeout=600) as client:  # warm-up: every module the burst needs
            for warm in ("/v1/route", "/v1/images/generations"):
                answer = client.post(
                    warm, json={"prompt": "x", "size": "1024x1024", "init_image": f"data:image/png;base64,{small_png}"}
                )
                assert answer.status_code == 200, answer.text
            answer = client.post(
                "/v1/images/edits",
                data={"prompt": "x", "size": "1024x1024"},
                files={"image": ("in.png", base64.b64decode(small_png), "image/png")},
            )
            assert answer.status_code == 200, answer.text
        time.sleep(0.5)
        idle = status_kib(pid, "VmRSS")

        def send(_: int) -> int:
            with httpx.Client(base_url=origin, timeout=600) as client:
                return client.post(path, content=body, headers={"content-type": content_type}).status_code

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            statuses = Counter(pool.map(send, range(clients)))
        seconds = time.perf_counter() - start
        peak = status_kib(pid, "VmHWM")
    variant = "default in-flight cap" if inflight is None else "no in-flight cap"
    return Row(scenario, variant, len(body), inflight or cap, idle, peak, statuses, seconds)


def table(rows: list[Row], cap: int, clients: int) -> str:
    import PIL

    lines = [
        f"# server memory: {clients} concurrent maximal bodies, body cap {cap / MIB:g} MiB, image cap "
        f"{MAX_IMAGE_BYTES / MIB:g} MiB; goal: peak growth < {GOAL:g} x body cap with the default in-flight cap",
        f"# python {platform.python_version()}, Pillow {PIL.__version__}; {os.cpu_count()} CPUs, {platform.machine()}",
        "| scenario | in-flight cap | body MiB | in-flight cap MiB | idle RSS MiB | peak RSS MiB | growth MiB | "
        "growth / body cap | answers | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        growth = (r.peak_kib - r.idle_kib) * 1024
        answers = ", ".join(f"{n}×{status}" for status, n in sorted(r.statuses.items()))
        lines.append(
            f"| {r.scenario} | {r.variant} | {r.body_bytes / MIB:.1f} | {r.inflight / MIB:.0f} | "
            f"{r.idle_kib / 1024:.0f} | {r.peak_kib / 1024:.0f} | {growth / MIB:.0f} | {growth / cap:.2f} | "
            f"{answers} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--body-mib", type=float, default=64, help="the body cap (default: the server's, 64)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--scenarios", default="route,generations,edits")
    parser.add_argument("--no-baseline", action="store_true", help="skip the rows without an in-flight cap")
    parser.add_argument("--out", type=Path, help="also write the table and the command here")
    args = parser.parse_args()
    cap = int(args.body_mib * MIB)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bodies = {"json": (json_body(cap), "application/json"), "edits": multipart_body(cap, MAX_IMAGE_BYTES)}
    rows = []
    with OpenAISandbox(api_key="sk-bench-memory") as sandbox:
        for scenario in scenarios:
            for inflight in (None, *(() if args.no_baseline else (args.clients * cap,))):
                rows.append(run(scenario, sandbox, cap, inflight, args.clients, bodies))
                print(json.dumps({"done": rows[-1].scenario, "variant": rows[-1].variant}), file=sys.stderr)
    text = table(rows, cap, args.clients)
    print(text)
    if args.out:
        command = "python benchmarks/server_memory.py " + " ".join(sys.argv[1:])
        args.out.write_text(
            f"# benchmarks/server_memory.py ({date.today().isoformat()})\n\nCommand: `{command}`\n\n```\n{text}\n```\n"
        )


if __name__ == "__main__":
    main()
