"""SSRF: every URL the SDK or an adapter handles is refused unless it reaches the public internet.

The corpus is RELIABILITY.md's (127.0.0.1, 169.254.169.254, [::1], fd00::, 0x7f.1, 2130706433, a name
resolving to 10.x, 302 → internal, file://, gopher://), the issue's (100.64.0.0/10, 100.100.100.200,
fec0::1, ::ffff:10.0.0.1, 64:ff9b::a00:1, 2002:0a00:0001::, decimal / octal / hex IPv4) and more
spellings of the same, driven through every entry point: the fetcher, request images, each provider's
init image, the output URLs of Together, Replicate and BFL, and the URLs a vendor fetches itself
(Together's init and reference images, LoRA weights on Together and Replicate).

Nothing here leaves the machine. Names resolve through :class:`FakeDNS` (no DNS query is made); the
fetcher's transport is :class:`GuardTransport`, which answers only the two "public" test addresses and
records anything else as a failure instead of connecting; and :func:`no_outside_connections` (autouse)
refuses and records any socket connect or address lookup outside 127.0.0.0/8 and ::1, failing the test
that made it. A wrongly allowed address therefore fails its test; it is never connected to.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import tracemalloc
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import httpx
import pytest

from providers.base import Provider
from providers.bfl import BFLProvider
from providers.openai import OpenAIProvider
from providers.replicate import ReplicateProvider
from providers.sandbox import (
    BFLSandbox,
    Fault,
    OpenAISandbox,
    ReplicateSandbox,
    StabilitySandbox,
    TogetherSandbox,
)
from providers.stability import StabilityProvider
from providers.together import DEV_LORA, KONTEXT_PRO, SCHNELL, TogetherProvider
from router import ImageRequest, InvalidRequestError, MalformedResponse
from router.errors import Disposition
from router.fetch import SafeFetcher, UnsafeURLError, forbidden, host_address
from router.images import ImageDecodeError, ImageInput, load_bytes
from tests.conftest import make_router, png

PUBLIC = "93.184.215.14"  # a global address the guard transport answers for: the positive control
REDIRECTOR = "93.184.215.15"  # a global address whose answer is a redirect to the target in its query


# --- the guards -----------------------------------------------------------------------------------------


def _loopback(host: Any) -> bool:
    if host in ("localhost", None, ""):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def no_outside_connections(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Refuse, and record, every socket connect and address lookup outside 127.0.0.0/8 and ::1; the test
    fails at teardown if any was attempted. The loopback sandboxes keep working."""
    attempts: list[str] = []
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def guarded_connect(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            attempts.append(f"connect {address!r}")
            raise ConnectionRefusedError(f"test guard: no connections outside loopback ({address!r})")
        return connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            attempts.append(f"connect_ex {address!r}")
            raise ConnectionRefusedError(f"test guard: no connections outside loopback ({address!r})")
        return connect_ex(self, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kw: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if not _loopback(name):
            attempts.append(f"getaddrinfo {name!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"test guard: no lookups outside loopback ({name!r})")
        return getaddrinfo(host, *args, **kw)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    yield attempts
    assert attempts == [], f"tried to reach outside loopback: {attempts}"


class FakeDNS:
    """A resolver from a table: never asks the system's DNS. An unknown name does not resolve."""

    TABLE: ClassVar[dict[str, list[str]]] = {
        "internal.example": ["10.1.2.3"],
        "metadata.google.internal": ["169.254.169.254"],
        "localhost": ["127.0.0.1", "::1"],
        "rebind.example": [PUBLIC, "10.0.0.1"],  # one public and one private answer: refused
        "ula.example": ["fd00::1"],
        "cgnat.example": ["100.64.0.1"],
        "nat64.example": ["64:ff9b::a9fe:a9fe"],  # 169.254.169.254 through NAT64
        "public.example": [PUBLIC],
        "redirect.example": [REDIRECTOR],
    }

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append(host)
        if host not in self.TABLE:
            raise socket.gaierror(socket.EAI_NONAME, "unknown name")
        return self.TABLE[host]


class GuardTransport(httpx.AsyncBaseTransport):
    """The fetcher's network: serves a PNG at :data:`PUBLIC`, a redirect at :data:`REDIRECTOR`, and refuses
    (recording it) any other request, which a correct fetcher never makes."""

    def __init__(self) -> None:
        self.served: list[str] = []
        self.refused: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host == PUBLIC:
            self.served.append(str(request.url))
            return httpx.Response(200, headers={"content-type": "image/png"}, content=png(16, 16))
        if host == REDIRECTOR:
            self.served.append(str(request.url))
            return httpx.Response(302, headers={"location": request.url.params.get("to", "/")})
        self.refused.append(str(request.url))
        raise httpx.ConnectError(f"test guard: refused to connect to {host}")


@pytest.fixture
def guard() -> Iterator[GuardTransport]:
    transport = GuardTransport()
    yield transport
    assert transport.refused == [], f"the fetcher tried to reach {transport.refused}"


def fetcher(transport: GuardTransport) -> SafeFetcher:
    return SafeFetcher(resolver=FakeDNS(), transport=transport, timeout_s=5.0)


def via_redirect(target: str) -> str:
    return str(httpx.URL("http://redirect.example/out", params={"to": target}))


# --- the corpus -----------------------------------------------------------------------------------------

HTTP_CORPUS: dict[str, str] = {
    # RELIABILITY.md
    "loopback": "http://127.0.0.1/a.png",
    "metadata": "http://169.254.169.254/latest/meta-data/",
    "ipv6 loopback": "http://[::1]/a.png",
    "ula fd00::": "http://[fd00::]/a.png",
    "hex short 0x7f.1": "http://0x7f.1/a.png",
    "decimal 2130706433": "http://2130706433/a.png",
    "name to 10.x": "http://internal.example/a.png",
    "302 to 10.x": via_redirect("http://10.0.0.5/secret.png"),
    # the issue
    "100.64.0.0/10": "http://100.64.0.1/a.png",
    "alibaba metadata": "http://100.100.100.200/latest/meta-data/",
    "site-local fec0::1": "http://[fec0::1]/a.png",
    "ipv4-mapped 10.x": "http://[::ffff:10.0.0.1]/a.png",
    "nat64 10.x": "http://[64:ff9b::a00:1]/a.png",
    "6to4 10.x": "http://[2002:0a00:0001::]/a.png",
    "octal 017700000001": "http://017700000001/a.png",
    "hex 0x7f000001": "http://0x7f000001/a.png",
    "hex dotted 0x7f.0.0.1": "http://0x7f.0.0.1/a.png",
    "short 127.1": "http://127.1/a.png",
    "octal dotted 0177.0.0.1": "http://0177.0.0.1/a.png",
    # more of the same
    "unspecified": "http://0.0.0.0/a.png",
    "ipv6 unspecified": "http://[::]/a.png",
    "multicast": "http://224.0.0.1/a.png",
    "ipv6 multicast": "http://[ff02::1]/a.png",
    "broadcast": "http://255.255.255.255/a.png",
    "link-local v6": "http://[fe80::1]/a.png",
    "benchmarking 198.18/15": "http://198.18.0.1/a.png",
    "reserved 240/4": "http://240.0.0.1/a.png",
    "private 192.168": "https://192.168.1.1/a.png",
    "private 172.16": "http://172.16.0.1:8080/a.png",
    "loopback other /8": "http://127.9.9.9/a.png",
    "loopback trailing dot": "http://127.0.0.1./a.png",
    "loopback with userinfo": "http://user:pw@127.0.0.1/a.png",
    "loopback other port": "http://127.0.0.1:6379/",
    "ipv4-mapped loopback": "http://[::ffff:127.0.0.1]/a.png",
    "ipv4-mapped hex": "http://[::ffff:7f00:1]/a.png",
    "ipv4-compatible": "http://[::127.0.0.1]/a.png",
    "teredo": "http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/a.png",
    "local nat64": "http://[64:ff9b:1::a00:1]/a.png",
    "6to4 loopback": "http://[2002:7f00:1::]/a.png",
    "oracle metadata": "http://192.0.0.192/opc/v2/instance/",
    "azure wireserver": "http://168.63.129.16/machine",
    "aws metadata v6": "http://[fd00:ec2::254]/latest/meta-data/",
    "localhost": "http://localhost/a.png",
    "gcp metadata name": "http://metadata.google.internal/computeMetadata/v1/",
    "mixed answers": "http://rebind.example/a.png",
    "name to ula": "https://ula.example/a.png",
    "name to 100.64": "http://cgnat.example/a.png",
    "name to nat64 metadata": "http://nat64.example/a.png",
    "unresolvable name": "http://nowhere.example/a.png",
    "302 to metadata": via_redirect("http://169.254.169.254/latest/meta-data/iam/"),
    "302 to file": via_redirect("file:///etc/passwd"),
    "302 to ipv6 loopback": via_redirect("http://[::1]/a.png"),
    "302 to 0x7f.1": via_redirect("http://0x7f.1/a.png"),
    "302 to gopher": via_redirect("gopher://127.0.0.1:70/_x"),
    "302 loop": via_redirect(via_redirect(via_redirect(via_redirect("http://public.example/a.png")))),
}
"""http(s) URLs: refused by the fetcher's address check (at some hop)."""

SCHEME_CORPUS: dict[str, str] = {
    "file": "file:///etc/passwd",
    "gopher": "gopher://127.0.0.1:70/_x",
    "ftp": "ftp://example.com/a.png",
    "dict": "dict://127.0.0.1:11211/stat",
    "ldap": "ldap://127.0.0.1/",
    "jar": "jar:http://127.0.0.1/a.jar!/",
    "scheme-relative": "//127.0.0.1/a.png",
    "bare path": "/etc/passwd",
}
"""Not http(s): refused for their scheme."""

CORPUS = HTTP_CORPUS | SCHEME_CORPUS


# --- the check itself ----------------------------------------------------------------------------------


@pytest.mark.parametrize("url", list(CORPUS.values()), ids=list(CORPUS))
async def test_the_fetcher_refuses_the_corpus_without_connecting(url: str, guard: GuardTransport) -> None:
    with pytest.raises(UnsafeURLError) as info:
        await fetcher(guard).fetch(url)
    assert info.value.disposition is Disposition.FATAL  # the request is at fault: no other backend is tried


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://169.254.169.254/latest/", "'169.254.169.254' is a link-local or cloud metadata address"),
        ("http://[64:ff9b::a00:1]/", "private (embedded in 64:ff9b::a00:1)"),
        ("http://0x7f.1/", "'0x7f.1' is a loopback address (127.0.0.1)"),
        ("http://internal.example/", "'internal.example' is a private address (10.1.2.3)"),
        ("gopher://127.0.0.1:70/", "only http(s) URLs are fetched, not gopher"),
    ],
)
async def test_a_refusal_says_why_and_what_to_give_instead(url: str, says: str, guard: GuardTransport) -> None:
    with pytest.raises(UnsafeURLError) as info:
        await fetcher(guard).fetch(url, what="init_image")
    assert info.value.message.startswith("init_image: ") and says in info.value.message
    assert "public internet" in info.value.message or "give an http(s) URL" in info.value.message


async def test_the_corpus_is_refused_in_full(guard: GuardTransport) -> None:
    """The figure: how much of the corpus the fetcher refuses (goal 100 %)."""
    allowed = []
    for name, url in CORPUS.items():
        try:
            await fetcher(guard).fetch(url)
            allowed.append(name)
        except UnsafeURLError:
            pass
    assert allowed == [] and len(CORPUS) >= 60


async def test_a_public_address_is_fetched_and_pinned(guard: GuardTransport) -> None:
    """The positive control: the same fetcher and guard download from a public name, through a redirect."""
    f = fetcher(guard)
    assert await f.fetch("http://public.example/a.png") == png(16, 16)
    assert await f.fetch(via_redirect("http://public.example/b.png")) == png(16, 16)
    assert guard.served[0] == f"http://{PUBLIC}/a.png"  # connected to the checked address, not the name again


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True),
        ("2002:808:808::", True),
        (PUBLIC, True),
        ("100.64.0.1", False),
        ("100.127.255.255", False),
        ("100.100.100.200", False),
        ("fec0::1", False),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::a00:1", False),
        ("2002:a00:1::", False),
        ("2001::1", False),
        ("64:ff9b:1::808:808", False),
        ("::a00:1", False),
        ("169.254.169.254", False),
        ("168.63.129.16", False),
        ("192.0.0.192", False),
        ("fd00:ec2::254", False),
        ("ff0e::1", False),
        ("2001:db8::1", False),
        ("127.0.0.1", False),
        ("::1", False),
        ("::", False),
        ("0.0.0.0", False),
    ],
)
def test_only_globally_reachable_addresses_are_allowed(address: str, allowed: bool) -> None:
    assert (forbidden(ipaddress.ip_address(address)) is None) is allowed


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("0x7f.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"),
        ("1.2.3.4.", "1.2.3.4"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("example.com", None),
        ("a.b-c.example", None),
    ],
)
def test_every_spelling_of_an_address_is_read_as_that_address(host: str, address: str | None) -> None:
    assert host_address(host) == (ipaddress.ip_address(address) if address else None)


@pytest.mark.parametrize("host", ["ex.123", "1.2.3.4.5", "256.1.1.1", "08.1.1.1", "0x100000000"])
def test_a_host_ending_in_a_number_that_is_no_address_is_refused_not_resolved(host: str) -> None:
    with pytest.raises(UnsafeURLError):
        host_address(host)


async def test_loopback_is_allowed_only_where_asked(guard: GuardTransport) -> None:
    with pytest.raises(UnsafeURLError, match="loopback"):
        await SafeFetcher(resolver=FakeDNS(), transport=guard).check("http://127.0.0.1/x")
    _, address = await SafeFetcher(resolver=FakeDNS(), transport=guard, allow_loopback=True).check("http://0x7f.1/")
    assert address == "127.0.0.1"


# --- request images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", list(CORPUS.values()), ids=list(CORPUS))
async def test_a_request_image_url_is_refused(url: str, guard: GuardTransport) -> None:
    try:
        image = ImageInput.coerce(url, what="init_image")
    except ImageDecodeError:
        return  # refused at once: not an http(s) URL, and no such file
    with pytest.raises(UnsafeURLError):
        await load_bytes(image, fetcher=fetcher(guard))


async def test_a_huge_data_url_is_refused_from_its_length_before_decoding() -> None:
    payload = "data:image/png;base64," + "A" * (80 * 1024 * 1024)  # 80 MB of base64: 60 MB decoded
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError, match="over the"):
            ImageInput.coerce(payload, what="init_image")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024  # nothing decoded: under 1 MB allocated (decoding first cost +140 MB)


# --- each provider's init image: downloaded here, through the fetcher, or refused --------------------------

HTTP_URLS = list(HTTP_CORPUS.values())


async def refused_for_every_url(make: Any, model: str, urls: list[str], **kw: Any) -> list[str]:
    """Call ``make()``'s provider with each URL as the init image; the URLs it did not refuse with UnsafeURLError."""
    allowed = []
    for url in urls:
        provider: Provider = make()
        try:
            await provider.generate(ImageRequest(prompt="a cat", init_image=url, **kw), model, timeout_s=5.0)
            allowed.append(url)
        except UnsafeURLError:
            pass
        finally:
            await provider.aclose()
    return allowed


async def test_openai_init_image_urls_are_refused(guard: GuardTransport) -> None:
    with OpenAISandbox(api_key="sk-ssrf") as sb:
        allowed = await refused_for_every_url(
            lambda: OpenAIProvider(api_key=sb.api_key, base_url=sb.base_url, fetcher=fetcher(guard)),
            "gpt-image-2",
            HTTP_URLS,
        )
        assert allowed == [] and sb.hits() == 0


async def test_stability_init_image_urls_are_refused(guard: GuardTransport) -> None:
    with StabilitySandbox(api_key="sk-ssrf") as sb:
        allowed = await refused_for_every_url(
            lambda: StabilityProvider(api_key=sb.api_key, base_url=sb.base_url, fetcher=fetcher(guard)),
            "stable-image-ultra",
            HTTP_URLS,
            strength=0.5,
        )
        assert allowed == [] and sb.hits() == 0


async def test_replicate_init_image_urls_are_refused(guard: GuardTransport) -> None:
    with ReplicateSandbox(api_token="r8_ssrf") as sb:
        allowed = await refused_for_every_url(
            lambda: ReplicateProvider(api_token="r8_ssrf", base_url=sb.base_url, fetcher=fetcher(guard)),
            "flux-dev",
            HTTP_URLS,
        )
        assert allowed == [] and sb.hits() == 0


async def test_bfl_init_image_urls_are_refused(guard: GuardTransport) -> None:
    with BFLSandbox(api_key="bfl-ssrf") as sb:
        allowed = await refused_for_every_url(
            lambda: BFLProvider(
                api_key="bfl-ssrf", base_url=sb.base_url, fetcher=fetcher(guard), models=("flux-kontext-pro",)
            ),
            "flux-kontext-pro",
            HTTP_URLS,
        )
        assert allowed == [] and sb.hits() == 0


async def test_together_init_image_urls_are_refused_never_forwarded(guard: GuardTransport) -> None:
    with TogetherSandbox(api_key="tg-ssrf") as sb:
        allowed = await refused_for_every_url(
            lambda: TogetherProvider(api_key="tg-ssrf", base_url=sb.base_url, fetcher=fetcher(guard)),
            KONTEXT_PRO,
            HTTP_URLS,
        )
        assert allowed == [] and sb.hits() == 0  # not one internal URL reached Together


async def test_together_sends_a_public_init_image_as_bytes_not_as_its_url(guard: GuardTransport) -> None:
    with TogetherSandbox(api_key="tg-ssrf") as sb:
        p = TogetherProvider(api_key="tg-ssrf", base_url=sb.base_url, fetcher=fetcher(guard))
        try:
            await p.generate(
                ImageRequest(prompt="a cat", init_image="http://public.example/cat.png"), KONTEXT_PRO, timeout_s=5.0
            )
        finally:
            await p.aclose()
        sent = sb.requests[-1].json
        assert sent is not None and sent["image_url"].startswith("data:image/png;base64,")
        assert guard.served == [f"http://{PUBLIC}/cat.png"]  # downloaded here, through the checked address


async def test_a_refused_url_stops_the_request_instead_of_trying_every_backend(guard: GuardTransport) -> None:
    with StabilitySandbox(api_key="sk-a") as a, StabilitySandbox(api_key="sk-b") as b:
        providers = [
            StabilityProvider(name=n, api_key=sb.api_key, base_url=sb.base_url, fetcher=fetcher(guard))
            for n, sb in (("first", a), ("second", b))
        ]
        async with make_router(*providers) as router:
            with pytest.raises(UnsafeURLError):
                await router.agenerate(
                    "a cat", init_image="http://169.254.169.254/latest/", strength=0.5, model="stable-image-ultra"
                )
        assert a.hits() == b.hits() == 0


# --- URLs a vendor would fetch itself -------------------------------------------------------------------


async def test_lora_urls_are_checked_before_together_or_replicate_fetch_them(guard: GuardTransport) -> None:
    urls = [*HTTP_URLS, *(u for name, u in SCHEME_CORPUS.items() if name != "bare path")]
    with TogetherSandbox(api_key="tg-ssrf") as tg, ReplicateSandbox(api_token="r8_ssrf") as rep:
        sent = {"together": 0, "replicate": 0}
        for url in urls:
            for name, model, make in (
                (
                    "together",
                    DEV_LORA,
                    lambda: TogetherProvider(api_key="tg-ssrf", base_url=tg.base_url, fetcher=fetcher(guard)),
                ),
                (
                    "replicate",
                    "flux-dev-lora",
                    lambda: ReplicateProvider(api_token="r8_ssrf", base_url=rep.base_url, fetcher=fetcher(guard)),
                ),
            ):
                provider = make()
                try:
                    await provider.generate(ImageRequest(prompt="a cat", loras=[{"ref": url}]), model, timeout_s=5)
                    sent[name] += 1
                except UnsafeURLError:
                    pass
                finally:
                    await provider.aclose()
        assert sent == {"together": 0, "replicate": 0} and tg.hits() == rep.hits() == 0


async def test_a_public_lora_url_is_sent_as_where_it_ends_and_a_repository_id_as_it_is(
    guard: GuardTransport,
) -> None:
    with TogetherSandbox(api_key="tg-ssrf") as tg:
        p = TogetherProvider(api_key="tg-ssrf", base_url=tg.base_url, fetcher=fetcher(guard))
        try:
            loras = [{"ref": via_redirect("https://public.example/style.safetensors")}, {"ref": "owner/other-lora"}]
            await p.generate(ImageRequest(prompt="a cat", loras=loras), DEV_LORA, timeout_s=5)
        finally:
            await p.aclose()
        sent = tg.requests[-1].json
        assert sent is not None
        assert [lora["path"] for lora in sent["image_loras"]] == [
            "https://public.example/style.safetensors",
            "owner/other-lora",
        ]
        assert guard.served[-1] == f"https://{PUBLIC}/style.safetensors"  # every hop checked, at its address


async def test_together_reference_images_are_downloaded_here_or_refused(guard: GuardTransport) -> None:
    with TogetherSandbox(api_key="tg-ssrf") as tg:
        for url in HTTP_URLS:
            p = TogetherProvider(api_key="tg-ssrf", base_url=tg.base_url, fetcher=fetcher(guard))
            try:
                with pytest.raises(UnsafeURLError):
                    await p.generate(
                        ImageRequest(prompt="a cat", provider_options={"together": {"reference_images": [url]}}),
                        SCHNELL,
                        timeout_s=5,
                    )
            finally:
                await p.aclose()
        assert tg.hits() == 0


# --- output URLs: a vendor's answer pointing inside the network is unusable, and still charged ------------


def _together_answer(url: str) -> bytes:
    return json.dumps({"id": "x", "object": "list", "data": [{"index": 0, "type": "url", "url": url}]}).encode()


async def test_output_urls_pointing_inside_are_never_fetched_and_the_call_is_charged(guard: GuardTransport) -> None:
    urls = [*HTTP_URLS, *SCHEME_CORPUS.values()]
    outcomes: list[tuple[str, str, bool]] = []
    with (
        TogetherSandbox(api_key="tg-ssrf") as tg,
        ReplicateSandbox(api_token="r8_ssrf") as rep,
        BFLSandbox(api_key="bfl-ssrf") as bfl,
    ):
        together = TogetherProvider(api_key="tg-ssrf", base_url=tg.base_url, fetcher=fetcher(guard))
        replicate = ReplicateProvider(
            api_token="r8_ssrf", base_url=rep.base_url, fetcher=fetcher(guard), poll_interval_s=0.01
        )
        bfl_p = BFLProvider(api_key="bfl-ssrf", base_url=bfl.base_url, fetcher=fetcher(guard), poll_interval_s=0.01)
        try:
            for url in urls:
                tg.faults.push(Fault.malformed(_together_answer(url)))
                rep.faults.push(
                    Fault.malformed(
                        json.dumps(
                            {
                                "id": "p-ssrf",
                                "status": "succeeded",
                                "output": [url],
                                "metrics": {"predict_time": 1.0},
                            }
                        ).encode()
                    )
                )
                bfl.faults.push(
                    Fault.malformed(
                        json.dumps(
                            {
                                "id": "t-ssrf",
                                "status": "Ready",
                                "result": {"sample": url},
                            }
                        ).encode()
                    ),
                    path="/v1/get_result",
                )
                for name, provider, model in (
                    ("together", together, SCHNELL),
                    ("replicate", replicate, "flux-schnell"),
                    ("bfl", bfl_p, "flux-pro-1.1"),
                ):
                    with pytest.raises(MalformedResponse) as info:
                        await provider.generate(ImageRequest(prompt="a cat"), model, timeout_s=5.0)
                    outcomes.append((name, url, info.value.billed is not None and info.value.billed.cost_usd > 0))
        finally:
            for p in (together, replicate, bfl_p):
                await p.aclose()
    assert len(outcomes) == 3 * len(urls)
    assert all(charged for _, _, charged in outcomes)  # paid for: the router settles it and falls back


def test_an_unsafe_url_is_an_invalid_request() -> None:
    assert issubclass(UnsafeURLError, InvalidRequestError)
