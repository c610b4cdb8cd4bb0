"""Image I/O helpers: header probing, decoding off the loop, base64 converted in slices."""

from __future__ import annotations

import base64
import io
import os
import threading

import pytest
from PIL import Image

from router.images import (
    B64_SLICE,
    ImageDecodeError,
    ImageInput,
    adecode,
    aload_image,
    b64decode,
    b64encode_parts,
    join_pieces,
    probe,
)
from tests.conftest import png


def test_probe_reads_format_and_size_from_the_header() -> None:
    assert probe(png(48, 16)) == ("image/png", 48, 16)
    for fmt, mime in (("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        buf = io.BytesIO()
        Image.new("RGB", (40, 24), (1, 2, 3)).save(buf, format=fmt)
        assert probe(buf.getvalue()) == (mime, 40, 24)
    with pytest.raises(ImageDecodeError, match="not a PNG, JPEG or WEBP"):
        probe(b"GIF89a" + b"\0" * 20)


@pytest.mark.parametrize("size", [0, 1, 2, 3, B64_SLICE // 4 * 3 - 1, B64_SLICE // 4 * 3, B64_SLICE // 4 * 3 + 1,
                                  5 * B64_SLICE // 4 * 3 + 2])
def test_sliced_base64_round_trips_at_every_slice_boundary(size: int) -> None:
    data = os.urandom(size)
    text = base64.b64encode(data).decode()
    assert b64decode(text) == data
    assert b64decode(f"  {text}\n") == data  # surrounding whitespace, as the stdlib's strip() allowed
    assert b64decode(memoryview(f"data:,{text}".encode()), start=6) == data
    assert b"".join(b64encode_parts(data)) == text.encode()


@pytest.mark.parametrize("memfd", [True, False])
def test_join_pieces_concatenates_small_and_large_inputs(monkeypatch: pytest.MonkeyPatch, memfd: bool) -> None:
    if not memfd:
        monkeypatch.delattr(os, "memfd_create", raising=False)  # the portable path: a BytesIO
    pieces = [os.urandom(n) for n in (0, 1, 70_000, 1_500_000, 3, 400_000)]
    assert join_pieces(pieces) == b"".join(pieces)
    assert join_pieces([memoryview(p) for p in pieces[:3]]) == b"".join(pieces[:3])
    assert join_pieces([]) == b""
    big = os.urandom(3 * 1024 * 1024)
    assert b64decode(base64.b64encode(big).decode()) == big


@pytest.mark.parametrize("text", [
    "QQ=",  # truncated
    "QQ==QUJD",  # padding, then more
    "QUJD" * (B64_SLICE // 4 - 1) + "QQ==" + "QUJD" * 10,  # padding at the end of a slice that is not the last
    "QU JD",  # whitespace inside
    "QUJ*",  # not the alphabet
    "QUJDé===",  # not ASCII
])
def test_sliced_base64_is_as_strict_as_validate_true(text: str) -> None:
    with pytest.raises(ImageDecodeError, match="base64"):
        b64decode(text, what="init_image")
    with pytest.raises(ValueError):
        base64.b64decode(text, validate=True)


async def test_decoding_for_async_code_runs_on_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    import router.images as images

    threads: list[int] = []
    original = images.decode

    def decode(data: bytes, *, what: str = "image") -> Image.Image:
        threads.append(threading.get_ident())
        return original(data, what=what)

    monkeypatch.setattr(images, "decode", decode)
    data = png(32, 32, (9, 8, 7))
    assert (await adecode(data)).getpixel((3, 3)) == (9, 8, 7)
    assert (await aload_image(ImageInput.coerce(data), what="mask_image")).size == (32, 32)
    assert len(threads) == 2 and threading.get_ident() not in threads
