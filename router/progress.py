"""Progress events of one request, delivered to a caller's callback or async iterator.

    def show(event: Event) -> None:
        match event:
            case Routed(chain=chain):
                print("will try", ", ".join(chain))
            case ProgressEvent(step=step, total=total):
                print(f"step {step}/{total}")
            case PartialImage(index=i, data=png):
                Path(f"partial-{i}.png").write_bytes(png)

    router.generate("a fox", on_progress=show)

    async for event in router.astream("a fox"):    # the same events, then Completed(result)
        ...

Every event is a frozen dataclass with a ``kind`` string (also its JSON ``type`` in the server's
event stream). The router reports routing and attempts; backends report what they can:
denoising steps (local, ComfyUI), a queued/running status while a vendor's job is polled
(Replicate, BFL, Stability's creative upscale), partial images (OpenAI's streamed
``partial_images``, and local latent previews when a tiny preview autoencoder is configured).

The router puts the callback in a context variable for the duration of one request;
providers read it with :func:`current_sink` on the event loop and may call it from a worker
thread. A callback must be quick and thread-safe; an exception it raises is logged and
otherwise ignored.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from router.result import GenerationResult

log = logging.getLogger("imagerouter")


@dataclass(frozen=True, slots=True)
class Routed:
    """The request was routed: the candidates it will try, in order (``provider/model``)."""

    kind: ClassVar[str] = "routed"
    request_id: str
    policy: str
    chain: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AttemptStarted:
    """A call of one candidate begins (``rank`` in the chain, ``retry`` 0 for its first call)."""

    kind: ClassVar[str] = "attempt_started"
    provider: str
    model: str
    rank: int
    retry: int


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    """A call failed; ``cost_usd`` is what the vendor billed for it (0 when nothing)."""

    kind: ClassVar[str] = "attempt_failed"
    provider: str
    model: str
    error: str
    message: str
    retry: int
    cost_usd: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class FellBack:
    """The router moves on from one candidate to the next one in the chain."""

    kind: ClassVar[str] = "fell_back"
    from_provider: str
    from_model: str
    to_provider: str
    to_model: str


@dataclass(frozen=True, slots=True)
class Status:
    """An asynchronous vendor's job changed status: ``queued`` (accepted, not started), ``running``,
    ``pending`` (queued or running: the vendor does not say which), ``succeeded`` or ``failed``.

    ``vendor_status`` is the vendor's own word (Replicate's ``starting``, BFL's ``Pending``)."""

    kind: ClassVar[str] = "status"
    provider: str
    model: str
    status: str
    vendor_status: str
    elapsed_s: float
    job_id: str | None = None


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One denoising step finished: ``step`` of ``total`` for the images of one request."""

    kind: ClassVar[str] = "step"
    provider: str
    model: str
    step: int
    total: int
    elapsed_s: float

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 1.0


Step = ProgressEvent


@dataclass(frozen=True, slots=True)
class PartialImage:
    """A preview of the image being made: the vendor's streamed partial image, or a local latent preview.

    ``data`` is the encoded image (``mime``); ``index`` counts previews from 0; ``step`` is the
    denoising step it shows where the backend knows it."""

    kind: ClassVar[str] = "partial_image"
    provider: str
    model: str
    index: int
    data: bytes = field(repr=False)
    mime: str = "image/png"
    step: int | None = None


@dataclass(frozen=True, slots=True)
class Completed:
    """The last event of :meth:`AsyncRouter.astream`: the request's result."""

    kind: ClassVar[str] = "completed"
    result: GenerationResult


Event = Routed | AttemptStarted | AttemptFailed | FellBack | Status | ProgressEvent | PartialImage | Completed
ProgressCallback = Callable[[Any], None]
"""A callable taking one :data:`Event`."""

_sink: contextvars.ContextVar[ProgressCallback | None] = contextvars.ContextVar("imagerouter_progress", default=None)


def current_sink() -> ProgressCallback | None:
    """The callback of the request being served in this context, if any, wrapped to never raise."""
    callback = _sink.get()
    if callback is None:
        return None

    def safe(event: Any) -> None:
        try:
            callback(event)
        except Exception:
            log.exception("progress callback failed; generation continues")

    return safe


def emit(event: Any) -> None:
    """Send ``event`` to the current request's callback, if it has one."""
    sink = current_sink()
    if sink is not None:
        sink(event)


def event_dict(event: Any) -> dict[str, Any]:
    """``event`` as JSON-ready values (``type`` = its kind; image bytes base64; money as a string)."""
    import base64
    import dataclasses

    out: dict[str, Any] = {"type": event.kind}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if isinstance(value, bytes):
            out["b64_json"] = base64.b64encode(value).decode("ascii")
        elif isinstance(value, Decimal):
            out[f.name] = str(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        elif f.name != "result":
            out[f.name] = value
    return out


class StatusReporter:
    """Turns a polled vendor status into :class:`Status` events, one per change of status."""

    def __init__(self, provider: str, model: str, clock: Callable[[], float]) -> None:
        self._sink = current_sink()
        self._provider, self._model, self._clock = provider, model, clock
        self._start = clock()
        self._last: tuple[str, str] | None = None

    def __call__(self, status: str, vendor_status: str, job_id: str | None = None) -> None:
        """Report ``status`` (``queued``/``running``/``succeeded``/``failed``) read as ``vendor_status``."""
        if self._sink is None or self._last == (status, vendor_status):
            return
        self._last = (status, vendor_status)
        self._sink(Status(self._provider, self._model, status, vendor_status, self._clock() - self._start, job_id))


@contextmanager
def reporting_to(callback: ProgressCallback | None) -> Iterator[None]:
    """Send progress events of the requests made inside this block to ``callback``."""
    token = _sink.set(callback)
    try:
        yield
    finally:
        _sink.reset(token)
