"""Server-sent events in OpenAI's image-streaming shape, made from the router's progress events.

A client that sends ``stream: true`` (OpenAI's ``images.generate(..., stream=True, partial_images=2)``)
receives ``image_generation.partial_image`` events for the previews a backend makes and one
``image_generation.completed`` event per final image (``image_edit.*`` for edits), with the fields of
ImageGenPartialImageEvent / ImageGenCompletedEvent (tests/specs/openai.openapi.yaml). A failure after
the stream began is an ``error`` event whose data is OpenAI's error object, which the ``openai``
client raises. With ``stream_events: true`` (this server's extension) every other progress event is
sent too, as ``pixroute.<kind>`` events holding :func:`router.progress.event_dict`.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

from router.progress import PartialImage, event_dict
from router.result import GenerationResult

FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One event, ``data`` as one line of JSON."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


def _size_of(data: bytes) -> str:
    """``WxH`` read from an encoded image's header (no pixels decoded)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return f"{img.width}x{img.height}"
    except Exception:
        return "auto"


def partial_event(event: PartialImage, prefix: str) -> bytes:
    """A ``{prefix}.partial_image`` event for a preview."""
    return sse(f"{prefix}.partial_image", {
        "type": f"{prefix}.partial_image",
        "b64_json": base64.b64encode(event.data).decode("ascii"),
        "created_at": int(time.time()),
        "size": _size_of(event.data),
        "quality": "auto",
        "background": "auto",
        "output_format": FORMATS.get(event.mime, "png"),
        "partial_image_index": event.index,
    })


def completed_events(result: GenerationResult, prefix: str, usage: dict[str, Any] | None,
                     summary: dict[str, Any]) -> list[bytes]:
    """One ``{prefix}.completed`` event per image. ``usage`` (OpenAI's token counts, when the backend
    billed in tokens, else zeros) is the request's: on the first image, zeros on the others, so the
    events add up to it. ``summary`` (provider, model, cost, attempts) rides under ``imagerouter``."""
    zero = {"input_tokens": 0, "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}, "output_tokens": 0,
            "total_tokens": 0}
    out = []
    for i, img in enumerate(result.images):
        out.append(sse(f"{prefix}.completed", {
            "type": f"{prefix}.completed",
            "b64_json": base64.b64encode(img.data).decode("ascii"),
            "created_at": int(time.time()),
            "size": f"{img.width}x{img.height}",
            "quality": "auto",
            "background": "auto",
            "output_format": FORMATS.get(img.mime, "png"),
            "usage": (usage or zero) if i == 0 else zero,
            "imagerouter": summary if i == 0 else {"request_id": result.request_id},
        }))
    return out


def progress_event(event: Any) -> bytes:
    """Any other progress event as ``pixroute.<kind>``."""
    return sse(f"pixroute.{event.kind}", event_dict(event))


def error_event(error: dict[str, Any]) -> bytes:
    """OpenAI's error object as an ``error`` event."""
    return sse("error", {"error": error})
