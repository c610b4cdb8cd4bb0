"""CLIP score, FID and KID (router.quality) on tiny random-weight models built from config on the CPU."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
from pathlib import Path
from typing import Any, cast

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("torchmetrics")

import numpy as np
import torch
from PIL import Image

from router.errors import ConfigurationError, RequestValidationError
from router.quality import (
    ClipScorer,
    aclip_score,
    batch_metrics,
    clip_score,
    clip_scorer,
    feature_extractor,
)
from tests.quality_models import build_tiny_clip, build_tiny_resnet, write_test_images

PROMPTS = ["a red apple", "a photo of a bench", "two dogs on a sofa", "a blue cube left of a green ball",
           "a sign that says SALE", "an oil painting of a lighthouse at dusk"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_resnet(tmp_path_factory.mktemp("resnet"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Image.Image]:
    folder = write_test_images(tmp_path_factory.mktemp("imgs"), len(PROMPTS), seed=3)
    return [Image.open(p).convert("RGB") for p in sorted(folder.iterdir())]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test (nothing may reach for a download)."""
    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"a connection was attempted to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


class _Transformers4Api(torch.nn.Module):
    """torchmetrics 1.9 expects transformers 4's ``get_*_features`` (a tensor); transformers 5 returns a
    model output carrying it in ``pooler_output``. This shim only unwraps that; the weights are the same."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.inner = model
        self.config = model.config

    def get_image_features(self, pixel_values: Any) -> Any:
        return self.inner.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids: Any, attention_mask: Any) -> Any:
        return self.inner.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _torchmetrics_scores(clip_dir: Path, images: list[Image.Image], prompts: list[str]) -> list[float]:
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(clip_dir), local_files_only=True)
    out = []
    for image, prompt in zip(images, prompts, strict=True):  # one pair per metric: its per-image score
        metric = CLIPScore(model_name_or_path=lambda: (cast(Any, _Transformers4Api(model)), processor))
        metric.update(torch.from_numpy(np.array(image)).permute(2, 0, 1), prompt)
        out.append(float(metric.compute()))
    return out


def test_clip_score_equals_torchmetrics_clipscore_on_the_same_weights(clip_dir: Path,
                                                                      images: list[Image.Image]) -> None:
    ours = clip_score(images, PROMPTS, clip=clip_dir)
    reference = _torchmetrics_scores(clip_dir, images, PROMPTS)
    assert len(ours) == len(PROMPTS)
    assert ours == pytest.approx(reference, abs=1e-4)
    assert any(s > 0 for s in ours)


def test_clip_score_equals_the_formula_on_clipmodel_forward(clip_dir: Path, images: list[Image.Image]) -> None:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(clip_dir), local_files_only=True)
    inputs = processor(text=PROMPTS, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cosine = out.logits_per_image.diagonal() / model.logit_scale.exp()
    expected = (100 * cosine).clamp(min=0).tolist()
    assert clip_score(images, PROMPTS, clip=clip_dir) == pytest.approx(expected, abs=1e-4)


def test_a_negative_cosine_scores_zero(clip_dir: Path, images: list[Image.Image], tmp_path: Path) -> None:
    import shutil

    from transformers import CLIPModel

    flipped = tmp_path / "flipped"  # the same CLIP with the text projection negated: every cosine changes sign
    model = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True)
    with torch.no_grad():
        model.text_projection.weight.neg_()
    model.save_pretrained(flipped, safe_serialization=True)
    for f in clip_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, flipped / f.name)
    ours = clip_score(images, PROMPTS, clip=clip_dir)
    theirs = clip_score(images, PROMPTS, clip=flipped)
    for a, b in zip(ours, theirs, strict=True):
        assert min(a, b) == 0.0 and max(a, b) > 0.0


def test_batches_of_any_size_give_the_same_scores(clip_dir: Path, images: list[Image.Image]) -> None:
    whole = ClipScorer(clip_dir, batch_size=16).score(images, PROMPTS)
    in_twos = ClipScorer(clip_dir, batch_size=2).score(images, PROMPTS)
    one_by_one = [ClipScorer(clip_dir, batch_size=1).score([i], [p])[0] for i, p in zip(images, PROMPTS, strict=True)]
    assert in_twos == pytest.approx(whole, abs=1e-4)
    assert one_by_one == pytest.approx(whole, abs=1e-4)


def test_images_may_be_bytes_paths_or_pil(clip_dir: Path, images: list[Image.Image], tmp_path: Path) -> None:
    buf = io.BytesIO()
    images[0].save(buf, format="PNG")
    path = tmp_path / "one.png"
    images[0].save(path)
    scores = clip_score([images[0], buf.getvalue(), path, str(path)], "a red apple", clip=clip_dir)
    assert scores == pytest.approx([scores[0]] * 4, abs=1e-5)


def test_one_prompt_per_image_or_the_call_is_refused(clip_dir: Path, images: list[Image.Image]) -> None:
    with pytest.raises(RequestValidationError, match="one prompt per image"):
        clip_score(images[:3], ["a", "b"], clip=clip_dir)


def test_the_scorer_is_loaded_once_per_path(clip_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_clip(tmp_path / "other", seed=1)
    assert clip_scorer(clip_dir) is clip_scorer(str(clip_dir))
    assert clip_scorer(other) is not clip_scorer(clip_dir)


async def test_the_async_api_scores_in_a_worker_thread(clip_dir: Path, images: list[Image.Image]) -> None:
    scorer = clip_scorer(clip_dir)
    threads: list[int] = []
    forward = scorer.model.get_image_features

    def recording(*args: Any, **kw: Any) -> Any:
        threads.append(threading.get_ident())
        return forward(*args, **kw)

    scorer.model.get_image_features = recording
    try:
        scores = await aclip_score(images, PROMPTS, clip=clip_dir)
    finally:
        del scorer.model.get_image_features
    assert threads and threading.get_ident() not in threads
    assert scores == pytest.approx(clip_score(images, PROMPTS, clip=clip_dir), abs=1e-5)
    assert asyncio.get_running_loop().is_running()


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("clip", [None, "", "openai/clip-vit-base-patch32"])
def test_no_clip_weights_is_a_clear_error_not_a_download(clip: str | None) -> None:
    with pytest.raises(ConfigurationError, match="local CLIP model directory") as info:
        clip_score([Image.new("RGB", (8, 8))], "x", clip=clip)
    assert "nothing is downloaded" in str(info.value)


@pytest.mark.usefixtures("no_network")
def test_pickled_clip_weights_are_refused_before_loading(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not-a-real-pickle.")
    with pytest.raises(ConfigurationError, match="pickled weights are never loaded"):
        ClipScorer(tmp_path)


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("features", [None, "google/inception_v3"])
def test_no_feature_extractor_weights_is_a_clear_error_not_a_download(features: str | None, tmp_path: Path) -> None:
    gen = write_test_images(tmp_path / "gen", 3)
    with pytest.raises(ConfigurationError, match="local Hugging Face vision model directory"):
        batch_metrics(gen, gen, features=features)


def test_fid_and_kid_of_a_folder_against_itself_are_zero(resnet_dir: Path, tmp_path: Path) -> None:
    folder = write_test_images(tmp_path / "ref", 24, seed=5)
    m = batch_metrics(folder, folder, features=resnet_dir, kid_subsets=20, kid_subset_size=12)
    assert (m.n_generated, m.n_reference, m.kid_subset_size) == (24, 24, 12)
    assert m.fid == pytest.approx(0.0, abs=1e-6)
    assert abs(m.kid_mean) < 2 * m.kid_std  # KID is unbiased: at this sample size it is 0 within its spread


def test_fid_and_kid_grow_with_added_noise(resnet_dir: Path, tmp_path: Path) -> None:
    ref = write_test_images(tmp_path / "ref", 24, seed=5)
    results = []
    for noise in (0.0, 0.05, 0.15, 0.4):
        noised = write_test_images(tmp_path / f"noise-{noise}", 24, seed=5, noise=noise)
        results.append(batch_metrics(noised, ref, features=resnet_dir, kid_subsets=20, kid_subset_size=12))
    fids = [m.fid for m in results]
    kids = [m.kid_mean for m in results]
    assert fids == sorted(fids) and fids[0] < 1e-6 < fids[1]
    assert kids == sorted(kids) and kids[-1] > 0


def test_fid_equals_torchmetrics_with_the_extractor_as_its_feature_module(resnet_dir: Path, tmp_path: Path) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    ref = write_test_images(tmp_path / "ref", 12, seed=1)
    gen = write_test_images(tmp_path / "gen", 12, seed=2, noise=0.1)
    extractor = feature_extractor(resnet_dir)

    class Features(torch.nn.Module):
        num_features = 16

        def forward(self, pixels: Any) -> Any:
            return extractor._forward(pixels)

    metric = FrechetInceptionDistance(feature=Features())
    for folder, real in ((ref, True), (gen, False)):
        pil = [Image.open(p).convert("RGB") for p in sorted(folder.iterdir())]
        metric.update(extractor.processor(images=pil, return_tensors="pt")["pixel_values"], real=real)
    assert batch_metrics(gen, ref, features=resnet_dir, kid_subsets=5).fid == pytest.approx(float(metric.compute()),
                                                                                            rel=1e-4)


def test_a_folder_with_fewer_than_two_images_is_refused(resnet_dir: Path, tmp_path: Path) -> None:
    one = write_test_images(tmp_path / "one", 1)
    many = write_test_images(tmp_path / "many", 4)
    with pytest.raises(RequestValidationError, match="generated"):
        batch_metrics(one, many, features=resnet_dir)


async def test_a_result_scores_its_images_against_the_prompt_it_was_made_for(clip_dir: Path) -> None:
    from providers.sandbox import OpenAISandbox
    from router.quality import clip_score
    from tests.conftest import make_router
    from tests.test_router_openai import provider

    with OpenAISandbox(api_key="sk-sandbox-primary") as sb:
        async with make_router(provider(sb)) as router:
            result = await router.agenerate("a red fox in the snow", n=2)
    want = clip_score(result.images, "a red fox in the snow", clip=clip_dir)
    assert result.score(clip=clip_dir) == want and await result.ascore(clip=clip_dir) == want
    assert result.score(clip=clip_dir, prompt="a blue car") == clip_score(result.images, "a blue car", clip=clip_dir)
