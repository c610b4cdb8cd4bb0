"""Prompt-complexity scorer: speed, and feature accuracy against GenEval's ground truth.

Run: ``python benchmarks/complexity.py [path/to/evaluation_metadata.jsonl]``. The GenEval
file lives in ``shared/data/geneval/`` beside the repository (not in it); without it only
the speed is measured, on built-in prompts.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.complexity import ComplexityFeatures, score_prompt

GENEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl"
TYPICAL = [
    "a photo of a cat",
    "three red apples on a wooden table, a sign that says SALE, oil painting, in the style of Van Gogh",
    "a cinematic shot of a lone astronaut riding a horse on mars at sunset, 35mm, bokeh",
    "a cozy cabin in a snowy forest at night, warm light in the windows, watercolor",
    "a photo of a red bench and a blue cup",
]

Check = Callable[[ComplexityFeatures, dict[str, Any]], bool]


def _colour_objects(row: dict[str, Any]) -> int:
    return sum("color" in obj for obj in row["include"])


CHECKS: dict[str, tuple[str, Check]] = {
    "single_object": ("subjects == 1, no counts/relations/attributes",
                      lambda f, r: f.subjects == 1 and f.counts == f.relations == f.attributes == 0),
    "two_object": ("subjects == 2", lambda f, r: f.subjects == 2),
    "counting": ("count_values[0] == include[0].count",
                 lambda f, r: f.counts >= 1 and f.count_values[0] == r["include"][0]["count"]),
    "colors": ("attributes == colour-bearing objects", lambda f, r: f.attributes == _colour_objects(r)),
    "color_attr": ("attributes == colour-bearing objects", lambda f, r: f.attributes == _colour_objects(r)),
    "position": ("relations == 1", lambda f, r: f.relations == 1),
}


def load(path: Path = GENEVAL) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def speed(prompts: list[str], seconds: float = 1.0) -> tuple[float, float]:
    """(prompts per second, microseconds per prompt) over ``prompts``, repeated for ``seconds``."""
    done = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for p in prompts:
            score_prompt(p)
        done += len(prompts)
    return done / elapsed, elapsed / done * 1e6


def accuracy(rows: list[dict[str, Any]]) -> dict[str, tuple[str, int, int, float]]:
    """Per tag: (what is checked, hits, total, mean score)."""
    hits: dict[str, int] = defaultdict(int)
    totals: dict[str, int] = defaultdict(int)
    scores: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        c = score_prompt(row["prompt"])
        totals[row["tag"]] += 1
        scores[row["tag"]].append(c.score)
        hits[row["tag"]] += CHECKS[row["tag"]][1](c.features, row)
    return {tag: (CHECKS[tag][0], hits[tag], totals[tag], statistics.fmean(scores[tag])) for tag in CHECKS}


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else GENEVAL
    rows = load(path) if path.exists() else []
    rate, us = speed(TYPICAL)
    print(f"typical prompts: {rate:,.0f} prompts/s, {us:.1f} µs/prompt")
    if not rows:
        print(f"GenEval metadata not found at {path}; accuracy skipped")
        return 0
    rate, us = speed([r["prompt"] for r in rows])
    print(f"GenEval prompts: {rate:,.0f} prompts/s, {us:.1f} µs/prompt")
    print(f"\n{'tag':<14} {'check':<46} {'accuracy':>15} {'mean score':>11}")
    for tag, (what, hit, total, mean) in accuracy(rows).items():
        print(f"{tag:<14} {what:<46} {hit:>4}/{total:<4} {hit / total:6.1%} {mean:>11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
