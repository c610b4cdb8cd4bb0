"""Every hosted sandbox in one process, and the real adapters pointed at them: offline, with fake keys.

The loopback sandboxes (:mod:`providers.sandbox`) speak each vendor's HTTP API on 127.0.0.1. This module
starts them together and says how to use them, three ways:

- ``pixroute sandbox`` runs them in the foreground and prints the environment lines that point the
  providers at them (``pixroute sandbox -- COMMAND`` runs one command with those lines set instead);
- ``--sandbox`` on ``route``, ``generate``, ``serve``, ``providers`` and ``demo``, ``IMAGEROUTER_SANDBOX=1``,
  or ``Router.from_env(sandbox=True)`` start them in this process, once, until it exits;
- :class:`Sandboxes` itself, in a ``with`` block, for tests and scripts that want their own.

``IMAGEROUTER_SANDBOX`` is what :func:`router.config.providers_from_env` reads: ``1`` starts the sandboxes
here; ``attach`` (what ``pixroute sandbox`` prints) means the vendors' ``*_BASE_URL`` variables already point
at running ones. Either way the sandboxed providers are built only from those variables, each URL must be a
loopback one (a provider whose URL is missing or elsewhere is listed as not configured: nothing reaches a
vendor), each sandbox also stands in for its vendor's regional hosts (so residency rules route as they would),
and the providers may download from loopback (where the sandboxes serve their images), which outside sandbox
mode is refused. The keys are fake and say so.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import providers.sandbox as sandbox_module
from providers.base import Provider
from providers.sandbox import Fault, SandboxServer
from router.errors import ConfigurationError
from router.fetch import is_loopback_host

__all__ = [
    "SANDBOX_ENV",
    "Sandboxes",
    "attached_provider_kwargs",
    "parse_fault",
    "sandbox_mode",
    "sandboxed_kinds",
    "shared",
]

SANDBOX_ENV = "IMAGEROUTER_SANDBOX"
"""``1`` (or ``true``/``yes``/``on``): start the sandboxes in this process; ``attach``: use running ones."""

_ON = frozenset({"1", "true", "yes", "on"})
_OFF = frozenset({"", "0", "false", "no", "off"})
_ATTACH = "attach"


@dataclass(frozen=True)
class _Vendor:
    """How one hosted sandbox is started and how its provider is pointed at it."""

    kind: str
    sandbox: str  # the class's name in providers.sandbox
    url_env: str
    key_env: str | None = None  # None: the backend takes no key
    fake_key: str = ""
    key_arg: str = "api_key"  # the sandbox's and the provider's keyword for the key
    url_arg: str = "base_url"  # the provider's keyword for the URL
    origin: bool = False  # the URL is the sandbox's origin, not its API root
    regions: tuple[str, ...] = ()  # regional hosts the sandbox stands in for
    region_module: str = ""  # where the vendor's region names are: "module:ATTRIBUTE"
    provider_kw: Mapping[str, Any] = field(default_factory=dict)
    downloads: bool = False  # the provider downloads the images it makes from the sandbox (loopback)


_VENDORS: tuple[_Vendor, ...] = (
    _Vendor("openai", "OpenAISandbox", "OPENAI_BASE_URL", "OPENAI_API_KEY", "sk-FAKE-sandbox-openai-key",
            region_module="providers.openai:REGIONS"),
    _Vendor("stability", "StabilitySandbox", "STABILITY_BASE_URL", "STABILITY_API_KEY",
            "sk-FAKE-sandbox-stability-key", provider_kw={"poll_interval_s": 0.05}, downloads=True),
    _Vendor("replicate", "ReplicateSandbox", "REPLICATE_BASE_URL", "REPLICATE_API_TOKEN",
            "r8_FAKE_sandbox_replicate_token", key_arg="api_token", provider_kw={"poll_interval_s": 0.05},
            downloads=True),
    _Vendor("together", "TogetherSandbox", "TOGETHER_BASE_URL", "TOGETHER_API_KEY", "tg-FAKE-sandbox-together-key",
            downloads=True),
    _Vendor("bfl", "BFLSandbox", "BFL_BASE_URL", "BFL_API_KEY", "bfl-FAKE-sandbox-key",
            region_module="providers.bfl:REGION_HOSTS", provider_kw={"poll_interval_s": 0.05}, downloads=True),
    _Vendor("google", "GoogleSandbox", "GOOGLE_GEMINI_BASE_URL", "GEMINI_API_KEY", "FAKE-sandbox-gemini-key"),
    _Vendor("xai", "XAISandbox", "XAI_BASE_URL", "XAI_API_KEY", "xai-FAKE-sandbox-key", downloads=True),
    _Vendor("fal", "FalSandbox", "FAL_QUEUE_URL", "FAL_KEY", "fal-FAKE-sandbox-key",
            provider_kw={"poll_interval_s": 0.05}, downloads=True),
    _Vendor("ideogram", "IdeogramSandbox", "IDEOGRAM_BASE_URL", "IDEOGRAM_API_KEY", "ideogram-FAKE-sandbox-key",
            downloads=True),
    _Vendor("comfyui", "ComfyUISandbox", "IMAGEROUTER_COMFYUI_URL", url_arg="url", origin=True),
)


def sandboxed_kinds() -> tuple[str, ...]:
    """The provider kinds that have a sandbox here (ComfyUI's when :mod:`providers.sandbox` exports one)."""
    return tuple(v.kind for v in _VENDORS if hasattr(sandbox_module, v.sandbox))


def _vendor(kind: str) -> _Vendor:
    for v in _VENDORS:
        if v.kind == kind and hasattr(sandbox_module, v.sandbox):
            return v
    raise ConfigurationError(f"unknown sandbox {kind!r}; the sandboxes are {', '.join(sandboxed_kinds())}")


def sandbox_mode(env: Mapping[str, str], sandbox: bool | None = None) -> str | None:
    """``"start"`` (start the sandboxes here), ``"attach"`` (use running ones) or None (no sandbox).

    ``sandbox`` (an argument) wins over ``IMAGEROUTER_SANDBOX``; an unknown value of the variable is a
    :class:`~router.errors.ConfigurationError`."""
    if sandbox is not None:
        return "start" if sandbox else None
    value = env.get(SANDBOX_ENV, "").strip().lower()
    if value in _OFF:
        return None
    if value in _ON:
        return "start"
    if value == _ATTACH:
        return "attach"
    raise ConfigurationError(f"{SANDBOX_ENV}={value!r}: use 1 (start the sandboxes in this process), "
                             f"attach (use the ones `pixroute sandbox` runs) or 0")


def parse_fault(spec: str) -> tuple[str, Fault, int | None]:
    """``PROVIDER=KIND[:ARG][,times=N]`` → (provider kind, fault, times; None: every request).

    ``openai=rate_limit:2`` (Retry-After 2 s), ``stability=server_error:503``, ``bfl=timeout:5`` (hold 5 s),
    ``together=bomb_image``, ``replicate=moderation,times=1``; the kinds are those of :class:`Fault` and
    the sandbox's own (``sb.fault_kinds``)."""
    head, *options = spec.split(",")
    kind, sep, rest = head.partition("=")
    kind = kind.strip()
    if not sep or not kind or not rest.strip():
        raise ConfigurationError(f"--fault {spec!r}: write PROVIDER=KIND, e.g. openai=rate_limit")
    vendor = _vendor(kind)
    name, _, arg = rest.strip().partition(":")
    times: int | None = None
    for option in options:
        key, _, value = option.partition("=")
        if key.strip() != "times" or not value.strip().isdigit() or int(value) < 1:
            raise ConfigurationError(f"--fault {spec!r}: {option!r} is not times=N (N ≥ 1)")
        times = int(value)
    served = sorted(getattr(sandbox_module, vendor.sandbox).fault_kinds | {"timeout", "disconnect"})
    if name not in served:
        raise ConfigurationError(f"--fault {spec!r}: unknown fault {name!r} for {kind}; use one of {', '.join(served)}")
    try:
        number = float(arg) if arg else None
    except ValueError:
        raise ConfigurationError(f"--fault {spec!r}: {arg!r} is not a number") from None
    if name == "rate_limit":
        fault = Fault.rate_limit(retry_after=number)
    elif name == "server_error":
        fault = Fault.server_error(int(number) if number is not None else 500)
    elif name == "timeout":
        fault = Fault.timeout(number if number is not None else 30.0)
    elif arg:
        raise ConfigurationError(f"--fault {spec!r}: {name} takes no argument")
    else:
        fault = Fault(name)
    return kind, fault, times


class Sandboxes:
    """The hosted sandboxes, started together: ``with Sandboxes() as fleet: fleet.env(); fleet.providers()``.

    ``kinds`` picks some (default: every one, :func:`sandboxed_kinds`); ``faults`` are
    ``(kind, fault, times)`` to serve (see :func:`parse_fault`); ``region_hosts`` gives a region its own
    sandbox (``{"openai": ("eu",)}``: host ``openai-eu``), so a test can see which host served a request;
    without one, a vendor's sandbox stands in for all its regions.
    """

    def __init__(self, kinds: Iterable[str] | None = None, *, faults: Iterable[tuple[str, Fault, int | None]] = (),
                 region_hosts: Mapping[str, Sequence[str]] | None = None) -> None:
        self.vendors = [_vendor(k) for k in (sandboxed_kinds() if kinds is None else kinds)]
        self.hosts: dict[str, SandboxServer] = {}
        self._host_vendor: dict[str, _Vendor] = {}
        for v in self.vendors:
            for host in (v.kind, *(f"{v.kind}-{r}" for r in (region_hosts or {}).get(v.kind, ()))):
                self.hosts[host], self._host_vendor[host] = self._make(v), v
        self._faults = list(faults)
        self._stack: ExitStack | None = None

    @staticmethod
    def _make(v: _Vendor) -> SandboxServer:
        cls = getattr(sandbox_module, v.sandbox)
        server: SandboxServer = cls(**{v.key_arg: v.fake_key}) if v.key_env else cls()
        return server

    def start(self) -> Sandboxes:
        if self._stack is None:
            stack = ExitStack()
            try:
                for server in self.hosts.values():
                    stack.enter_context(server)
            except BaseException:
                stack.close()
                raise
            self._stack = stack
            for kind, fault, times in self._faults:
                self.hosts[kind].faults.push(fault, times=times)
        return self

    def stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> Sandboxes:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._stack is not None

    def url(self, host: str) -> str:
        """The URL of a host (``openai``, ``openai-eu``): what the provider is given as its ``*_BASE_URL``."""
        server = self.hosts[host]
        return server.origin if self._host_vendor[host].origin else server.base_url

    def env(self) -> dict[str, str]:
        """The environment lines that point the providers at these sandboxes (fake keys, loopback URLs)."""
        out: dict[str, str] = {}
        for v in self.vendors:
            if v.key_env:
                out[v.key_env] = v.fake_key
            out[v.url_env] = self.url(v.kind)
        out[SANDBOX_ENV] = _ATTACH
        return out

    def provider(self, kind: str, **overrides: Any) -> Provider:
        """The real adapter of ``kind`` pointed at its sandbox (``overrides``: more constructor arguments)."""
        from providers.registry import create_provider

        v = _vendor(kind)
        regional = {host.removeprefix(f"{kind}-"): self.url(host) for host in self.hosts
                    if host.startswith(f"{kind}-")}
        kw = _provider_kwargs(v, self.url(kind), v.fake_key, regional) | overrides
        return create_provider(kind, **kw)

    def providers(self) -> list[Provider]:
        """Every sandboxed provider, pointed at its sandbox."""
        return [self.provider(v.kind) for v in self.vendors]

    def hits(self) -> dict[str, int]:
        """Requests each host received so far."""
        return {name: server.hits() for name, server in self.hosts.items()}


def _provider_kwargs(v: _Vendor, url: str, key: str, regional: Mapping[str, str] | None = None) -> dict[str, Any]:
    kw: dict[str, Any] = {v.url_arg: url, **v.provider_kw}
    if v.key_env:
        kw[v.key_arg] = key
    if v.region_module:
        import importlib

        module, _, attr = v.region_module.partition(":")
        regions = [r for r in getattr(importlib.import_module(module), attr) if r != "global"]
        kw["region_base_urls"] = {r: url for r in regions} | dict(regional or {})
    if v.downloads:
        from router.fetch import SafeFetcher

        kw["fetcher"] = SafeFetcher(allow_loopback=True)  # the sandboxes serve their images on 127.0.0.1
    return kw


def _loopback(url: str) -> bool:
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and is_loopback_host(parts.hostname or "")


def attached_provider_kwargs(kind: str, env: Mapping[str, str]) -> dict[str, Any] | str:
    """Constructor arguments that point the provider of ``kind`` at the sandbox the environment names, or
    why it cannot be (its URL missing, or not on loopback: a sandboxed provider never reaches a vendor)."""
    v = _vendor(kind)
    url = env.get(v.url_env, "").strip()
    if not url:
        return f"not configured: {SANDBOX_ENV} is set but {v.url_env} is not (run `pixroute sandbox`)"
    if not _loopback(url):
        return (f"not configured: {SANDBOX_ENV} is set but {v.url_env}={url} is not a sandbox on loopback; "
                f"unset {SANDBOX_ENV} to use the vendor")
    return _provider_kwargs(v, url, v.fake_key)  # the sandbox's own fake key, never a key from the environment


_shared: Sandboxes | None = None
_shared_lock = threading.Lock()


def shared() -> Sandboxes:
    """The process's own sandboxes, started on first use and stopped when the process exits."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Sandboxes().start()
            atexit.register(_shared.stop)
        return _shared
