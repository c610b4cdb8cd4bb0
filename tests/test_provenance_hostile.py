"""read_provenance on files from anyone: every malformed file is a typed error, quickly and in little memory.

The issue's bound is "a typed error in < 100 ms and < 10 MB" for zTXt/iTXt bombs, a 1 MB tEXt, malformed
JSON and truncated chunks. Memory is asserted as measured (tracemalloc's peak), and the work is asserted
where it can be counted (bytes inflated, bytes read). Time is asserted only as a generous 1 s bound (the
quadratic parser this replaces took 22 s on a 64 KB text; the reader takes milliseconds), so a loaded
machine cannot fail the test while a return of the quadratic behaviour still does.
"""

from __future__ import annotations

import io
import json
import random
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import router.provenance as provenance
from router.images import ImageDecodeError
from router.provenance import MAX_TEXT_BYTES, ProvenanceError, embed, read_provenance

RECORD = {
    "version": 1,
    "prompt": "a red bicycle, watercolor",
    "negative_prompt": "blurry",
    "seed": 1234,
    "steps": 30,
    "guidance_scale": 6.5,
    "scheduler": "euler_a",
    "width": 64,
    "height": 48,
    "model": "sdxl",
    "provider": "local",
    "cost_usd": "0",
    "request_id": "ir_0123",
    "policy": "local-first",
    "generator": "imagerouter 0.1.0",
}
TEN_MB = 10 * 1024 * 1024
GENEROUS_S = 1.0  # the goal is 100 ms; measured: a few ms each (see the module docstring)


def chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def encoded(fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buf, format=fmt)
    return buf.getvalue()


def png_with(*chunks: bytes) -> bytes:
    """A small valid PNG with ``chunks`` spliced in after IHDR."""
    plain = encoded("PNG")
    return plain[:33] + b"".join(chunks) + plain[33:]


def zeros_deflated(size: int) -> bytes:
    squeeze = zlib.compressobj(9)
    return b"".join(squeeze.compress(bytes(1 << 20)) for _ in range(size >> 20)) + squeeze.flush()


def jpeg_with(app1_payload: bytes) -> bytes:
    plain = encoded("JPEG")
    return plain[:2] + b"\xff\xe1" + struct.pack(">H", len(app1_payload) + 2) + app1_payload + plain[2:]


def _outcome(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception as exc:  # returned for the caller to check
        return exc


def measured(read: Callable[[], Any]) -> tuple[Any, float, int]:
    """``read()``'s result (or the exception it raised), its time, and its peak memory (a second run, traced:
    tracing slows Python down several times, so it is not timed)."""
    start = time.perf_counter()
    outcome = _outcome(read)
    elapsed = time.perf_counter() - start
    tracemalloc.start()
    try:
        _outcome(read)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return outcome, elapsed, peak


@pytest.fixture
def inflated(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The bytes each inflate of the reader produced."""
    sizes: list[int] = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self) -> None:
            self._inner = real()

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            out = self._inner.decompress(data, max_length)
            sizes.append(len(out))
            return out

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

    monkeypatch.setattr(provenance.zlib, "decompressobj", Counting)
    yield sizes


# --- the fuzz cases of the issue --------------------------------------------------------------------

BOMB = zeros_deflated(128 << 20)  # 128 MiB of zeros in ~130 KB: under the chunk cap, so it is inflated (bounded)
MALFORMED: dict[str, bytes] = {
    "zTXt bomb (parameters)": png_with(chunk(b"zTXt", b"parameters\0\0" + BOMB)),
    "zTXt bomb (record)": png_with(chunk(b"zTXt", b"imagerouter\0\0" + BOMB)),
    "iTXt bomb": png_with(chunk(b"iTXt", b"imagerouter\0\1\0en\0\0" + BOMB)),
    "1 KB iTXt inflating to 1 MB": png_with(chunk(b"iTXt", b"parameters\0\1\0\0\0" + zeros_deflated(1 << 20))),
    "1 MB tEXt": png_with(chunk(b"tEXt", b"parameters\0" + b"Steps: 20, " * ((1 << 20) // 11 + 1))),
    "malformed JSON": png_with(chunk(b"tEXt", b'imagerouter\0{"prompt": "a cat", "seed": ')),
    "JSON nested 100k deep": png_with(chunk(b"tEXt", b"imagerouter\0" + b"[" * 100_000)),
    "JSON not an object": png_with(chunk(b"tEXt", b"imagerouter\0[1, 2, 3]")),
    "JSON integer of 100k digits": png_with(chunk(b"tEXt", b'imagerouter\0{"seed": ' + b"9" * 100_000 + b"}")),
    "truncated chunk body": embed(encoded("PNG"), RECORD)[:120],
    "truncated chunk header": encoded("PNG")[:37],
    "chunk length past the end": encoded("PNG")[:33] + struct.pack(">I", 0xFFFFFFF0) + b"tEXt" + b"x" * 64,
    "signature only": b"\x89PNG\r\n\x1a\n",
    "first chunk not IHDR": b"\x89PNG\r\n\x1a\n" + chunk(b"tEXt", b"parameters\0x") + encoded("PNG")[8:],
    "corrupt zTXt stream": png_with(chunk(b"zTXt", b"parameters\0\0" + b"\x78\x9c" + bytes(range(200)))),
    "truncated zTXt stream": png_with(chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"Steps: 1" * 100)[:-6])),
    "zTXt unknown method": png_with(chunk(b"zTXt", b"parameters\0\7" + zlib.compress(b"x"))),
    "iTXt bad UTF-8": png_with(chunk(b"iTXt", b"parameters\0\0\0\0\0\xff\xfe\xfd")),
    "iTXt missing fields": png_with(chunk(b"iTXt", b"parameters\0\0")),
    "text chunk without keyword": png_with(chunk(b"tEXt", b"k" * 200)),
    "JPEG XMP opened 2,600 times, never closed": jpeg_with(
        b"http://ns.adobe.com/xap/1.0/\0" + b"<imagerouter:provenance>" * 2600
    ),
    "JPEG EXIF garbage": jpeg_with(b"Exif\0\0MM\0*\0\0\0\x08\xff\xff" + bytes(range(256)) * 40),
    "JPEG truncated segment": encoded("JPEG")[:2] + b"\xff\xe1\xff\xf0" + b"x" * 100,
    "JPEG without a scan": encoded("JPEG")[:20],
    "WEBP XMP over the cap": b"RIFF\0\0\0\0WEBP" + b"XMP " + struct.pack("<I", MAX_TEXT_BYTES + 1) + b"x" * 64,
    "WEBP chunk past the end": b"RIFF\0\0\0\0WEBP" + b"VP8L" + struct.pack("<I", 1 << 30) + b"x" * 64,
    "60,000 empty chunks": encoded("PNG")[:33] + chunk(b"abCd", b"") * 60_000,
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_file_is_a_typed_error_quickly_and_in_little_memory(data: bytes, inflated: list[int]) -> None:
    outcome, elapsed, peak = measured(lambda: read_provenance(data))
    assert isinstance(outcome, ProvenanceError), outcome
    assert isinstance(outcome, ValueError) and isinstance(outcome, ImageDecodeError)  # both ways to catch it
    assert peak < TEN_MB  # the bound, as measured
    assert max(inflated, default=0) <= MAX_TEXT_BYTES + 1  # whatever a stream would inflate to, at most this
    assert elapsed < GENEROUS_S


@pytest.mark.parametrize("path_or_bytes", ["bytes", "path"])
def test_a_bomb_stops_at_the_cap_and_says_so(path_or_bytes: str, tmp_path: Path, inflated: list[int]) -> None:
    data = MALFORMED["zTXt bomb (record)"]
    source: Any = data
    if path_or_bytes == "path":
        source = tmp_path / "bomb.png"
        source.write_bytes(data)
    with pytest.raises(ProvenanceError, match="inflates past 262,144 bytes"):
        read_provenance(source)
    assert inflated == [MAX_TEXT_BYTES + 1]  # one bounded inflate: 256 KiB + 1 byte of the 128 MiB


def test_an_oversized_text_is_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real = provenance._Source.read

    def counted(self: Any, pos: int, count: int) -> bytes:
        reads.append(count)
        return real(self, pos, count)

    monkeypatch.setattr(provenance._Source, "read", counted)
    with pytest.raises(ProvenanceError, match="over the 262,144-byte cap"):
        read_provenance(MALFORMED["1 MB tEXt"])
    assert max(reads) <= 80  # chunk headers and the keyword: the megabyte itself is never read


def test_only_the_chunks_that_can_hold_the_record_are_read(tmp_path: Path) -> None:
    """A 30 MB file is read through a few KB: IDAT and every other chunk are stepped over."""
    big = chunk(b"IDAT", bytes(30 << 20))  # not even valid deflate: never read
    text = chunk(b"tEXt", b"imagerouter\0" + json.dumps(RECORD).encode())
    plain = encoded("PNG")
    path = tmp_path / "big.png"
    path.write_bytes(plain[:33] + big + text + plain[33:])
    outcome, elapsed, peak = measured(lambda: read_provenance(path))
    assert outcome == RECORD
    assert peak < 1024 * 1024 and elapsed < GENEROUS_S


# --- the parameters parser takes linear time -------------------------------------------------------

QUADRATIC_FOR_THE_REGEX = {  # each took the old regex parser seconds to minutes
    "64 KB without a colon": "a" * 65_536,
    "64 KB of words": "word " * 13_000,
    "64 KB name-like run then a colon": "ab cd-ef/gh " * 5_500 + ": 1",
    "64 KB of unclosed quotes": 'k: "' * 16_000,
    "64 KB of escaped quotes": 'k: "\\", ' * 8_000,
    "256 KB of parameters": "Steps: 20, " * 23_800,
}


@pytest.mark.parametrize("text", list(QUADRATIC_FOR_THE_REGEX.values()), ids=list(QUADRATIC_FOR_THE_REGEX))
def test_parameters_are_parsed_in_linear_time(text: str) -> None:
    data = png_with(chunk(b"tEXt", b"parameters\0" + text.encode("latin-1")))
    outcome, elapsed, peak = measured(lambda: read_provenance(data))
    assert isinstance(outcome, dict) and "parameters" in outcome  # a valid (odd) text: parsed, not refused
    assert elapsed < GENEROUS_S and peak < TEN_MB


def test_the_linear_parser_reads_automatic1111_lines_as_its_regex_does() -> None:
    import re

    a1111 = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # modules/infotext_utils.py
    lines = [
        'Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x768, Model hash: abc, Model: "sd, 1.5"',
        'Steps: 30, Sampler: Euler a, Lora hashes: "a: 123, b: 456", TI hashes: "x: 1", Version: v1.6.0',
        'Steps: 30, Model: "a" b, Template: "x \\" y", A b/c-d: 3, Hires upscaler: Latent (nearest-exact)',
    ]
    for line in lines:
        assert provenance._parameters(line) == [(k.strip(), v.strip()) for k, v in a1111.findall(line)]


# --- a fuzz ---------------------------------------------------------------------------------------------


def test_mutated_files_only_ever_fail_typed() -> None:
    """Flipped, cut, spliced and length-corrupted PNG, JPEG and WEBP files with provenance: each read returns a
    record or raises ProvenanceError, in bounded time and memory (deterministic: a fixed seed)."""
    bases = [embed(encoded(fmt), RECORD) for fmt in ("PNG", "JPEG", "WEBP")]
    bases.append(embed(encoded("PNG"), RECORD | {"prompt": "日本語の猫"}))  # iTXt
    rnd = random.Random(2024)
    results = {"record": 0, "typed": 0}
    worst_s, worst_peak = 0.0, 0
    for _ in range(1500):
        data = bytearray(rnd.choice(bases))
        op = rnd.randrange(4)
        if op == 0:
            for _ in range(rnd.randint(1, 8)):
                data[rnd.randrange(len(data))] = rnd.randrange(256)
        elif op == 1:
            del data[rnd.randrange(len(data)) :]
        elif op == 2:
            pos = rnd.randrange(len(data))
            data[pos:pos] = rnd.randbytes(rnd.randint(1, 16))
        else:
            pos = rnd.randrange(8, len(data) - 4)
            data[pos : pos + 4] = rnd.randbytes(4)
        outcome, elapsed, peak = measured(lambda data=bytes(data): read_provenance(data))  # type: ignore[misc]
        if isinstance(outcome, dict):
            results["record"] += 1
        else:
            assert isinstance(outcome, ProvenanceError), repr(outcome)
            results["typed"] += 1
        worst_s, worst_peak = max(worst_s, elapsed), max(worst_peak, peak)
    assert results["typed"] > 500 and results["record"] > 100
    assert worst_peak < TEN_MB and worst_s < GENEROUS_S


def test_files_of_other_kinds_hold_no_record() -> None:
    assert read_provenance(b"GIF89a" + bytes(100)) == {}
    assert read_provenance(b"") == {}
    assert read_provenance(embed(encoded("PNG"), RECORD)) == RECORD
