"""``pixroute inspect IMAGE``: what an image file says about where it came from.

:func:`inspect` reads a PNG, JPEG or WEBP file (under the byte and pixel caps every image the SDK reads is
under) and reports its format and size, the provenance record the router writes into saved images
(:func:`router.provenance.read_provenance`) and whether it carries the invisible watermark the local and
ComfyUI backends embed (:func:`providers.local.watermark.read_watermark`, when ``invisible-watermark`` is
installed). A damaged provenance record is reported, not raised: the rest of the file can still be read.

It decodes the whole image to look for the mark (tens to hundreds of ms): from async code, run it in a worker
thread (``await asyncio.to_thread(inspect, path)``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from router.errors import InvalidRequestError
from router.images import MAX_IMAGE_BYTES, ImageDecodeError, probe
from router.provenance import ProvenanceError, read_provenance

__all__ = ["add_arguments", "inspect", "run_args"]

_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}


def _payload(text: str | None) -> bytes | None:
    if text is None:
        return None
    data = text.encode()
    if len(data) != 6:
        raise InvalidRequestError(f"a watermark payload is 6 bytes (48 bits), got {len(data)}: {text!r}",
                                  code="invalid_payload")
    return data


def _read(path: Path) -> bytes:
    """The file's bytes, refused before reading when it is missing, not a file, or over the byte cap."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InvalidRequestError(f"{path}: not a file", code="not_a_file")
        if size > MAX_IMAGE_BYTES:
            raise ImageDecodeError(f"{path}: {size} bytes is over the {MAX_IMAGE_BYTES}-byte cap")
        return path.read_bytes()
    except FileNotFoundError:
        raise InvalidRequestError(f"{path}: no such file", code="file_not_found") from None
    except OSError as exc:
        raise InvalidRequestError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})",
                                  code="unreadable") from None


def inspect(path: str | Path, *, watermark_payload: bytes | None = None) -> dict[str, Any]:
    """Format, size, provenance and invisible watermark of the image file at ``path``.

    Returns ``{"path", "format", "mime", "width", "height", "bytes", "provenance", "provenance_error",
    "watermark"}``: ``provenance`` is the record (``{}`` when the file has none, None when it is damaged, with
    ``provenance_error`` saying how); ``watermark`` is ``{"checked": True, "found", "agreement", "payload"}``,
    or ``{"checked": False, "reason"}`` without ``invisible-watermark``. ``watermark_payload`` is the 6-byte
    mark to look for (default: the one the backends embed).

    Raises :class:`~router.errors.InvalidRequestError` for a missing or unreadable file, and its subclass
    :class:`~router.images.ImageDecodeError` for a file that is not a PNG, JPEG or WEBP image or is over the
    caps.
    """
    where = Path(path).expanduser()
    data = _read(where)
    mime, width, height = probe(data, what=str(where))
    report: dict[str, Any] = {"path": str(where), "format": _FORMATS[mime], "mime": mime, "width": width,
                              "height": height, "bytes": len(data), "provenance": None, "provenance_error": None}
    try:
        report["provenance"] = read_provenance(data)
    except ProvenanceError as exc:
        report["provenance_error"] = exc.message
    report["watermark"] = _watermark(data, watermark_payload, width * height)
    return report


def _watermark(data: bytes, payload: bytes | None, pixels: int) -> dict[str, Any]:
    if importlib.util.find_spec("imwatermark") is None:
        return {"checked": False,
                "reason": "invisible-watermark is not installed (pip install 'pixroute[local]')"}
    from providers.local.watermark import MIN_PIXELS, PAYLOAD, read_watermark

    want = payload or PAYLOAD
    reading = read_watermark(data, want)
    out: dict[str, Any] = {"checked": True, "found": reading.found, "agreement": reading.agreement,
                           "payload": want.decode("latin-1")}
    if pixels < MIN_PIXELS:
        out["note"] = f"smaller than {MIN_PIXELS:,} pixels: too small to carry the mark"
    return out


# --- the command ------------------------------------------------------------------------------------


def _shown(value: Any) -> str:
    """``value`` for a terminal: the record comes from anyone's file, so control characters (escape
    sequences) are shown escaped, never sent."""
    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def add_arguments(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    """The ``inspect`` command's arguments (for ``pixroute inspect``); ``json_flag=False`` when the parser
    already has ``--json`` (the CLI's common options)."""
    p.add_argument("image", help="a PNG, JPEG or WEBP file")
    p.add_argument("--watermark-payload", metavar="TEXT",
                   help="the 6-byte mark to look for, when the operator set its own (default: the backends')")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the report as JSON")


def run_args(ns: argparse.Namespace, *, stdout: TextIO | None = None) -> int:
    """Run the ``inspect`` command for parsed arguments; return the exit code (0: the file was read)."""
    out = stdout or sys.stdout
    report = inspect(ns.image, watermark_payload=_payload(getattr(ns, "watermark_payload", None)))
    if getattr(ns, "json", False):
        out.write(json.dumps(report, default=str) + "\n")
        return 0
    out.write(f"{_shown(report['path'])}: {report['format'].upper()} {report['width']}x{report['height']}, "
              f"{report['bytes']:,} bytes\n")
    prov = report["provenance"]
    if report["provenance_error"]:
        out.write(f"provenance: damaged ({_shown(report['provenance_error'])})\n")
    elif not prov:
        out.write("provenance: none\n")
    else:
        out.write("provenance:\n")
        for key, value in prov.items():
            out.write(f"  {_shown(key)}: {_shown(value)}\n")
    mark = report["watermark"]
    if not mark["checked"]:
        out.write(f"invisible watermark: not checked ({mark['reason']})\n")
    else:
        verdict = "found" if mark["found"] else "not found"
        note = f"; {mark['note']}" if "note" in mark else ""
        out.write(f"invisible watermark: {verdict} ({mark['agreement']:.0%} of its bits match{note})\n")
    return 0
