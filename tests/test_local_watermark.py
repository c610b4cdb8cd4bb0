"""The invisible watermark on local outputs: embedded by default, survives JPEG, read back by ``read_watermark``."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

pytest.importorskip("imwatermark")
pytest.importorskip("diffusers")

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from providers.local import LocalProvider
from providers.local.watermark import PAYLOAD, detect, embed, read_watermark
from router import ImageRequest, InvalidRequestError


def scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth picture with shapes (closer to a generated image than noise is)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), (90, 120, 160))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(10, 80))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img.filter(ImageFilter.GaussianBlur(2))


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize(("width", "height", "seed"), [(256, 256, 0), (512, 512, 1), (640, 384, 2)])
def test_the_mark_survives_jpeg_quality_90(tmp_path: Path, width: int, height: int, seed: int) -> None:
    original = scene(width, height, seed)
    marked = embed(original)
    diff = np.asarray(marked, dtype=np.float64) - np.asarray(original, dtype=np.float64)
    assert 10 * np.log10(255**2 / np.mean(diff**2)) > 35  # invisible: PSNR above 35 dB
    path = tmp_path / "marked.jpg"
    path.write_bytes(jpeg(marked))
    found = read_watermark(path)
    assert found.found and found.agreement >= 0.9 and found.payload == PAYLOAD
    unmarked = read_watermark(jpeg(original))
    assert not unmarked.found and unmarked.agreement < 0.7


def test_another_payload_is_not_mistaken_for_ours() -> None:
    marked = embed(scene(512, 512), b"other!")
    assert detect(marked, b"other!").found
    assert not detect(marked).found


def test_images_below_256_by_256_are_left_as_they_are() -> None:
    small = scene(128, 128)
    assert embed(small) is small
    assert not detect(small).found


def test_unreadable_files_are_typed_errors(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(InvalidRequestError, match="cannot read"):
        read_watermark(tmp_path / "x.png")
    with pytest.raises(InvalidRequestError, match="6 bytes"):
        embed(scene(256, 256), b"short")


def provider(sd15_dir: Path, **kw: object) -> LocalProvider:
    entry = {"path": str(sd15_dir), "family": "sd15", "native": [256, 256], "min_side": 64, "steps": 2}
    return LocalProvider({"m": entry}, device="cpu", **kw)  # type: ignore[arg-type]


async def test_local_outputs_are_marked_by_default_and_read_back_after_jpeg(sd15_dir: Path) -> None:
    p = provider(sd15_dir)
    res = await p.generate(ImageRequest(prompt="a cube", width=256, height=256, seed=1, output_format="jpeg"), "m",
                           timeout_s=120)
    assert res.billing.details["watermark"] == "embedded"
    assert read_watermark(res.images[0].data).found
    again = Image.open(io.BytesIO(res.images[0].data))
    assert read_watermark(jpeg(again)).found  # re-encoded at quality 90 once more
    await p.aclose()


async def test_the_operator_decides_who_may_turn_the_mark_off(sd15_dir: Path) -> None:
    req = ImageRequest(prompt="a cube", width=256, height=256, seed=1)
    off = req.model_copy_validated(provider_options={"local": {"watermark": False}})
    strict = provider(sd15_dir)
    with pytest.raises(InvalidRequestError, match="watermark_opt_out"):
        await strict.generate(off, "m", timeout_s=120)
    lenient = provider(sd15_dir, watermark_opt_out=True)
    res = await lenient.generate(off, "m", timeout_s=120)
    assert res.billing.details["watermark"] == "off" and not read_watermark(res.images[0].data).found
    unmarked = provider(sd15_dir, watermark=False)
    res = await unmarked.generate(req, "m", timeout_s=120)
    assert res.billing.details["watermark"] == "off" and not read_watermark(res.images[0].data).found
    on = req.model_copy_validated(provider_options={"local": {"watermark": True}})
    res = await unmarked.generate(on, "m", timeout_s=120)
    assert res.billing.details["watermark"] == "embedded" and read_watermark(res.images[0].data).found
    small = await unmarked.generate(on.model_copy_validated(width=64, height=64), "m", timeout_s=120)
    assert small.billing.details["watermark"] == "too_small" and not small.warnings
    for p in (strict, lenient, unmarked):
        await p.aclose()
