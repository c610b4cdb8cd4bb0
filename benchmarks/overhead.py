"""The router's added latency per request, against the OpenAI SDK it wraps and against LiteLLM.

    .venv/bin/python benchmarks/overhead.py [--requests 400] [--rounds 5] [--concurrency 1 200]
                                            [--server fixed|sandbox] [--skip-litellm] [--profile]

Four clients call one loopback OpenAI Images endpoint that runs in its own process (so the
server does not share this process's GIL):

- ``raw``      the plain ``openai.AsyncOpenAI().images.generate`` (the baseline);
- ``adapter``  this project's :class:`providers.openai.OpenAIProvider` called directly;
- ``router``   :meth:`router.AsyncRouter.agenerate` over that adapter (in-memory ledger,
               policy decision, reserve/settle, statistics, provenance and result building);
- ``litellm``  ``litellm.aimage_generation(model="openai/gpt-image-2", api_base=...)``.

``--server fixed`` (default) is an asyncio responder that replays, byte for byte, the body the
project's :class:`~providers.sandbox.OpenAISandbox` answers for the benchmark request (one PNG,
``usage`` included); ``--server sandbox`` serves that sandbox itself, whose thread per connection
becomes the bottleneck at concurrency 200 and hides the clients' differences there. Every round runs every client
(in a rotating order) on the same server, after a warm-up; "added" is a client's percentile
minus the raw SDK's, from the latencies pooled over all rounds. No test asserts on these times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import logging
import os
import platform
import pstats
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is imported: no cost-map fetch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

API_KEY = "sk-bench"
MODEL = "gpt-image-2"
PROMPT = "a red bicycle leaning on a wall"

Call = Callable[[], Awaitable[object]]


# --- the server, in a child process ------------------------------------------------------------


def _serve(kind: str, size: str) -> None:
    """Child process: start a server, print its base URL, serve until stdin closes."""
    if kind == "sandbox":
        from providers.sandbox import OpenAISandbox

        sandbox = OpenAISandbox(api_key=API_KEY).start()
        print(sandbox.base_url, flush=True)
        sys.stdin.read()
        sandbox.stop()
        return
    asyncio.run(_serve_fixed(_sandbox_body(size)))


def _sandbox_body(size: str) -> bytes:
    """The body the project's sandbox answers for the benchmark request, fetched once."""
    import httpx

    from providers.sandbox import OpenAISandbox

    with OpenAISandbox(api_key=API_KEY) as sandbox:
        resp = httpx.post(f"{sandbox.base_url}/images/generations", headers={"authorization": f"Bearer {API_KEY}"},
                          json={"model": MODEL, "prompt": PROMPT, "size": size, "n": 1, "output_format": "png"})
        resp.raise_for_status()
        return resp.content


async def _serve_fixed(body: bytes) -> None:
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: req_bench\r\n"
            b"openai-processing-ms: 1\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n")
    answer = head + body

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in header.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length:
                    await reader.readexactly(length)
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client hung up, or the server is shutting down
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0, backlog=2048)
    port = server.sockets[0].getsockname()[1]
    print(f"http://127.0.0.1:{port}/v1", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


@contextlib.contextmanager
def server_process(kind: str, size: str) -> Iterator[str]:
    """Run the server in a child process; yield its base URL."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--size", size], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"the benchmark server did not start (got {url!r})")
        yield url
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the clients -----------------------------------------------------------------------------


@dataclass
class Client:
    name: str
    call: Call
    close: Callable[[], Awaitable[None]] | None = None


async def build_clients(base_url: str, size: str, *, litellm_too: bool, ledger: str = ":memory:") -> list[Client]:
    import openai

    from providers.openai import OpenAIProvider
    from router import AsyncRouter, ImageRequest

    width, height = (int(x) for x in size.split("x"))
    request = ImageRequest(prompt=PROMPT, width=width, height=height)

    raw = openai.AsyncOpenAI(api_key=API_KEY, base_url=base_url, max_retries=0)

    async def call_raw() -> object:
        return await raw.images.generate(model=MODEL, prompt=PROMPT, size=size, n=1,
                                         output_format="png", timeout=60)

    adapter = OpenAIProvider(api_key=API_KEY, base_url=base_url)

    async def call_adapter() -> object:
        return await adapter.generate(request, MODEL, timeout_s=60)

    routed = AsyncRouter([OpenAIProvider(api_key=API_KEY, base_url=base_url)], ledger=ledger)

    async def call_router() -> object:
        return await routed.agenerate(request)

    clients = [Client("raw", call_raw, raw.close), Client("adapter", call_adapter, adapter.aclose),
               Client("router", call_router, routed.aclose)]
    if litellm_too:
        import litellm

        litellm.telemetry = False
        litellm.suppress_debug_info = True
        litellm.set_verbose = False
        logging.getLogger("LiteLLM").setLevel(logging.ERROR)

        async def call_litellm() -> object:
            return await litellm.aimage_generation(model=f"openai/{MODEL}", prompt=PROMPT, size=size,
                                                   api_base=base_url, api_key=API_KEY, num_retries=0, timeout=60)

        clients.append(Client("litellm", call_litellm))
    return clients


# --- measuring -----------------------------------------------------------------------------------


@dataclass
class Series:
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    wall_s: float = 0.0


async def run_batch(call: Call, requests: int, concurrency: int) -> tuple[list[float], float]:
    """``requests`` calls from ``concurrency`` workers; each call's latency and the batch's wall time."""
    latencies: list[float] = []
    left = requests
    clock = time.perf_counter

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = clock()
            await call()
            latencies.append(clock() - t0)

    start = clock()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    return latencies, clock() - start


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def measure(clients: list[Client], concurrency: int, requests: int, rounds: int) -> dict[str, Series]:
    for client in clients:  # warm-up: connections, imports, caches
        await run_batch(client.call, max(50, concurrency), concurrency)
    series = {c.name: Series() for c in clients}
    for r in range(rounds):
        order = clients[r % len(clients):] + clients[:r % len(clients)]
        for client in order:
            latencies, wall = await run_batch(client.call, requests, concurrency)
            s = series[client.name]
            s.latencies += latencies
            s.requests += len(latencies)
            s.wall_s += wall
    return series


def table(results: dict[int, dict[str, Series]]) -> str:
    lines = ["| method | concurrency | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for concurrency, series in results.items():
        base = sorted(series["raw"].latencies)
        b50, b99 = percentile(base, 0.5), percentile(base, 0.99)
        for name, s in series.items():
            lat = sorted(s.latencies)
            p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
            added = ("-", "-") if name == "raw" else (f"{(p50 - b50) * 1e3:+.3f}", f"{(p99 - b99) * 1e3:+.3f}")
            lines.append(f"| {name} | {concurrency} | {p50 * 1e3:.3f} | {p99 * 1e3:.3f} | {added[0]} | {added[1]} "
                         f"| {s.requests / s.wall_s:,.0f} |")
    return "\n".join(lines)


def verdict(results: dict[int, dict[str, Series]]) -> list[str]:
    out = []
    for concurrency, series in results.items():
        p50 = {name: percentile(sorted(s.latencies), 0.5) for name, s in series.items()}
        router_added = (p50["router"] - p50["raw"]) * 1e3
        over_adapter = (p50["router"] - p50["adapter"]) * 1e3
        line = (f"concurrency {concurrency}: the router adds {over_adapter:+.3f} ms p50 over its own adapter "
                f"(what routing costs; goal ≤ 0.3), {router_added:+.3f} ms over the raw SDK")
        if "litellm" in p50:
            litellm_added = (p50["litellm"] - p50["raw"]) * 1e3  # LiteLLM over the SDK it wraps
            ratio = over_adapter / litellm_added if litellm_added > 0 else float("nan")
            both_raw = router_added / litellm_added if litellm_added > 0 else float("nan")
            line += (f"; LiteLLM adds {litellm_added:+.3f} ms over the SDK it wraps (router/LiteLLM = {ratio:.2f}, "
                     f"goal ≤ 0.2; {both_raw:.2f} counting our adapter too)")
        out.append(line)
    return out


def versions(litellm_too: bool) -> str:
    from importlib.metadata import version

    parts = [f"python {platform.python_version()}", f"openai {version('openai')}", f"httpx {version('httpx')}"]
    if litellm_too:
        parts.append(f"litellm {version('litellm')}")
    return ", ".join(parts) + f"; {os.cpu_count()} CPUs, {platform.machine()}"


async def profile_router(base_url: str, size: str, requests: int) -> str:
    """cProfile of the router path at concurrency 1: the top functions by own time and by cumulative time."""
    clients = {c.name: c for c in await build_clients(base_url, size, litellm_too=False)}
    router = clients["router"]
    await run_batch(router.call, 50, 1)
    profiler = cProfile.Profile()
    profiler.enable()
    await run_batch(router.call, requests, 1)
    profiler.disable()
    for c in clients.values():
        if c.close is not None:
            await c.close()
    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf).strip_dirs()
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    return buf.getvalue()


async def run(args: argparse.Namespace) -> int:
    litellm_too = not args.skip_litellm
    with server_process(args.server, args.size) as base_url:
        clients = await build_clients(base_url, args.size, litellm_too=litellm_too, ledger=args.ledger)
        results: dict[int, dict[str, Series]] = {}
        try:
            for concurrency in args.concurrency:
                results[concurrency] = await measure(clients, concurrency, args.requests, args.rounds)
        finally:
            for client in clients:
                if client.close is not None:
                    await client.close()
        print(f"# router overhead: {args.server} server in its own process, size {args.size}, "
              f"{args.requests} requests x {args.rounds} rounds per method and concurrency")
        print(f"# {versions(litellm_too)}")
        print(table(results))
        for line in verdict(results):
            print(line)
        if args.profile:
            print(await profile_router(base_url, args.size, args.requests * args.rounds))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=400, help="requests per method, round and concurrency")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 200])
    parser.add_argument("--server", choices=("sandbox", "fixed"), default="fixed")
    parser.add_argument("--size", default="1024x1024", help="image size requested (the sandbox draws it once)")
    parser.add_argument("--ledger", default=":memory:", help="the router's ledger: :memory: or a file path")
    parser.add_argument("--skip-litellm", action="store_true", help="leave LiteLLM out (its import takes seconds)")
    parser.add_argument("--profile", action="store_true", help="then print a cProfile of the router path")
    parser.add_argument("--serve", choices=("sandbox", "fixed"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.size)
        return 0
    import importlib.util

    if importlib.util.find_spec("openai") is None:
        parser.error("the openai SDK is not installed: pip install -e '.[openai]' (or '.[bench]', which adds LiteLLM)")
    if not args.skip_litellm and importlib.util.find_spec("litellm") is None:
        parser.error("LiteLLM is not installed: pip install -e '.[bench]' (the bench extra), or pass --skip-litellm")
    logging.basicConfig(level=logging.WARNING)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
