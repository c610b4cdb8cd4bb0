"""Rebuild this example: 50 GenEval prompts through cheapest, balanced and quality against the sandboxes.

    .venv/bin/python benchmarks/results/eval_example/make_example.py

The CLIP model is a tiny random-weight one built from config (tests/quality_models.py), so the CLIP
numbers are meaningless: the example shows the report's shape, not any backend's quality.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from router.evaluate import evaluate, load_prompts, write_report  # noqa: E402
from tests.quality_models import build_tiny_clip  # noqa: E402

OUT = Path(__file__).resolve().parent
GENEVAL = ROOT.parent / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        clip = build_tiny_clip(Path(tmp) / "tiny-clip", seed=0)
        report = evaluate(load_prompts(GENEVAL, limit=50), ["cheapest", "balanced", "quality"], clip=clip,
                          concurrency=8, defaults={"width": 1024, "height": 1024, "seed": 0},
                          source="GenEval evaluation_metadata.jsonl (50 prompts spread over its 553)")
    report.clip = "tiny random-weight CLIP built from config (tests/quality_models.py build_tiny_clip, seed 0)"
    report.caption = "RANDOM-WEIGHT CLIP: the CLIP scores are meaningless; sandbox backends"
    write_report(report, OUT)


if __name__ == "__main__":
    main()
