"""Image quality you can measure: CLIP score against the prompt, FID and KID between folders.

Everything here needs the ``quality`` extra (``pip install 'pixroute[quality]'``: torch,
transformers, torchmetrics) and weights the user already has on disk. Nothing is downloaded:
models load with ``local_files_only=True`` and from safetensors only, and a missing or wrong
path is a :class:`~router.errors.ConfigurationError` that says what to provide.

CLIP score follows the standard definition (Hessel et al. 2021, as torchmetrics' ``CLIPScore``):
``100 × max(cos(image embedding, text embedding), 0)`` per image, reported per image::

    from router.quality import clip_score
    scores = clip_score(images, prompts, clip="/models/clip-vit-base-patch32")

:class:`ClipScorer` holds one loaded model; :func:`clip_scorer` caches one per (path, device), and
:meth:`ClipScorer.ascore` / :func:`aclip_score` run the model in a worker thread so the event loop
keeps serving. FID and KID use torchmetrics' implementations with a feature extractor the user
gives as a local Hugging Face vision model directory (any model with a pooled output, a CLIP model
included), computing each image's features once for both metrics.
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from router.errors import ConfigurationError, RequestValidationError

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "IMAGE_SUFFIXES",
    "BatchMetrics",
    "ClipScorer",
    "FeatureExtractor",
    "aclip_score",
    "batch_metrics",
    "clip_score",
    "clip_scorer",
    "feature_extractor",
    "fid",
    "kid",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
_EXTRA = "install the quality extra: pip install 'pixroute[quality]'"
_CLIP_HINT = ("give the path of a local CLIP model directory (config.json, model.safetensors, the tokenizer and "
              "preprocessor files, e.g. from `hf download openai/clip-vit-base-patch32 --local-dir DIR`); "
              "nothing is downloaded at run time")
_FEATURES_HINT = ("give the path of a local Hugging Face vision model directory to extract features with "
                  "(config.json, model.safetensors, preprocessor_config.json; a CLIP or a ResNet model, e.g. "
                  "`hf download openai/clip-vit-base-patch32 --local-dir DIR`); nothing is downloaded at run time")

ImageLike = Any
"""A PIL image, encoded bytes, a file path, or an object with ``to_pil()`` (a ``GeneratedImage``)."""


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigurationError(f"quality metrics need {', '.join(missing)}: {_EXTRA}")


def _model_dir(path: str | os.PathLike[str] | None, field: str, hint: str) -> Path:
    """The local model directory ``path`` names, checked before anything loads (safetensors weights only)."""
    if path is None or not str(path).strip():
        raise ConfigurationError(f"no {field} weights are configured: {hint}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigurationError(f"{field}={str(path)!r} is not a local directory: {hint}")
    if not (p / "config.json").is_file():
        raise ConfigurationError(f"{field}={str(p)!r} has no config.json: {hint}")
    if not any(p.glob("*.safetensors")):
        pickled = [f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        found = f" (found {', '.join(sorted(pickled))}: pickled weights are never loaded)" if pickled else ""
        raise ConfigurationError(f"{field}={str(p)!r} has no .safetensors weights{found}: {hint}")
    return p.resolve()


def _to_pil(image: ImageLike) -> PILImage.Image:
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = image
    elif hasattr(image, "to_pil"):
        pil = image.to_pil()
    elif isinstance(image, bytes | bytearray | memoryview):
        pil = Image.open(io.BytesIO(bytes(image)))
    elif isinstance(image, str | os.PathLike):
        with Image.open(image) as opened:
            pil = opened.copy()
    else:
        raise RequestValidationError([("images", f"{type(image).__name__} is not an image: give PIL images, "
                                                 "encoded bytes, file paths or GeneratedImage objects")])
    return pil.convert("RGB")


def _batches(n: int, size: int) -> Iterable[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def _pooled(output: Any) -> Any:
    """A ``get_*_features`` result as a tensor (transformers 5 returns a model output carrying it)."""
    return output if hasattr(output, "norm") else output.pooler_output


# --- CLIP score -------------------------------------------------------------------------------


class ClipScorer:
    """One CLIP model loaded from a local directory, scoring images against their prompts.

    ``path``: a transformers CLIP directory (safetensors weights, tokenizer and image processor);
    ``device``: where the model runs (``"cpu"``, ``"cuda"``); ``batch_size``: image–prompt pairs per
    forward pass. Thread-safe: one forward pass at a time per scorer.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, device: str = "cpu", batch_size: int = 16) -> None:
        self.path = _model_dir(path, "clip", _CLIP_HINT)
        if batch_size < 1:
            raise RequestValidationError([("batch_size", "use 1 or more")])
        _require("torch", "transformers")
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(str(self.path), local_files_only=True, use_safetensors=True)
            self.processor = CLIPProcessor.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigurationError(f"clip={str(self.path)!r} could not be loaded as a CLIP model "
                                     f"({type(exc).__name__}: {exc}): {_CLIP_HINT}") from None
        self.model.eval().to(device)
        self.device = device
        self.batch_size = batch_size
        self.max_tokens = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        self._lock = threading.Lock()

    def score(self, images: Sequence[ImageLike], prompts: Sequence[str] | str) -> list[float]:
        """The CLIP score of each image against its prompt (one prompt for all, or one per image)."""
        prompt_list = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompt_list) != len(images):
            raise RequestValidationError([("prompts", f"give one prompt per image ({len(images)} images, "
                                                      f"{len(prompt_list)} prompts) or a single prompt")])
        import torch

        scores: list[float] = []
        with self._lock, torch.inference_mode():
            for batch in _batches(len(images), self.batch_size):
                pil = [_to_pil(images[i]) for i in batch]
                text = self.processor.tokenizer([prompt_list[i] for i in batch], padding=True, truncation=True,
                                                max_length=self.max_tokens, return_tensors="pt")
                pixels = self.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
                image_emb = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device)))
                text_emb = _pooled(self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                                attention_mask=text["attention_mask"].to(self.device)))
                cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
                scores.extend(float(s) for s in (100.0 * cos).clamp(min=0.0).cpu())
        return scores

    async def ascore(self, images: Sequence[ImageLike], prompts: Sequence[str] | str) -> list[float]:
        """:meth:`score` in a worker thread: the event loop keeps running while the model does."""
        return await asyncio.to_thread(self.score, images, prompts)


_scorers: dict[tuple[Path, str, int], ClipScorer] = {}
_scorers_lock = threading.Lock()


def clip_scorer(clip: str | os.PathLike[str] | None, *, device: str = "cpu", batch_size: int = 16) -> ClipScorer:
    """The :class:`ClipScorer` for ``clip`` on ``device``, loaded once per process and then reused."""
    path = _model_dir(clip, "clip", _CLIP_HINT)
    key = (path, device, batch_size)
    with _scorers_lock:
        scorer = _scorers.get(key)
        if scorer is None:
            scorer = _scorers[key] = ClipScorer(path, device=device, batch_size=batch_size)
        return scorer


def clip_score(images: Sequence[ImageLike], prompts: Sequence[str] | str, *, clip: str | os.PathLike[str] | None,
               device: str = "cpu", batch_size: int = 16) -> list[float]:
    """The CLIP score (0–100) of each image against its prompt, with the local CLIP model at ``clip``."""
    return clip_scorer(clip, device=device, batch_size=batch_size).score(images, prompts)


async def aclip_score(images: Sequence[ImageLike], prompts: Sequence[str] | str, *,
                      clip: str | os.PathLike[str] | None, device: str = "cpu", batch_size: int = 16) -> list[float]:
    """:func:`clip_score` off the event loop (loading and scoring both run in a worker thread)."""
    scorer = await asyncio.to_thread(clip_scorer, clip, device=device, batch_size=batch_size)
    return await scorer.ascore(images, prompts)


# --- FID and KID ------------------------------------------------------------------------------


class FeatureExtractor:
    """A local Hugging Face vision model that turns images into one feature vector each.

    The features are the model's pooled output (a CLIP model's image embedding; a ResNet's pooled
    last stage; otherwise the mean of the last hidden state), flattened.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, device: str = "cpu", batch_size: int = 32) -> None:
        self.path = _model_dir(path, "features", _FEATURES_HINT)
        _require("torch", "transformers", "torchmetrics")
        from transformers import AutoImageProcessor, AutoModel

        try:
            self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True, use_safetensors=True)
            self.processor = AutoImageProcessor.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigurationError(f"features={str(self.path)!r} could not be loaded as a vision model with an "
                                     f"image processor ({type(exc).__name__}: {exc}): {_FEATURES_HINT}") from None
        self.model.eval().to(device)
        self.device = device
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def _forward(self, pixels: Any) -> Any:
        if hasattr(self.model, "get_image_features"):
            return _pooled(self.model.get_image_features(pixel_values=pixels))
        out = self.model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            hidden = out.last_hidden_state
            pooled = hidden.mean(dim=1) if hidden.dim() == 3 else hidden.mean(dim=(2, 3))
        return pooled.flatten(1)

    def features(self, images: Sequence[ImageLike]) -> Any:
        """A float64 tensor ``[len(images), dim]`` of the images' features."""
        import torch

        chunks = []
        with self._lock, torch.inference_mode():
            for batch in _batches(len(images), self.batch_size):
                pixels = self.processor(images=[_to_pil(images[i]) for i in batch], return_tensors="pt")
                chunks.append(self._forward(pixels["pixel_values"].to(self.device)).double().cpu())
        return torch.cat(chunks) if chunks else torch.zeros((0, 0), dtype=torch.float64)


_extractors: dict[tuple[Path, str], FeatureExtractor] = {}


def feature_extractor(features: str | os.PathLike[str] | None, *, device: str = "cpu") -> FeatureExtractor:
    """The :class:`FeatureExtractor` for ``features`` on ``device``, loaded once per process."""
    path = _model_dir(features, "features", _FEATURES_HINT)
    with _scorers_lock:
        extractor = _extractors.get((path, device))
        if extractor is None:
            extractor = _extractors[(path, device)] = FeatureExtractor(path, device=device)
        return extractor


@dataclass(frozen=True)
class BatchMetrics:
    """FID and KID between generated and reference images (lower is closer; 0 for the same images)."""

    fid: float
    kid_mean: float
    kid_std: float
    n_generated: int
    n_reference: int
    kid_subset_size: int
    features: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _folder_images(folder: str | os.PathLike[str], field: str) -> list[Path]:
    p = Path(folder)
    if not p.is_dir():
        raise RequestValidationError([(field, f"{str(folder)!r} is not a directory of images")])
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if len(files) < 2:
        raise RequestValidationError([(field, f"{str(folder)!r} holds {len(files)} images "
                                              f"({', '.join(sorted(IMAGE_SUFFIXES))}); FID and KID need 2 or more")])
    return files


class _Identity:
    """Stands in for torchmetrics' Inception: the features are computed beforehand, once for both metrics."""

    @staticmethod
    def module(dim: int) -> Any:
        import torch

        class Precomputed(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.num_features = dim

            def forward(self, x: Any) -> Any:
                return x

        return Precomputed()


def _metrics_from_features(real: Any, fake: Any, *, subset_size: int | None, subsets: int, seed: int,
                           features: str) -> BatchMetrics:
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    dim = int(real.shape[1])
    fid_metric = FrechetInceptionDistance(feature=_Identity.module(dim), reset_real_features=True)
    fid_metric.update(real, real=True)
    fid_metric.update(fake, real=False)
    fid_value = float(fid_metric.compute())
    size = min(subset_size or 1000, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():  # it keeps every feature vector: that is what it is given here anyway
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid_metric = KernelInceptionDistance(feature=_Identity.module(dim), subsets=subsets, subset_size=size)
    kid_metric.update(real, real=True)
    kid_metric.update(fake, real=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # KID draws random subsets: a fixed seed makes a report reproducible
    try:
        kid_mean, kid_std = (float(v) for v in kid_metric.compute())
    finally:
        torch.random.set_rng_state(state)
    return BatchMetrics(fid=max(fid_value, 0.0), kid_mean=kid_mean, kid_std=kid_std, n_generated=int(fake.shape[0]),
                        n_reference=int(real.shape[0]), kid_subset_size=size, features=features)


def batch_metrics(generated: str | os.PathLike[str], reference: str | os.PathLike[str], *,
                  features: str | os.PathLike[str] | None, device: str = "cpu", kid_subset_size: int | None = None,
                  kid_subsets: int = 100, seed: int = 0) -> BatchMetrics:
    """FID and KID between the images in folder ``generated`` and those in folder ``reference``.

    ``features``: the local vision model directory whose pooled output is the feature space (see
    :class:`FeatureExtractor`); a score is comparable only with scores in the same feature space.
    ``kid_subset_size`` defaults to 1000 or the smaller folder's size.
    """
    extractor = feature_extractor(features, device=device)
    fake = extractor.features(_folder_images(generated, "generated"))
    real = extractor.features(_folder_images(reference, "reference"))
    return _metrics_from_features(real, fake, subset_size=kid_subset_size, subsets=kid_subsets, seed=seed,
                                  features=str(extractor.path))


def fid(generated: str | os.PathLike[str], reference: str | os.PathLike[str], *,
        features: str | os.PathLike[str] | None, device: str = "cpu") -> float:
    """The Fréchet distance between the two folders' features (torchmetrics' FID)."""
    return batch_metrics(generated, reference, features=features, device=device, kid_subsets=1).fid


def kid(generated: str | os.PathLike[str], reference: str | os.PathLike[str], *,
        features: str | os.PathLike[str] | None, device: str = "cpu", subset_size: int | None = None,
        subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """The kernel inception distance (mean, standard deviation over subsets) between the two folders."""
    m = batch_metrics(generated, reference, features=features, device=device, kid_subset_size=subset_size,
                      kid_subsets=subsets, seed=seed)
    return m.kid_mean, m.kid_std
