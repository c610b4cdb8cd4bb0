"""Progress events for long generations (local denoising steps), delivered to a caller's callback.

    def show(event: ProgressEvent) -> None:
        print(f"{event.provider}/{event.model}: step {event.step}/{event.total}")

    router.generate("a fox", on_progress=show)

The router puts the callback in a context variable for the duration of one request;
providers that can report steps read it with :func:`current_sink` on the event loop
and call it from their worker thread. A callback must be quick and thread-safe; an
exception it raises is logged and otherwise ignored.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger("imagerouter")


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One denoising step finished: ``step`` of ``total`` for the images of one request."""

    provider: str
    model: str
    step: int
    total: int
    elapsed_s: float

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 1.0


ProgressCallback = Callable[[ProgressEvent], None]
_sink: contextvars.ContextVar[ProgressCallback | None] = contextvars.ContextVar("imagerouter_progress", default=None)


def current_sink() -> ProgressCallback | None:
    """The callback of the request being served in this context, if any, wrapped to never raise."""
    callback = _sink.get()
    if callback is None:
        return None

    def safe(event: ProgressEvent) -> None:
        try:
            callback(event)
        except Exception:
            log.exception("progress callback failed; generation continues")

    return safe


@contextmanager
def reporting_to(callback: ProgressCallback | None) -> Iterator[None]:
    """Send progress events of the requests made inside this block to ``callback``."""
    token = _sink.set(callback)
    try:
        yield
    finally:
        _sink.reset(token)
