"""The safe fetcher: every URL the SDK downloads (init images, provider outputs) goes through it.

- http(s) only;
- the host is read as an address where it is one, in every spelling a resolver would accept
  (``[::ffff:127.0.0.1]``, ``0x7f.1``, ``2130706433``, ``0177.1``...), and resolved otherwise;
- an address is allowed only if it is globally reachable (``ipaddress``'s ``is_global``), and
  not multicast, site-local, a cloud metadata address (:data:`METADATA`) or an IPv6 form that
  carries a non-global IPv4 address (IPv4-mapped and -compatible, NAT64 ``64:ff9b::/96``, 6to4
  ``2002::/16``); Teredo ``2001::/32`` and local-use NAT64 ``64:ff9b:1::/48`` are refused whole.
  A name is refused if any of its addresses is;
- the connection goes to the address that was checked (no second DNS lookup);
- redirects are followed by hand, each hop checked again, at most ``max_redirects``;
- a byte cap while streaming and an overall timeout; then the bytes must be a whole PNG /
  JPEG / WEBP under the pixel cap.

URLs a vendor fetches on our behalf (a LoRA's weights) go through :meth:`SafeFetcher.check`
before they are sent. Tests of the loopback sandboxes pass ``allow_loopback=True``; nothing else
does. ``resolver`` and ``transport`` are injectable, so tests run without DNS or sockets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

from router.errors import Disposition, InvalidRequestError, ProviderUnavailable
from router.images import MAX_IMAGE_BYTES, probe_whole

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",  # link-local: AWS, GCP, Azure, OpenStack instance metadata at 169.254.169.254
        "100.100.100.200/32",  # Alibaba Cloud metadata (inside 100.64.0.0/10, shared address space)
        "168.63.129.16/32",  # Azure WireServer: a public address that answers only inside Azure
        "192.0.0.0/24",  # IETF protocol assignments; Oracle Cloud metadata at 192.0.0.192
        "fd00:ec2::254/128",  # AWS metadata over IPv6
    )
)
"""Blocked whatever ``is_global`` says about them (Python 3.11 calls 168.63.129.16 and 192.0.0.192 global)."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are the IPv4 address reached
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: local-use NAT64, a network's own
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0[xX][0-9a-fA-F]*)")
_INET_ATON_FORM = re.compile(r"[0-9a-fA-FxX.]+")


class UnsafeURLError(InvalidRequestError):
    """A URL the fetcher refuses: wrong scheme, or a host it must not reach. The request is at fault,
    and every backend would refuse it the same way, so it is not tried elsewhere."""

    disposition = Disposition.FATAL


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """Resolve with the OS resolver, off the event loop."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def host_address(host: str) -> IPAddress | None:
    """The address ``host`` spells, or None when it is a name to resolve.

    IPv6 and dotted-quad literals are read by ``ipaddress``. A host whose last label is a number
    (``0x7f.1``, ``2130706433``, ``0177.0.0.1``, ``127.1``) is an IPv4 address in the forms
    ``inet_aton`` accepts, as URL parsers and resolvers read it (WHATWG URL, "ends in a number"):
    it is read the same way here, and one that does not parse is refused rather than resolved.
    """
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if not _NUMERIC_LABEL.fullmatch(labels[-1]):
        return None
    if not _INET_ATON_FORM.fullmatch(host):
        raise UnsafeURLError(f"host {host!r} is neither a name nor an IPv4 address")
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host.removesuffix(".")))
    except OSError:
        raise UnsafeURLError(f"host {host!r} is not a valid IPv4 address") from None


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address, as a server binds or a URL names it) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def forbidden(ip: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why ``ip`` must not be fetched from (a phrase), or None when it may be."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = None
        if ip.ipv4_mapped is not None:
            embedded = ip.ipv4_mapped
        elif ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are judged as IPv6
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)  # the last 32 bits
        elif ip.sixtofour is not None:
            embedded = ip.sixtofour
        elif ip.teredo is not None:
            return "Teredo-tunnelled"
        elif ip in _NAT64_LOCAL:
            return "local-use NAT64"
        if embedded is not None:
            inner = forbidden(embedded, allow_loopback=allow_loopback)
            return f"{inner} (embedded in {ip})" if inner else None
    if ip.is_loopback:
        return None if allow_loopback else "loopback"
    if any(ip in net for net in METADATA):
        return "link-local or cloud metadata"
    for label, hit in (
        ("unspecified", ip.is_unspecified),
        ("multicast", ip.is_multicast),
        ("link-local", ip.is_link_local),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
    ):
        if hit:
            return label
    if not ip.is_global:
        return "non-global (shared, documentation or benchmarking)"
    return None


@dataclass(frozen=True, slots=True)
class SafeFetcher:
    """Downloads images from URLs that cannot be turned against the host or its network."""

    max_bytes: int = MAX_IMAGE_BYTES
    timeout_s: float = 30.0
    max_redirects: int = 3
    allow_loopback: bool = False
    resolver: Resolver = system_resolver
    transport: httpx.AsyncBaseTransport | None = None
    """The HTTP transport (None: httpx's own); tests pass one that refuses to connect."""

    async def check(self, url: str, *, what: str = "URL") -> tuple[httpx.URL, str]:
        """The parsed URL and the one address it may be fetched from; raise UnsafeURLError otherwise."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError):
            raise UnsafeURLError(f"{what}: not a valid URL; give an http(s) URL") from None
        if parsed.scheme not in ("http", "https"):
            raise UnsafeURLError(
                f"{what}: only http(s) URLs are fetched, not {parsed.scheme or 'a bare path'}; "
                "give an http(s) URL or the image's bytes"
            )
        host = parsed.host
        if not host:
            raise UnsafeURLError(f"{what}: the URL has no host")
        literal = host_address(host)
        if literal is not None:
            addresses: Sequence[str] = [str(literal)]
        else:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            try:
                addresses = await self.resolver(host, port)
            except OSError:
                raise UnsafeURLError(f"{what}: host {host!r} does not resolve") from None
            if not addresses:
                raise UnsafeURLError(f"{what}: host {host!r} does not resolve")
        for address in addresses:
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                raise UnsafeURLError(f"{what}: host {host!r} resolves to {address!r}, not an address") from None
            reason = forbidden(ip, allow_loopback=self.allow_loopback)
            if reason:
                raise UnsafeURLError(
                    f"{what}: host {host!r} is a {reason} address ({ip}); refused: give an "
                    "http(s) URL on the public internet"
                )
        return parsed, str(ipaddress.ip_address(addresses[0].split("%", 1)[0]))

    async def fetch(self, url: str, *, what: str = "image URL") -> bytes:
        """The image bytes at ``url``, checked hop by hop, capped, and checked whole (header and end)."""
        _, data = await self._hops(url, what, read=True)
        assert data is not None
        probe_whole(data, what="downloaded image")  # an image of an allowed format, under the caps, whole
        return data

    async def follow(self, url: str, *, what: str = "URL") -> str:
        """The URL ``url`` ends at once its redirects are followed, every hop checked; no body is read.

        For a URL a vendor fetches itself (a LoRA's weights): the vendor is then sent this final URL, so a
        redirect cannot lead it inside a network. Raises UnsafeURLError.
        """
        final, _ = await self._hops(url, what, read=False)
        return final

    async def _hops(self, url: str, what: str, *, read: bool) -> tuple[str, bytes | None]:
        """Follow ``url`` hop by hop, each checked and connected to at its checked address: the last hop's
        URL, and its body when ``read`` (then it must answer 200)."""
        try:
            async with (
                asyncio.timeout(self.timeout_s),
                httpx.AsyncClient(
                    follow_redirects=False,
                    trust_env=False,
                    timeout=self.timeout_s,
                    transport=self.transport,
                ) as client,
            ):
                for hop in range(self.max_redirects + 1):
                    parsed, address = await self.check(url, what=what if hop == 0 else f"{what} (redirect {hop})")
                    headers = {"Host": parsed.netloc.decode("ascii")}
                    extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
                    request = client.build_request(
                        "GET", parsed.copy_with(host=address), headers=headers, extensions=extensions
                    )
                    response = await client.send(request, stream=True)
                    try:
                        if response.is_redirect:
                            url = str(parsed.join(response.headers.get("location", "")))
                            continue
                        if not read:
                            return url, None
                        if response.status_code != 200:
                            raise ProviderUnavailable(f"image download answered HTTP {response.status_code}")
                        return url, await self._read(response)
                    finally:
                        await response.aclose()
        except TimeoutError:
            raise ProviderUnavailable(f"{what}: the download took over {self.timeout_s:.0f}s") from None
        except httpx.HTTPError as exc:  # the transport's own text can quote the URL: only its kind is kept
            raise ProviderUnavailable(f"{what}: the download failed ({type(exc).__name__})") from None
        raise UnsafeURLError(f"{what}: more than {self.max_redirects} redirects")

    async def _read(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise InvalidRequestError(f"image is {declared} bytes, over the {self.max_bytes}-byte cap")
        chunks: list[bytes] = []
        total = 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > self.max_bytes:
                raise InvalidRequestError(f"image is over the {self.max_bytes}-byte cap")
            chunks.append(chunk)
        return b"".join(chunks)
