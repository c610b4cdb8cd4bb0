"""Test-only model directories (flagging safety checker, pickled and incomplete models); the tiny models
themselves live in :mod:`providers.local.tiny`."""

from __future__ import annotations

import json
from pathlib import Path

from providers.local.tiny import (
    build_controlnet,
    build_embedding,
    build_flux,
    build_ip_adapter,
    build_lora,
    build_sd15,
    build_sdxl,
    build_upscaler,
    flagging_safety_checker,
    write_clip_tokenizer,
)

__all__ = ["build_controlnet", "build_embedding", "build_flux", "build_ip_adapter", "build_lora", "build_sd15",
           "build_sdxl", "build_upscaler", "flagging_safety_checker", "write_clip_tokenizer",
           "write_incomplete_model", "write_pickled_model"]


def write_pickled_model(directory: Path) -> Path:
    """A pipeline directory whose UNet weights are a pickle (never to be loaded)."""
    (directory / "unet").mkdir(parents=True, exist_ok=True)
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    (directory / "unet" / "config.json").write_text("{}")
    (directory / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not-a-real-pickle.")
    return directory


def write_incomplete_model(directory: Path) -> Path:
    """A pipeline directory whose UNet folder has a config but no weights."""
    (directory / "unet").mkdir(parents=True, exist_ok=True)
    (directory / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    (directory / "unet" / "config.json").write_text("{}")
    return directory
