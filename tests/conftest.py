"""Shared fixtures: tiny images, and sandboxes served over real loopback HTTP."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

if TYPE_CHECKING:
    from providers.base import Provider
    from providers.sandbox import OpenAISandbox, StabilitySandbox
    from router import AsyncRouter


def png(width: int = 64, height: int = 64, color: tuple[int, ...] = (200, 30, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


class Sleeps:
    """Stands in for the router's sleep: records each wait instead of sleeping through it."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def make_router(*providers: Provider, **kw: Any) -> AsyncRouter:
    """An AsyncRouter over ``providers`` with an in-memory ledger and recorded (not slept) waits."""
    from router import AsyncRouter

    kw.setdefault("ledger", ":memory:")
    kw.setdefault("sleep", Sleeps())
    return AsyncRouter(list(providers), **kw)


def half_mask(width: int = 64, height: int = 64) -> bytes:
    """White (repaint) on the left half, black (keep) on the right."""
    img = Image.new("L", (width, height), 0)
    img.paste(255, (0, 0, width // 2, height))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def sandbox() -> Iterator[OpenAISandbox]:
    from providers.sandbox import OpenAISandbox

    with OpenAISandbox(api_key="sk-sandbox-primary") as sb:
        yield sb


@pytest.fixture
def sandbox2() -> Iterator[OpenAISandbox]:
    from providers.sandbox import OpenAISandbox

    with OpenAISandbox(api_key="sk-sandbox-backup") as sb:
        yield sb


@pytest.fixture
def sb() -> Iterator[StabilitySandbox]:
    """A Stability sandbox (``sb2``: a second one, for fallback chains)."""
    from providers.sandbox import StabilitySandbox

    with StabilitySandbox(api_key="sk-stab-primary") as server:
        yield server


@pytest.fixture
def sb2() -> Iterator[StabilitySandbox]:
    from providers.sandbox import StabilitySandbox

    with StabilitySandbox(api_key="sk-stab-backup") as server:
        yield server


# --- tiny local Diffusers models, written once per session and loaded back from disk ---------


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory for the tiny models; the hub is off while they are in use."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield tmp_path_factory.mktemp("models")
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


@pytest.fixture(scope="session")
def sd15_dir(models_root: Path) -> Path:
    from tests.local_models import build_sd15

    return build_sd15(models_root / "tiny-sd15")


@pytest.fixture(scope="session")
def sdxl_dir(models_root: Path) -> Path:
    from tests.local_models import build_sdxl

    return build_sdxl(models_root / "tiny-sdxl")


@pytest.fixture(scope="session")
def flux_dir(models_root: Path) -> Path:
    from tests.local_models import build_flux

    return build_flux(models_root / "tiny-flux")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test sees the developer's keys, policy or ledger."""
    for var in (
        "OPENAI_API_KEY", "OPENAI_BASE_URL", "STABILITY_API_KEY", "STABILITY_BASE_URL",
        "REPLICATE_API_TOKEN", "REPLICATE_BASE_URL",
        "TOGETHER_API_KEY", "TOGETHER_BASE_URL", "BFL_API_KEY", "BFL_BASE_URL",
        "GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL", "XAI_API_KEY", "XAI_BASE_URL",
        "FAL_KEY", "FAL_QUEUE_URL", "IDEOGRAM_API_KEY", "IDEOGRAM_BASE_URL", "IMAGEROUTER_STATE",
        "IMAGEROUTER_RAY_URL", "IMAGEROUTER_RAY_TOKEN", "IMAGEROUTER_RAY_USD_PER_GPU_HOUR", "IMAGEROUTER_RAY_REGIONS",
        "RAY_ADDRESS", "IMAGEROUTER_JOBS_REDIS", "IMAGEROUTER_JOBS_DIR", "IMAGEROUTER_WEBHOOK_SECRET",
        "IMAGEROUTER_POLICY", "IMAGEROUTER_PROVIDERS", "IMAGEROUTER_MODELS",
        "IMAGEROUTER_COMFYUI_URL", "IMAGEROUTER_COMFYUI_WORKFLOWS", "IMAGEROUTER_COMFYUI_REGIONS",
        "IMAGEROUTER_COMFYUI_USD_PER_GPU_HOUR", "IMAGEROUTER_SANDBOX",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("IMAGEROUTER_LEDGER", ":memory:")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg")))
