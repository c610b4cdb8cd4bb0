"""Precision and compilation on the local backend: FLUX in bfloat16, the fp16-fix VAE, ``compile: true``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")

import numpy as np
from PIL import Image

from providers.local import LocalProvider, ModelEntry
from providers.local.catalog import SDXL_FP16_VAE
from providers.local.pipelines import PipelineCache
from providers.local.precision import choose_dtype
from router import ImageRequest
from router.errors import CatalogError


@pytest.mark.parametrize(("family", "device", "requested", "default", "bf16", "want"), [
    ("flux", "cuda", "auto", None, True, "bfloat16"),
    ("flux", "cuda:1", "auto", None, False, "float32"),
    ("flux", "cuda", "auto", "float16", True, "bfloat16"),  # a provider-wide float16 never reaches FLUX
    ("flux", "cuda", "float16", None, True, "float16"),  # the catalog's own choice is kept (and logged)
    ("flux", "cpu", "auto", None, True, "float32"),
    ("sdxl", "cuda", "auto", None, True, "float16"),
    ("sd15", "cuda", "auto", None, True, "float16"),
    ("sdxl", "cuda", "bfloat16", None, True, "bfloat16"),
    ("sd15", "cpu", "auto", None, True, "float32"),
    ("sd15", "cpu", "auto", "float16", True, "float16"),
])
def test_the_dtype_follows_family_device_and_catalog(family: str, device: str, requested: str,
                                                     default: str | None, bf16: bool, want: str) -> None:
    assert choose_dtype(family, device, requested=requested, default=default, bf16_supported=bf16) == want


def test_the_cache_loads_flux_in_bfloat16_on_cuda() -> None:
    import torch

    flux = ModelEntry.from_dict("f", {"path": "/m", "family": "flux"})
    sdxl = ModelEntry.from_dict("x", {"path": "/m", "family": "sdxl"})
    assert PipelineCache("cuda").dtype_for(flux) == torch.bfloat16
    assert PipelineCache("cuda", dtype=torch.float16).dtype_for(flux) == torch.bfloat16
    assert PipelineCache("cuda").dtype_for(sdxl) == torch.float16
    assert PipelineCache("cpu").dtype_for(flux) == torch.float32


def test_sdxl_takes_the_fp16_fix_vae_in_float16_on_cuda_only() -> None:
    sdxl = ModelEntry.from_dict("x", {"path": "/m", "family": "sdxl"})
    assert sdxl.fp16_vae == SDXL_FP16_VAE
    assert PipelineCache("cuda").vae_for(sdxl) == SDXL_FP16_VAE
    assert PipelineCache("cpu").vae_for(sdxl) is None
    assert PipelineCache("cuda").vae_for(ModelEntry.from_dict("x", {"path": "/m", "family": "sdxl",
                                                                       "dtype": "bfloat16"})) is None
    assert PipelineCache("cuda").vae_for(ModelEntry.from_dict("x", {"path": "/m", "family": "sdxl",
                                                                       "fp16_vae": None})) is None
    assert PipelineCache("cuda").vae_for(ModelEntry.from_dict("x", {"path": "/m", "family": "sdxl",
                                                                       "vae": "/vae"})) == "/vae"
    for family in ("sd15", "flux"):
        assert ModelEntry.from_dict("m", {"path": "/m", "family": family}).fp16_vae is None


def test_dtype_and_compile_are_checked_in_the_catalog() -> None:
    entry = ModelEntry.from_dict("f", {"path": "/m", "family": "flux", "dtype": "BFloat16", "compile": True})
    assert (entry.dtype, entry.compile) == ("bfloat16", True)
    assert ModelEntry.from_dict("f", {"path": "/m"}).compile is False
    with pytest.raises(CatalogError, match="dtype must be one of"):
        ModelEntry.from_dict("f", {"path": "/m", "dtype": "fp8"})
    with pytest.raises(CatalogError, match="compile must be true or false"):
        ModelEntry.from_dict("f", {"path": "/m", "compile": "yes"})


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


async def test_flux_in_bfloat16_matches_plain_diffusers(flux_dir: Path) -> None:
    import torch
    from diffusers import FluxPipeline

    p = LocalProvider({"flux": {"path": str(flux_dir), "family": "flux", "native": [64, 64], "min_side": 32,
                                "steps": 3, "dtype": "bfloat16"}}, device="cpu")
    res = await p.generate(ImageRequest(prompt="a red cube", width=64, height=64, seed=11), "flux", timeout_s=120)
    assert p.worker.cache.base(p.catalog.get("flux")).transformer.dtype == torch.bfloat16
    await p.aclose()

    plain: Any = FluxPipeline.from_pretrained(str(flux_dir), dtype=torch.bfloat16, use_safetensors=True,
                                              local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    want = plain("a red cube", width=64, height=64, num_inference_steps=3, guidance_scale=3.5,
                 generator=[torch.Generator("cpu").manual_seed(11)]).images[0]
    assert np.abs(pixels(res.images[0].data) - np.asarray(want.convert("RGB"), dtype=np.int16)).max() <= 1


async def test_compile_is_opt_in_and_warmed_before_requests(sd15_dir: Path) -> None:
    entry = {"path": str(sd15_dir), "family": "sd15", "native": [64, 64], "min_side": 64, "steps": 2}
    plain = LocalProvider({"m": entry}, device="cpu")
    compiled = LocalProvider({"m": entry | {"compile": True}}, device="cpu",
                             compile_options={"backend": "eager"})  # the wiring, without a C++ toolchain
    assert await plain.warm() == []  # nothing asks for compilation: nothing loads
    assert plain._worker is None or not plain.worker.cache.loaded()
    assert await compiled.warm() == ["m"]
    assert compiled.worker.cache.loaded() == ["m"] and compiled.worker.completed == 0  # warm-up is no request
    unet = compiled.worker.cache.base(compiled.catalog.get("m")).unet
    assert unet._compiled_call_impl is not None
    req = ImageRequest(prompt="a red cube", width=64, height=64, seed=3)
    a = await compiled.generate(req, "m", timeout_s=120)
    b = await plain.generate(req, "m", timeout_s=120)
    assert plain.worker.cache.base(plain.catalog.get("m")).unet._compiled_call_impl is None
    assert np.abs(pixels(a.images[0].data) - pixels(b.images[0].data)).max() <= 1
    for p in (plain, compiled):
        await p.aclose()
