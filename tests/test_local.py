"""The local Diffusers backend end to end: tiny real pipelines saved to disk and loaded back."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")

import numpy as np
from PIL import Image

from providers.local import Catalog, LocalProvider, ModelEntry, ModelNotAvailable, UnsafeCheckpoint
from providers.local.pipelines import PipelineCache
from router import AsyncRouter, ImageRequest, InvalidRequestError
from router.errors import AllProvidersFailed, ProviderTimeout, RequestValidationError
from tests.conftest import half_mask
from tests.local_models import build_sd15, write_incomplete_model, write_pickled_model

STEPS = 3


def entry(path: Path | str, **kw: Any) -> dict[str, Any]:
    return {"path": str(path), "family": "sd15", "native": [64, 64], "min_side": 64, "steps": STEPS} | kw


@pytest.fixture
def provider(sd15_dir: Path) -> LocalProvider:
    return LocalProvider({"tiny": entry(sd15_dir)}, device="cpu")


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def noise_png(w: int = 64, h: int = 64, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def router(*providers: LocalProvider) -> AsyncRouter:
    return AsyncRouter(list(providers), ledger=":memory:")


# --- through the router -----------------------------------------------------------


async def test_txt2img_through_the_router(provider: LocalProvider) -> None:
    async with router(provider) as r:
        res = await r.agenerate("a red cube", width=64, height=64, n=2, seed=5, negative_prompt="blur")
    assert (res.provider, res.model) == ("local", "tiny")
    assert [(i.width, i.height, i.seed, i.mime) for i in res.images] == [(64, 64, 5, "image/png"),
                                                                        (64, 64, 6, "image/png")]
    assert res.cost.unit == "gpu_seconds" and res.cost.actual_usd == 0 and res.cost.quantity > 0
    assert res.cost.details["steps"] == STEPS
    assert not res.warnings
    assert not np.array_equal(pixels(res.images[0].data), pixels(res.images[1].data))


async def test_img2img_through_the_router_takes_the_init_size(provider: LocalProvider) -> None:
    init = noise_png(72, 64)
    async with router(provider) as r:
        a = await r.agenerate("a red cube", init_image=init, strength=0.7, seed=1, steps=4)
        b = await r.agenerate("a red cube", init_image=init, strength=0.7, seed=1, steps=4)
    assert (a.images[0].width, a.images[0].height) == (72, 64)
    assert a.cost.details["steps"] == int(4 * 0.7)
    assert np.array_equal(pixels(a.images[0].data), pixels(b.images[0].data))


async def test_inpaint_keeps_unmasked_pixels_exactly(provider: LocalProvider) -> None:
    init = noise_png(64, 64, seed=3)
    async with router(provider) as r:
        res = await r.agenerate("a red cube", init_image=init, mask_image=half_mask(64, 64), seed=2)
    out, src = pixels(res.images[0].data), pixels(init)
    assert res.provider == "local"
    assert np.array_equal(out[:, 32:], src[:, 32:])  # black half of the mask: kept
    assert not np.array_equal(out[:, :32], src[:, :32])  # white half: repainted


async def test_estimate_starts_from_a_prior_then_follows_observations(sd15_dir: Path) -> None:
    p = LocalProvider({"tiny": entry(sd15_dir)}, device="cpu", usd_per_gpu_hour=3.6)
    req = ImageRequest(prompt="x", width=64, height=64, steps=10)
    prior = p.estimate(req, "tiny")
    assert prior.unit == "gpu_seconds" and prior.cost_usd == prior.quantity / 1000
    async with router(p) as r:
        res = await r.agenerate(req)
    assert res.cost.actual_usd == res.cost.quantity / 1000
    observed = p.seconds_per_step("tiny")
    assert observed != 0.03
    assert p.estimate(req, "tiny").latency_s == pytest.approx(observed * 10, rel=1e-6)


# --- equivalence and determinism --------------------------------------------------


@pytest.mark.parametrize("scheduler", [None, "euler"])
async def test_txt2img_equals_plain_diffusers(provider: LocalProvider, sd15_dir: Path, scheduler: str | None) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    res = await provider.generate(ImageRequest(prompt="a red cube", width=72, height=64, n=2, seed=9,
                                               guidance_scale=6.0, scheduler=scheduler), "tiny", timeout_s=60)
    await provider.aclose()
    pipe = StableDiffusionPipeline.from_pretrained(str(sd15_dir), use_safetensors=True, local_files_only=True)
    if scheduler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red cube", width=72, height=64, num_inference_steps=STEPS, guidance_scale=6.0,
               num_images_per_prompt=2, generator=[torch.Generator("cpu").manual_seed(s) for s in (9, 10)]).images
    for got, want in zip(res.images, ref, strict=True):
        diff = np.abs(pixels(got.data) - np.asarray(want.convert("RGB"), dtype=np.int16))
        assert diff.max() <= 1


async def test_a_returned_seed_reproduces_its_image_alone(provider: LocalProvider) -> None:
    many = await provider.generate(ImageRequest(prompt="a cube", width=64, height=64, n=3, seed=20), "tiny",
                                   timeout_s=60)
    alone = await provider.generate(ImageRequest(prompt="a cube", width=64, height=64, seed=many.images[1].seed),
                                    "tiny", timeout_s=60)
    again = await provider.generate(ImageRequest(prompt="a cube", width=64, height=64, seed=21), "tiny",
                                    timeout_s=60)
    await provider.aclose()
    assert [i.seed for i in many.images] == [20, 21, 22]
    assert np.abs(pixels(many.images[1].data) - pixels(alone.images[0].data)).max() <= 1
    assert np.array_equal(pixels(alone.images[0].data), pixels(again.images[0].data))


async def test_concurrent_requests_with_different_schedulers_match_their_solo_runs(provider: LocalProvider) -> None:
    schedulers = ["dpmpp_2m_karras", "euler", "euler_a", "unipc", "ddim", "lcm", None, "euler_a"]
    sizes = [(64, 64), (72, 64), (64, 80), (64, 64), (96, 64), (64, 64), (80, 80), (64, 72)]
    reqs = [ImageRequest(prompt=f"cube {i}", width=w, height=h, seed=100 + i, scheduler=s, steps=4)
            for i, (s, (w, h)) in enumerate(zip(schedulers, sizes, strict=True))]
    async with router(provider) as r:
        together = await asyncio.gather(*(r.agenerate(q) for q in reqs))
        alone = [await r.agenerate(q) for q in reqs]
    for t, a, (w, h) in zip(together, alone, sizes, strict=True):
        assert (t.images[0].width, t.images[0].height) == (w, h)
        assert np.array_equal(pixels(t.images[0].data), pixels(a.images[0].data))
    assert len({pixels(t.images[0].data).tobytes() for t in together}) == len(reqs)


async def test_the_deadline_interrupts_the_call(provider: LocalProvider) -> None:
    with pytest.raises(ProviderTimeout):
        await provider.generate(ImageRequest(prompt="x", width=64, height=64), "tiny", timeout_s=0.0)
    await provider.aclose()


async def test_cancelling_the_await_stops_the_pipeline_early(provider: LocalProvider) -> None:
    slow = ImageRequest(prompt="x", width=64, height=64, steps=500, seed=1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(provider.generate(slow, "tiny", timeout_s=600), 0.3)
    quick = await provider.generate(ImageRequest(prompt="x", width=64, height=64, steps=1), "tiny", timeout_s=60)
    assert quick.images and provider.worker.interrupted == 1 and provider.worker.completed == 1
    await provider.aclose()


# --- loading: safety and typed errors ---------------------------------------------


async def test_a_missing_model_directory_is_a_typed_error(tmp_path: Path) -> None:
    p = LocalProvider({"gone": entry(tmp_path / "nope")}, device="cpu")
    async with router(p) as r:
        with pytest.raises(AllProvidersFailed) as info:  # a candidate's failure: the next one would be tried
            await r.agenerate("x", width=64, height=64)
    (error,) = info.value.errors
    assert isinstance(error, ModelNotAvailable) and "gone" in str(error)
    assert "does not exist" in str(info.value)
    assert [a.error for a in info.value.attempts] == ["ModelNotAvailable"]


async def test_missing_weights_are_a_typed_error(tmp_path: Path) -> None:
    p = LocalProvider({"half": entry(write_incomplete_model(tmp_path / "half"))}, device="cpu")
    with pytest.raises(ModelNotAvailable, match=r"no \.safetensors weights for unet"):
        await p.generate(ImageRequest(prompt="x", width=64, height=64), "half", timeout_s=10)
    await p.aclose()


async def test_a_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    import torch

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    p = LocalProvider({"pkl": entry(write_pickled_model(tmp_path / "pkl"))}, device="cpu")
    with pytest.raises(UnsafeCheckpoint, match="pickled") as info:
        await p.generate(ImageRequest(prompt="x", width=64, height=64), "pkl", timeout_s=10)
    await p.aclose()
    assert isinstance(info.value, InvalidRequestError)
    single = tmp_path / "model.ckpt"
    single.write_bytes(b"\x80\x04.")
    with pytest.raises(UnsafeCheckpoint):
        PipelineCache("cpu").base(ModelEntry.from_dict("ckpt", entry(single)))


def test_sizes_must_be_multiples_of_8_and_16_for_flux() -> None:
    with pytest.raises(RequestValidationError, match="multiple of 8"):
        ImageRequest(prompt="x", width=100, height=64)
    p = LocalProvider({"flux": {"path": "/nowhere", "family": "flux", "min_side": 64}}, device="cpu")
    caps = p.capabilities("flux")
    assert caps.sizes.multiple == 16 and not caps.scheduler and not caps.negative_prompt
    plan = p.plan(ImageRequest(prompt="x", width=72, height=72), "flux")
    assert plan.size.width % 16 == 0 and plan.size.height % 16 == 0 and plan.warnings


# --- cache, catalog, capabilities -------------------------------------------------


async def test_the_cache_evicts_the_least_recently_used_model(sd15_dir: Path) -> None:
    p = LocalProvider({"a": entry(sd15_dir), "b": entry(sd15_dir)}, device="cpu", max_models=1)
    req = ImageRequest(prompt="x", width=64, height=64, seed=1, steps=1)
    ra = await p.generate(req, "a", timeout_s=60)
    await p.generate(req.model_copy_validated(init_image=noise_png(), strength=1.0), "b", timeout_s=60)
    assert p.worker.cache.loaded() == ["b"] and p.worker.cache.loads == 2
    ra2 = await p.generate(req, "a", timeout_s=60)
    assert p.worker.cache.loaded() == ["a"] and p.worker.cache.loads == 3
    assert np.array_equal(pixels(ra.images[0].data), pixels(ra2.images[0].data))
    await p.aclose()


def test_catalog_from_dict_and_yaml(tmp_path: Path) -> None:
    cat = Catalog.from_dict({"models": {"xl": {"path": "org/sdxl", "family": "sdxl",
                                               "controlnets": {"canny": "/cn/canny"}}}})
    xl = cat.get("xl")
    assert (xl.family, xl.guidance, xl.native, xl.is_local_dir) == ("sdxl", 5.0, (1024, 1024), False)
    assert xl.controlnets == {"canny": "/cn/canny"}
    f = tmp_path / "models.yaml"
    f.write_text("models:\n  flux:\n    path: /m/flux\n    family: flux\n    vram_gb: 30\n")
    p = LocalProvider(f, device="cpu")
    assert p.models() == ["flux"] and p.catalog.get("flux").steps == 28
    with pytest.raises(InvalidRequestError, match="unknown family"):
        Catalog.from_dict({"m": {"path": "/x", "family": "sd3"}})
    with pytest.raises(InvalidRequestError, match="no local model"):
        cat.get("nope")


def test_capabilities_and_options(sd15_dir: Path) -> None:
    p = LocalProvider({"tiny": entry(sd15_dir, quality=0.4)}, device="cpu")
    caps = p.capabilities("tiny")
    assert caps.tasks == {"txt2img", "img2img", "inpaint"} and caps.regions == {"local"}
    assert caps.quality == 0.4 and caps.scheduler and caps.seed and caps.mask
    plan = p.plan(ImageRequest(prompt="x", width=64, height=64,
                               provider_options={"local": {"safety_checker": False, "bogus": 1}}), "tiny")
    assert plan.warnings == ("provider_options.local.bogus is not an option local knows; ignored",)
    assert p.capabilities("tiny") is caps  # built once per model, not per candidate per request
    p.catalog._entries["tiny"] = ModelEntry.from_dict("tiny", entry(sd15_dir, quality=0.6))
    assert p.capabilities("tiny").quality == 0.6  # a replaced entry is read again


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, providers.local; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


async def test_a_call_never_mutates_the_cached_pipeline(provider: LocalProvider) -> None:
    await provider.generate(ImageRequest(prompt="x", width=64, height=64, steps=2, scheduler="euler_a",
                                         guidance_scale=3.0), "tiny", timeout_s=60)
    base = provider.worker.cache.base(provider.catalog.get("tiny"))
    assert type(base.scheduler).__name__ == "DDIMScheduler"
    assert base.config["scheduler"][1] == "DDIMScheduler"
    assert not hasattr(base, "_guidance_scale") and not getattr(base, "_interrupt", False)
    await provider.aclose()


async def test_sdxl_txt2img_and_inpaint_through_the_router(sd15_dir: Path, sdxl_dir: Path) -> None:
    p = LocalProvider({"xl": entry(sdxl_dir, family="sdxl", quality=0.9), "tiny": entry(sd15_dir, quality=0.3)},
                      device="cpu")
    init = noise_png(64, 64, seed=4)
    async with router(p) as r:
        t2i = await r.agenerate("a red cube", width=64, height=64, seed=1, scheduler="dpmpp_2m_karras",
                                negative_prompt="blur", model="xl")
        inp = await r.agenerate("a red cube", init_image=init, mask_image=half_mask(64, 64), seed=1, model="xl")
    assert (t2i.model, inp.model) == ("xl", "xl")
    assert (t2i.images[0].width, t2i.images[0].height) == (64, 64)
    assert t2i.cost.details["scheduler"] == "DPMSolverMultistepScheduler"
    assert np.array_equal(pixels(inp.images[0].data)[:, 32:], pixels(init)[:, 32:])


async def test_the_safety_checker_runs_unless_turned_off(tmp_path: Path) -> None:
    path = build_sd15(tmp_path / "checked", safety_checker=True)
    p = LocalProvider({"checked": entry(path)}, device="cpu")
    async with router(p) as r:
        flagged = await r.agenerate("x", width=64, height=64, seed=1, steps=1)
        off = await r.agenerate("x", width=64, height=64, seed=1, steps=1,
                                provider_options={"local": {"safety_checker": False}})
    assert flagged.images[0].nsfw and pixels(flagged.images[0].data).max() == 0
    assert not off.images[0].nsfw and pixels(off.images[0].data).max() > 0
    assert not off.warnings
    quiet = LocalProvider({"checked": entry(path)}, device="cpu", safety_checker=False)
    res = await quiet.generate(ImageRequest(prompt="x", width=64, height=64, seed=1, steps=1), "checked",
                               timeout_s=60)
    await quiet.aclose()
    assert np.array_equal(pixels(res.images[0].data), pixels(off.images[0].data))


async def test_the_cache_evicts_beyond_its_vram_budget(sd15_dir: Path) -> None:
    models = {"a": entry(sd15_dir, vram_gb=4), "b": entry(sd15_dir, vram_gb=4), "c": entry(sd15_dir, vram_gb=1)}
    p = LocalProvider(models, device="cpu", max_models=3, vram_budget_gb=5)
    req = ImageRequest(prompt="x", width=64, height=64, seed=1, steps=1)
    for name, held in (("a", ["a"]), ("c", ["a", "c"]), ("b", ["c", "b"]), ("a", ["a"])):
        await p.generate(req, name, timeout_s=60)
        assert p.worker.cache.loaded() == held
    await p.aclose()


async def test_img2img_equals_plain_diffusers(provider: LocalProvider, sd15_dir: Path) -> None:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, UniPCMultistepScheduler

    init = noise_png(64, 64, seed=7)
    res = await provider.generate(ImageRequest(prompt="a red cube", init_image=init, strength=0.6, steps=5, seed=3,
                                               scheduler="unipc"), "tiny", timeout_s=60)
    await provider.aclose()
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(sd15_dir), use_safetensors=True, local_files_only=True)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    want = pipe("a red cube", image=Image.open(io.BytesIO(init)).convert("RGB"), strength=0.6, num_inference_steps=5,
                guidance_scale=7.5, generator=[torch.Generator("cpu").manual_seed(3)]).images[0]
    assert np.abs(pixels(res.images[0].data) - np.asarray(want, dtype=np.int16)).max() <= 1
