"""examples/local_controlnet_lora.py runs offline and writes what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]


def test_the_local_controlnet_lora_inpaint_example_runs_offline(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_API_KEY", "_API_TOKEN"))}
    env |= {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "local_controlnet_lora.py"), str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    from router import read_provenance

    for name in ("controlnet", "controlnet+loras", "inpaint+controlnet+lora"):
        assert f"{name}:" in out.stdout
        path = tmp_path / f"{name}.png"
        meta = read_provenance(path)
        assert (meta["provider"], meta["model"], meta["seed"]) == ("local", "tiny-sd15", 11)
    assert out.stdout.count("local/tiny-sd15 (private)") == 3
    assert "step 6/6" in out.stdout
