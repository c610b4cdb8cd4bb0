"""Provenance metadata written into saved images, and read back.

The router attaches a provenance record to every image it returns
(:attr:`GeneratedImage.provenance`); :meth:`GeneratedImage.save` writes it into the file:

====  =========================================================================================
PNG   a ``parameters`` text chunk in AUTOMATIC1111's infotext format (``<prompt>\\nNegative
      prompt: …\\nSteps: 30, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 1024x1024, Model: …``)
      and an ``imagerouter`` text chunk holding the JSON record. The chunks are spliced into
      the file after ``IHDR``: no pixel is re-encoded, every other chunk stays as it was.
JPEG  an EXIF ``UserComment`` holding the infotext (where AUTOMATIC1111 puts it; left out when
      the file already has an EXIF block, which is kept) and an XMP packet holding the JSON
      (``imagerouter:provenance``), as APP1 segments spliced in after SOI/APP0: the compressed
      image data is untouched.
WEBP  nothing yet (it needs the RIFF container rewritten to the extended VP8X form).
====  =========================================================================================

The record holds the prompt and negative prompt (passed through :func:`router.errors.redact`),
seed (the one the backend used, where it reported it; ``requested_seed`` otherwise), steps,
guidance, scheduler, size, model, provider, cost, request id, routing policy, task, time and
``version``; never ``provider_options``, LoRA references, headers or keys.

Opt out per call with ``image.save(path, metadata=False)``, or for the process with
``IMAGEROUTER_PROVENANCE=0``. :func:`read_provenance` returns the record from a file or bytes
(parsing the ``parameters`` infotext when that is all there is).
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import struct
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from router.errors import redact

if TYPE_CHECKING:
    from router.request import ImageRequest
    from router.result import Cost, GeneratedImage

VERSION = 1
JSON_KEY = "imagerouter"
PARAMETERS_KEY = "parameters"
XMP_NS = "https://github.com/imagerouter/imagerouter/ns/provenance/1.0/"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_XMP_ID = b"http://ns.adobe.com/xap/1.0/\x00"
_EXIF_ID = b"Exif\x00\x00"
_OUR_EXIF = _EXIF_ID + b"MM\x00*\x00\x00\x00\x08\x00\x01\x87\x69"
_SAMPLERS = {"dpmpp_2m_karras": "DPM++ 2M Karras", "euler": "Euler", "euler_a": "Euler a", "unipc": "UniPC",
             "ddim": "DDIM", "lcm": "LCM"}


def enabled() -> bool:
    """Whether :meth:`GeneratedImage.save` embeds provenance by default (``IMAGEROUTER_PROVENANCE=0`` turns it off)."""
    return os.environ.get("IMAGEROUTER_PROVENANCE", "1").strip().lower() not in {"0", "false", "no", "off"}


# --- the record --------------------------------------------------------------------------


def build(request: ImageRequest, image: GeneratedImage, *, provider: str, model: str, cost: Cost, request_id: str,
          policy: str, provider_request_id: str | None = None) -> dict[str, Any]:
    """The provenance record of one image the router returns."""
    from router import __version__

    record: dict[str, Any] = {
        "version": VERSION,
        "generator": f"imagerouter {__version__}",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "prompt": redact(request.prompt),
        "negative_prompt": redact(request.negative_prompt) if request.negative_prompt else None,
        "seed": image.seed,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "scheduler": request.scheduler,
        "width": image.width,
        "height": image.height,
        "task": request.task,
        "model": model,
        "provider": provider,
        "cost_usd": str(cost.actual_usd),
        "estimated_cost_usd": str(cost.estimated_usd),
        "request_id": request_id,
        "provider_request_id": provider_request_id,
        "policy": policy,
    }
    if request.seed is not None and request.seed != image.seed:
        record["requested_seed"] = request.seed
    if request.strength is not None:
        record["strength"] = request.strength
    return record


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


def infotext(record: Mapping[str, Any]) -> str:
    """The record in AUTOMATIC1111's ``parameters`` format."""
    params: dict[str, Any] = {
        "Steps": record.get("steps"),
        "Sampler": _SAMPLERS.get(record.get("scheduler") or "", record.get("scheduler")),
        "CFG scale": record.get("guidance_scale"),
        "Seed": record.get("seed"),
        "Size": f"{record['width']}x{record['height']}" if record.get("width") and record.get("height") else None,
        "Model": record.get("model"),
        "Denoising strength": record.get("strength"),
        "Provider": record.get("provider"),
        "Policy": record.get("policy"),
        "Cost": f"${record['cost_usd']}" if record.get("cost_usd") is not None else None,
        "Request id": record.get("request_id"),
        "Version": record.get("generator"),
    }
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {record['negative_prompt']}" if record.get("negative_prompt") else ""
    return f"{record.get('prompt') or ''}{negative}\n{line}".strip()


_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_FROM_INFOTEXT = {"Steps": ("steps", int), "Sampler": ("sampler", str), "CFG scale": ("guidance_scale", float),
                  "Seed": ("seed", int), "Model": ("model", str), "Denoising strength": ("strength", float),
                  "Provider": ("provider", str), "Policy": ("policy", str), "Request id": ("request_id", str),
                  "Version": ("generator", str)}


def parse_infotext(text: str) -> dict[str, Any]:
    """Parse AUTOMATIC1111's ``parameters`` text; known keys get this module's names, ``parameters`` has all."""
    lines = text.strip().split("\n")
    last = lines[-1]
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    params: dict[str, str] = {}
    for key, value in _RE_PARAM.findall(last):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        params[key.strip()] = value
    out: dict[str, Any] = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative) or None}
    for key, (name, kind) in _FROM_INFOTEXT.items():
        if key in params:
            try:
                out[name] = kind(params[key])
            except ValueError:
                out[name] = params[key]
    size = re.fullmatch(r"(\d+)x(\d+)", params.get("Size", ""))
    if size:
        out["width"], out["height"] = int(size.group(1)), int(size.group(2))
    out["parameters"] = params
    return out


def _json(record: Mapping[str, Any]) -> str:
    return json.dumps(dict(record), default=lambda o: str(o) if isinstance(o, Decimal) else repr(o),
                      separators=(",", ":"))


# --- writing -------------------------------------------------------------------------------


def embed(data: bytes, record: Mapping[str, Any]) -> bytes:
    """``data`` (PNG, JPEG or WEBP bytes) with ``record`` written in; other formats come back unchanged.

    Raises ValueError for a file too damaged to splice into.
    """
    if data.startswith(_PNG_SIG):
        return _embed_png(data, record)
    if data.startswith(b"\xff\xd8"):
        return _embed_jpeg(data, record)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _embed_webp(data, record)
    return data


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _png_text(key: str, text: str) -> bytes:
    try:
        return _png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:  # iTXt: keyword, no compression, empty language and translated keyword
        return _png_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))


def _png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of every chunk, end exclusive (CRC included)."""
    chunks = []
    pos = len(_PNG_SIG)
    while pos < len(data):
        if pos + 8 > len(data):
            raise ValueError("truncated PNG chunk header")
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        end = pos + 12 + length
        if end > len(data):
            raise ValueError("truncated PNG chunk")
        ctype = data[pos + 4:pos + 8]
        chunks.append((ctype, pos, end))
        pos = end
        if ctype == b"IEND":
            break
    if not chunks or chunks[0][0] != b"IHDR":
        raise ValueError("PNG does not start with IHDR")
    return chunks


def _png_keyword(data: bytes, start: int, end: int) -> bytes:
    body = data[start + 8:end - 4]
    return body[:body.find(b"\0")] if b"\0" in body else body


def _embed_png(data: bytes, record: Mapping[str, Any]) -> bytes:
    ours = {PARAMETERS_KEY.encode(), JSON_KEY.encode()}
    out = [data[:len(_PNG_SIG)]]
    for ctype, start, end in _png_chunks(data):
        if ctype in (b"tEXt", b"iTXt", b"zTXt") and _png_keyword(data, start, end) in ours:
            continue  # replaced by ours
        out.append(data[start:end])
        if ctype == b"IHDR":
            out.append(_png_text(PARAMETERS_KEY, infotext(record)))
            out.append(_png_text(JSON_KEY, _json(record)))
    return b"".join(out)


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment before the scan data."""
    segments = []
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError("bad JPEG marker")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        end = pos + 2 + length
        if end > len(data):
            raise ValueError("truncated JPEG segment")
        segments.append((marker, pos, end))
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            return segments
        pos = end
    raise ValueError("JPEG has no scan")


def _app1(payload: bytes) -> bytes | None:
    if len(payload) + 2 > 0xFFFF:
        return None  # a segment holds at most 64 KiB; a prompt that long is left out rather than split
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _user_comment(text: str) -> bytes:
    try:
        return b"ASCII\0\0\0" + text.encode("ascii")
    except UnicodeEncodeError:
        return b"UNICODE\0" + text.encode("utf-16-be")


def _xmp(record: Mapping[str, Any]) -> bytes:
    value = html.escape(_json(record), quote=False)
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:imagerouter="{XMP_NS}">'
        f"<imagerouter:provenance>{value}</imagerouter:provenance>"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="r"?>'
    ).encode()


def _exif_user_comment(text: str) -> bytes:
    """A minimal big-endian EXIF block: IFD0 points to an Exif IFD holding one UserComment (UNDEFINED)."""
    comment = _user_comment(text)
    ifd0 = struct.pack(">H", 1) + struct.pack(">HHII", 0x8769, 4, 1, 26) + struct.pack(">I", 0)
    exif_ifd = struct.pack(">H", 1) + struct.pack(">HHII", 0x9286, 7, len(comment), 44) + struct.pack(">I", 0)
    return _EXIF_ID + b"MM\x00*" + struct.pack(">I", 8) + ifd0 + exif_ifd + comment


def _embed_jpeg(data: bytes, record: Mapping[str, Any]) -> bytes:
    segments = _jpeg_segments(data)
    kept: list[bytes] = []
    has_exif = False
    insert_at = 0
    for i, (marker, start, end) in enumerate(segments[:-1]):
        payload = data[start + 4:end]
        if marker == 0xE1 and payload.startswith((_XMP_ID, _OUR_EXIF)):
            continue  # replaced by ours
        has_exif = has_exif or (marker == 0xE1 and payload.startswith(_EXIF_ID))
        if marker == 0xE0 and i == 0:
            insert_at = 1  # JFIF's APP0 must stay first
        kept.append(data[start:end])
    new = [_app1(_XMP_ID + _xmp(record))]
    if not has_exif:  # a provider's own EXIF block is kept as it is; the XMP packet carries the record
        new.insert(0, _app1(_exif_user_comment(infotext(record))))
    scan = segments[-1][1]
    return data[:2] + b"".join(kept[:insert_at] + [s for s in new if s] + kept[insert_at:]) + data[scan:]


def _webp_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (FourCC, payload) chunks of a RIFF/WEBP file."""
    chunks, pos = [], 12
    while pos + 8 <= len(data):
        fourcc, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if pos + 8 + size > len(data):
            raise ValueError("WEBP chunk runs past the end of the file")
        chunks.append((fourcc, data[pos + 8:pos + 8 + size]))
        pos += 8 + size + (size & 1)
    return chunks


def _webp_chunk(fourcc: bytes, payload: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(payload)) + payload + (b"\0" if len(payload) & 1 else b"")


def _webp_size(fourcc: bytes, payload: bytes) -> tuple[int, int, bool]:
    """Canvas width, height and whether it has alpha, from a simple file's one image chunk."""
    if fourcc == b"VP8L" and len(payload) >= 5 and payload[0] == 0x2F:
        bits = int.from_bytes(payload[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, bool(bits >> 28 & 1)
    if fourcc == b"VP8 " and len(payload) >= 10 and payload[3:6] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", payload[6:10])
        return w & 0x3FFF, h & 0x3FFF, False
    raise ValueError(f"not a WEBP image chunk: {fourcc!r}")


def _embed_webp(data: bytes, record: Mapping[str, Any]) -> bytes:
    """The record as an XMP chunk; a simple (VP8/VP8L) file becomes an extended (VP8X) one. Image data is kept."""
    chunks = [(c, body) for c, body in _webp_chunks(data) if c != b"XMP "]
    if chunks and chunks[0][0] == b"VP8X":
        vp8x = chunks[0][1]
        chunks[0] = (b"VP8X", bytes([vp8x[0] | 0x04]) + vp8x[1:])  # flag: XMP present
    elif len(chunks) == 1:
        width, height, alpha = _webp_size(*chunks[0])
        flags = 0x04 | (0x10 if alpha else 0)
        chunks.insert(0, (b"VP8X", bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little")
                          + (height - 1).to_bytes(3, "little")))
    else:
        raise ValueError("unexpected WEBP layout: several chunks without a VP8X header")
    chunks.append((b"XMP ", _xmp(record)))
    body = b"WEBP" + b"".join(_webp_chunk(c, payload) for c, payload in chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _xmp_json(payload: bytes) -> str | None:
    m = re.search(rb"<imagerouter:provenance>(.*?)</imagerouter:provenance>", payload, re.S)
    return html.unescape(m.group(1).decode("utf-8")) if m else None


# --- reading -------------------------------------------------------------------------------


def read_provenance(source: str | os.PathLike[str] | bytes) -> dict[str, Any]:
    """The provenance record in an image file (or its bytes); ``{}`` when it has none.

    Returns the JSON record where there is one, else the parsed ``parameters`` infotext.
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    texts: dict[str, str] = {}
    if data.startswith(_PNG_SIG):
        texts = _png_texts(data)
    elif data.startswith(b"\xff\xd8"):
        texts = _jpeg_texts(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        found = [_xmp_json(body) for c, body in _webp_chunks(data) if c == b"XMP "]
        texts = {JSON_KEY: found[0]} if found and found[0] is not None else {}
    if JSON_KEY in texts:
        value = json.loads(texts[JSON_KEY])
        return value if isinstance(value, dict) else {}
    if PARAMETERS_KEY in texts:
        return parse_infotext(texts[PARAMETERS_KEY])
    return {}


def _png_texts(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for ctype, start, end in _png_chunks(data):
        body = data[start + 8:end - 4]
        key, _, rest = body.partition(b"\0")
        name = key.decode("latin-1")
        if ctype == b"tEXt":
            out[name] = rest.decode("latin-1")
        elif ctype == b"zTXt":
            out[name] = zlib.decompress(rest[1:]).decode("latin-1")
        elif ctype == b"iTXt":
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _translated, _, text = rest.partition(b"\0")
            out[name] = (zlib.decompress(text) if compressed else text).decode("utf-8")
    return out


def _jpeg_texts(data: bytes) -> dict[str, str]:
    from PIL import Image

    out: dict[str, str] = {}
    for marker, start, end in _jpeg_segments(data):
        payload = data[start + 4:end]
        if marker != 0xE1:
            continue
        if payload.startswith(_XMP_ID):
            found = _xmp_json(payload)
            if found is not None:
                out[JSON_KEY] = found
        elif payload.startswith(_EXIF_ID):
            exif = Image.Exif()
            exif.load(payload)
            comment = exif.get_ifd(0x8769).get(0x9286)
            if isinstance(comment, bytes):
                head, body = comment[:8], comment[8:]
                out[PARAMETERS_KEY] = (body.decode("utf-16-be") if head == b"UNICODE\0"
                                       else body.decode("utf-8", "replace"))
            elif isinstance(comment, str):
                out[PARAMETERS_KEY] = comment
    return out


__all__ = ["JSON_KEY", "PARAMETERS_KEY", "VERSION", "build", "embed", "enabled", "infotext", "parse_infotext",
           "read_provenance"]
