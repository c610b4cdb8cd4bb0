"""Control preprocessors: each ControlNet kind's map made by the detector it was trained on, from local
weights only (tiny random-weight detectors written to disk here), and a seeded content shuffle."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import numpy as np
from PIL import Image, ImageDraw

from providers.local.catalog import Catalog
from providers.local.controls import DetectorNotConfigured, content_shuffle, control_map
from providers.local.detectors import ADE20K_PALETTE, ARCHS, DetectorError, Detectors, _aux
from router import CatalogError, ImageRequest

SIDE = 64


def shapes(side: int = SIDE) -> Image.Image:
    img = Image.new("RGB", (side, side), (20, 20, 20))
    draw = ImageDraw.Draw(img)
    draw.rectangle([side // 4, side // 4, 3 * side // 4, side // 2], fill=(230, 230, 230))
    draw.ellipse([side // 8, side // 2, side // 2, 7 * side // 8], fill=(120, 60, 200))
    return img


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


# --- tiny detectors on disk ----------------------------------------------------------------


def tiny_dpt(directory: Path, seed: int = 0) -> Path:
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    config = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16,
                       backbone_out_indices=[0, 1, 2, 3])
    DPTForDepthEstimation(config).save_pretrained(directory)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(directory)
    return directory


def tiny_segformer(directory: Path, seed: int = 0) -> Path:
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(seed)
    config = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                             patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                             decoder_hidden_size=16)
    config.num_labels = 150  # ADE20K's classes
    SegformerForSemanticSegmentation(config).save_pretrained(directory)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def aux_weights(path: Path, arch: str, seed: int = 0, *, cmu_names: bool = False) -> Path:
    """A random-init controlnet-aux detector network's state dict, saved as ``.safetensors``."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    net = {"hed": lambda: _aux("hed").ControlNetHED_Apache2(), "pidinet": lambda: _aux("pidi.model").pidinet(),
           "lineart": lambda: _aux("lineart").Generator(3, 1, 3),
           "openpose": lambda: (_aux("open_pose.util"), _aux("open_pose.body").bodypose_model())[1]}[arch]()
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if cmu_names:  # the published body_pose_model names layers without their block ("model0.conv1_1" → "conv1_1")
        state = {k.split(".", 1)[1]: v for k, v in state.items()}
    if arch == "pidinet":  # table5_pidinet was saved from DataParallel
        state = {f"module.{k}": v for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detectors")
    return {
        "dpt": tiny_dpt(root / "dpt"), "seg": tiny_segformer(root / "seg"),
        "hed": aux_weights(root / "hed.safetensors", "hed"), "hed2": aux_weights(root / "hed2.safetensors", "hed", 1),
        "pidinet": aux_weights(root / "pidinet.safetensors", "pidinet"),
        "lineart": aux_weights(root / "lineart.safetensors", "lineart"),
        "openpose": aux_weights(root / "openpose.safetensors", "openpose", cmu_names=True),
    }


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def detectors(weights: dict[str, Path], **extra: Any) -> Detectors:
    return Detectors.from_dict({
        "depth": str(weights["dpt"]), "normal": str(weights["dpt"]), "seg": str(weights["seg"]),
        "softedge": {"path": str(weights["hed"]), "resolution": SIDE},
        "scribble": {"path": str(weights["pidinet"]), "arch": "pidinet", "resolution": SIDE},
        "lineart": {"path": str(weights["lineart"]), "resolution": SIDE},
        "pose": {"path": str(weights["openpose"]), "resolution": SIDE}} | extra)


# --- the catalog and the error without a detector ----------------------------------------------


def test_the_catalog_reads_a_detectors_section() -> None:
    cat = Catalog.from_dict({"models": {"m": {"path": "/models/m"}},
                             "detectors": {"depth": "/d/dpt", "scribble": {"path": "/d/p.safetensors",
                                                                           "arch": "PiDiNet", "resolution": 256}}})
    assert cat.names() == ["m"] and set(cat.detectors.entries) == {"depth", "scribble"}
    assert cat.detectors.entries["depth"].arch == "dpt"
    assert (cat.detectors.entries["scribble"].arch, cat.detectors.entries["scribble"].resolution) == ("pidinet", 256)
    flat = Catalog.from_dict({"m": {"path": "/models/m"}, "detectors": {"pose": "/d/body.safetensors"}})
    assert flat.names() == ["m"] and "pose" in flat.detectors
    assert len(Catalog.from_dict({"m": {"path": "/models/m"}}).detectors) == 0


@pytest.mark.parametrize(("section", "message"), [
    ({"mlsd": "/d/x"}, "no detector for control kind 'mlsd'"),
    ({"softedge": {"path": "/d/x", "arch": "canny"}}, "arch must be one of hed, pidinet"),
    ({"depth": {"path": "/d/x", "size": 3}}, "unknown keys"),
    ({"depth": {"arch": "dpt"}}, "'path'"),
    ({"pose": {"path": "/d/x", "resolution": 10}}, "resolution must be"),
    (["depth"], "must map control kinds"),
])
def test_a_bad_detectors_section_is_a_catalog_error(section: Any, message: str) -> None:
    with pytest.raises(CatalogError, match=message):
        Catalog.from_dict({"models": {"m": {"path": "/models/m"}}, "detectors": section})


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_without_a_detector_the_error_names_the_catalog_key(kind: str) -> None:
    for given in (None, Detectors()):
        with pytest.raises(DetectorNotConfigured, match=f"set detectors.{kind} in the local model catalog") as info:
            control_map(shapes(), kind, (SIDE, SIDE), detectors=given)
        assert info.value.code == "detector_not_configured" and "preprocess=False" in info.value.message
    assert np.array_equal(arr(control_map(shapes(), kind, (SIDE, SIDE), preprocess=False)), arr(shapes()))


def test_kinds_without_a_supported_detector_say_to_pass_the_map() -> None:
    for kind in ("mlsd", "lineart_anime"):
        with pytest.raises(DetectorNotConfigured, match=r"no detector for it is supported here.*preprocess=False"):
            control_map(shapes(), kind, (SIDE, SIDE))


# --- shuffle -----------------------------------------------------------------------------


def test_shuffle_moves_content_the_same_way_for_the_same_seed() -> None:
    img = shapes(96)
    a, b = arr(control_map(img, "shuffle", (96, 96), seed=3)), arr(control_map(img, "shuffle", (96, 96), seed=3))
    other = arr(control_map(img, "shuffle", (96, 96), seed=4))
    assert np.array_equal(a, b)
    assert np.abs(a - arr(img)).mean() > 10 and np.abs(a - other).mean() > 10
    # a remap only samples the picture: values stay within its range, and a flat picture stays flat
    assert a.min() >= arr(img).min() and a.max() <= arr(img).max()
    flat = Image.new("RGB", (40, 24), (9, 99, 199))
    assert np.array_equal(arr(content_shuffle(flat, 0)), arr(flat))


# --- transformers detectors: depth, normal, seg --------------------------------------------


def test_depth_is_the_midas_map_the_transformers_pipeline_makes(weights: dict[str, Path]) -> None:
    from transformers import pipeline

    img = shapes(80)
    ours = arr(control_map(img, "depth", (80, 80), detectors=detectors(weights)))
    reference = pipeline("depth-estimation", model=str(weights["dpt"]), device="cpu")(img)["depth"]
    assert ours.shape == (80, 80, 3) and np.array_equal(ours[..., 0], ours[..., 2])
    assert np.abs(ours[..., 0] - arr(reference)).max() <= 1
    assert ours.min() == 0 and ours.max() == 255


def test_normals_are_derived_from_depth_as_controlnet_aux_does(weights: dict[str, Path]) -> None:
    import cv2
    from transformers import pipeline

    img = shapes(80)
    ours = arr(control_map(img, "normal", (80, 80), detectors=detectors(weights))).astype(np.float64)
    depth = pipeline("depth-estimation", model=str(weights["dpt"]), device="cpu")(img)["predicted_depth"]
    depth = depth.numpy().astype(np.float32)
    near = (depth - depth.min()) / (depth.max() - depth.min())
    x, y = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    x[near < 0.1], y[near < 0.1] = 0, 0
    n = np.stack([x, y, np.full_like(x, 2 * np.pi)], axis=2)
    n /= np.linalg.norm(n, axis=2, keepdims=True)
    expected = (n * 127.5 + 127.5).clip(0, 255).astype(np.uint8)[:, :, ::-1]
    assert np.abs(ours - expected).max() <= 1
    assert tuple(ours[np.unravel_index(np.argmin(depth), depth.shape)]) == (255, 127, 127)  # background: facing


def test_segmentation_paints_ade20k_classes(weights: dict[str, Path]) -> None:
    import torch
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    img = shapes(72)
    ours = np.asarray(control_map(img, "seg", (72, 72), detectors=detectors(weights)))
    processor = AutoImageProcessor.from_pretrained(str(weights["seg"]))
    model = AutoModelForSemanticSegmentation.from_pretrained(str(weights["seg"])).eval()
    with torch.no_grad():
        logits = model(**processor(images=img, return_tensors="pt")).logits
    labels = torch.nn.functional.interpolate(logits, size=(72, 72), mode="bilinear", align_corners=False)
    palette = np.asarray(ADE20K_PALETTE, dtype=np.uint8).reshape(-1, 3)
    assert palette.shape == (150, 3) and tuple(palette[0]) == (120, 120, 120)  # class 0, wall
    assert np.array_equal(ours, palette[labels.argmax(1)[0].numpy()])


# --- controlnet-aux detectors: HED, PiDiNet, lineart, OpenPose -----------------------------------


def test_soft_edges_scribbles_and_lineart_come_from_their_networks(weights: dict[str, Path]) -> None:
    det = detectors(weights)
    img = shapes()
    soft = arr(control_map(img, "softedge", (SIDE, SIDE), detectors=det))
    scribble = arr(control_map(img, "scribble", (SIDE, SIDE), detectors=det))
    lineart = arr(control_map(img, "lineart", (SIDE, SIDE), detectors=det))
    for m in (soft, scribble, lineart):
        assert m.shape == (SIDE, SIDE, 3) and np.array_equal(m[..., 0], m[..., 1])
    assert len(np.unique(soft)) > 16  # soft: a grey-level edge probability, not a binary edge map
    assert set(np.unique(scribble)) <= {0, 255}  # scribble: thresholded after NMS, as controlnet-aux does
    assert np.array_equal(soft, arr(control_map(img, "softedge", (SIDE, SIDE), detectors=det)))
    other = detectors(weights, softedge={"path": str(weights["hed2"]), "resolution": SIDE})
    assert np.abs(soft - arr(control_map(img, "softedge", (SIDE, SIDE), detectors=other))).max() > 0
    pidinet_soft = detectors(weights, softedge={"path": str(weights["pidinet"]), "arch": "pidinet",
                                                 "resolution": SIDE})
    assert np.abs(soft - arr(control_map(img, "softedge", (SIDE, SIDE), detectors=pidinet_soft))).max() > 0
    assert "controlnet_aux" not in sys.modules  # the public package (and its torchvision imports) untouched


def test_openpose_loads_the_cmu_checkpoint_names_and_draws_on_black(weights: dict[str, Path]) -> None:
    det = detectors(weights)
    pose = arr(control_map(shapes(), "pose", (SIDE, SIDE), detectors=det))
    assert pose.shape == (SIDE, SIDE, 3)
    assert pose.max() == 0  # random weights find no body part above OpenPose's 0.1 threshold: an empty canvas
    assert det.loads() == 1


def test_a_detector_is_loaded_once_for_concurrent_requests(weights: dict[str, Path]) -> None:
    det = detectors(weights)
    maps: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: maps.append(arr(det.detect("depth", shapes())))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert det.loads() == 1 and len(maps) == 4 and all(np.array_equal(m, maps[0]) for m in maps)
    det.detect("normal", shapes())  # normal uses the same DPT directory: no second load
    assert det.loads() == 1


def test_pickled_missing_and_mismatched_weights_are_refused(tmp_path: Path, weights: dict[str, Path]) -> None:
    pickled = tmp_path / "ControlNetHED.pth"
    pickled.write_bytes(b"\x80\x04not-a-real-pickle.")
    binary_dir = tmp_path / "dpt-bin"
    binary_dir.mkdir()
    (binary_dir / "config.json").write_text("{}")
    (binary_dir / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    cases = {
        ("softedge", str(pickled)): "unsafe_checkpoint",
        ("depth", str(binary_dir)): "unsafe_checkpoint",
        ("lineart", str(tmp_path / "missing.safetensors")): "model_not_available",
        ("seg", str(tmp_path / "nowhere")): "model_not_available",
        ("lineart", str(weights["hed"])): "invalid_detector",  # HED weights are not a lineart generator
    }
    for (kind, path), code in cases.items():
        with pytest.raises(DetectorError, match=f"detectors.{kind}") as info:
            control_map(shapes(), kind, (SIDE, SIDE), detectors=Detectors.from_dict({kind: path}))
        assert info.value.code == code, (kind, path)


def test_a_catalog_with_detectors_imports_no_model_library() -> None:
    code = ("import sys, router; from providers.local.catalog import Catalog; "
            "c = Catalog.from_dict({'m': {'path': '/m'}, 'detectors': {'depth': '/d', 'pose': '/p.safetensors'}}); "
            "print(sorted(m for m in ('torch', 'transformers', 'controlnet_aux', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


# --- through the local provider ----------------------------------------------------------


async def test_a_depth_control_from_a_photo_runs_through_the_provider(weights: dict[str, Path],
                                                                      sd15_dir: Path) -> None:
    from providers.local import LocalProvider
    from tests.local_models import build_controlnet

    cn = build_controlnet(sd15_dir.parent / "cn-depth-controls", "sd15", seed=5)
    catalog = {"models": {"tiny": {"path": str(sd15_dir), "family": "sd15", "native": [SIDE, SIDE], "min_side": 32,
                                   "steps": 2, "controlnets": {"depth": str(cn)}}},
               "detectors": {"depth": str(weights["dpt"])}}
    p = LocalProvider(catalog, device="cpu")
    buf = io.BytesIO()
    shapes().save(buf, format="PNG")
    photo = {"kind": "depth", "image": buf.getvalue()}

    async def run(control: dict[str, Any]) -> np.ndarray:
        req = ImageRequest(prompt="a cube", width=SIDE, height=SIDE, seed=7, controls=[control])
        res = await p.generate(req, "tiny", timeout_s=120)
        return arr(Image.open(io.BytesIO(res.images[0].data)).convert("RGB"))

    depth_map = control_map(shapes(), "depth", (SIDE, SIDE), detectors=detectors(weights))
    buf = io.BytesIO()
    depth_map.save(buf, format="PNG")
    from_photo = await run(photo)
    from_map = await run({"kind": "depth", "image": buf.getvalue(), "preprocess": False})
    await p.aclose()
    assert np.abs(from_photo - from_map).max() <= 1  # the provider made the same map the detector makes
    assert p.catalog.detectors.loads() == 1
