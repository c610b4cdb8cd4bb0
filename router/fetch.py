"""The safe fetcher: every URL the SDK downloads (init images, provider outputs) goes through it.

- http(s) only;
- the host is resolved first, and loopback, private, link-local (cloud metadata
  included), multicast, reserved and unspecified addresses are refused, in every
  spelling (``0x7f.1``, ``2130706433``, ``[::ffff:127.0.0.1]``...);
- the connection goes to the address that was checked (no second DNS lookup);
- redirects are followed by hand, each hop checked again, at most ``max_redirects``;
- a byte cap while streaming and an overall timeout; then the bytes must decode as
  PNG / JPEG / WEBP under the pixel cap.

Tests of the loopback sandboxes pass ``allow_loopback=True``; nothing else does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import httpx

from router.errors import InvalidRequestError, ProviderUnavailable
from router.images import MAX_IMAGE_BYTES, probe_whole

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeURLError(InvalidRequestError):
    """A URL the fetcher refuses to download: wrong scheme, or an address it must not reach."""


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """Resolve with the OS resolver, off the event loop."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _forbidden(ip: IPAddress, allow_loopback: bool) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None if allow_loopback else "loopback"
    for label, hit in (
        ("unspecified", ip.is_unspecified),
        ("link-local or metadata", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
    ):
        if hit:
            return label
    if isinstance(ip, ipaddress.IPv6Address) and (ip.sixtofour or ip.teredo):
        return "tunnelled"
    return None


@dataclass(frozen=True, slots=True)
class SafeFetcher:
    """Downloads images from URLs that cannot be turned against the host or its network."""

    max_bytes: int = MAX_IMAGE_BYTES
    timeout_s: float = 30.0
    max_redirects: int = 3
    allow_loopback: bool = False
    resolver: Resolver = system_resolver

    async def check(self, url: str) -> tuple[httpx.URL, str]:
        """The parsed URL and the one address it may be fetched from; raise UnsafeURLError otherwise."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            raise UnsafeURLError("not a valid URL") from None
        if parsed.scheme not in ("http", "https"):
            raise UnsafeURLError(f"only http(s) URLs are fetched, not {parsed.scheme or 'a bare path'}")
        host = parsed.host
        if not host:
            raise UnsafeURLError("URL has no host")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            addresses = await self.resolver(host, port)
        except OSError:
            raise UnsafeURLError(f"host {host!r} does not resolve") from None
        if not addresses:
            raise UnsafeURLError(f"host {host!r} does not resolve")
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            reason = _forbidden(ip, self.allow_loopback)
            if reason:
                raise UnsafeURLError(f"host {host!r} resolves to a {reason} address; refused")
        return parsed, addresses[0]

    async def fetch(self, url: str) -> bytes:
        """The image bytes at ``url``, checked hop by hop, capped and decoded once to verify."""
        try:
            async with asyncio.timeout(self.timeout_s):
                data = await self._fetch(url)
        except TimeoutError:
            raise ProviderUnavailable(f"image download took over {self.timeout_s:.0f}s") from None
        probe_whole(data, what="downloaded image")  # an image of an allowed format, under the caps, whole
        return data

    async def _fetch(self, url: str) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=self.timeout_s) as client:
            for _ in range(self.max_redirects + 1):
                parsed, address = await self.check(url)
                pinned = parsed.copy_with(host=address)
                headers = {"Host": parsed.netloc.decode("ascii")}
                extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
                request = client.build_request("GET", pinned, headers=headers, extensions=extensions)
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        location = response.headers.get("location", "")
                        url = str(parsed.join(location))
                        continue
                    if response.status_code != 200:
                        raise ProviderUnavailable(f"image download answered HTTP {response.status_code}")
                    return await self._read(response)
                finally:
                    await response.aclose()
        raise UnsafeURLError(f"more than {self.max_redirects} redirects")

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
