"""The policy evaluation (router.evaluate): prompt files, runs against the loopback sandboxes, the report."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from router.errors import ConfigurationError, RequestValidationError
from router.evaluate import (
    GENEVAL_ENV,
    EvalReport,
    PolicySummary,
    PromptCase,
    PromptRun,
    _mean_ci,
    _percentile,
    default_prompts,
    evaluate,
    load_prompts,
    main,
    write_report,
)
from router.sandboxes import Sandboxes

PROMPTS = [PromptCase("a photo of a bench"), PromptCase("two red apples", tag="counting"),
           PromptCase("a blue cube left of a green ball", tag="position")]
SMALL = {"width": 512, "height": 512, "seed": 1}


@pytest.fixture(scope="module")
def fleet() -> Iterator[Sandboxes]:
    with Sandboxes() as sandboxes:
        yield sandboxes


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    pytest.importorskip("scipy")  # the CLIP means' confidence interval
    from tests.quality_models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


# --- prompt files ------------------------------------------------------------------------------


def test_a_text_file_is_one_prompt_a_line_without_blanks_or_comments(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a red apple\n\n# a comment\n  a lighthouse at dusk  \n", encoding="utf-8")
    assert [c.prompt for c in load_prompts(f)] == ["a red apple", "a lighthouse at dusk"]


def test_jsonl_fields_go_to_the_request_the_tag_or_the_metadata(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "two dogs", "tag": "counting", "seed": 7, "width": 512,
                             "include": [{"class": "dog", "count": 2}]}) + "\n", encoding="utf-8")
    (case,) = load_prompts(f)
    assert case == PromptCase("two dogs", tag="counting", request={"seed": 7, "width": 512},
                              meta={"include": [{"class": "dog", "count": 2}]})


def test_a_limit_spreads_the_prompts_over_the_file(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}", "tag": f"t{i // 10}"}) + "\n" for i in range(40)))
    picked = load_prompts(f, limit=8)
    assert [c.prompt for c in picked] == ["p0", "p5", "p10", "p15", "p20", "p25", "p30", "p35"]
    assert {c.tag for c in picked} == {"t0", "t1", "t2", "t3"}


@pytest.mark.parametrize(("line", "problem"), [("{not json", "line 2 is not JSON"),
                                               ('{"tag": "x"}', 'line 2 has no "prompt" string')])
def test_a_bad_jsonl_line_is_named(tmp_path: Path, line: str, problem: str) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(RequestValidationError, match=problem):
        load_prompts(f)


def test_the_default_is_the_geneval_file_named_by_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    f = tmp_path / "evaluation_metadata.jsonl"
    f.write_text(json.dumps({"tag": "single_object", "include": [], "prompt": "a photo of a cow"}) + "\n")
    monkeypatch.setenv(GENEVAL_ENV, str(f))
    assert default_prompts() == f
    assert load_prompts()[0] == PromptCase("a photo of a cow", tag="single_object", meta={"include": []})
    monkeypatch.setenv(GENEVAL_ENV, str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigurationError, match=GENEVAL_ENV):
        default_prompts()


# --- statistics --------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "q", "expected"), [([1.0, 2.0, 3.0, 4.0], 50, 2.5), ([5.0], 99, 5.0),
                                                       ([0.0, 10.0], 90, 9.0), ([3.0, 1.0, 2.0], 0, 1.0)])
def test_percentiles_interpolate_between_ranks(values: list[float], q: float, expected: float) -> None:
    assert _percentile(values, q) == pytest.approx(expected)


def test_the_confidence_interval_is_students_t() -> None:
    pytest.importorskip("scipy")
    mean, low, high = _mean_ci([1.0, 2.0, 3.0]) or (0, 0, 0)
    half = 4.302652729911275 / 3 ** 0.5  # t(0.975, 2 degrees of freedom) × sd 1 / √3
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))


def test_a_summary_counts_cost_per_image_shares_and_failures() -> None:
    runs = [PromptRun("p", 0, "a", None, True, "x", "m1", 1, Decimal("0.02"), 1.0),
            PromptRun("p", 1, "b", None, True, "x", "m1", 2, Decimal("0.04"), 2.0),
            PromptRun("p", 2, "c", None, True, "y", "m2", 1, Decimal("0.01"), 3.0),
            PromptRun("p", 3, "d", None, False, cost_usd=Decimal("0.005"), error="AllProvidersFailed")]
    s = PolicySummary.of("p", runs)
    assert (s.prompts, s.ok, s.failed, s.images) == (4, 3, 1, 4)
    assert s.total_cost_usd == Decimal("0.075") and s.cost_per_image_usd == Decimal("0.01875")
    assert s.served == pytest.approx({"x/m1": 2 / 3, "y/m2": 1 / 3})
    assert s.latency_s["p50"] == 2.0 and s.errors == {"AllProvidersFailed": 1}
    assert s.clip_mean is None and s.clip_ci95 is None


# --- runs against the sandboxes ----------------------------------------------------------------


def test_every_prompt_runs_under_every_policy_and_is_accounted(fleet: Sandboxes) -> None:
    report = evaluate(PROMPTS, ["cheapest", "quality"], providers=fleet.providers(), defaults=SMALL)
    assert [(r.policy, r.index) for r in report.runs] == [(p, i) for p in ("cheapest", "quality") for i in range(3)]
    for policy in ("cheapest", "quality"):
        s = report.summary(policy)
        runs = [r for r in report.runs if r.policy == policy]
        assert (s.ok, s.failed) == (3, 0)
        assert s.total_cost_usd == sum(r.cost_usd for r in runs)
        assert sum(s.served.values()) == pytest.approx(1.0)
        assert set(s.latency_s) == {"p50", "p90", "p95", "p99"}
        assert all(r.image for r in runs)
    assert report.summary("quality").cost_per_image_usd > report.summary("cheapest").cost_per_image_usd  # type: ignore[operator]


def test_without_providers_it_starts_the_sandboxes_itself() -> None:
    report = evaluate(PROMPTS[:1], ["balanced"], defaults=SMALL)
    assert report.backend == "sandbox" and report.runs[0].ok
    assert any("nothing was billed" in n for n in report.notes)


def test_a_request_no_backend_serves_is_a_counted_failure() -> None:
    report = evaluate(PROMPTS[:2], ["cheapest"], providers=[], defaults=SMALL)
    s = report.summary("cheapest")
    assert (s.ok, s.failed, s.total_cost_usd, s.cost_per_image_usd) == (0, 2, Decimal(0), None)
    assert s.errors == {"NoRouteError": 2}


def test_clip_scores_are_those_of_clip_score_on_the_served_images(fleet: Sandboxes, clip_dir: Path) -> None:
    from router.quality import clip_score

    report = evaluate(PROMPTS, ["balanced"], providers=fleet.providers(), clip=clip_dir, defaults=SMALL)
    expected = clip_score([r.image for r in report.runs], [r.prompt for r in report.runs], clip=clip_dir)
    assert [r.clip for r in report.runs] == pytest.approx(expected, abs=1e-5)
    s = report.summary("balanced")
    assert s.clip_mean == pytest.approx(sum(expected) / 3)
    assert s.clip_ci95 is not None and s.clip_mean is not None
    assert s.clip_ci95[0] <= s.clip_mean <= s.clip_ci95[1]
    assert set(s.clip_by_tag) == {"counting", "position"}


@pytest.mark.parametrize("clip", ["/nonexistent/clip", "openai/clip-vit-base-patch32"])
def test_clip_weights_that_are_not_there_stop_the_run_before_any_request(fleet: Sandboxes, clip: str) -> None:
    before = fleet.hits()
    with pytest.raises(ConfigurationError, match="local CLIP model directory"):
        evaluate(PROMPTS, ["cheapest"], providers=fleet.providers(), clip=clip)
    assert fleet.hits() == before


# --- the report --------------------------------------------------------------------------------


def test_the_report_is_markdown_json_and_a_plot(fleet: Sandboxes, clip_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = evaluate(PROMPTS, ["cheapest", "quality"], providers=fleet.providers(), clip=clip_dir, defaults=SMALL)
    report.caption = "random-weight CLIP"
    paths = write_report(report, tmp_path, save_images=True)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert set(data["policies"]) == {"cheapest", "quality"} and len(data["runs"]) == 6
    assert data["policies"]["quality"]["clip_mean"] == pytest.approx(report.summary("quality").clip_mean)
    md = paths["markdown"].read_text()
    assert "**random-weight CLIP**" in md and "| cheapest | 3 / 3 |" in md and "| quality | 3 / 3 |" in md
    assert sorted(p.name for p in (tmp_path / "images" / "quality").iterdir()) == ["0000.png", "0001.png", "0002.png"]


def test_without_clip_scores_no_plot_is_written(tmp_path: Path) -> None:
    report = EvalReport(policies=["p"], runs=[PromptRun("p", 0, "a", None, True, "x", "m", 1, Decimal("0.01"), 0.5)],
                        backend="sandbox", prompts_source="x")
    paths = write_report(report, tmp_path)
    assert "plot" not in paths and not (tmp_path / "cost_vs_clip.png").exists()
    assert "(none: no CLIP scores)" in paths["markdown"].read_text()


def test_main_runs_the_file_and_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a red apple\na lighthouse at dusk\n")
    code = main([str(f), "--policy", "cheapest", "--out", str(tmp_path / "out"), "--width", "512", "--height", "512",
                 "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data["policies"]["cheapest"]["ok"] == 2 and data["prompts"] == str(f)
    assert Path(data["files"]["json"]).is_file()


def test_main_names_missing_clip_weights_and_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a red apple\n")
    assert main([str(f), "--clip", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 3
    assert "local CLIP model directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_markdown_table_has_a_row_per_policy() -> None:
    runs = [PromptRun(p, 0, "a", None, True, "x", "m", 1, Decimal("0.02"), 0.5, clip=20.0) for p in ("a", "b")]
    md = EvalReport(policies=["a", "b"], runs=runs, backend="sandbox", prompts_source="f").to_markdown()
    table = [line for line in io.StringIO(md) if line.startswith("| a ") or line.startswith("| b ")]
    assert len(table) == 2 and all("| 0.0200 | 0.0200 |" in line and "20.00" in line for line in table)
