"""Configuration from the environment, for :func:`router.generate` and the CLI.

=========================  ========================================================
``IMAGEROUTER_POLICY``     a preset (balanced, cheapest, fastest, quality,
                           local-first, private) or a .yaml/.toml policy file
``IMAGEROUTER_LEDGER``     the ledger's SQLite path, or ``:memory:``
                           (default: ``ledger.sqlite3`` in the user's data dir)
``IMAGEROUTER_PROVIDERS``  comma-separated provider kinds to register (default: all)
``IMAGEROUTER_MODELS``     the local backend's model catalog (YAML)
``OPENAI_API_KEY``         enables the ``openai`` provider (``OPENAI_BASE_URL``
                           points it at another endpoint); likewise
                           ``STABILITY_API_KEY``, ``BFL_API_KEY``,
                           ``REPLICATE_API_TOKEN``, ``TOGETHER_API_KEY``
=========================  ========================================================
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from providers.base import Provider
from providers.registry import available_providers, create_provider

log = logging.getLogger("imagerouter")


def providers_from_env(env: Mapping[str, str] | None = None) -> list[Provider]:
    """Every registered provider kind, constructed from the environment.

    Providers without credentials are still registered: ``generate`` rejects them as
    not configured (saying what to set) instead of hiding them, and ``route`` (a dry
    run) ranks them as if configured, each marked with what to set.
    """
    env = os.environ if env is None else env
    wanted = [k.strip() for k in env.get("IMAGEROUTER_PROVIDERS", "").split(",") if k.strip()]
    kinds = wanted or list(available_providers())
    out = []
    for kind in kinds:
        try:
            out.append(create_provider(kind))
        except Exception as exc:  # a broken plugin must not take the router down
            log.warning("provider %s could not be created: %s", kind, type(exc).__name__)
    return out


def router_kwargs_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The keyword arguments :class:`~router.router.AsyncRouter` gets from the environment."""
    env = os.environ if env is None else env
    kw: dict[str, Any] = {"providers": providers_from_env(env)}
    if env.get("IMAGEROUTER_POLICY"):
        kw["policy"] = env["IMAGEROUTER_POLICY"]
    if env.get("IMAGEROUTER_LEDGER"):
        kw["ledger"] = env["IMAGEROUTER_LEDGER"]
    return kw
