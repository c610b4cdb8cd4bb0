"""Image inputs and outputs: loading what users pass, sniffing formats, mask conversions.

Every image the SDK reads goes through here, so the limits hold everywhere:
PNG, JPEG and WEBP only, a byte cap before decoding (base64 text is measured before it is
decoded) and a pixel cap while decoding. Every image a provider returns passes :func:`averify`:
those caps, the file whole, every pixel decoded once; whatever Pillow raises on a hostile file
comes out as an :class:`ImageDecodeError`.

Nothing here stalls an event loop for long. Validating a request reads an image's header only
(:func:`probe`: format, width, height, the caps; microseconds for any size): the pixels are
decoded where they are used, with :func:`adecode` / :func:`aload_image` in a worker thread. An
image whose header is sound but whose pixel data is corrupt passes validation and fails there, as
an :class:`ImageDecodeError`. Base64 is converted in slices (:func:`b64decode`, :func:`b64encode_parts`)
so that, run in a worker thread, it never holds the GIL for more than a millisecond or two at a time.
"""

from __future__ import annotations

import asyncio
import binascii
import io
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from router.errors import InvalidRequestError

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from router.fetch import SafeFetcher

MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class ImageDecodeError(InvalidRequestError):
    """An image could not be read: wrong format, too large, truncated or hostile."""


def sniff_mime(data: bytes) -> str | None:
    """The MIME type of PNG / JPEG / WEBP bytes from their magic numbers, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _pillow_failures() -> tuple[type[BaseException], ...]:
    """What Pillow raises on bytes it cannot read. ``DecompressionBombWarning`` is among them: under
    ``-W error`` it is raised, and it must come out typed like the rest."""
    from PIL import Image

    return (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        IndexError,
        TypeError,
        struct.error,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    )


def _why(exc: BaseException) -> str:
    """Pillow's reason, short: its messages quote sizes and limits, never the image's content."""
    detail = str(exc).strip()
    return f"{type(exc).__name__}: {detail[:160]}" if detail else type(exc).__name__


def _open(data: bytes, what: str) -> PILImage.Image:
    """The image opened lazily (its header read, no pixel decoded) after the format, byte and pixel caps."""
    from PIL import Image

    if len(data) > MAX_IMAGE_BYTES:
        raise ImageDecodeError(f"{what}: {len(data)} bytes is over the {MAX_IMAGE_BYTES}-byte cap")
    if sniff_mime(data) is None:
        raise ImageDecodeError(f"{what}: not a PNG, JPEG or WEBP image")
    try:
        img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except _pillow_failures() as exc:
        raise ImageDecodeError(f"{what}: cannot be decoded ({_why(exc)})") from None
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        img.close()
        raise ImageDecodeError(f"{what}: {w}x{h} is over the {MAX_IMAGE_PIXELS}-pixel cap")
    return img


def probe(data: bytes, *, what: str = "image") -> tuple[str, int, int]:
    """MIME type, width and height from the image's header, under the format, byte and pixel caps.

    Reads the header only: microseconds for any size, so it is safe on an event loop. The pixel
    data is not checked; :func:`decode` does that where the pixels are used.
    """
    with _open(data, what) as img:
        w, h = img.size
        return ALLOWED_FORMATS[img.format or ""], w, h


def probe_whole(data: bytes, *, what: str = "image") -> tuple[str, int, int]:
    """:func:`probe`, and the file ends as its format says (PNG's IEND chunk, JPEG's EOI marker, WEBP's RIFF
    length): a truncated answer is caught in microseconds, without decoding the pixels."""
    mime, w, h = probe(data, what=what)
    if mime == "image/png":
        whole = data.endswith(b"IEND\xaeB`\x82")
    elif mime == "image/jpeg":
        whole = data.rstrip(b"\x00").endswith(b"\xff\xd9")
    else:
        whole = len(data) >= 8 + int.from_bytes(data[4:8], "little")
    if not whole:
        raise ImageDecodeError(f"{what}: the file is truncated")
    return mime, w, h


def decode(data: bytes, *, what: str = "image") -> PILImage.Image:
    """Decode bytes into a loaded PIL image under the format, byte and pixel caps.

    This decodes every pixel (a 9-megapixel PNG takes a few hundred ms): from async code, call
    :func:`adecode` instead, which runs it in a worker thread.
    """
    img = _open(data, what)
    try:
        img.load()
    except _pillow_failures() as exc:
        img.close()
        raise ImageDecodeError(f"{what}: cannot be decoded ({_why(exc)})") from None
    return img


async def adecode(data: bytes, *, what: str = "image") -> PILImage.Image:
    """:func:`decode` in a worker thread, for async code (Pillow decodes without holding the GIL)."""
    return await asyncio.to_thread(decode, data, what=what)


def verify(data: bytes, *, what: str = "image") -> tuple[str, int, int]:
    """MIME type, width and height of an image that passed every check a user's image passes, and was
    decoded whole: :func:`probe_whole` (format, byte and pixel caps, the file's end), then every pixel
    decoded once and dropped. A decompression bomb, a truncated or corrupt file, a format other than
    PNG / JPEG / WEBP: ImageDecodeError, naming what is wrong.

    It decodes (tens of ms for a megapixel): from async code, call :func:`averify`.
    """
    mime, width, height = probe_whole(data, what=what)
    decode(data, what=what).close()
    return mime, width, height


async def averify(data: bytes, *, what: str = "image") -> tuple[str, int, int]:
    """:func:`verify` in a worker thread, for async code."""
    return await asyncio.to_thread(verify, data, what=what)


# --- base64 in slices -----------------------------------------------------------------------
# binascii converts a whole buffer in one C call that holds the GIL: 0.1–0.3 s for a 9-megapixel
# image on a small machine, during which no other thread (an event loop included) runs Python.
# Converting slices, and releasing the GIL between them (:func:`let_others_run`), lets a waiting
# thread take it within about a slice's time instead of the interpreter's 5 ms switch interval.

B64_SLICE = 128 * 1024
"""Base64 characters converted per C call (a multiple of 4); about a millisecond each."""
_SPACE = frozenset(" \t\n\r\f\v")


def let_others_run() -> None:
    """Release the GIL for a moment, so a thread waiting for it (an event loop) runs now: call it
    between the slices of long work in a worker thread. Microseconds."""
    time.sleep(0)


def b64decode(
    text: str | bytes | memoryview, *, start: int = 0, what: str = "image", max_bytes: int = MAX_IMAGE_BYTES
) -> bytes:
    """Strict base64 (the standard alphabet, padding only at the end, surrounding whitespace ignored)
    decoded in slices of :data:`B64_SLICE` characters; raises ImageDecodeError if it is not base64,
    or if it would decode to more than ``max_bytes`` (known from its length, before anything is decoded).

    Decoding starts at ``start`` (a data URL's payload) and ``text`` may be a ``memoryview`` into a
    larger buffer (a request body): nothing is copied whole.
    """
    end = len(text)
    while start < end and _char(text, start) in _SPACE:
        start += 1
    while end > start and _char(text, end - 1) in _SPACE:
        end -= 1
    least = (end - start) * 3 // 4 - 2  # every 4 characters are 3 bytes; padding takes off at most 2
    if least > max_bytes:
        raise ImageDecodeError(
            f"{what}: the base64 text decodes to {least:,}+ bytes, over the {max_bytes:,}-byte "
            "cap; send a smaller image"
        )

    def decoded() -> Iterator[bytes]:
        for pos in range(start, end, B64_SLICE):
            piece = binascii.a2b_base64(text[pos : min(pos + B64_SLICE, end)], strict_mode=True)
            if pos + B64_SLICE < end and len(piece) * 4 != B64_SLICE * 3:
                raise binascii.Error("padding before the end")  # a slice that is not the last one must be full
            yield piece
            let_others_run()

    try:
        return join_pieces(decoded())
    except (binascii.Error, ValueError):
        raise ImageDecodeError(f"{what}: not a readable path, URL, data URL or base64 string") from None


def b64encode_parts(data: bytes | memoryview, *, slice_bytes: int = B64_SLICE // 4 * 3) -> Iterator[bytes]:
    """The base64 of ``data`` (no newlines), as consecutive pieces, each converted in its own C call."""
    view = memoryview(data)
    for pos in range(0, len(view), slice_bytes):
        yield binascii.b2a_base64(view[pos : pos + slice_bytes], newline=False)
        let_others_run()


_IN_FILE_BYTES = 1024 * 1024


def join_pieces(pieces: Iterable[bytes | memoryview]) -> bytes:
    """The pieces concatenated, without a copy of the whole that holds the GIL.

    A growing BytesIO re-allocates its buffer, and once the allocator cannot extend it in place it
    copies the whole of it holding the GIL (tens of ms at 30 MB on a small machine); b"".join copies
    everything in one call. Past 1 MiB, on Linux, the pieces go to an in-memory file (memfd) and come
    back with one read(): the kernel does both copies, with the GIL released. Elsewhere: a BytesIO.
    """
    out = io.BytesIO()
    it = iter(pieces)
    for piece in it:
        out.write(piece)
        if out.tell() > _IN_FILE_BYTES and hasattr(os, "memfd_create"):
            break
    else:
        return out.getvalue()  # no copy: BytesIO hands over its buffer
    fd = os.memfd_create("imagerouter-join", os.MFD_CLOEXEC)
    try:
        _write_all(fd, out.getbuffer())
        del out
        for piece in it:
            _write_all(fd, piece)
        size = os.lseek(fd, 0, os.SEEK_CUR)
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, size)
        while len(data) < size:  # a short read (not seen on Linux for an in-memory file): the rest
            more = os.read(fd, size - len(data))
            if not more:
                raise OSError("in-memory file shorter than written")
            data += more
        return data
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _char(text: str | bytes | memoryview, i: int) -> str:
    c = text[i]
    return c if isinstance(c, str) else chr(c)


def encode(img: PILImage.Image, fmt: str = "png", *, png_compress_level: int = 6) -> bytes:
    """Encode a PIL image as png, jpeg or webp bytes.

    ``png_compress_level`` trades size for time: on a 1024² photo-like image, level 1
    encodes about 4× faster than Pillow's default 6 for a file about a third larger.
    """
    buf = io.BytesIO()
    pil_format = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}[fmt.lower()]
    if pil_format == "JPEG" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if pil_format == "PNG":
        img.save(buf, format=pil_format, compress_level=png_compress_level)
    else:
        img.save(buf, format=pil_format)
    return buf.getvalue()


@dataclass(frozen=True, slots=True)
class ImageInput:
    """An image given to a request: bytes in hand, or an http(s) URL fetched when needed.

    Build one with :meth:`coerce` from bytes, a path, a PIL image, base64, a data URL
    or a URL. Bytes are checked (format, caps) at once; URLs when fetched.
    """

    data: bytes | None = field(default=None, repr=False)
    url: str | None = None
    mime: str | None = None
    width: int | None = None
    height: int | None = None

    def __repr__(self) -> str:
        if self.url:
            return f"ImageInput(url={self.url!r})"
        return f"ImageInput({self.mime}, {self.width}x{self.height}, {len(self.data or b'')} bytes)"

    @classmethod
    def coerce(cls, value: Any, *, what: str = "image") -> ImageInput:
        """Turn any accepted form into an ImageInput; raise ImageDecodeError if unreadable."""
        if isinstance(value, ImageInput):
            return value
        if isinstance(value, bytes | bytearray | memoryview):
            return cls.from_bytes(bytes(value), what=what)
        if isinstance(value, os.PathLike):
            return cls.from_path(Path(value), what=what)
        if isinstance(value, str):
            return cls._from_str(value, what=what)
        if _is_pil(value):
            return cls.from_bytes(encode(value, "png"), what=what)
        raise ImageDecodeError(
            f"{what}: expected bytes, a path, a PIL image, base64, a data URL or an http(s) URL, "
            f"got {type(value).__name__}"
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, what: str = "image") -> ImageInput:
        """Checked from the header only (format, caps, size); the pixels are decoded where they are used."""
        mime, width, height = probe(data, what=what)
        return cls(data=data, mime=mime, width=width, height=height)

    @classmethod
    def from_path(cls, path: Path, *, what: str = "image") -> ImageInput:
        try:
            size = path.stat().st_size
        except OSError:
            raise ImageDecodeError(f"{what}: file not found: {path}") from None
        if size > MAX_IMAGE_BYTES:
            raise ImageDecodeError(f"{what}: {path} is over the {MAX_IMAGE_BYTES}-byte cap")
        return cls.from_bytes(path.read_bytes(), what=what)

    @classmethod
    def _from_str(cls, value: str, *, what: str) -> ImageInput:
        head = value[:16].lower()
        if head.startswith(("http://", "https://")):
            return cls(url=value)
        if head.startswith("data:"):
            comma = value.find(",", 0, 256)
            if comma < 0:
                raise ImageDecodeError(f"{what}: a data URL needs a comma before its base64 payload")
            return cls.from_bytes(b64decode(value, start=comma + 1, what=what), what=what)
        if "://" in value[:12]:
            raise ImageDecodeError(f"{what}: only http(s) URLs are accepted, not {value.split(':', 1)[0]}://")
        if len(value) < 4096 and Path(value).exists():
            return cls.from_path(Path(value), what=what)
        if len(value) < 256 and ("/" in value or "." in value[-5:]):
            raise ImageDecodeError(f"{what}: file not found: {value}")
        return cls.from_bytes(b64decode(value, what=what), what=what)

    def to_pil(self) -> PILImage.Image:
        """Decode the bytes (the URL must have been fetched into bytes first)."""
        if self.data is None:
            raise ImageDecodeError(f"image at {self.url} has not been fetched")
        return decode(self.data)


def _is_pil(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.")


# --- masks ------------------------------------------------------------------------
# The SDK's own convention: white = repaint, black = keep (as Stability and Diffusers).
# A mask with transparent pixels is read in OpenAI's convention (alpha 0 = repaint).


def mask_to_white_repaint(mask: PILImage.Image, size: tuple[int, int] | None = None) -> PILImage.Image:
    """Any mask form as an 'L' image where 255 marks the area to repaint."""
    from PIL import Image, ImageOps

    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        lowest = cast(tuple[int, int], alpha.getextrema())[0]
        out = ImageOps.invert(alpha) if lowest < 255 else mask.convert("L")
    else:
        out = mask.convert("L")
    if size is not None and out.size != size:
        out = out.resize(size, Image.Resampling.NEAREST)
    return out.point(lambda v: 255 if v >= 128 else 0)


def mask_to_alpha_repaint(mask: PILImage.Image, size: tuple[int, int] | None = None) -> PILImage.Image:
    """Any mask form as an RGBA image where alpha 0 marks the area to repaint (OpenAI)."""
    from PIL import Image, ImageOps

    white = mask_to_white_repaint(mask, size)
    rgba = Image.new("RGBA", white.size, (0, 0, 0, 255))
    rgba.putalpha(ImageOps.invert(white))
    return rgba


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height from the image header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS)) as img:
            return img.size
    except _pillow_failures() as exc:
        raise ImageDecodeError(f"image header unreadable ({type(exc).__name__})") from None


async def load_bytes(image: ImageInput, *, fetcher: SafeFetcher | None = None) -> bytes:
    """The image's bytes, downloading its URL through the safe fetcher if it has one."""
    if image.data is not None:
        return image.data
    from router.fetch import SafeFetcher

    assert image.url is not None
    return await (fetcher or SafeFetcher()).fetch(image.url)


async def aload_image(image: ImageInput, *, fetcher: SafeFetcher | None = None, what: str = "image") -> PILImage.Image:
    """The image decoded, from async code: its bytes (fetched if it is a URL), decoded in a worker thread."""
    return await adecode(await load_bytes(image, fetcher=fetcher), what=what)


async def amask_png(
    mask: ImageInput,
    size: tuple[int, int],
    convert: Callable[[PILImage.Image, tuple[int, int] | None], PILImage.Image],
    *,
    fetcher: SafeFetcher | None = None,
) -> bytes:
    """A mask as the PNG a vendor takes (``convert``: :func:`mask_to_white_repaint` or
    :func:`mask_to_alpha_repaint`, at the image's ``size``), decoded, converted and encoded in a worker thread."""
    data = await load_bytes(mask, fetcher=fetcher)
    return await asyncio.to_thread(lambda: encode(convert(decode(data, what="mask_image"), size), "png"))


_INLINE_B64 = 256 * 1024  # base64 characters decoded on the event loop (well under a millisecond)


async def ab64decode(text: str | bytes, *, what: str = "image", max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """:func:`b64decode` from async code: inline when small, else in a worker thread."""
    if len(text) <= _INLINE_B64:
        return b64decode(text, what=what, max_bytes=max_bytes)
    return await asyncio.to_thread(b64decode, text, what=what, max_bytes=max_bytes)


async def ab64(data: bytes) -> str:
    """``data`` as base64 text, encoded in a worker thread in slices so the event loop keeps running."""
    return await asyncio.to_thread(lambda: join_pieces(b64encode_parts(data)).decode("ascii"))


async def adata_url(data: bytes, mime: str | None = None) -> str:
    """``data`` as a ``data:`` URL (its type sniffed when not given), encoded off the event loop."""
    return f"data:{mime or sniff_mime(data) or 'image/png'};base64,{await ab64(data)}"
