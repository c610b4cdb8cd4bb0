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
(parsing the ``parameters`` infotext when that is all there is). It reads files from anyone, so it
is bounded: only the chunks that can hold the record are read, compressed text is inflated to at
most :data:`MAX_TEXT_BYTES`, the parsers run in linear time, and a malformed file is a
:class:`ProvenanceError` in milliseconds and a few MB, whatever it holds.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import struct
import warnings
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, BinaryIO

from router.errors import redact
from router.images import ImageDecodeError

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
_SAMPLERS = {
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "euler": "Euler",
    "euler_a": "Euler a",
    "unipc": "UniPC",
    "ddim": "DDIM",
    "lcm": "LCM",
}


def enabled() -> bool:
    """Whether :meth:`GeneratedImage.save` embeds provenance by default (``IMAGEROUTER_PROVENANCE=0`` turns it off)."""
    return os.environ.get("IMAGEROUTER_PROVENANCE", "1").strip().lower() not in {"0", "false", "no", "off"}


# --- the record --------------------------------------------------------------------------


def build(
    request: ImageRequest,
    image: GeneratedImage,
    *,
    provider: str,
    model: str,
    cost: Cost,
    request_id: str,
    policy: str,
    provider_request_id: str | None = None,
) -> dict[str, Any]:
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


_KEY = re.compile(r"\w[\w \-/]+")  # AUTOMATIC1111's parameter names: "Steps", "CFG scale", "Model hash"
_FROM_INFOTEXT = {
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "CFG scale": ("guidance_scale", float),
    "Seed": ("seed", int),
    "Model": ("model", str),
    "Denoising strength": ("strength", float),
    "Provider": ("provider", str),
    "Policy": ("policy", str),
    "Request id": ("request_id", str),
    "Version": ("generator", str),
}


# One parameter: the text before its colon, then a quoted value (JSON escapes) that ends at a comma or the end
# of the line, or else everything up to the next comma. Each alternative is unambiguous, so a failed attempt
# backtracks over its own span only; with the loop in _parameters the whole line is read in linear time.
_ITEM = re.compile(r'([^:,]*):\s*("(?:[^"\\]|\\.)*"(?=,|$)|[^,]*)')


def _parameters(line: str) -> list[tuple[str, str]]:
    """The ``key: value`` pairs of an infotext's parameter line, read as AUTOMATIC1111's regex reads a
    well-formed line, but in linear time: that regex backtracks quadratically on a long line (a 64 KB
    text took 22 s). Items run from comma to comma, a quoted value may hold commas, and an item whose
    text before its colon is not a parameter name is skipped."""
    pairs: list[tuple[str, str]] = []
    pos, size = 0, len(line)
    while pos < size:
        item = _ITEM.match(line, pos)
        if item is None:  # no colon before the next comma: not a parameter
            comma = line.find(",", pos)
            if comma < 0:
                break
            pos = comma + 1
            continue
        key = item.group(1).strip()
        if _KEY.fullmatch(key):
            pairs.append((key, item.group(2).strip()))
        pos = item.end() + 1  # past the comma that ends it
    return pairs


def parse_infotext(text: str) -> dict[str, Any]:
    """Parse AUTOMATIC1111's ``parameters`` text; known keys get this module's names, ``parameters`` has all.

    Linear in the text's length (:func:`_parameters`).
    """
    lines = text.strip().split("\n")
    last = lines[-1]
    pairs = _parameters(last)
    if len(pairs) < 3:  # as AUTOMATIC1111: a last line with fewer than three parameters is prompt text
        lines.append(last)
        pairs = []
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    params: dict[str, str] = {}
    for key, value in pairs:
        if len(value) >= 2 and value[0] == value[-1] == '"':
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        params[key] = value
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
    return json.dumps(
        dict(record), default=lambda o: str(o) if isinstance(o, Decimal) else repr(o), separators=(",", ":")
    )


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
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        if end > len(data):
            raise ValueError("truncated PNG chunk")
        ctype = data[pos + 4 : pos + 8]
        chunks.append((ctype, pos, end))
        pos = end
        if ctype == b"IEND":
            break
    if not chunks or chunks[0][0] != b"IHDR":
        raise ValueError("PNG does not start with IHDR")
    return chunks


def _png_keyword(data: bytes, start: int, end: int) -> bytes:
    body = data[start + 8 : end - 4]
    return body[: body.find(b"\0")] if b"\0" in body else body


def _embed_png(data: bytes, record: Mapping[str, Any]) -> bytes:
    ours = {PARAMETERS_KEY.encode(), JSON_KEY.encode()}
    out = [data[: len(_PNG_SIG)]]
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
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
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
        payload = data[start + 4 : end]
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
        fourcc, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if pos + 8 + size > len(data):
            raise ValueError("WEBP chunk runs past the end of the file")
        chunks.append((fourcc, data[pos + 8 : pos + 8 + size]))
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
        chunks.insert(
            0,
            (b"VP8X", bytes([flags, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")),
        )
    else:
        raise ValueError("unexpected WEBP layout: several chunks without a VP8X header")
    chunks.append((b"XMP ", _xmp(record)))
    body = b"WEBP" + b"".join(_webp_chunk(c, payload) for c, payload in chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


# --- reading -------------------------------------------------------------------------------
# Reading is bounded whatever the file holds: only the chunks and segments that can hold the record are
# read (a chunk's header first, its body only when its keyword is ours), a compressed text is inflated
# to at most MAX_TEXT_BYTES, the walk stops after MAX_CHUNKS chunks, and the parsers take linear time.
# Anything malformed is a ProvenanceError: quickly, in well under 10 MB, whatever the file's size.

MAX_TEXT_BYTES = 256 * 1024
"""The most bytes of one metadata text that are read, stored or inflated (a record or an infotext is a few
KB; a prompt at most tens of KB): a larger one is refused, not read."""
MAX_CHUNKS = 20_000
"""The most PNG chunks, JPEG segments or WEBP chunks walked (a 50 MB PNG written in 8 KB IDATs has 6,400)."""
_XMP_OPEN, _XMP_CLOSE = b"<imagerouter:provenance>", b"</imagerouter:provenance>"


class ProvenanceError(ImageDecodeError, ValueError):
    """A file whose metadata cannot be read: a truncated or malformed chunk or segment, a text over
    :data:`MAX_TEXT_BYTES` (a compressed one inflating past it: a decompression bomb), text that is not in
    its declared encoding, a record that is not a JSON object."""


class _Source:
    """Random access to the bytes of a file, or of bytes in memory, reading only what is asked."""

    def __init__(self, data: bytes | None = None, file: BinaryIO | None = None) -> None:
        self._data, self._file = data, file
        self.size = len(data) if data is not None else os.fstat(file.fileno()).st_size if file else 0

    def read(self, pos: int, count: int) -> bytes:
        """Up to ``count`` bytes from ``pos`` (fewer at the end of the file)."""
        if self._data is not None:
            return self._data[pos : pos + count]
        assert self._file is not None
        self._file.seek(pos)
        return self._file.read(count)


def read_provenance(source: str | os.PathLike[str] | bytes) -> dict[str, Any]:
    """The provenance record in an image file (or its bytes); ``{}`` when it has none.

    Returns the JSON record where there is one, else the parsed ``parameters`` infotext. Raises
    :class:`ProvenanceError` (a ValueError) for a PNG, JPEG or WEBP whose metadata is malformed; a file
    of another kind has no record (``{}``).
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return _read(_Source(bytes(source)))
    with open(source, "rb") as file:
        return _read(_Source(file=file))


def _read(src: _Source) -> dict[str, Any]:
    head = src.read(0, 12)
    texts: dict[str, str] = {}
    if head.startswith(_PNG_SIG):
        texts = _png_texts(src)
    elif head.startswith(b"\xff\xd8"):
        texts = _jpeg_texts(src)
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        texts = _webp_texts(src)
    if JSON_KEY in texts:
        try:
            value = json.loads(texts[JSON_KEY])
        except (ValueError, RecursionError):
            raise ProvenanceError(
                f"the {JSON_KEY!r} record is not valid JSON; the file's provenance is damaged"
            ) from None
        if not isinstance(value, dict):
            raise ProvenanceError(f"the {JSON_KEY!r} record is JSON but not an object")
        return value
    if PARAMETERS_KEY in texts:
        return parse_infotext(texts[PARAMETERS_KEY])
    return {}


def _cap_chunks(count: int, what: str) -> None:
    if count > MAX_CHUNKS:
        raise ProvenanceError(f"{what} has more than {MAX_CHUNKS:,} chunks; not read")


def _inflate(data: bytes, what: str) -> bytes:
    """``data`` decompressed, never past :data:`MAX_TEXT_BYTES` however much it would inflate to."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_TEXT_BYTES + 1)
    except zlib.error:
        raise ProvenanceError(f"{what}: the compressed text is corrupt") from None
    if len(out) > MAX_TEXT_BYTES or inflater.unconsumed_tail:
        raise ProvenanceError(
            f"{what}: the compressed text inflates past {MAX_TEXT_BYTES:,} bytes (a decompression bomb?); not read"
        )
    if not inflater.eof:
        raise ProvenanceError(f"{what}: the compressed text is truncated")
    return out


def _decoded(data: bytes, encoding: str, what: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        raise ProvenanceError(f"{what}: the text is not valid {encoding}") from None


def _png_texts(src: _Source) -> dict[str, str]:
    """Our two keywords' texts (tEXt, zTXt or iTXt; the first of each), reading no other chunk's body."""
    ours = {JSON_KEY, PARAMETERS_KEY}
    out: dict[str, str] = {}
    pos, count = len(_PNG_SIG), 0
    while pos < src.size:
        count += 1
        _cap_chunks(count, "the PNG")
        head = src.read(pos, 8)
        if len(head) < 8:
            raise ProvenanceError(f"the PNG is truncated: a chunk header at byte {pos} is cut short")
        length, ctype = struct.unpack(">I4s", head)
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > src.size:
            raise ProvenanceError(f"the PNG is truncated: the {ctype!r} chunk at byte {pos} runs past its end")
        if count == 1 and ctype != b"IHDR":
            raise ProvenanceError("the PNG does not start with IHDR")
        if ctype in (b"tEXt", b"zTXt", b"iTXt"):
            first = src.read(pos + 8, min(length, 80))  # a keyword is 1-79 bytes and a NUL
            name = first[: first.find(b"\0")].decode("latin-1") if b"\0" in first else None
            if name is None:
                raise ProvenanceError(f"the {ctype.decode()} chunk at byte {pos} has no keyword")
            if name in ours and name not in out:
                what = f"the {name!r} {ctype.decode()} chunk"
                if length > MAX_TEXT_BYTES + 80:
                    raise ProvenanceError(f"{what} is {length:,} bytes, over the {MAX_TEXT_BYTES:,}-byte cap; not read")
                out[name] = _chunk_text(ctype, src.read(pos + 8, length)[len(name) + 1 :], what)
        pos = end
        if ctype == b"IEND":
            break
    if count == 0:
        raise ProvenanceError("the PNG is truncated: it has no chunks")
    return out


def _chunk_text(ctype: bytes, rest: bytes, what: str) -> str:
    """A text chunk's text; ``rest`` is its body after the keyword's NUL."""
    if ctype == b"tEXt":
        return rest.decode("latin-1")
    if ctype == b"zTXt":
        if rest[:1] != b"\0":
            raise ProvenanceError(f"{what}: unknown compression method")
        return _inflate(rest[1:], what).decode("latin-1")
    # iTXt: compression flag, method, language tag NUL, translated keyword NUL, text
    if len(rest) < 2 or rest[0] not in (0, 1) or (rest[0] == 1 and rest[1] != 0):
        raise ProvenanceError(f"{what}: malformed compression fields")
    compressed, fields = rest[0], rest[2:]
    _lang, nul1, fields = fields.partition(b"\0")
    _translated, nul2, text = fields.partition(b"\0")
    if not (nul1 and nul2):
        raise ProvenanceError(f"{what}: malformed language fields")
    return _decoded(_inflate(text, what) if compressed else text, "utf-8", what)


def _xmp_json(payload: bytes, what: str) -> str | None:
    """The record in an XMP packet, found with two linear searches (no backtracking regex)."""
    start = payload.find(_XMP_OPEN)
    if start < 0:
        return None
    start += len(_XMP_OPEN)
    end = payload.find(_XMP_CLOSE, start)
    if end < 0:
        raise ProvenanceError(f"{what}: the imagerouter:provenance element is not closed")
    return html.unescape(_decoded(payload[start:end], "utf-8", what))


def _jpeg_texts(src: _Source) -> dict[str, str]:
    """The record (XMP) from the APP1 segments before the scan, else the infotext (EXIF UserComment)."""
    out: dict[str, str] = {}
    exif: bytes | None = None
    pos, count = 2, 0
    while True:
        count += 1
        _cap_chunks(count, "the JPEG")
        head = src.read(pos, 4)
        if len(head) < 2 or head[0] != 0xFF:
            raise ProvenanceError(f"the JPEG is malformed or truncated: no marker at byte {pos}")
        marker = head[1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: the metadata segments are all before
            break
        if len(head) < 4:
            raise ProvenanceError(f"the JPEG is truncated: a segment header at byte {pos} is cut short")
        (length,) = struct.unpack(">H", head[2:4])
        end = pos + 2 + length
        if length < 2 or end > src.size:
            raise ProvenanceError(f"the JPEG is truncated: the segment at byte {pos} runs past its end")
        if marker == 0xE1:
            payload = src.read(pos + 4, length - 2)  # at most 64 KB
            if payload.startswith(_XMP_ID) and JSON_KEY not in out:
                found = _xmp_json(payload, "the JPEG's XMP packet")
                if found is not None:
                    out[JSON_KEY] = found
            elif payload.startswith(_EXIF_ID) and exif is None:
                exif = payload
        pos = end
    if JSON_KEY not in out and exif is not None:  # EXIF is read only when there is no record to return
        comment = _user_comment_of(exif)
        if comment is not None:
            out[PARAMETERS_KEY] = comment
    return out


def _user_comment_of(payload: bytes) -> str | None:
    """The EXIF UserComment of an APP1 payload (Pillow reads the TIFF structure), or None.

    Pillow reports a corrupt EXIF block with warnings and reads on; here they are errors: a
    ProvenanceError, rather than a half-read block.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            exif = Image.Exif()
            exif.load(payload)
            comment = exif.get_ifd(0x8769).get(0x9286)
    except Exception as exc:  # Pillow's TIFF reader on hostile bytes: any of a dozen kinds, all "malformed"
        raise ProvenanceError(f"the JPEG's EXIF block is malformed ({type(exc).__name__})") from None
    if isinstance(comment, bytes):
        head, body = comment[:8], comment[8:]
        if head == b"UNICODE\0":
            return _decoded(body, "utf-16-be", "the JPEG's EXIF UserComment")
        return body.decode("utf-8", "replace")
    return comment if isinstance(comment, str) else None


def _webp_texts(src: _Source) -> dict[str, str]:
    """The record from a WEBP's ``XMP `` chunk."""
    pos, count = 12, 0
    while pos + 8 <= src.size:
        count += 1
        _cap_chunks(count, "the WEBP")
        fourcc, size = struct.unpack("<4sI", src.read(pos, 8))
        if pos + 8 + size > src.size:
            raise ProvenanceError(f"the WEBP is truncated: the {fourcc!r} chunk at byte {pos} runs past its end")
        if fourcc == b"XMP ":
            if size > MAX_TEXT_BYTES:
                raise ProvenanceError(
                    f"the WEBP's XMP chunk is {size:,} bytes, over the {MAX_TEXT_BYTES:,}-byte cap; not read"
                )
            found = _xmp_json(src.read(pos + 8, size), "the WEBP's XMP chunk")
            return {JSON_KEY: found} if found is not None else {}
        pos += 8 + size + (size & 1)
    return {}


__all__ = [
    "JSON_KEY",
    "MAX_TEXT_BYTES",
    "PARAMETERS_KEY",
    "VERSION",
    "ProvenanceError",
    "build",
    "embed",
    "enabled",
    "infotext",
    "parse_infotext",
    "read_provenance",
]
