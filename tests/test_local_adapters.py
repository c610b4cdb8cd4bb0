"""Textual-inversion embeddings and IP-Adapters on the local backend, on tiny SD models, against plain Diffusers."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")

import numpy as np
from PIL import Image

from providers.local import LocalProvider
from providers.local.adapters import AdapterError
from router import ImageRequest
from tests.local_models import build_embedding, build_ip_adapter

PROMPT = "a <tiny-style> cube"


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def face(side: int = 64) -> bytes:
    arr = np.random.default_rng(9).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def provider(model: Path, family: str = "sd15", **entry: Any) -> LocalProvider:
    cfg = {"path": str(model), "family": family, "native": [64, 64], "min_side": 32, "steps": 3} | entry
    return LocalProvider({"m": cfg}, device="cpu")


async def run(p: LocalProvider, prompt: str = PROMPT, **local: Any) -> np.ndarray:
    req = ImageRequest(prompt=prompt, width=64, height=64, seed=4, provider_options={"local": local} if local else {})
    res = await p.generate(req, "m", timeout_s=120)
    return pixels(res.images[0].data)


def plain(model: Path, prompt: str, setup: Any, **call: Any) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe: Any = StableDiffusionPipeline.from_pretrained(str(model), use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    setup(pipe)
    img = pipe(prompt, width=64, height=64, num_inference_steps=3, guidance_scale=7.5,
               generator=[torch.Generator("cpu").manual_seed(4)], **call).images[0]
    return np.asarray(img.convert("RGB"), dtype=np.int16)


async def test_an_embedding_matches_plain_diffusers_and_changes_the_image(sd15_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    emb = build_embedding(tmp_path / "style.safetensors", "sd15", width=8, vectors=2)
    p = provider(sd15_dir)
    got = await run(p, embeddings=[{"ref": str(emb), "token": "<tiny-style>"}])
    without = await run(p)  # a request that names no embedding: the token is plain characters again
    want = plain(sd15_dir, PROMPT, lambda pipe: pipe.load_textual_inversion(load_file(str(emb)),
                                                                           token="<tiny-style>"))
    assert np.abs(got - want).max() <= 1
    fresh = await run(provider(sd15_dir))
    assert not np.array_equal(got, fresh) and np.array_equal(without, fresh)
    assert not p.worker.cache.embeddings(p.catalog.get("m")).loaded()
    await p.aclose()


async def test_rebinding_a_token_loads_the_new_embedding(sd15_dir: Path, tmp_path: Path) -> None:
    a = build_embedding(tmp_path / "a.safetensors", "sd15", seed=1)
    b = build_embedding(tmp_path / "b.safetensors", "sd15", seed=2)
    p = provider(sd15_dir)
    first = await run(p, embeddings=[{"ref": str(a), "token": "<tiny-style>"}])
    second = await run(p, embeddings=[{"ref": str(b), "token": "<tiny-style>"}])
    again = await run(p, embeddings=[{"ref": str(a), "token": "<tiny-style>"}])
    assert not np.array_equal(first, second) and np.array_equal(first, again)
    assert p.worker.cache.embeddings(p.catalog.get("m")).loads == 3
    await p.aclose()


async def test_an_sdxl_embedding_loads_into_both_text_encoders(sdxl_dir: Path, tmp_path: Path) -> None:
    emb = build_embedding(tmp_path / "xl.safetensors", "sdxl", width=32, width_2=32)
    p = provider(sdxl_dir, "sdxl")
    got = await run(p, embeddings=[{"ref": str(emb), "token": "<tiny-style>"}])
    assert not np.array_equal(got, await run(provider(sdxl_dir, "sdxl")))
    base = p.worker.cache.base(p.catalog.get("m"))
    assert "<tiny-style>" in base.tokenizer.get_vocab() and "<tiny-style>" in base.tokenizer_2.get_vocab()
    await p.aclose()


async def test_embeddings_are_family_checked_and_safetensors_only(sd15_dir: Path, flux_dir: Path,
                                                                  tmp_path: Path) -> None:
    xl = build_embedding(tmp_path / "xl.safetensors", "sdxl", width=32, width_2=32)
    p = provider(sd15_dir)
    with pytest.raises(AdapterError, match="trained for sdxl") as err:
        await run(p, embeddings=[{"ref": str(xl), "token": "<x>"}])
    assert err.value.code == "adapter_family_mismatch"
    assert p._worker is None  # refused before any model loaded
    (tmp_path / "old.pt").write_bytes(b"\x80\x04not-a-real-pickle.")
    with pytest.raises(AdapterError, match="pickled") as err:
        await run(p, embeddings=[{"ref": str(tmp_path / "old.pt"), "token": "<x>"}])
    assert err.value.code == "unsafe_checkpoint"
    wide = build_embedding(tmp_path / "wide.safetensors", "sd15", width=16)
    with pytest.raises(AdapterError, match="does not fit this model"):
        await run(p, embeddings=[{"ref": str(wide), "token": "<w>"}])
    with pytest.raises(AdapterError, match="not offered for flux"):
        await run(provider(flux_dir, "flux"), embeddings=[{"ref": str(xl), "token": "<x>"}])
    await p.aclose()


async def test_an_ip_adapter_matches_plain_diffusers_and_scale_zero_is_no_adapter(sd15_dir: Path,
                                                                                   tmp_path: Path) -> None:
    weights = build_ip_adapter(sd15_dir, tmp_path / "ip")
    p = provider(sd15_dir)
    before = await run(p, "a cube")
    ip = {"ref": str(weights), "image": face(), "scale": 0.8}
    got = await run(p, "a cube", ip_adapter=ip)
    zero = await run(p, "a cube", ip_adapter=ip | {"scale": 0.0})
    after = await run(p, "a cube")  # the adapter is removed for a request without one
    assert not np.array_equal(got, before)
    assert np.abs(zero - before).max() <= 1 and np.array_equal(after, before)

    def setup(pipe: Any) -> None:
        from transformers import CLIPVisionModelWithProjection

        pipe.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(
            str(weights.parent / "image_encoder"), use_safetensors=True))
        pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name, image_encoder_folder=None)
        pipe.set_ip_adapter_scale(0.8)

    want = plain(sd15_dir, "a cube", setup, ip_adapter_image=Image.open(io.BytesIO(face())).convert("RGB"))
    assert np.abs(got - want).max() <= 1
    await p.aclose()


async def test_an_ip_adapter_rides_on_img2img(sd15_dir: Path, tmp_path: Path) -> None:
    weights = build_ip_adapter(sd15_dir, tmp_path / "ip")
    p = provider(sd15_dir)
    await run(p, "warm the txt2img view first")
    req = ImageRequest(prompt="a cube", init_image=face(), strength=0.7, steps=4, seed=1,
                       provider_options={"local": {"ip_adapter": {"ref": str(weights), "image": face()}}})
    res = await p.generate(req, "m", timeout_s=120)
    assert res.images[0].width == 64
    await p.aclose()


async def test_ip_adapters_are_family_checked_and_need_their_image_encoder(sd15_dir: Path, flux_dir: Path,
                                                                           tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = build_ip_adapter(sd15_dir, tmp_path / "ip")
    p = provider(sd15_dir)
    xl = tmp_path / "xl" / "ip-adapter.safetensors"
    xl.parent.mkdir()
    save_file(load_file(str(weights)), str(xl), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base"})
    with pytest.raises(AdapterError, match="trained for sdxl"):
        await run(p, "a cube", ip_adapter={"ref": str(xl), "image": face()})
    moved = tmp_path / "moved" / "ip.safetensors"
    moved.parent.mkdir()
    moved.write_bytes(weights.read_bytes())
    with pytest.raises(AdapterError, match="image_encoder"):  # none beside it, none in the catalog
        await run(p, "a cube", ip_adapter={"ref": str(moved), "image": face()})
    with pytest.raises(AdapterError, match="not an IP-Adapter"):
        await run(p, "a cube", ip_adapter={"ref": str(build_embedding(tmp_path / "e.safetensors")), "image": face()})
    with pytest.raises(AdapterError, match="sd15 and sdxl"):
        await run(provider(flux_dir, "flux"), "a cube", ip_adapter={"ref": str(weights), "image": face()})
    shared = provider(sd15_dir, image_encoder=str(weights.parent / "image_encoder"))
    assert (await run(shared, "a cube", ip_adapter={"ref": str(moved), "image": face()})).shape == (64, 64, 3)
    await p.aclose()
