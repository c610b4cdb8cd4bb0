"""Configuration from the environment, for :func:`router.generate` and the CLI.

=============================  ========================================================
``IMAGEROUTER_POLICY``         a preset (balanced, cheapest, fastest, quality,
                               local-first, private) or a .yaml/.toml policy file
``IMAGEROUTER_LEDGER``         the ledger's SQLite path, or ``:memory:``
                               (default: ``ledger.sqlite3`` in the user's data dir)
``IMAGEROUTER_STATE``          where breakers, latency statistics, rate limits and the result cache live:
                               a ``redis://`` URL shared by a fleet (default: this process)
``IMAGEROUTER_PROVIDERS``      comma-separated provider kinds to register (default: all)
``IMAGEROUTER_MODELS``         the local backend's model catalog (YAML)
``IMAGEROUTER_SANDBOX``        ``1``: the hosted providers talk to loopback sandboxes
                               started in this process, with fake keys; ``attach``: to
                               the ones ``pixroute sandbox`` runs (see :mod:`router.sandboxes`).
                               Their spend goes to ``IMAGEROUTER_LEDGER`` if set, else to
                               an in-memory ledger, never to the default one
``OPENAI_API_KEY``             enables the ``openai`` provider (``OPENAI_BASE_URL``
                               points it at another endpoint); likewise
                               ``STABILITY_API_KEY``, ``BFL_API_KEY``,
                               ``REPLICATE_API_TOKEN``, ``TOGETHER_API_KEY``
=============================  ========================================================

A provider that cannot be created (a model catalog that cannot be read, a broken plugin) is still
registered, as one that offers no model and says why: ``pixroute providers`` and ``explain()`` show it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from providers.base import Capabilities, Estimate, Provider, ProviderResponse
from providers.registry import available_providers, create_provider
from router.errors import ConfigurationError, ImageRouterError, ProviderUnavailable
from router.request import ImageRequest

log = logging.getLogger("imagerouter")

_OWN_MACHINE = frozenset({"local"})
"""Providers that run here, not at a vendor: sandbox mode leaves them as they are."""

__all__ = ["UnavailableProvider", "providers_from_env", "router_kwargs_from_env"]


class UnavailableProvider(Provider):
    """A provider that could not be created: it offers no model, and :meth:`configuration_problem` says why."""

    def __init__(self, kind: str, problem: str) -> None:
        self.kind = kind
        super().__init__(name=kind)
        self.problem = problem

    def models(self) -> Sequence[str]:
        return ()

    def configuration_problem(self) -> str | None:
        return self.problem

    def capabilities(self, model: str) -> Capabilities:
        raise ProviderUnavailable(self.problem, provider=self.name)

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        raise ProviderUnavailable(self.problem, provider=self.name)

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        raise ProviderUnavailable(self.problem, provider=self.name)


def _why(kind: str, exc: Exception) -> str:
    """What went wrong creating a provider, whole (an ImageRouterError's message names the file and the key)."""
    what = exc.message if isinstance(exc, ImageRouterError) else str(exc) or type(exc).__name__
    if not isinstance(exc, ImageRouterError):
        what = f"{type(exc).__name__}: {what}"
    return f"not configured: {kind} could not be created: {what}"


def providers_from_env(env: Mapping[str, str] | None = None, *, sandbox: bool | None = None) -> list[Provider]:
    """Every registered provider kind, constructed from the environment.

    Providers without credentials are still registered: ``generate`` rejects them as
    not configured (saying what to set) instead of hiding them, and ``route`` (a dry
    run) ranks them as if configured, each marked with what to set. ``sandbox=True`` (or
    ``IMAGEROUTER_SANDBOX``) points the hosted ones at loopback sandboxes (:mod:`router.sandboxes`).
    """
    env = os.environ if env is None else env
    wanted = [k.strip() for k in env.get("IMAGEROUTER_PROVIDERS", "").split(",") if k.strip()]
    known = available_providers()
    unknown = [k for k in wanted if k not in known]
    if unknown:
        raise ConfigurationError(f"IMAGEROUTER_PROVIDERS: unknown provider {', '.join(map(repr, unknown))}; "
                                 f"the providers are {', '.join(sorted(known))}")
    kinds = wanted or list(known)
    sandboxed: dict[str, dict[str, Any] | str] = {}
    from router.sandboxes import sandbox_mode

    mode = sandbox_mode(env, sandbox)
    if mode is not None:
        from router.sandboxes import attached_provider_kwargs, sandboxed_kinds, shared

        if mode == "start":
            env = {**env, **shared().env()}
        sandboxed = {kind: attached_provider_kwargs(kind, env) for kind in sandboxed_kinds()}
        for kind in kinds:  # a plugin has no sandbox: in sandbox mode it might reach its vendor, so it stays off
            if kind not in sandboxed and kind not in _OWN_MACHINE:
                sandboxed[kind] = f"not configured: {kind} has no sandbox, and IMAGEROUTER_SANDBOX is set"
    out: list[Provider] = []
    for kind in kinds:
        config = sandboxed.get(kind, {})
        if isinstance(config, str):
            out.append(UnavailableProvider(kind, config))
            continue
        try:
            out.append(create_provider(kind, **config))
        except Exception as exc:  # a broken catalog or plugin must not take the router down: listed with why
            log.debug("provider %s could not be created: %s", kind, type(exc).__name__)
            out.append(UnavailableProvider(kind, _why(kind, exc)))
    return out


def router_kwargs_from_env(env: Mapping[str, str] | None = None, *, sandbox: bool | None = None) -> dict[str, Any]:
    """The keyword arguments :class:`~router.router.AsyncRouter` gets from the environment; ``sandbox`` as in
    :func:`providers_from_env`."""
    env = os.environ if env is None else env
    kw: dict[str, Any] = {"providers": providers_from_env(env, sandbox=sandbox)}
    if env.get("IMAGEROUTER_POLICY"):
        kw["policy"] = env["IMAGEROUTER_POLICY"]
    if env.get("IMAGEROUTER_LEDGER"):
        kw["ledger"] = env["IMAGEROUTER_LEDGER"]
    elif _sandboxed(env, sandbox):
        kw["ledger"] = ":memory:"  # the sandboxes' spend is make-believe: it stays out of the real ledger
    if env.get("IMAGEROUTER_STATE"):
        kw["state"] = env["IMAGEROUTER_STATE"]
    return kw


def _sandboxed(env: Mapping[str, str], sandbox: bool | None) -> bool:
    from router.sandboxes import sandbox_mode

    return sandbox_mode(env, sandbox) is not None
