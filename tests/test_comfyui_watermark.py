"""The invisible watermark on ComfyUI outputs: the local backend's mark, on by default (the server is the
operator's own), an operator switch and not a request option, embedded off the event loop and read back after
JPEG re-encoding.

The DWT-DCT mark is read back from an image's fine texture: on flat colour and on faint texture it is embedded
but not reliably read (measured: the sandbox's flat disc on a flat ground reads back for about half the seeds).
The read-back tests therefore give the sandbox a picture with grain, as a sampler's output has, through img2img
at a low strength.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest

pytest.importorskip("imwatermark")
pytest.importorskip("websockets")

import numpy as np
from PIL import Image

import providers.comfyui as comfyui_module
import providers.local.watermark as watermark_module
from providers.comfyui import ComfyUIProvider
from providers.local.watermark import PAYLOAD, read_watermark
from providers.sandbox.comfyui import ComfyUISandbox
from router.errors import ProviderUnavailable
from router.request import ImageRequest
from tests.conftest import half_mask, make_router
from tests.test_comfyui import (
    DATA,
    SD15,
    XL,
    Ticks,
    _no_comfyui_env,  # noqa: F401  (autouse: no ComfyUI settings from the environment)
    comfy,
)

WORKFLOW = "workflow:retouch"


@pytest.fixture
def sb() -> Iterator[ComfyUISandbox]:
    with ComfyUISandbox(clock=Ticks()) as server:
        yield server


def textured(width: int = 512, height: int = 512, seed: int = 0) -> bytes:
    """A PNG of smooth colour waves with grain: the texture of a generated picture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    waves = np.stack([128 + 60 * np.sin(xx / 37 + seed), 128 + 60 * np.cos(yy / 23),
                      128 + 50 * np.sin((xx + yy) / 51)], axis=-1)
    pixels = np.clip(waves + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def photo(prompt: str, seed: int = 1, **kw: Any) -> ImageRequest:
    """An img2img request the sandbox answers with a textured image of the init image's size."""
    return ImageRequest(prompt=prompt, init_image=textured(seed=seed), strength=0.2, seed=seed, **kw)


def jpeg(data: bytes, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    with Image.open(io.BytesIO(data)) as img:
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64)


def psnr(a: bytes, b: bytes) -> float:
    return float(10 * np.log10(255**2 / np.mean((rgb(a) - rgb(b)) ** 2)))


def views(sb: ComfyUISandbox) -> list[dict[str, str]]:
    return [dict(r.query) for r in sb.requests if r.path == "/view"]


async def test_outputs_are_marked_by_default_invisibly_and_survive_jpeg_90(sb: ComfyUISandbox) -> None:
    request = photo("a lighthouse", seed=4)
    marked_p, plain_p = await comfy(sb), await comfy(sb, name="plain", watermark=False)
    marked = (await marked_p.generate(request, SD15, timeout_s=20)).images[0]
    plain = (await plain_p.generate(request, SD15, timeout_s=20)).images[0]
    assert marked.mime == "image/png" and (marked.width, marked.height) == (512, 512)
    # the same picture but for the mark: about 40 dB PSNR on smooth areas (test_local_watermark.py), 31.6 here,
    # where the grain gives the mark larger DCT coefficients to requantize
    assert psnr(marked.data, plain.data) > 30
    found = read_watermark(marked.data)
    assert found.found and found.payload == PAYLOAD
    assert read_watermark(jpeg(marked.data)).found
    assert not read_watermark(plain.data).found and not read_watermark(jpeg(plain.data)).found
    for p in (marked_p, plain_p):
        await p.aclose()


async def test_the_router_returns_marked_images_and_bills_say_so(sb: ComfyUISandbox) -> None:
    async with make_router(await comfy(sb)) as router:
        result = await router.agenerate(photo("a fox", seed=8, n=2), model=XL)
    assert result.cost.details["watermark"] == "embedded" and not result.warnings
    assert [read_watermark(i.data).found for i in result.images] == [True, True]


async def test_a_marked_jpeg_is_fetched_lossless_and_encoded_once_here(sb: ComfyUISandbox) -> None:
    p = await comfy(sb)
    response = await p.generate(photo("a cat", output_format="jpeg"), SD15, timeout_s=20)
    (image,) = response.images
    assert image.mime == "image/jpeg" and image.data[:3] == b"\xff\xd8\xff"
    assert "preview" not in views(sb)[-1]  # the server's PNG, not its own JPEG re-encode
    assert read_watermark(image.data).found and read_watermark(jpeg(image.data)).found
    webp = await p.generate(photo("a cat", output_format="webp"), SD15, timeout_s=20)
    assert webp.images[0].mime == "image/webp" and read_watermark(webp.images[0].data).found
    await p.aclose()


async def test_saved_workflow_outputs_are_marked_too(sb: ComfyUISandbox) -> None:
    p = await comfy(sb, workflows_dir=DATA)
    request = photo("a red door", seed=3).model_copy_validated(mask_image=half_mask(512, 512))
    response = await p.generate(request, WORKFLOW, timeout_s=20)
    assert response.billing.details["watermark"] == "embedded" and response.images[0].width == 512
    assert read_watermark(response.images[0].data).found
    await p.aclose()


async def test_only_the_operator_turns_the_mark_off(sb: ComfyUISandbox) -> None:
    asks_off = photo("a cube", seed=2, provider_options={"comfyui": {"watermark": False}})
    p = await comfy(sb)
    response = await p.generate(asks_off, SD15, timeout_s=20)
    assert read_watermark(response.images[0].data).found and response.billing.details["watermark"] == "embedded"
    assert any("provider_options.comfyui.watermark is not an option" in w for w in response.warnings)
    off = await comfy(sb, name="off", watermark=False)
    response = await off.generate(asks_off.model_copy_validated(provider_options={}), SD15, timeout_s=20)
    assert response.billing.details["watermark"] == "off" and not read_watermark(response.images[0].data).found
    for provider in (p, off):
        await provider.aclose()


async def test_the_operator_may_choose_its_own_payload(sb: ComfyUISandbox) -> None:
    p = await comfy(sb, watermark_payload=b"acme01")
    response = await p.generate(photo("a cube", seed=2), SD15, timeout_s=20)
    data = response.images[0].data
    assert read_watermark(data, b"acme01").found and not read_watermark(data).found
    with pytest.raises(ValueError, match="6 bytes"):
        ComfyUIProvider(sb.origin, watermark_payload=b"short")
    with pytest.raises(ValueError, match="True or False"):
        ComfyUIProvider(sb.origin, watermark="no")  # type: ignore[arg-type]
    await p.aclose()


async def test_images_under_256_by_256_are_left_unmarked_and_unchanged(sb: ComfyUISandbox) -> None:
    request = ImageRequest(prompt="a dot", seed=5, width=128, height=128)
    p, plain = await comfy(sb), await comfy(sb, name="plain", watermark=False)
    small = await p.generate(request, SD15, timeout_s=20)
    assert small.billing.details["watermark"] == "too_small" and not small.warnings
    assert small.images[0].data == (await plain.generate(request, SD15, timeout_s=20)).images[0].data
    small_jpeg = await p.generate(request.model_copy_validated(output_format="jpeg"), SD15, timeout_s=20)
    assert small_jpeg.images[0].mime == "image/jpeg" and small_jpeg.images[0].data[:3] == b"\xff\xd8\xff"
    for provider in (p, plain):
        await provider.aclose()


async def test_without_invisible_watermark_outputs_are_served_with_a_warning(
        sb: ComfyUISandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(comfyui_module, "_FOUND", set())
    monkeypatch.setitem(sys.modules, "imwatermark", None)  # find_spec answers None: not installed
    p = await comfy(sb)
    response = await p.generate(ImageRequest(prompt="a cat", seed=1, width=512, height=512,
                                             output_format="jpeg"), SD15, timeout_s=20)
    assert response.billing.details["watermark"] == "unavailable"
    assert any(w.startswith("not watermarked: invisible-watermark is not installed") for w in response.warnings)
    assert views(sb)[-1]["preview"] == "jpeg;95"  # nothing to do here: the server encodes it
    await p.aclose()


async def test_marking_and_encoding_run_off_the_event_loop(sb: ComfyUISandbox,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[int]] = {"embed": [], "encode": []}

    def record(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kw: Any) -> Any:
            seen[name].append(threading.get_ident())
            return fn(*args, **kw)
        return wrapper

    monkeypatch.setattr(watermark_module, "embed", record("embed", watermark_module.embed))
    monkeypatch.setattr(comfyui_module, "encode", record("encode", comfyui_module.encode))
    p = await comfy(sb)
    response = await p.generate(ImageRequest(prompt="a cat", seed=1, width=512, height=512, n=2,
                                             output_format="jpeg"), SD15, timeout_s=20)
    assert len(response.images) == 2
    loop_thread = threading.get_ident()
    assert len(seen["embed"]) == 2 and loop_thread not in seen["embed"]
    assert len(seen["encode"]) == 2 and loop_thread not in seen["encode"]
    await p.aclose()


async def test_an_output_that_cannot_be_marked_is_not_served_unmarked(sb: ComfyUISandbox,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("cv2 failed")

    monkeypatch.setattr(watermark_module, "embed", broken)
    p = await comfy(sb)
    with pytest.raises(ProviderUnavailable) as caught:
        await p.generate(photo("a cat"), SD15, timeout_s=20)
    err = caught.value
    assert err.code == "watermark_failed" and err.provider == "comfyui" and "RuntimeError: cv2 failed" in err.message
    assert err.billed is not None and err.billed.quantity == Decimal("0.5")  # the GPU time was used: billed
    await p.aclose()
