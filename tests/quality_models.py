"""Tiny random-weight models for the quality metrics, built from config on the CPU and saved with safetensors.

Their numbers mean nothing about images; they exercise the real code paths (loading, preprocessing,
batching, the metric formulas) in well under a second, with no download.
"""

from __future__ import annotations

from pathlib import Path

from providers.local.tiny import write_clip_tokenizer

__all__ = ["build_tiny_clip", "build_tiny_resnet", "write_test_images"]


def build_tiny_clip(directory: Path, *, seed: int = 0) -> Path:
    """A CLIP model (2-layer ViT and text transformer, 16-d projection), its tokenizer and image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                     "vocab_size": 200, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    model = CLIPModel(config).eval()
    write_clip_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(directory, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def build_tiny_resnet(directory: Path, *, seed: int = 0) -> Path:
    """A two-stage ResNet (a small conv feature model, 16-d pooled output) and a 32-px image processor."""
    import torch
    from transformers import CLIPImageProcessor, ResNetConfig, ResNetModel

    torch.manual_seed(seed)
    model = ResNetModel(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                     layer_type="basic")).eval()
    model.save_pretrained(directory, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def write_test_images(directory: Path, count: int, *, seed: int = 0, noise: float = 0.0, size: int = 48) -> Path:
    """``count`` varied PNGs (gradients and blocks of colour), the same for the same seed; ``noise`` adds
    Gaussian pixel noise of that standard deviation (in units of the full 0–255 range)."""
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng(seed + 1000)
    ys, xs = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        base = rng.uniform(0, 1, size=3)
        slope = rng.uniform(-1, 1, size=(3, 2))
        img = np.stack([base[c] + slope[c, 0] * xs + slope[c, 1] * ys for c in range(3)], axis=-1)
        x0, y0 = rng.integers(0, size // 2, size=2)
        img[y0:y0 + size // 3, x0:x0 + size // 3] = rng.uniform(0, 1, size=3)
        if noise:
            img = img + noise_rng.normal(0, noise, size=img.shape)
        pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(directory / f"img-{i:03d}.png")
    return directory
