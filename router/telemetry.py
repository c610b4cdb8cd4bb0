"""OpenTelemetry spans for routed requests (the ``otel`` extra); a cheap no-op without it.

One ``INTERNAL`` span per request and one ``CLIENT`` span per provider call (retries
included), named after the GenAI semantic conventions: ``{gen_ai.operation.name}
{gen_ai.request.model}``. The operation is ``generate_content``, the conventions'
well-known value for multimodal generation, with ``gen_ai.output.type = "image"``.

Tracing is on whenever ``opentelemetry-api`` is importable: spans go to the global
tracer provider, or to the one given as ``AsyncRouter(..., tracer_provider=tp)``.
``IMAGEROUTER_OTEL=0`` (or ``tracer_provider=False``) turns it off. Prompts are
recorded only with ``AsyncRouter(..., record_prompts=True)`` or
``IMAGEROUTER_OTEL_RECORD_PROMPTS=1``; error messages are passed through
:func:`router.errors.redact`.

=====================================  ==========================================================
request span                           ``gen_ai.operation.name``, ``gen_ai.output.type``,
                                       ``gen_ai.request.model`` (when pinned), ``gen_ai.request.seed``,
                                       ``gen_ai.request.choice.count``, ``gen_ai.provider.name`` and
                                       ``gen_ai.response.model`` (on success), ``imagerouter.request_id``,
                                       ``.task``, ``.policy``, ``.outcome``, ``.provider``, ``.attempts``,
                                       ``.candidates``, ``.rank``, ``.errors``, ``.fallback.reasons``,
                                       ``.cost.estimated_usd``, ``.cost.actual_usd``, ``error.type``
attempt span                           ``gen_ai.*`` as above for the candidate, ``imagerouter.provider``
                                       (the instance name), ``.rank``, ``.attempt`` (1-based, per
                                       request), ``.retry`` (0 on the first try of a candidate),
                                       ``.outcome``, ``.cost.*``, ``.error.disposition``, ``error.type``
=====================================  ==========================================================
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from router.errors import ImageRouterError, redact

if TYPE_CHECKING:
    from providers.base import ProviderResponse
    from router.request import ImageRequest

OPERATION = "generate_content"
_FALSY = {"0", "false", "no", "off"}


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() not in _FALSY


class _NoSpan:
    """Stands in for a span when tracing is off: every method does nothing."""

    __slots__ = ()

    def is_recording(self) -> bool:
        return False

    def set_attribute(self, key: str, value: Any) -> None:
        pass


_NO_SPAN = _NoSpan()


class Tracing:
    """Creates the router's spans. ``tracer_provider``: None (the global one), an SDK
    ``TracerProvider``, or False (no spans)."""

    def __init__(self, tracer_provider: Any = None, *, record_prompts: bool | None = None) -> None:
        self.record_prompts = (_env_flag("IMAGEROUTER_OTEL_RECORD_PROMPTS", False) if record_prompts is None
                               else record_prompts)
        self._tracer: Any = None
        self._global: Any = None  # opentelemetry.trace, while the global provider is still to be looked up
        if tracer_provider is False or not _env_flag("IMAGEROUTER_OTEL", True):
            return
        try:
            from opentelemetry import trace
            from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, SpanKind, Status, StatusCode
        except ImportError:
            return
        self._kind_client = SpanKind.CLIENT
        self._kind_internal = SpanKind.INTERNAL
        self._status = Status
        self._ok = StatusCode.OK
        self._error = StatusCode.ERROR
        self._unset = (ProxyTracerProvider, NoOpTracerProvider)
        if tracer_provider is None:
            self._global = trace
        else:
            self._tracer = _get_tracer(tracer_provider)

    @property
    def enabled(self) -> bool:
        """Whether spans are (or, once the app sets a global tracer provider, will be) created."""
        return self._tracer is not None or self._global is not None

    def _current(self) -> Any:
        """The tracer to use now, or None. Until the app sets a global provider, spans would go
        nowhere: skip them instead of paying for no-op spans on every request."""
        if self._tracer is None and self._global is not None:
            provider = self._global.get_tracer_provider()
            if isinstance(provider, self._unset):
                return None
            self._tracer = _get_tracer(provider)  # the global provider can be set once only: safe to keep
            self._global = None
        return self._tracer

    @contextmanager
    def _span(self, tracer: Any, name: str, kind: Any) -> Iterator[Any]:
        # exceptions are recorded by hand below: the SDK's own recording would carry unredacted messages
        with tracer.start_as_current_span(name, kind=kind, record_exception=False,
                                                set_status_on_exception=False) as span:
            try:
                yield span
            except BaseException as exc:
                if span.is_recording():
                    self._fail(span, exc)
                raise

    def _fail(self, span: Any, exc: BaseException) -> None:
        kind = type(exc).__name__
        message = redact(str(exc))
        span.set_attribute("error.type", kind)
        if isinstance(exc, ImageRouterError):
            span.set_attribute("imagerouter.error.disposition", exc.disposition.value)
            if exc.status_code is not None:
                span.set_attribute("imagerouter.error.status_code", exc.status_code)
        span.add_event("exception", {"exception.type": kind, "exception.message": message})
        span.set_status(self._status(self._error, f"{kind}: {message}"))
        span.set_attribute("imagerouter.outcome", "cancelled" if isinstance(exc, asyncio.CancelledError) else "error")

    # --- the request span ------------------------------------------------------------

    @contextmanager
    def request(self, request: ImageRequest, policy: str, request_id: str) -> Iterator[Any]:
        """The span around one request's whole walk (a no-op span when tracing is off)."""
        tracer = self._current()
        if tracer is None:
            yield _NO_SPAN
            return
        name = f"{OPERATION} {request.model}" if request.model else OPERATION
        with self._span(tracer, name, self._kind_internal) as span:
            if span.is_recording():
                attrs: dict[str, Any] = {
                    "gen_ai.operation.name": OPERATION,
                    "gen_ai.output.type": "image",
                    "gen_ai.request.choice.count": request.n,
                    "imagerouter.request_id": request_id,
                    "imagerouter.task": request.task,
                    "imagerouter.policy": policy,
                }
                if request.model:
                    attrs["gen_ai.request.model"] = request.model
                if request.seed is not None:
                    attrs["gen_ai.request.seed"] = request.seed
                if request.width and request.height:
                    attrs["imagerouter.request.size"] = f"{request.width}x{request.height}"
                if self.record_prompts:
                    attrs["imagerouter.prompt"] = request.prompt
                    if request.negative_prompt:
                        attrs["imagerouter.negative_prompt"] = request.negative_prompt
                span.set_attributes(attrs)
            yield span

    def routed(self, span: Any, candidates: int) -> None:
        """Record the decision's chain length."""
        if span.is_recording():
            span.set_attribute("imagerouter.candidates", candidates)

    def request_done(self, span: Any, *, provider: str, provider_kind: str, model: str, rank: int,
                     attempts: list[Any], estimated_usd: Decimal, actual_usd: Decimal) -> None:
        """Mark the request span a success."""
        if not span.is_recording():
            return
        span.set_attributes({
            "gen_ai.provider.name": provider_kind,
            "gen_ai.response.model": model,
            "imagerouter.provider": provider,
            "imagerouter.rank": rank,
            "imagerouter.outcome": "success",
            "imagerouter.cost.estimated_usd": float(estimated_usd),
            "imagerouter.cost.actual_usd": float(actual_usd),
            **_trail(attempts),
        })
        span.set_status(self._status(self._ok))

    def request_failed(self, span: Any, attempts: list[Any]) -> None:
        """Add the attempt trail to a failing request span (its status is set when the error leaves it)."""
        if span.is_recording():
            span.set_attributes(_trail(attempts))

    # --- attempt spans ---------------------------------------------------------------

    @contextmanager
    def attempt(self, *, provider: str, provider_kind: str, model: str, request_id: str, rank: int, number: int,
                retry: int, estimated_usd: Decimal, seed: int | None = None) -> Iterator[Any]:
        """The span around one provider call."""
        tracer = self._current()
        if tracer is None:
            yield _NO_SPAN
            return
        with self._span(tracer, f"{OPERATION} {model}", self._kind_client) as span:
            if span.is_recording():
                attrs: dict[str, Any] = {
                    "gen_ai.operation.name": OPERATION,
                    "gen_ai.output.type": "image",
                    "gen_ai.provider.name": provider_kind,
                    "gen_ai.request.model": model,
                    "imagerouter.provider": provider,
                    "imagerouter.request_id": request_id,
                    "imagerouter.rank": rank,
                    "imagerouter.attempt": number,
                    "imagerouter.retry": retry,
                    "imagerouter.cost.estimated_usd": float(estimated_usd),
                }
                if seed is not None:
                    attrs["gen_ai.request.seed"] = seed
                span.set_attributes(attrs)
            yield span

    def attempt_done(self, span: Any, response: ProviderResponse) -> None:
        """Mark an attempt span a success."""
        if not span.is_recording():
            return
        span.set_attributes({
            "gen_ai.response.model": response.model,
            "imagerouter.outcome": "success",
            "imagerouter.cost.actual_usd": float(response.billing.cost_usd),
            "imagerouter.images": len(response.images),
        })
        if response.provider_request_id:
            span.set_attribute("gen_ai.response.id", response.provider_request_id)
        span.set_status(self._status(self._ok))


def _get_tracer(provider: Any) -> Any:
    from router import __version__

    return provider.get_tracer("imagerouter", __version__)


def _trail(attempts: list[Any]) -> dict[str, Any]:
    """Attempt count, every failed attempt's error class, and why each abandoned candidate was left."""
    out: dict[str, Any] = {"imagerouter.attempts": sum(1 for a in attempts if a.outcome != "skipped")}
    errors = [a.error for a in attempts if a.outcome != "success" and a.error]
    if errors:
        out["imagerouter.errors"] = errors
    left: dict[tuple[str, str], str] = {}
    for a in attempts:
        if a.outcome != "success" and a.error:
            left[(a.provider, a.model)] = a.error  # the last error on a candidate is why it was left
    if left:
        out["imagerouter.fallback.reasons"] = [f"{p}/{m}: {e}" for (p, m), e in left.items()]
    return out


__all__ = ["OPERATION", "Tracing"]
