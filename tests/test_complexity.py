"""The prompt-complexity scorer: features against GenEval's ground truth, tables, robustness."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from policies.complexity import HIGH_MIN, LOW_MAX, WEIGHTS, ComplexityFeatures, PromptComplexity, score_prompt

ROOT = Path(__file__).resolve().parents[1]
GENEVAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "geneval"
COMPLEX = "three red apples on a wooden table, a sign that says SALE, oil painting, in the style of Van Gogh"


@pytest.fixture(scope="module")
def geneval() -> dict[str, list[dict[str, Any]]]:
    path = GENEVAL_DIR / "evaluation_metadata.jsonl"
    if not path.exists():
        pytest.skip(f"GenEval metadata not found at {path} (shared/data/ lives beside the repository)")
    by_tag: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                by_tag[row["tag"]].append(row)
    return by_tag


def _colour_objects(row: dict[str, Any]) -> int:
    return sum("color" in obj for obj in row["include"])


GENEVAL_CHECKS = {
    "single_object": lambda f, r: f.subjects == 1 and f.counts == f.relations == f.attributes == 0,
    "two_object": lambda f, r: f.subjects == 2,
    "counting": lambda f, r: f.counts >= 1 and f.count_values[0] == r["include"][0]["count"],
    "colors": lambda f, r: f.attributes == _colour_objects(r),
    "color_attr": lambda f, r: f.attributes == _colour_objects(r),
    "position": lambda f, r: f.relations == 1,
}


@pytest.mark.parametrize("tag", list(GENEVAL_CHECKS))
def test_features_match_geneval_ground_truth(geneval: dict[str, list[dict[str, Any]]], tag: str) -> None:
    rows = geneval[tag]
    assert rows, f"no GenEval prompts tagged {tag}"
    misses = [r["prompt"] for r in rows if not GENEVAL_CHECKS[tag](score_prompt(r["prompt"]).features, r)]
    rate = 1 - len(misses) / len(rows)
    assert rate >= 0.95, f"{tag}: {rate:.1%} of {len(rows)} right; first misses: {misses[:5]}"


def test_subject_count_matches_geneval_objects(geneval: dict[str, list[dict[str, Any]]]) -> None:
    rows = [r for rows in geneval.values() for r in rows]
    right = sum(score_prompt(r["prompt"]).features.subjects == len(r["include"]) for r in rows)
    assert right / len(rows) >= 0.95, f"subjects right for {right}/{len(rows)} prompts"


def test_mean_score_rises_with_geneval_difficulty(geneval: dict[str, list[dict[str, Any]]]) -> None:
    # Found: single_object 0.080 < colors 0.133 < two_object 0.155 < counting 0.230 < color_attr 0.259
    # < position 0.306.
    mean = {tag: statistics.fmean(score_prompt(r["prompt"]).score for r in rows) for tag, rows in geneval.items()}
    report = ", ".join(f"{t} {m:.3f}" for t, m in sorted(mean.items(), key=lambda kv: kv[1]))
    middle = ("two_object", "counting", "colors")
    assert all(mean["single_object"] < mean[t] for t in middle), report
    assert max(mean[t] for t in middle) < min(mean["color_attr"], mean["position"]), report


def test_geneval_single_objects_are_low(geneval: dict[str, list[dict[str, Any]]]) -> None:
    tiers = {r["prompt"]: score_prompt(r["prompt"]).tier for r in geneval["single_object"]}
    assert set(tiers.values()) == {"low"}, [p for p, t in tiers.items() if t != "low"]


@pytest.mark.parametrize(
    ("prompt", "tier"),
    [
        ("a cat", "low"),
        ("a photo of a cat", "low"),
        ("", "low"),
        ("a lighthouse on a cliff at sunset, oil painting", "medium"),
        (COMPLEX, "high"),
        ("three red apples on a wooden table, a sign that says SALE", "high"),
    ],
)
def test_tiers(prompt: str, tier: str) -> None:
    assert score_prompt(prompt).tier == tier, score_prompt(prompt)


def test_the_complex_prompt_has_every_feature() -> None:
    f = score_prompt(COMPLEX).features
    assert (f.subjects, f.counts, f.count_values, f.attributes, f.relations, f.text_to_render, f.style) == (
        3, 1, (3,), 2, 1, 1, 2,
    )
    assert f.words == 20


# (prompt, {feature: expected}) — each row pins one behaviour of the extractor.
FEATURE_CASES: list[tuple[str, dict[str, Any]]] = [
    # subjects
    ("a photo of a teddy bear", {"subjects": 1}),
    ("a hot dog", {"subjects": 1}),
    ("an apple tree", {"subjects": 1}),
    ("a man and two women", {"subjects": 2}),
    ("a photo of a quokka", {"subjects": 1}),
    ("the cat's toy", {"subjects": 2}),
    ("a photo of a beautiful scene", {"subjects": 0}),
    # counts
    ("a pair of shoes", {"counts": 1, "count_values": (2,)}),
    ("a cake with 12 candles", {"counts": 1, "count_values": (12,)}),
    ("twenty one balloons", {"count_values": (21,)}),
    ("several birds", {"counts": 1, "count_values": (0,)}),
    ("a group of people", {"counts": 1, "count_values": (0,)}),
    ("three dogs and five cats", {"count_values": (3, 5)}),
    ("one of the best views of the city", {"counts": 0}),
    ("a poster from 1920", {"counts": 0}),
    # attributes
    ("a red bench", {"attributes": 1}),
    ("a big red wooden table", {"attributes": 3}),
    ("a red and blue ball", {"attributes": 2}),
    ("the car is red", {"attributes": 1}),
    ("red", {"attributes": 0}),
    ("a photo of an orange", {"attributes": 0, "subjects": 1}),
    ("an orange cup", {"attributes": 1, "subjects": 1}),
    ("a glass vase", {"attributes": 1, "subjects": 1}),
    # relations
    ("a cup on top of a table", {"relations": 1}),
    ("a dog left of a cat and a cat below a bird", {"relations": 2}),
    ("a cat, a tree in the background", {"relations": 1}),
    ("a cat on fire", {"relations": 0}),
    ("a cat in the style of Monet", {"relations": 0, "style": 1}),
    # text to render
    ('a sign with "OPEN"', {"text_to_render": 1}),
    ('a sign that says "OPEN" and a flag that reads “GO”', {"text_to_render": 2}),
    ("a mug that says best dad ever", {"text_to_render": 1, "subjects": 1}),
    ("a shop sign with the words hot dogs", {"text_to_render": 1, "subjects": 1}),
    ("Van Gogh's sunflowers", {"text_to_render": 0}),
    ("the sign says", {"text_to_render": 0}),
    # style
    ("a cat, oil painting", {"style": 1}),
    ("a cat, photorealistic, 35mm, bokeh", {"style": 3}),
    ("a cat, cinematic lighting", {"style": 1}),
    ("a beach at golden hour, watercolor", {"style": 2}),
    ("a photo of a cat", {"style": 0}),
    # words
    ("don't stop", {"words": 2}),
]


@pytest.mark.parametrize(("prompt", "expected"), FEATURE_CASES, ids=[c[0] for c in FEATURE_CASES])
def test_feature_table(prompt: str, expected: dict[str, Any]) -> None:
    f = score_prompt(prompt).features
    got = {k: getattr(f, k) for k in expected}
    assert got == expected, f


def test_score_is_the_rounded_sum_of_saturating_terms() -> None:
    assert sum(w for w, _ in WEIGHTS.values()) == pytest.approx(1.0)
    for prompt in (COMPLEX, "a photo of a cat", "a dog left of a cat"):
        c = score_prompt(prompt)
        terms = c.features.terms()
        assert set(terms) == set(WEIGHTS)
        assert c.score == round(sum(terms.values()), 3)
        for name, (weight, k) in WEIGHTS.items():
            assert terms[name] == pytest.approx(weight * min(1.0, getattr(c.features, name) / k))
    saturated = ComplexityFeatures(subjects=9, counts=9, attributes=9, relations=9, text_to_render=9, style=9, words=99)
    assert saturated.terms() == {name: w for name, (w, _) in WEIGHTS.items()}


def test_every_feature_moves_the_score() -> None:
    base = ComplexityFeatures(subjects=1, words=5)
    for name in WEIGHTS:
        more = dataclasses.replace(base, **{name: getattr(base, name) + 1})
        assert sum(more.terms().values()) > sum(base.terms().values()), name


def test_thresholds() -> None:
    assert (LOW_MAX, HIGH_MIN) == (0.35, 0.7)
    for prompt in ("a cat", COMPLEX, "a lighthouse on a cliff at sunset, oil painting"):
        c = score_prompt(prompt)
        assert c.tier == ("low" if c.score < LOW_MAX else "high" if c.score >= HIGH_MIN else "medium")


def test_to_dict_is_plain_json() -> None:
    c = score_prompt(COMPLEX)
    d = json.loads(json.dumps(c.to_dict()))
    assert d["score"] == c.score and d["tier"] == "high"
    assert d["features"]["text_to_render"] == 1 and d["features"]["count_values"] == [3]
    assert set(d["terms"]) == set(WEIGHTS)


def test_dataclasses_are_frozen_with_slots() -> None:
    c = score_prompt("a cat")
    for obj, name in ((c, "score"), (c.features, "subjects")):
        assert not hasattr(obj, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, 1)
    assert isinstance(c, PromptComplexity) and isinstance(c.features, ComplexityFeatures)


def test_deterministic_across_calls_and_hash_seeds() -> None:
    prompts = [COMPLEX, "a photo of a dog right of a teddy bear", "a cat, cinematic lighting, 8k"]
    here = [score_prompt(p).to_dict() for p in prompts]
    assert here == [score_prompt(p).to_dict() for p in prompts]
    code = (
        "import json, sys; from policies.complexity import score_prompt; "
        "print(json.dumps([score_prompt(p).to_dict() for p in json.loads(sys.argv[1])]))"
    )
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, json.dumps(prompts)], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": seed}, timeout=60, check=True)
        assert json.loads(out.stdout) == here


@pytest.mark.parametrize(
    "prompt",
    ["", "   ", ".,;!?", "🐱🐶", "一只红色的猫", "une pomme rouge sur la table, café", "e\u0301\u0301\u0301", "²³ cats",
     "\x00\x01\x02", '"', "'", "“unterminated"],
)
def test_odd_inputs_are_safe(prompt: str) -> None:
    c = score_prompt(prompt)
    assert 0.0 <= c.score <= 1.0 and c.tier in ("low", "medium", "high")


def test_empty_prompt_scores_zero() -> None:
    c = score_prompt("")
    assert (c.score, c.tier, c.features) == (0.0, "low", ComplexityFeatures())


@pytest.mark.parametrize(
    "unit",
    [COMPLEX + ", ", '"', '"a', "'a ", "“", "on ", "red and ", "1", "in the style of ", "a sign that says "],
)
def test_32k_prompts_finish_fast(unit: str) -> None:
    prompt = (unit * (32_768 // len(unit) + 1))[:32_768]
    start = time.perf_counter()
    c = score_prompt(prompt)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"{elapsed:.2f}s for 32k chars of {unit!r}"
    assert 0.0 <= c.score <= 1.0


def test_typical_prompts_are_fast() -> None:
    prompts = [COMPLEX, "a photo of a cat", "a photo of a red bench and a blue cup"]
    start = time.perf_counter()
    for _ in range(200):
        for p in prompts:
            score_prompt(p)
    per_prompt = (time.perf_counter() - start) / 600
    assert per_prompt < 500e-6, f"{per_prompt * 1e6:.0f} µs per prompt (target 50)"
