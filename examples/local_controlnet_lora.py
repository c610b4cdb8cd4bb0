"""Local generation with ControlNet, LoRA and inpainting, offline.

A tiny random-weight SD1.5 model, a canny ControlNet and a LoRA are written to disk
(no download; the images are noise, the plumbing is real) and served by the local
backend under the ``private`` policy: nothing leaves the machine.

    python examples/local_controlnet_lora.py [OUT_DIR]

With real weights, point the catalog at your model directories instead (see README).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from providers.local import LocalProvider
from providers.local.tiny import build_controlnet, build_lora, build_sd15
from router import ProgressEvent, Router, read_provenance


def sketch(size: int = 64) -> bytes:
    """A photo stand-in with clear edges: a bright box and a grey disc on a dark ground."""
    img = Image.new("RGB", (size, size), (25, 25, 25))
    draw = ImageDraw.Draw(img)
    draw.rectangle([size // 4, size // 4, 3 * size // 4, size // 2], fill=(230, 230, 230))
    draw.ellipse([size // 8, size // 2, size // 2, 7 * size // 8], fill=(120, 120, 120))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def right_half_mask(size: int = 64) -> bytes:
    """White (repaint) on the right half, black (keep) on the left."""
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).rectangle([size // 2, 0, size, size], fill=255)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main(out_dir: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    models = out_dir / "models"
    model = build_sd15(models / "tiny-sd15")
    canny = build_controlnet(models / "controlnet-canny", "sd15")
    watercolor = build_lora(model, models / "watercolor.safetensors", seed=3)
    ink = build_lora(model, models / "ink.safetensors", seed=4)
    catalog = {"tiny-sd15": {"path": str(model), "family": "sd15", "native": [64, 64], "min_side": 64,
                             "steps": 6, "controlnets": {"canny": str(canny)}}}

    def progress(event: ProgressEvent) -> None:
        print(f"\r  {event.model}: step {event.step}/{event.total}", end="\n" if event.step == event.total else "")

    photo = sketch()
    with Router([LocalProvider(catalog, device="cpu")], policy="private", ledger=":memory:") as router:
        runs: dict[str, dict[str, Any]] = {
            "controlnet": dict(controls=[{"kind": "canny", "image": photo, "scale": 0.9}]),
            "controlnet+loras": dict(controls=[{"kind": "canny", "image": photo}],
                                     loras=[{"ref": str(watercolor), "weight": 0.8},
                                            {"ref": str(ink), "weight": 0.4}]),
            "inpaint+controlnet+lora": dict(init_image=photo, mask_image=right_half_mask(),
                                            controls=[{"kind": "canny", "image": photo, "scale": 0.6}],
                                            loras=[{"ref": str(watercolor), "weight": 1.0}]),
        }
        for name, fields in runs.items():
            print(f"{name}:")
            result = router.generate("a lighthouse at dusk, watercolor", width=64, height=64, seed=11,
                                     on_progress=progress, **fields)
            path = result.images[0].save(out_dir / name)
            meta = read_provenance(path)
            print(f"  {result.provider}/{result.model} ({result.decision.policy if result.decision else ''}), "
                  f"{result.cost.quantity} GPU-s, ${result.cost.actual_usd}; seed {meta['seed']}; wrote {path}")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="pixroute-local-"))
    main(target)
