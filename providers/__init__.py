"""Backends behind one contract (:mod:`providers.base`), loaded lazily by name."""

from providers.base import Billing, Capabilities, Estimate, Plan, Provider, ProviderResponse
from providers.registry import available_providers, create_provider, load_provider_class

__all__ = [
    "Billing",
    "Capabilities",
    "Estimate",
    "Plan",
    "Provider",
    "ProviderResponse",
    "available_providers",
    "create_provider",
    "load_provider_class",
]
