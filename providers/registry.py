"""Find provider classes by name: the built-in ones and the ``pixroute.providers`` entry points.

Nothing is imported until a provider is asked for, so ``import router`` stays light.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from providers.base import Provider

ENTRY_POINT_GROUP = "pixroute.providers"

BUILTIN: dict[str, str] = {
    "openai": "providers.openai:OpenAIProvider",
    "stability": "providers.stability:StabilityProvider",
    "replicate": "providers.replicate:ReplicateProvider",
    "together": "providers.together:TogetherProvider",
    "bfl": "providers.bfl:BFLProvider",
    "google": "providers.google:GoogleProvider",
    "xai": "providers.xai:XAIProvider",
    "fal": "providers.fal:FalProvider",
    "ideogram": "providers.ideogram:IdeogramProvider",
    "local": "providers.local.provider:LocalProvider",
    "comfyui": "providers.comfyui:ComfyUIProvider",
    "ray": "providers.ray_pool:RayPoolProvider",
}


def available_providers() -> dict[str, str]:
    """Every provider kind that can be loaded: name → ``module:Class``."""
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def load_provider_class(kind: str) -> type[Provider]:
    """Import and return the provider class registered as ``kind``."""
    target = available_providers().get(kind)
    if target is None:
        known = ", ".join(sorted(available_providers()))
        raise KeyError(f"unknown provider {kind!r}; registered: {known}")
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise TypeError(f"{target} is not a Provider subclass")
    return cls


def create_provider(kind: str, **config: Any) -> Provider:
    """Instantiate the provider registered as ``kind`` with its configuration."""
    return load_provider_class(kind)(**config)
