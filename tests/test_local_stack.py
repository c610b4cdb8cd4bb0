"""The full local stack on SD1.5, SDXL and Flux: ControlNet, LoRA, control maps, memory options, progress."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")

import numpy as np
from PIL import Image, ImageDraw

from providers.local import LocalProvider
from providers.local.controls import DetectorNotConfigured, control_map
from providers.local.loras import LoraError, family_of
from router import AsyncRouter, ImageRequest, InvalidRequestError, NoRouteError, ProgressEvent
from tests.conftest import half_mask
from tests.local_models import build_controlnet, build_lora

FAMILIES = ("sd15", "sdxl", "flux")
SIDE = {"sd15": 64, "sdxl": 64, "flux": 64}


@pytest.fixture(scope="session")
def assets(models_root: Path, sd15_dir: Path, sdxl_dir: Path, flux_dir: Path) -> dict[str, dict[str, Path]]:
    """Per family: the model, two ControlNets (canny, depth) and two LoRAs, all written to disk."""
    out: dict[str, dict[str, Path]] = {}
    for family, model in (("sd15", sd15_dir), ("sdxl", sdxl_dir), ("flux", flux_dir)):
        root = models_root / f"{family}-extras"
        out[family] = {
            "model": model,
            "canny": build_controlnet(root / "cn-canny", family, seed=1),
            "depth": build_controlnet(root / "cn-depth", family, seed=2),
            "lora_a": build_lora(model, root / "lora-a.safetensors", seed=3),
            "lora_b": build_lora(model, root / "lora-b" / "pytorch_lora_weights.safetensors", seed=4).parent,
        }
    return out


def make_provider(assets: dict[str, dict[str, Path]], family: str, **kw: Any) -> LocalProvider:
    a = assets[family]
    side = SIDE[family]
    entry = {"path": str(a["model"]), "family": family, "native": [side, side], "min_side": 32, "steps": 3,
             "controlnets": {"canny": str(a["canny"]), "depth": str(a["depth"])}} | kw
    return LocalProvider({f"tiny-{family}": entry}, device="cpu")


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def shapes_png(side: int) -> bytes:
    img = Image.new("RGB", (side, side), (20, 20, 20))
    draw = ImageDraw.Draw(img)
    draw.rectangle([side // 4, side // 4, 3 * side // 4, side // 2], fill=(230, 230, 230))
    draw.ellipse([side // 8, side // 2, side // 2, 7 * side // 8], fill=(120, 120, 120))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def noise_png(side: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def canny(side: int, scale: float = 1.0, **kw: Any) -> dict[str, Any]:
    return {"kind": "canny", "image": shapes_png(side), "scale": scale} | kw


async def run(p: LocalProvider, **kw: Any) -> np.ndarray:
    side = SIDE[p.catalog.get(p.models()[0]).family]
    req = ImageRequest(**({"prompt": "a red cube", "width": side, "height": side, "seed": 7} | kw))
    res = await p.generate(req, p.models()[0], timeout_s=120)
    return pixels(res.images[0].data)


# --- every task, every family, through the router ----------------------------------


@pytest.mark.parametrize("family", FAMILIES)
async def test_every_task_runs_through_the_router(assets: dict[str, dict[str, Path]], family: str) -> None:
    p = make_provider(assets, family)
    side = SIDE[family]
    init, mask = noise_png(side, 1), half_mask(side, side)
    lora = {"ref": str(assets[family]["lora_a"]), "weight": 0.8}
    cases: dict[str, dict[str, Any]] = {
        "txt2img": {},
        "img2img": {"init_image": init, "strength": 0.7},
        "inpaint": {"init_image": init, "mask_image": mask},
        "control": {"controls": [canny(side)]},
        "control+img2img": {"controls": [canny(side)], "init_image": init, "strength": 0.7},
        "control+inpaint": {"controls": [canny(side)], "init_image": init, "mask_image": mask},
        "multi-control": {"controls": [canny(side, 0.7), {"kind": "depth", "image": shapes_png(side),
                                                          "preprocess": False, "start": 0.2, "end": 0.9}]},
        "lora": {"loras": [lora]},
        "lora+control+inpaint": {"loras": [lora], "controls": [canny(side)], "init_image": init, "mask_image": mask},
    }
    async with AsyncRouter([p], ledger=":memory:") as r:
        for name, fields in cases.items():
            res = await r.agenerate("a red cube", width=side, height=side, seed=3, **fields)
            assert (res.provider, res.model) == ("local", f"tiny-{family}"), name
            img = pixels(res.images[0].data)
            assert img.shape == (side, side, 3), name
            if "mask_image" in fields:
                assert np.array_equal(img[:, side // 2:], pixels(init)[:, side // 2:]), name


# --- ControlNet -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
async def test_controlnet_scale_zero_equals_none_and_one_changes(assets: dict[str, dict[str, Path]],
                                                                  family: str) -> None:
    p = make_provider(assets, family)
    side = SIDE[family]
    plain = await run(p)
    zero = await run(p, controls=[canny(side, 0.0)])
    one = await run(p, controls=[canny(side, 1.0)])
    other_map = await run(p, controls=[{"kind": "canny", "image": noise_png(side, 5)}])
    await p.aclose()
    assert np.abs(zero - plain).max() <= 1
    assert np.abs(one - plain).max() > 8
    assert not np.array_equal(one, other_map)  # the map itself steers the image


async def test_multi_controlnet_applies_each_net_with_its_own_scale(assets: dict[str, dict[str, Path]]) -> None:
    p = make_provider(assets, "sd15")
    depth = {"kind": "depth", "image": shapes_png(64), "preprocess": False}
    only_canny = await run(p, controls=[canny(64)])
    both = await run(p, controls=[canny(64), depth])
    depth_off = await run(p, controls=[canny(64), depth | {"scale": 0.0}])
    late = await run(p, controls=[canny(64), depth | {"start": 0.7}])
    await p.aclose()
    assert np.abs(depth_off - only_canny).max() <= 1
    assert np.abs(both - only_canny).max() > 8
    assert not np.array_equal(late, both)  # the window applies


async def test_a_control_kind_without_a_controlnet_is_a_typed_error(assets: dict[str, dict[str, Path]]) -> None:
    p = make_provider(assets, "sd15")
    req = ImageRequest(prompt="x", width=64, height=64, controls=[{"kind": "pose", "image": shapes_png(64)}])
    async with AsyncRouter([p], ledger=":memory:") as r:
        with pytest.raises(NoRouteError, match="no ControlNet for pose"):
            await r.agenerate(req)
        with pytest.raises(InvalidRequestError, match="no ControlNet for pose") as info:
            await p.generate(req, "tiny-sd15", timeout_s=60)
        assert info.value.code == "control_kind_unavailable"
        assert (await r.agenerate("x", width=64, height=64, steps=1)).images  # nothing else broke


async def test_a_kind_that_needs_a_detector_says_so(assets: dict[str, dict[str, Path]]) -> None:
    p = make_provider(assets, "sd15")
    photo = {"kind": "depth", "image": shapes_png(64)}
    with pytest.raises(DetectorNotConfigured, match="preprocess=False"):
        await run(p, controls=[photo])
    assert (await run(p, controls=[photo | {"preprocess": False}])).shape == (64, 64, 3)
    await p.aclose()


def test_control_maps() -> None:
    img = Image.open(io.BytesIO(shapes_png(128)))
    edges = np.asarray(control_map(img, "canny", (128, 128)))[..., 0]
    assert set(np.unique(edges)) == {0, 255}
    # the rectangle's top edge (row 32) is found and thin; flat areas carry no edge
    assert edges[30:35, 64].max() == 255 and (edges[28:38, 64] > 0).sum() <= 2
    assert edges[5:20, 5:20].max() == 0
    tile = control_map(img, "tile", (128, 128))
    assert np.array_equal(np.asarray(tile), np.asarray(img.convert("RGB")))
    passthrough = control_map(img, "depth", (128, 128), preprocess=False)
    assert np.array_equal(np.asarray(passthrough), np.asarray(img.convert("RGB")))
    for kind in ("depth", "pose", "seg", "normal", "softedge", "scribble", "lineart"):  # HED, lineart... models
        with pytest.raises(DetectorNotConfigured, match=f"detectors.{kind}"):
            control_map(img, kind, (128, 128))


# --- LoRA -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
async def test_lora_weight_zero_equals_none_one_changes_and_two_apply(assets: dict[str, dict[str, Path]],
                                                                       family: str) -> None:
    p = make_provider(assets, family)
    a, b = str(assets[family]["lora_a"]), str(assets[family]["lora_b"])
    plain = await run(p)
    zero = await run(p, loras=[{"ref": a, "weight": 0.0}])
    with_a = await run(p, loras=[{"ref": a, "weight": 1.0}])
    with_b = await run(p, loras=[{"ref": b, "weight": 1.0}])
    both = await run(p, loras=[{"ref": a, "weight": 1.0}, {"ref": b, "weight": 0.7}])
    b_off = await run(p, loras=[{"ref": a, "weight": 1.0}, {"ref": b, "weight": 0.0}])
    after = await run(p)  # a request without LoRA after LoRA requests: LoRA is off again
    adapters = p.worker.cache.adapters(p.catalog.get(f"tiny-{family}"))
    await p.aclose()
    assert np.abs(zero - plain).max() <= 1
    assert np.abs(with_a - plain).max() > 1
    assert np.abs(both - with_a).max() > 1 and np.abs(both - with_b).max() > 1
    assert np.abs(b_off - with_a).max() <= 1
    assert np.array_equal(after, plain)
    assert adapters.loads == 2  # each file loaded once, then switched with set_adapters


async def test_a_lora_for_another_family_is_refused_before_loading(assets: dict[str, dict[str, Path]]) -> None:
    assert [family_of(assets[f]["lora_a"]) for f in FAMILIES] == list(FAMILIES)
    p = make_provider(assets, "sd15")
    for other in ("sdxl", "flux"):
        with pytest.raises(LoraError, match=f"trained for {other}.*this model is sd15") as info:
            await run(p, loras=[{"ref": str(assets[other]["lora_a"])}])
        assert isinstance(info.value, InvalidRequestError) and info.value.code == "lora_family_mismatch"
    assert p._worker is None or not p.worker.cache.adapters(p.catalog.get("tiny-sd15")).loaded()
    assert (await run(p, loras=[{"ref": str(assets["sd15"]["lora_a"])}])).shape == (64, 64, 3)
    await p.aclose()


async def test_lora_files_are_checked(tmp_path: Path, assets: dict[str, dict[str, Path]]) -> None:
    p = make_provider(assets, "sd15")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter.bin").write_bytes(b"\x80\x04.")
    cases = {str(tmp_path / "missing.safetensors"): "lora_not_found",
             str(tmp_path / "pickled"): "unsafe_checkpoint",
             str(tmp_path / "pickled" / "adapter.bin"): "unsafe_checkpoint"}
    for ref, code in cases.items():
        with pytest.raises(LoraError) as info:
            await run(p, loras=[{"ref": ref}])
        assert info.value.code == code
    await p.aclose()


async def test_the_adapter_cache_drops_the_least_recently_used(assets: dict[str, dict[str, Path]]) -> None:
    p = make_provider(assets, "sd15", lora_cache=1)
    a, b = str(assets["sd15"]["lora_a"]), str(assets["sd15"]["lora_b"])
    first = await run(p, loras=[{"ref": a}])
    await run(p, loras=[{"ref": b}])
    again = await run(p, loras=[{"ref": a}])
    adapters = p.worker.cache.adapters(p.catalog.get("tiny-sd15"))
    base = p.worker.cache.base(p.catalog.get("tiny-sd15"))
    assert len(adapters.loaded()) == 1 and adapters.loads == 3
    assert set(base.get_list_adapters().get("unet", [])) == set(adapters.loaded())
    assert np.array_equal(first, again)
    await p.aclose()


async def test_concurrent_requests_with_schedulers_sizes_and_loras_match_solo(
        assets: dict[str, dict[str, Path]]) -> None:
    p = make_provider(assets, "sd15")
    a, b = str(assets["sd15"]["lora_a"]), str(assets["sd15"]["lora_b"])
    loras: list[list[dict[str, Any]]] = [[], [{"ref": a}], [{"ref": b, "weight": 0.5}], [{"ref": a}, {"ref": b}],
                                         [], [{"ref": b}], [{"ref": a, "weight": 0.3}], []]
    schedulers = ["dpmpp_2m_karras", "euler", "euler_a", "unipc", "ddim", "lcm", None, "euler_a"]
    sizes = [(64, 64), (72, 64), (64, 80), (64, 64), (96, 64), (64, 64), (80, 80), (64, 72)]
    reqs = [ImageRequest(prompt=f"cube {i}", width=w, height=h, seed=100 + i, scheduler=s, steps=3, loras=lo)
            for i, (s, (w, h), lo) in enumerate(zip(schedulers, sizes, loras, strict=True))]
    async with AsyncRouter([p], ledger=":memory:") as r:
        together = await asyncio.gather(*(r.agenerate(q) for q in reqs))
        alone = [await r.agenerate(q) for q in reqs]
    for t, s in zip(together, alone, strict=True):
        assert np.array_equal(pixels(t.images[0].data), pixels(s.images[0].data))
    assert len({pixels(t.images[0].data).tobytes() for t in together}) == len(reqs)


# --- Flux specifics, memory options, progress ---------------------------------------------


async def test_flux_seeds_reproduce_across_n_and_sizes_follow_its_multiple(
        assets: dict[str, dict[str, Path]]) -> None:
    p = make_provider(assets, "flux")
    req = ImageRequest(prompt="a cube", width=64, height=64, n=2, seed=40)
    many = await p.generate(req, "tiny-flux", timeout_s=60)
    alone = await p.generate(req.model_copy_validated(n=1, seed=41), "tiny-flux", timeout_s=60)
    assert np.abs(pixels(many.images[1].data) - pixels(alone.images[0].data)).max() <= 1
    assert p.capabilities("tiny-flux").sizes.multiple == 16
    async with AsyncRouter([p], ledger=":memory:") as r:
        with pytest.raises(NoRouteError, match="exact size"):
            await r.agenerate("a cube", width=72, height=72, size_mode="exact")
        adapted = await r.agenerate("a cube", width=72, height=72, steps=1)
    assert adapted.images[0].width % 16 == 0 and adapted.warnings


async def test_memory_options_keep_the_image(assets: dict[str, dict[str, Path]]) -> None:
    plain = make_provider(assets, "sd15")
    lean = make_provider(assets, "sd15", vae_slicing=True, attention_slicing=True, offload="model")
    tiled = make_provider(assets, "sd15", vae_tiling=True)
    a = await run(plain, n=2)
    b = await run(lean, n=2)
    await run(tiled)  # tiles blend at their seams (the tiny VAE's tile is 32 px), so only that it runs
    assert lean.worker.cache.base(lean.catalog.get("tiny-sd15")).vae.use_slicing
    assert tiled.worker.cache.base(tiled.catalog.get("tiny-sd15")).vae.use_tiling
    assert np.abs(a - b).max() <= 1  # offload applies on CUDA only; on CPU it is logged and skipped
    for p in (plain, lean, tiled):
        await p.aclose()


async def test_a_replacement_vae_is_loaded(assets: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(assets["sd15"]["model"] / "vae"), use_safetensors=True)
    with np.errstate(all="ignore"):
        for param in vae.decoder.conv_out.parameters():
            param.data.mul_(-1.0)
    vae.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    swapped = make_provider(assets, "sd15", vae=str(tmp_path / "vae"))
    plain = make_provider(assets, "sd15")
    assert not np.array_equal(await run(swapped), await run(plain))
    missing = make_provider(assets, "sd15", vae=str(tmp_path / "nope"))
    with pytest.raises(InvalidRequestError, match="VAE directory"):
        await run(missing)
    for p in (swapped, plain, missing):
        await p.aclose()


async def test_progress_events_reach_the_callback(assets: dict[str, dict[str, Path]]) -> None:
    p = make_provider(assets, "sd15")
    events: list[ProgressEvent] = []
    async with AsyncRouter([p], ledger=":memory:") as r:
        await r.agenerate("x", width=64, height=64, steps=4, on_progress=events.append)
        await r.agenerate("x", init_image=noise_png(64), strength=0.5, steps=4, on_progress=events.append)
        await r.agenerate("x", width=64, height=64, steps=2)  # no callback: nothing more arrives
    steps = [e for e in events if isinstance(e, ProgressEvent)]
    assert [(e.step, e.total) for e in steps] == [(1, 4), (2, 4), (3, 4), (4, 4), (1, 2), (2, 2)]
    assert steps[0].provider == "local" and steps[0].model == "tiny-sd15" and steps[3].fraction == 1.0


async def test_a_failing_progress_callback_does_not_fail_the_request(assets: dict[str, dict[str, Path]]) -> None:
    p = make_provider(assets, "sd15")

    def broken(event: ProgressEvent) -> None:
        raise RuntimeError("display gone")

    async with AsyncRouter([p], ledger=":memory:") as r:
        res = await r.agenerate("x", width=64, height=64, steps=2, on_progress=broken)
    assert res.images


def test_capabilities_follow_the_catalog(assets: dict[str, dict[str, Path]]) -> None:
    caps = make_provider(assets, "sdxl").capabilities("tiny-sdxl")
    assert "control" in caps.tasks and caps.control_kinds == {"canny", "depth"} and caps.max_controls == 2
    assert caps.max_loras == 4
    bare = LocalProvider({"m": {"path": "/m", "family": "sd15"}}, device="cpu").capabilities("m")
    assert "control" not in bare.tasks and not bare.control_kinds


async def test_bad_local_options_are_typed_errors(assets: dict[str, dict[str, Path]]) -> None:
    p = make_provider(assets, "sd15")
    for options in ({"mask_blur": "soft"}, {"canny_low": -1}, {"padding_mask_crop": 1.5}):
        with pytest.raises(InvalidRequestError, match=f"provider_options.local.{next(iter(options))}"):
            await run(p, controls=[canny(64)], provider_options={"local": options})
    await p.aclose()


def test_options_that_do_not_apply_are_named_in_the_warnings(assets: dict[str, dict[str, Path]]) -> None:
    p = make_provider(assets, "sd15")
    req = ImageRequest(prompt="x", width=64, height=64, provider_options={"local": {"mask_blur": 4, "canny_low": 50}})
    warnings = p.plan(req, "tiny-sd15").warnings
    assert any("mask_blur ignored" in w for w in warnings) and any("canny_low ignored" in w for w in warnings)
    used = req.model_copy_validated(init_image=noise_png(64), mask_image=half_mask(64, 64), controls=[canny(64)])
    assert not p.plan(used, "tiny-sd15").warnings


def test_a_float16_vae_that_upcasts_is_pointed_out(assets: dict[str, dict[str, Path]],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from providers.local import ModelEntry
    from providers.local.pipelines import PipelineCache

    entry = ModelEntry.from_dict("xl", {"path": str(assets["sdxl"]["model"]), "family": "sdxl"})
    with caplog.at_level("INFO", logger="imagerouter"):
        PipelineCache("cpu", dtype=torch.float16).base(entry)
    assert "fp16-fix VAE" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="imagerouter"):
        PipelineCache("cpu").base(entry)  # float32: nothing to say
    assert "fp16-fix" not in caplog.text
