"""Local upscaling with spandrel: tiny random Real-ESRGAN / Compact / SwinIR models saved as safetensors."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import numpy as np
from PIL import Image

from providers.local import LocalProvider
from providers.local.upscale import UpscalerEntry, UpscalerError, load, passes, upscale

try:
    from providers.local.upscale import _spandrel

    _spandrel()
except ImportError:
    pytest.skip("spandrel is not installed (pip install 'pixroute[upscale]')", allow_module_level=True)

from router import AsyncRouter, ImageRequest
from router.errors import CatalogError, ProviderTimeout
from tests.local_models import build_upscaler

ARCHS = ("esrgan", "compact", "swinir")


@pytest.fixture(scope="module")
def upscalers(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    root = tmp_path_factory.mktemp("upscalers")
    return {(arch, scale): build_upscaler(root / f"{arch}-x{scale}.safetensors", arch, scale=scale)
            for arch in ARCHS for scale in (2, 4)}


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def direct(model_file: Path, img: Image.Image) -> Image.Image:
    """The model run on the whole image with spandrel alone (the reference)."""
    import torch

    model = load(UpscalerEntry("ref", str(model_file)), "cpu")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    with torch.inference_mode():
        y = model(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return Image.fromarray((y * 255.0).round().astype(np.uint8))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scale", [2, 4])
async def test_each_architecture_upscales_through_the_router(upscalers: dict[tuple[str, int], Path], arch: str,
                                                             scale: int) -> None:
    path = upscalers[(arch, scale)]
    p = LocalProvider({"upscalers": {"up": {"path": str(path), "tile": 0}}}, device="cpu", watermark=False)
    async with AsyncRouter([p], ledger=":memory:") as r:
        res = await r.agenerate("", init_image=png(noise(32, 24)), upscale=scale)
    (img,) = res.images
    assert (res.provider, res.model, img.width, img.height) == ("local", "up", 32 * scale, 24 * scale)
    assert res.cost.unit == "gpu_seconds"
    want = direct(path, noise(32, 24))
    assert np.abs(arr(Image.open(io.BytesIO(img.data))) - arr(want)).max() <= 1


@pytest.mark.parametrize("arch", ARCHS)
def test_tiles_with_overlap_match_the_whole_image(upscalers: dict[tuple[str, int], Path], arch: str) -> None:
    model = load(UpscalerEntry("t", str(upscalers[(arch, 2)])), "cpu")
    img = noise(40, 36, seed=1)
    whole = upscale(model, img, 2, tile=0)
    tiled = upscale(model, img, 2, tile=16, overlap=16)
    assert whole.size == tiled.size == (80, 72)
    assert np.abs(arr(whole) - arr(tiled)).max() <= 2


def test_two_times_from_a_four_times_model_and_four_from_two(upscalers: dict[tuple[str, int], Path]) -> None:
    x4 = load(UpscalerEntry("x4", str(upscalers[("compact", 4)])), "cpu")
    x2 = load(UpscalerEntry("x2", str(upscalers[("compact", 2)])), "cpu")
    img = noise(20, 16)
    down = upscale(x4, img, 2, tile=0)
    assert down.size == (40, 32)
    assert np.array_equal(arr(down), arr(upscale(x4, img, 4, tile=0).resize((40, 32), Image.Resampling.LANCZOS)))
    assert upscale(x2, img, 4, tile=0).size == (80, 64) and passes(2, 4) == 2 and passes(4, 2) == 1


def test_pickled_and_foreign_files_are_refused(tmp_path: Path) -> None:
    pth = tmp_path / "RealESRGAN_x4plus.pth"
    pth.write_bytes(b"\x80\x04not-a-real-pickle.")
    with pytest.raises(UpscalerError, match="pickled") as err:
        load(UpscalerEntry("p", str(pth)), "cpu")
    assert err.value.code == "unsafe_checkpoint"
    with pytest.raises(UpscalerError, match="no such file"):
        load(UpscalerEntry("m", str(tmp_path / "missing.safetensors")), "cpu")
    import torch
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UpscalerError, match="not an upscaler architecture") as err:
        load(UpscalerEntry("o", str(tmp_path / "other.safetensors")), "cpu")
    assert err.value.code == "unsupported_upscaler"


def test_the_upscalers_section_is_checked() -> None:
    p = LocalProvider({"models": {"m": {"path": "/m"}}, "upscalers": {"up": {"path": "/u.safetensors", "tile": 256}}})
    assert list(p.models()) == ["m", "up"]
    assert p.capabilities("up").tasks == {"upscale"} and p.capabilities("up").regions == {"local"}
    assert "upscale" not in p.capabilities("m").tasks
    with pytest.raises(CatalogError, match="unknown catalog keys"):
        LocalProvider({"upscalers": {"up": {"path": "/u.safetensors", "scale": 4}}})
    with pytest.raises(CatalogError, match="tile must be"):
        LocalProvider({"upscalers": {"up": {"path": "/u.safetensors", "tile": -1}}})
    with pytest.raises(CatalogError, match="both as a model and as an upscaler"):
        LocalProvider({"models": {"x": {"path": "/m"}}, "upscalers": {"x": {"path": "/u.safetensors"}}})


async def test_upscale_requests_route_to_the_upscaler_and_others_to_models(
        upscalers: dict[tuple[str, int], Path], sd15_dir: Path) -> None:
    catalog = {"models": {"m": {"path": str(sd15_dir), "family": "sd15", "native": [64, 64], "min_side": 64,
                                "steps": 2}},
               "upscalers": {"up": {"path": str(upscalers[("compact", 4)])}}}
    p = LocalProvider(catalog, device="cpu")
    async with AsyncRouter([p], ledger=":memory:") as r:
        up = await r.agenerate("", init_image=png(noise(64, 64)), upscale=4)
        gen = await r.agenerate("a cube", width=64, height=64, steps=2)
    assert (up.model, up.images[0].width) == ("up", 256) and gen.model == "m"
    assert up.cost.details["watermark"] == "embedded"  # 256×256 output: marked like every local output
    await p.aclose()


async def test_an_upscale_past_its_deadline_stops(upscalers: dict[tuple[str, int], Path]) -> None:
    p = LocalProvider({"upscalers": {"up": {"path": str(upscalers[("compact", 2)]), "tile": 8}}}, device="cpu")
    req = ImageRequest(prompt="", init_image=png(noise(32, 32)), upscale=2)
    with pytest.raises(ProviderTimeout, match="upscale interrupted"):
        await p.generate(req, "up", timeout_s=-1)
    await p.aclose()
