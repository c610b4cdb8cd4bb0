"""Skill profiles from the user's own prompts (router.calibrate): an eval run's CLIP scores per model and
skill become a profile override file, which a policy loads and routing then follows, model by model and
skill by skill."""

from __future__ import annotations

import json
import statistics
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest

from policies.complexity import score_prompt
from policies.policy import Policy, policy_from_dict
from policies.skills import SKILLS, needs
from router import AsyncRouter
from router.calibrate import calibrate, prompt_skills
from router.config import providers_from_env
from router.errors import ConfigurationError, PolicyFileError, RequestValidationError
from router.evaluate import EvalReport, PromptRun, ServedModel, main
from router.profiles import default_profiles, load_profile_overrides, merge_overrides, profiles_from_file

SIGNS = ['a neon sign that says "OPEN" above a door', 'a poster with the words "BIG SALE"',
         'a wooden board that reads "WELCOME"', 'a mug printed with the word "COFFEE"']
HEAD, RIVAL, THIRD = "bfl/flux-2-pro", "openai/gpt-image-2", "stability/sd3.5-large"


def served(*keys: str, family: str | None = None, quality: float = 0.5) -> dict[str, ServedModel]:
    out = {}
    for key in keys:
        kind, _, model = key.partition("/")
        out[key] = ServedModel(kind, kind, model, family, quality)
    return out


def report(scores: dict[str, list[float]], prompts: list[str], *, policy: str = "p",
           keys: dict[str, ServedModel] | None = None, backend: str = "configured") -> EvalReport:
    """A run in which model ``key`` served every prompt and scored ``scores[key][i]`` on prompt i."""
    runs = [PromptRun(policy, i, prompt, None, True, key.partition("/")[0], key.partition("/")[2], 1,
                      Decimal("0.01"), 1.0, clip=values[i])
            for key, values in scores.items() for i, prompt in enumerate(prompts)]
    return EvalReport(policies=[policy], runs=runs, backend=backend, prompts_source="prompts.jsonl",
                      clip="/models/clip", created="2026-12-02T10:00:00+00:00", served=keys or served(*scores))


def router(policy: Policy | None = None) -> AsyncRouter:
    """The three providers of HEAD, RIVAL and THIRD, unconfigured (routing ranks them as if they were)."""
    return AsyncRouter(providers_from_env({"IMAGEROUTER_PROVIDERS": "bfl,openai,stability"}), policy=policy,
                       ledger=":memory:")


def head_of(decision: object) -> str:
    chain = decision.chain  # type: ignore[attr-defined]
    return f"{chain[0].provider}/{chain[0].model}"


# --- measuring -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [*SIGNS, "three cats on a sofa", "a photo of a cat",
                                    "a red cube to the left of a blue ball"])
def test_a_prompt_counts_for_the_skills_routing_says_it_needs(prompt: str) -> None:
    need = needs(score_prompt(prompt).features, prompt)
    assert prompt_skills(prompt) == tuple(s for s in SKILLS if need[s] > 0)
    assert "adherence" in prompt_skills(prompt)


def test_min_max_puts_the_measured_order_on_the_published_range_of_the_same_models() -> None:
    cal = calibrate(report({HEAD: [18.0] * 4, RIVAL: [30.0] * 4, THIRD: [24.0] * 4}, SIGNS), min_prompts=4)
    text = {m.key: m.value for m in cal.measured if m.skill == "text"}
    published = default_profiles()
    lo = min(published.entries[k].skills["text"] for k in (HEAD, RIVAL, THIRD))
    hi = max(published.entries[k].skills["text"] for k in (HEAD, RIVAL, THIRD))
    assert text == pytest.approx({HEAD: lo, RIVAL: hi, THIRD: round(lo + 0.5 * (hi - lo), 3)})


def test_rank_hands_the_published_values_out_in_the_measured_order() -> None:
    cal = calibrate(report({HEAD: [18.0] * 4, RIVAL: [30.0] * 4, THIRD: [24.0] * 4}, SIGNS), min_prompts=4,
                    method="rank")
    text = {m.key: m.value for m in cal.measured if m.skill == "text"}
    values = sorted(default_profiles().entries[k].skills["text"] for k in (HEAD, RIVAL, THIRD))
    assert text == {HEAD: values[0], THIRD: values[1], RIVAL: values[2]}


def test_the_mean_is_over_prompts_with_its_count_and_standard_error() -> None:
    cal = calibrate(report({HEAD: [10.0, 20.0, 30.0, 40.0], RIVAL: [30.0] * 4}, SIGNS), min_prompts=4)
    head = next(m for m in cal.measured if m.key == HEAD and m.skill == "text")
    assert (head.prompts, head.clip_mean) == (4, 25.0)
    assert head.clip_se == pytest.approx(statistics.stdev([10.0, 20.0, 30.0, 40.0]) / 2)


def test_a_prompt_two_policies_sent_to_the_same_model_counts_once() -> None:
    one = report({HEAD: [10.0, 20.0, 30.0, 40.0], RIVAL: [30.0] * 4}, SIGNS, policy="a")
    two = report({HEAD: [20.0, 30.0, 40.0, 50.0]}, SIGNS, policy="b")
    both = EvalReport(policies=["a", "b"], runs=one.runs + two.runs, backend="configured", prompts_source="f",
                      served=one.served)
    head = next(m for m in calibrate(both, min_prompts=4).measured if m.key == HEAD and m.skill == "text")
    assert (head.prompts, head.clip_mean) == (4, 30.0)


def test_only_skills_with_enough_prompts_on_two_models_are_calibrated() -> None:
    cal = calibrate(report({HEAD: [18.0] * 4, RIVAL: [30.0] * 4}, SIGNS), min_prompts=5)
    assert cal.calibrated == [] and cal.overrides() == {}
    assert "at least 5 scored prompts" in cal.skipped["text"] and f"{HEAD} 4" in cal.skipped["text"]
    alone = calibrate(report({HEAD: [18.0] * 4}, SIGNS), min_prompts=1)
    assert alone.calibrated == [] and "two or more models" in alone.skipped["text"]
    assert alone.prompts_per_skill["text"] == 4 and alone.prompts_per_skill["counting"] == 0


def test_a_skill_whose_scores_or_published_values_cannot_tell_models_apart_is_skipped() -> None:
    tied = calibrate(report({HEAD: [20.0] * 4, RIVAL: [20.0] * 4}, SIGNS), min_prompts=4)
    assert "same mean CLIP score" in tied.skipped["text"]
    flat = served("comfyui/a.safetensors", "comfyui/b.safetensors", quality=0.6)
    unscaled = calibrate(report({"comfyui/a.safetensors": [20.0] * 4, "comfyui/b.safetensors": [25.0] * 4}, SIGNS,
                                keys=flat), min_prompts=4)
    assert "all 0.60: no scale" in unscaled.skipped["text"]


@pytest.mark.parametrize(("kwargs", "field"), [({"min_prompts": 0}, "min_prompts"), ({"method": "zscore"}, "method")])
def test_a_bad_setting_is_a_validation_error(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(RequestValidationError, match=field):
        calibrate(report({HEAD: [1.0] * 4}, SIGNS), **kwargs)  # type: ignore[arg-type]


def test_a_run_without_clip_scores_has_nothing_to_calibrate() -> None:
    unscored = report({HEAD: [1.0] * 4}, SIGNS)
    for run in unscored.runs:
        run.clip = None
    with pytest.raises(ConfigurationError, match="no image of the run has a CLIP score"):
        calibrate(unscored)


# --- the file ------------------------------------------------------------------------------------


def test_the_file_says_where_its_values_come_from_and_loads_as_overrides(tmp_path: Path) -> None:
    cal = calibrate(report({HEAD: [18.0] * 4, RIVAL: [30.0] * 4}, SIGNS), min_prompts=4)
    path = cal.write(tmp_path / "calibrated.toml")
    doc = tomllib.loads(path.read_text(encoding="utf-8"))
    meta = doc["calibration"]
    assert meta["run"] == "2026-12-02T10:00:00+00:00" and meta["date"] == "2026-12-02"
    assert meta["prompts"] == 4 and meta["prompts_per_skill"]["text"] == 4 and meta["min_prompts"] == 4
    assert meta["method"] == "minmax" and "lowest mean CLIP score maps to its bottom" in meta["mapping"]
    assert meta["measured"][HEAD]["text"] == {"clip": 18.0, "prompts": 4, "published": 0.89, "clip_se": 0.0,
                                              "value": 0.89}  # HEAD scored lowest: the bottom of 0.89..0.90
    evidence = doc["profiles"][HEAD]["skills"]["text"]
    assert evidence["source"].startswith("pixroute eval --calibrate: run of 2026-12-02T10:00:00+00:00")
    assert evidence["verified"] is True
    assert evidence["note"].startswith("mean CLIP score 18.00 ± 0.00 (s.e.) over 4 text rendering prompts")
    # only the skills every model has enough prompts of: the four signs need text and adherence, not position
    assert set(doc["profiles"][HEAD]["skills"]) == {"text", "adherence"}
    assert load_profile_overrides(path) == cal.overrides() == doc["profiles"]
    assert f"| {HEAD} | text | 4 | 18.00 | 0.89 | 0.890 |" in cal.to_markdown()


def test_a_sandbox_run_is_marked_as_measuring_nothing_about_the_models(tmp_path: Path) -> None:
    cal = calibrate(report({HEAD: [18.0] * 4, RIVAL: [30.0] * 4}, SIGNS, backend="sandbox"), min_prompts=4)
    assert any("placeholder images" in n for n in cal.notes)
    assert "# NOTE: measured on the sandboxes' placeholder images" in cal.to_toml()


def test_a_local_model_starts_from_its_family_and_an_unprofiled_one_from_its_tier(tmp_path: Path) -> None:
    keys = served("local/my-sdxl-finetune", family="sdxl") | served("comfyui/mix.safetensors", quality=0.6)
    cal = calibrate(report({"local/my-sdxl-finetune": [30.0] * 4, "comfyui/mix.safetensors": [20.0] * 4}, SIGNS,
                           keys=keys), min_prompts=4)
    overrides = cal.overrides()
    assert overrides["local/my-sdxl-finetune"]["family"] == "sdxl"
    assert overrides["comfyui/mix.safetensors"]["overall"]["value"] == 0.6
    table = default_profiles().with_overrides(load_profile_overrides(cal.write(tmp_path / "c.toml")))
    sdxl = default_profiles().entries["local/sdxl"]
    mine = table.entries["local/my-sdxl-finetune"]
    assert mine.skills["text"] == pytest.approx(max(0.6, sdxl.skills["text"]))
    assert mine.skills["counting"] == sdxl.skills["counting"] and mine.overall == sdxl.overall
    assert table.entries["comfyui/mix.safetensors"].skills["counting"] == 0.6


# --- merging and routing -------------------------------------------------------------------------


def test_an_override_wins_for_its_model_and_skill_and_nothing_else(tmp_path: Path) -> None:
    cal = calibrate(report({HEAD: [18.0] * 4, RIVAL: [30.0] * 4}, SIGNS), min_prompts=4)
    cal.write(tmp_path / "calibrated.toml")
    inline = {RIVAL: {"skills": {"text": 0.5}}, HEAD: {"skills": {"counting": 0.1}}}
    profiles = profiles_from_file("calibrated.toml", inline, policy_source=str(tmp_path / "policy.yaml"))
    table, shipped = default_profiles().with_overrides(profiles), default_profiles()
    measured = {(m.key, m.skill): m.value for m in cal.calibrated}
    assert set(measured) == {(HEAD, "text"), (RIVAL, "text"), (HEAD, "adherence"), (RIVAL, "adherence")}
    assert table.entries[HEAD].skills["text"] == measured[HEAD, "text"] == 0.89
    assert table.entries[HEAD].skills["adherence"] == measured[HEAD, "adherence"] == 0.86
    assert table.entries[HEAD].skills["counting"] == 0.1  # the policy's own override, beside the file's
    assert table.entries[RIVAL].skills["text"] == 0.5  # the policy's inline value wins over the file's
    assert table.entries[RIVAL].skills["adherence"] == measured[RIVAL, "adherence"]
    changed = set(measured) | {(HEAD, "counting")}
    for key, published in shipped.entries.items():
        assert table.entries[key].overall == published.overall
        for skill in SKILLS:
            if (key, skill) not in changed:
                assert table.entries[key].skills[skill] == published.skills[skill], (key, skill)
    assert merge_overrides({HEAD: {"skills": {"text": 0.2, "position": 0.3}}}, {HEAD: {"skills": {"text": 0.4}}}) \
        == {HEAD: {"skills": {"text": 0.4, "position": 0.3}}}


def test_measured_quality_that_differs_from_the_published_changes_the_route(tmp_path: Path) -> None:
    sign = 'a neon sign that says "OPEN" above a door'
    before = router().route(sign)
    assert head_of(before) == HEAD
    cal = calibrate(report({HEAD: [18.0] * 4, RIVAL: [30.0] * 4, THIRD: [24.0] * 4}, SIGNS), min_prompts=4)
    file = cal.write(tmp_path / "calibrated.toml")
    policy = policy_from_dict({"extends": "balanced", "profiles": profiles_from_file(file)}, source="calibrated")
    after = router(policy).route(sign)
    assert head_of(after) == RIVAL
    moved = next(c for c in after.ranked if f"{c.provider}/{c.model}" == HEAD)
    assert moved.fit_note.startswith("decided by text rendering: needs 0.85, model has 0.65 (verified)")
    assert "0.65 (verified)" in after.explain()


# --- bad files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "problem"), [
    ("[profiles", "not a TOML profile override file"),
    ("[models.x]\nname = 'x'\n", r"unknown tables \['models'\]; an override file holds calibration and profiles"),
    ("profiles = 3\n", "profiles must be a table"),
    ('[profiles."openai/gpt-image-2".skills]\nspelling = 0.5\n', "unknown skill 'spelling'"),
    ('[profiles."openai/gpt-image-2".skills]\ntext = 1.5\n', r"skills.text.value: a number in \[0, 1\]"),
    ('[profiles."openai/gpt-image-2".skills.text]\nvalue = 0.5\nmeasured = true\n', "unknown keys \\['measured'\\]"),
    ('[profiles."gpt-image-2".skills]\ntext = 0.5\n', "keys are '<provider kind>/<model>'"),
    ('[profiles."comfyui/mystery.safetensors".skills]\ntext = 0.5\n', "no shipped profile to start from"),
    ('[profiles."local/mine"]\nfamily = "nope"\n', "no profile for local/nope"),
])
def test_a_bad_override_file_is_a_policy_file_error_naming_the_file_and_field(tmp_path: Path, text: str,
                                                                              problem: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyFileError, match=problem) as caught:
        load_profile_overrides(path)
    assert str(path) in str(caught.value)


def test_a_missing_override_file_is_named_relative_to_the_policy(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="cannot read the profile override file") as caught:
        profiles_from_file("nope.toml", policy_source=str(tmp_path / "team.yaml"))
    assert str(tmp_path / "nope.toml") in str(caught.value)
    with pytest.raises(PolicyFileError, match="profiles_file: the path of a profile override file"):
        profiles_from_file(3, policy_source="team.yaml")  # type: ignore[arg-type]
    (tmp_path / "c.toml").write_text('[profiles."openai/gpt-image-2".skills]\ntext = 0.3\n', encoding="utf-8")
    with pytest.raises(PolicyFileError, match=r"team\.yaml: profiles: a table of '<provider kind>/<model>' entries"):
        profiles_from_file("c.toml", 3, policy_source=str(tmp_path / "team.yaml"))  # type: ignore[arg-type]


# --- the eval command ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    pytest.importorskip("scipy")
    from tests.quality_models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_eval_calibrate_writes_the_run_s_scores_per_model_and_skill(tmp_path: Path, clip_dir: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    rows = [*SIGNS, "two red apples on a plate", "three dogs in a park", "a photo of a cat",
            "a blue cube to the left of a green ball", "a photo of a bench", "a photo of a cow on a hill"]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows), encoding="utf-8")
    out = tmp_path / "calibrated.toml"
    code = main([str(prompts), "--policy", "cheapest", "--policy", "quality", "--clip", str(clip_dir),
                 "--out", str(tmp_path / "report"), "--width", "512", "--height", "512", "--json",
                 "--calibrate", str(out), "--calibrate-min", "2"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["files"]["calibration"] == str(out)
    doc = tomllib.loads(out.read_text(encoding="utf-8"))
    assert doc["calibration"]["prompts"] == len(rows) and doc["calibration"]["backend"] == "sandbox"
    assert doc["calibration"]["prompts_per_skill"] == {s: sum(s in prompt_skills(p) for p in rows) for s in SKILLS}
    # every mean in the file is the mean of the report's own CLIP scores for that model and skill
    models = printed["models"]
    expected: dict[tuple[str, str], dict[int, list[float]]] = {}
    for run in printed["runs"]:
        key = "{kind}/{model}".format(**models[f"{run['provider']}/{run['model']}"])
        for skill in prompt_skills(run["prompt"]):
            expected.setdefault((key, skill), {}).setdefault(run["index"], []).append(run["clip"])
    measured = doc["calibration"]["measured"]
    assert {(k, s) for k in measured for s in measured[k]} == set(expected)
    for (key, skill), per_prompt in expected.items():
        row = measured[key][skill]
        assert row["prompts"] == len(per_prompt)
        assert row["clip"] == pytest.approx(statistics.fmean(statistics.fmean(v) for v in per_prompt.values()),
                                            abs=1e-4)
    # each calibrated value lies in the published range of the models measured on its skill
    for entry in doc["profiles"].values():
        for skill, evidence in entry["skills"].items():
            peers = [measured[k][skill]["published"] for k in measured if "value" in measured[k].get(skill, {})]
            assert min(peers) <= evidence["value"] <= max(peers)
    assert load_profile_overrides(out) == doc["profiles"]


def test_eval_calibrate_without_clip_stops_before_any_request(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red apple\n", encoding="utf-8")
    assert main([str(prompts), "--calibrate", str(tmp_path / "c.toml"), "--out", str(tmp_path / "out")]) == 3
    assert "--calibrate needs CLIP scores: give --clip" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.toml").exists()


def test_a_policy_file_loads_the_override_file_beside_it(tmp_path: Path) -> None:
    calibrate(report({HEAD: [18.0] * 4, RIVAL: [30.0] * 4, THIRD: [24.0] * 4}, SIGNS), min_prompts=4).write(
        tmp_path / "calibrated.toml")
    (tmp_path / "team.yaml").write_text("extends: balanced\nprofiles_file: calibrated.toml\n", encoding="utf-8")
    assert head_of(router().route(SIGNS[0], policy=str(tmp_path / "team.yaml"))) == RIVAL
