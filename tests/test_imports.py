"""Every module imports first in a fresh interpreter, and ``import router`` stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for pkg in ("router", "providers", "policies")
    for p in (ROOT / pkg).rglob("*.py")
)


def test_the_module_list_is_not_empty() -> None:
    assert {"router", "router.router", "policies.engine", "providers.openai"} <= set(MODULES)


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    code = (
        "import importlib, subprocess, sys\n"
        f"mods = {MODULES!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    r = subprocess.run([sys.executable, '-c', f'import {m}'], capture_output=True, text=True)\n"
        "    if r.returncode: bad.append((m, r.stderr.strip().splitlines()[-1]))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("entry", ["import router", "from router import generate, ImageRequest, Router",
                                   "import router; router.Router; router.generate"])
def test_import_router_pulls_in_no_heavy_dependency(entry: str) -> None:
    heavy = {"torch", "diffusers", "openai", "replicate", "together", "transformers", "opentelemetry", "fastapi",
             "torchmetrics", "matplotlib", "scipy", "psycopg", "websockets", "cv2", "spandrel",
             "redis", "google", "arq", "ray", "controlnet_aux"}
    code = f"{entry}\nimport sys\nprint(sorted({heavy!r} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
