"""pixroute: one image-generation request, routed to the best backend for it.

    from router import generate
    result = generate("a lighthouse at dusk, oil painting", width=1024, height=1024)

The data types load at once; the router, its policies and providers load on first
use, so ``import router`` stays light (no torch, no vendor SDK).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from router.errors import (
    AllProvidersFailed,
    AuthenticationError,
    BudgetExceeded,
    CatalogError,
    ConfigurationError,
    ContentPolicyError,
    DeadlineExceeded,
    ExecutionFailed,
    ImageRouterError,
    InsufficientCredits,
    InvalidRequestError,
    KeyFileError,
    MalformedResponse,
    NoRouteError,
    PolicyFileError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    RequestValidationError,
)
from router.progress import (
    AttemptFailed,
    AttemptStarted,
    Completed,
    Event,
    FellBack,
    PartialImage,
    ProgressEvent,
    Routed,
    Status,
)
from router.request import Constraints, ControlInput, ImageRequest, LoraRef
from router.result import Attempt, Cost, GeneratedImage, GenerationResult, Latency

if TYPE_CHECKING:
    from router.ledger import Budget, Ledger, LedgerBackend, open_ledger
    from router.logs import JsonFormatter
    from router.provenance import read_provenance
    from router.router import AsyncRouter, Router, agenerate, generate

_LAZY = {
    "Router": "router.router",
    "AsyncRouter": "router.router",
    "generate": "router.router",
    "agenerate": "router.router",
    "Ledger": "router.ledger",
    "Budget": "router.ledger",
    "LedgerBackend": "router.ledger",
    "open_ledger": "router.ledger",
    "JsonFormatter": "router.logs",
    "read_provenance": "router.provenance",
}

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'router' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AllProvidersFailed",
    "AsyncRouter",
    "Attempt",
    "AttemptFailed",
    "AttemptStarted",
    "AuthenticationError",
    "Budget",
    "BudgetExceeded",
    "CatalogError",
    "Completed",
    "ConfigurationError",
    "Constraints",
    "ContentPolicyError",
    "ControlInput",
    "Cost",
    "DeadlineExceeded",
    "Event",
    "ExecutionFailed",
    "FellBack",
    "GeneratedImage",
    "GenerationResult",
    "ImageRequest",
    "ImageRouterError",
    "InsufficientCredits",
    "InvalidRequestError",
    "JsonFormatter",
    "KeyFileError",
    "Latency",
    "Ledger",
    "LedgerBackend",
    "LoraRef",
    "MalformedResponse",
    "NoRouteError",
    "PartialImage",
    "PolicyFileError",
    "ProgressEvent",
    "ProviderTimeout",
    "ProviderUnavailable",
    "RateLimited",
    "RequestValidationError",
    "Routed",
    "Router",
    "Status",
    "agenerate",
    "generate",
    "open_ledger",
    "read_provenance",
]
