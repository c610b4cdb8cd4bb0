"""An invisible watermark on local outputs (``invisible-watermark``, DWT-DCT), and reading it back.

The mark is a 48-bit payload spread over the image's DWT-DCT blocks. It goes into the luma
channel only: JPEG subsamples the colour channels, which erases a mark placed there (measured:
the library's default colour scales do not survive JPEG quality 90; luma at scale 36 does, at
about 40 dB PSNR). The library needs at least 256×256 pixels; a smaller image is returned
unmarked and the caller is told. Detection counts matching bits: an unmarked image matches
about half of them, a marked one all or nearly all.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.errors import InvalidRequestError

PAYLOAD = b"imgrtr"
"""The 48-bit mark every local output carries (unless the operator gives another 6-byte payload)."""
_SCALES = [36, 0, 0]  # luma only: chroma does not survive JPEG's 4:2:0 subsampling
_METHOD = "dwtDct"
MIN_PIXELS = 256 * 256
DETECT_AT = 0.9
"""Fraction of payload bits that must match for :func:`read_watermark` to report the mark."""


@dataclass(frozen=True, slots=True)
class WatermarkReading:
    """What :func:`read_watermark` found: whether the mark is there and how many of its bits matched."""

    found: bool
    agreement: float
    """Fraction of the payload's bits read back (about 0.5 on an unmarked image)."""
    payload: bytes


def _check(payload: bytes) -> bytes:
    if not isinstance(payload, bytes) or len(payload) != 6:
        raise InvalidRequestError(f"watermark payload must be 6 bytes (48 bits), got {payload!r}", provider="local")
    return payload


def can_mark(image: Any) -> bool:
    """Whether ``image`` (PIL) is large enough to carry the mark."""
    width, height = image.size
    return bool(width * height >= MIN_PIXELS)


def embed(image: Any, payload: bytes = PAYLOAD) -> Any:
    """``image`` (PIL, RGB) with the invisible mark; an image below 256×256 pixels is returned as it is."""
    if not can_mark(image):
        return image
    import cv2
    import numpy as np
    import pywt
    from imwatermark.maxDct import EmbedMaxDct
    from PIL import Image

    bits = [int(b) for b in np.unpackbits(np.frombuffer(_check(payload), dtype=np.uint8))]
    # The library's own encode (imwatermark 0.2.0, maxDct.EmbedMaxDct.encode) writes the marked luma back into
    # uint8, so values past 255 wrap to black (white areas come out black), and rebuilds it with the
    # horizontal and vertical details swapped (~30 dB instead of ~43 dB on grain). Its block coder is used
    # here on a float copy of the luma, rebuilt in the right order, then rounded and clipped; the decoder
    # reads the mark the same way.
    yuv = cv2.cvtColor(cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2YUV)
    rows, cols = yuv.shape[0] // 4 * 4, yuv.shape[1] // 4 * 4
    luma = yuv[:rows, :cols, 0].astype(np.float64)
    ca1, (h1, v1, d1) = pywt.dwt2(luma, "haar")
    EmbedMaxDct(bits, wmLen=len(bits), scales=_SCALES).encode_frame(ca1, _SCALES[0])
    yuv[:rows, :cols, 0] = np.clip(np.rint(pywt.idwt2((ca1, (h1, v1, d1)), "haar")), 0, 255).astype(np.uint8)
    return Image.fromarray(cv2.cvtColor(cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR), cv2.COLOR_BGR2RGB))


def detect(image: Any, payload: bytes = PAYLOAD) -> WatermarkReading:
    """Look for ``payload`` in ``image`` (PIL)."""
    import cv2
    import numpy as np
    from imwatermark import WatermarkDecoder

    want = np.unpackbits(np.frombuffer(_check(payload), dtype=np.uint8))
    if not can_mark(image):
        return WatermarkReading(False, 0.0, payload)
    bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    bits = np.asarray(WatermarkDecoder("bits", len(want)).decode(bgr, _METHOD, scales=_SCALES), dtype=np.uint8)
    agreement = float((bits == want).mean())
    return WatermarkReading(agreement >= DETECT_AT, round(agreement, 4), payload)


def read_watermark(source: str | Path | bytes, payload: bytes = PAYLOAD) -> WatermarkReading:
    """Whether the image file at ``source`` (a path, or its bytes) carries the local backend's invisible mark."""
    from PIL import Image, UnidentifiedImageError

    what = "the bytes" if isinstance(source, bytes) else str(source)
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source).expanduser())
        image.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidRequestError(f"read_watermark: cannot read {what} as an image "
                                  f"({type(exc).__name__}: {exc})"[:400]) from None
    return detect(image, payload)
