"""The error hierarchy: one class per failure kind, each with what the router does next.

Every error says whether the router retries it on the same provider (``RETRY``),
moves on to the next candidate (``FALLBACK``) or stops (``FATAL``). Messages are
written for a person and never carry a secret: providers build them from status
codes and vendor error codes, never from headers or request bodies.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from providers.base import Billing
    from router.result import Attempt


class Disposition(enum.Enum):
    """What the router does after an error."""

    RETRY = "retry"  # retry on the same provider (bounded), then fall back
    FALLBACK = "fallback"  # try the next candidate at once
    FATAL = "fatal"  # stop: the request itself is at fault, or nothing is left


_SECRET_PATTERNS = (
    re.compile(r"(?i)\b(sk|r8|pk|key|tok)[-_][A-Za-z0-9_\-]{8,}"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9_\-\.=]{8,}"),
    re.compile(r"(?i)((?:api[-_]?key|x-key|authorization|token)\s*[=:]\s*)['\"]?[^\s'\",}]{6,}"),
)


def redact(text: str) -> str:
    """Mask anything in ``text`` that looks like an API key or a bearer token."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.lastindex else "") + "[REDACTED]", text)
    return text


class ImageRouterError(Exception):
    """Base of every error the SDK raises."""

    disposition: Disposition = Disposition.FATAL

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        status_code: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self.message = redact(message)
        self.provider = provider
        self.status_code = status_code
        self.code = code
        self.request_id = request_id
        self.attempts: list[Attempt] = []
        self.billed: Billing | None = None
        """What the vendor billed for the failed call (paid work before the failure), or None."""
        self.cost_usd = Decimal(0)
        """What the whole request was charged before it failed (every billed attempt), set by the router."""
        super().__init__(self.message)

    def __str__(self) -> str:
        where = f"[{self.provider}] " if self.provider else ""
        return f"{where}{self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    @property
    def kind(self) -> str:
        """The class name, as recorded in attempt trails and reports."""
        return type(self).__name__

    def detach(self) -> ImageRouterError:
        """This error cut from the exception it was raised while handling (``raise ... from None`` only
        hides that one): a vendor SDK's error holds its response and request, headers and key included,
        and error reporters walk ``__context__``. The router detaches every error it passes on."""
        self.__context__ = None
        self.__cause__ = None
        self.__suppress_context__ = True
        return self


# --- the request is at fault ---------------------------------------------------


class InvalidRequestError(ImageRouterError):
    """This backend cannot serve the request as written: the vendor answered 400/404/422, the model
    is not there, or its pipeline refused the inputs. Another candidate may still serve it (fallback);
    the circuit breaker does not count it."""

    disposition = Disposition.FALLBACK


class RequestValidationError(InvalidRequestError, ValueError):
    """A request failed validation before anything was sent: fatal, no backend could serve it.

    ``problems`` lists ``(field, what to change)`` pairs; the message names them all.
    """

    disposition = Disposition.FATAL

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        lines = "; ".join(f"{field}: {hint}" for field, hint in self.problems)
        super().__init__(f"invalid request: {lines}")

    @property
    def field(self) -> str:
        """The first field at fault."""
        return self.problems[0][0]


class AuthenticationError(ImageRouterError):
    """The provider refused the credentials (401/403). Fix the key; no fallback."""

    disposition = Disposition.FATAL


class BudgetExceeded(ImageRouterError):
    """Reserving this request's estimated cost would overspend a budget."""

    disposition = Disposition.FATAL

    def __init__(self, message: str, *, budget: str | None = None, decision: Any = None, **kw: Any) -> None:
        self.budget = budget
        self.decision = decision
        super().__init__(message, **kw)


# --- the configuration is at fault -------------------------------------------------


class ConfigurationError(ImageRouterError, ValueError):
    """A file or setting the SDK was given is wrong (a policy file, a model catalog, a key file, an
    environment variable); the message names it and what to change. Nothing was sent. Also a ``ValueError``."""

    disposition = Disposition.FATAL


class PolicyFileError(ConfigurationError):
    """A policy that cannot be used: an unknown preset name, or a policy file that cannot be read or
    validated; the message names the file and the field. Importable from :mod:`policies.policy` too."""


class CatalogError(ConfigurationError, InvalidRequestError):
    """A local model catalog (``IMAGEROUTER_MODELS``) that cannot be read or holds a wrong entry; the message
    names the file or the model and the key. Also an :class:`InvalidRequestError`, as it was before."""

    disposition = Disposition.FATAL


class KeyFileError(ConfigurationError):
    """A server key file that will not be used (unreadable, malformed, writable by others) or a key entry
    that cannot be added (a duplicate name). Importable from :mod:`router.keys` too."""


# --- the provider is at fault: retry, or try the next candidate -------------------


class RateLimited(ImageRouterError):
    """429: too many requests. ``retry_after`` is the provider's hint in seconds."""

    disposition = Disposition.RETRY

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kw)


class ProviderUnavailable(ImageRouterError):
    """5xx or a connection failure."""

    disposition = Disposition.RETRY


class ExecutionFailed(ProviderUnavailable):
    """A node raised while a ComfyUI server ran the graph (its ``execution_error``): this backend cannot make
    the image as asked, another may, so the router falls back at once (it is not retried). ``node_id``,
    ``node_type`` and ``exception_type`` say where and what."""

    disposition = Disposition.FALLBACK

    def __init__(self, message: str, *, node_id: str | None = None, node_type: str | None = None,
                 exception_type: str | None = None, **kw: Any) -> None:
        self.node_id, self.node_type, self.exception_type = node_id, node_type, exception_type
        super().__init__(message, **kw)


class ProviderTimeout(ImageRouterError):
    """The provider did not answer within the attempt's time."""

    disposition = Disposition.RETRY


class MalformedResponse(ImageRouterError):
    """The provider answered with a body that does not follow its own contract."""

    disposition = Disposition.FALLBACK


class InsufficientCredits(ImageRouterError):
    """The account has no credit or quota left (402, or OpenAI's insufficient_quota)."""

    disposition = Disposition.FALLBACK


class ContentPolicyError(ImageRouterError):
    """The provider's moderation refused the prompt or the output.

    Not retried; the router falls back only where the policy allows it.
    """

    disposition = Disposition.FATAL


# --- the router's own verdicts ----------------------------------------------------


class DeadlineExceeded(ImageRouterError):
    """The request's deadline passed before any provider succeeded."""

    disposition = Disposition.FATAL

    def __init__(self, message: str, *, attempts: Sequence[Attempt] = (), decision: Any = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.attempts = list(attempts)
        self.decision = decision


class NoRouteError(ImageRouterError):
    """No candidate could serve the request; ``decision`` holds every rejection."""

    disposition = Disposition.FATAL

    def __init__(self, message: str, *, decision: Any = None, **kw: Any) -> None:
        self.decision = decision
        super().__init__(message, **kw)

    @property
    def rejections(self) -> list[Any]:
        return list(self.decision.rejections) if self.decision is not None else []


class AllProvidersFailed(ImageRouterError):
    """Every candidate in the chain failed; ``attempts`` is the whole trail and ``errors`` each
    candidate's last error (in chain order)."""

    disposition = Disposition.FATAL

    def __init__(self, message: str, *, attempts: Sequence[Attempt] = (), decision: Any = None,
                 errors: Sequence[ImageRouterError] = (), **kw: Any) -> None:
        super().__init__(message, **kw)
        self.attempts = list(attempts)
        self.decision = decision
        self.errors = list(errors)


__all__ = [
    "AllProvidersFailed",
    "AuthenticationError",
    "BudgetExceeded",
    "CatalogError",
    "ConfigurationError",
    "ContentPolicyError",
    "DeadlineExceeded",
    "Disposition",
    "ExecutionFailed",
    "ImageRouterError",
    "InsufficientCredits",
    "InvalidRequestError",
    "KeyFileError",
    "MalformedResponse",
    "NoRouteError",
    "PolicyFileError",
    "ProviderTimeout",
    "ProviderUnavailable",
    "RateLimited",
    "RequestValidationError",
    "redact",
]
