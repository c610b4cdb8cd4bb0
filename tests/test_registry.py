"""Providers load lazily by name, built-in or from the ``pixroute.providers`` entry points."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from importlib.metadata import EntryPoint

import pytest

import providers.registry as registry
from providers.base import Capabilities, Estimate, Provider, ProviderResponse
from router.request import ImageRequest


class PluginProvider(Provider):
    """A third-party provider as a plugin package would ship it."""

    kind = "plugin"

    def models(self) -> Sequence[str]:
        return ["plugin-model"]

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(tasks=frozenset({"txt2img"}))

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        return Estimate(Decimal("0.001"), 1.0)

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        raise NotImplementedError


def test_builtin_providers_load_by_name() -> None:
    cls = registry.load_provider_class("openai")
    assert cls.kind == "openai" and issubclass(cls, Provider)


def test_entry_point_plugins_are_found_and_routed(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = EntryPoint(name="plugin", value=f"{__name__}:PluginProvider", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == registry.ENTRY_POINT_GROUP else [])
    assert registry.available_providers()["plugin"] == f"{__name__}:PluginProvider"
    from router.config import providers_from_env

    names = [p.name for p in providers_from_env({})]
    assert "plugin" in names and "openai" in names
    from router import AsyncRouter

    decision = AsyncRouter(providers_from_env({}), ledger=":memory:").route("a cat")
    assert decision.chosen is not None and decision.chosen.provider == "plugin"


def test_unknown_provider_names_the_registered_ones() -> None:
    with pytest.raises(KeyError, match="openai"):
        registry.load_provider_class("nope")
