"""Per-skill model profiles: what a prompt needs, what each model can do, where the data comes from."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from policies.complexity import score_prompt
from policies.skills import SKILLS, Profile, ProfileError, describe_fit, fit, needs
from router.profiles import ProfileTable, default_profiles, load_profiles, profile_for

BAKERY = ("a bakery storefront with a sign that says FRESH BREAD, three baguettes and two croissants in the "
          "window, a bicycle to the left of the door, a cat on top of the awning, under a lamp post beside a "
          "bench, photorealistic")
"""Text, two counts and four spatial relations: the prompt that local SDXL used to head."""
SIMPLE = "a photo of a cat"
STRONG = ("openai/gpt-image-2", "bfl/flux-2-pro")
WEAK = ("local/sdxl", "local/sd15", "replicate/sdxl")
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
GENEVAL = Path(__file__).resolve().parent / "data" / "geneval" / "evaluation_metadata.jsonl"  # vendored, MIT


def need_of(prompt: str) -> dict[str, float]:
    return dict(needs(score_prompt(prompt).features, prompt))


@pytest.fixture(scope="module")
def table() -> ProfileTable:
    return default_profiles()


# --- what a prompt needs ----------------------------------------------------------------------


def test_the_bakery_prompt_needs_text_counting_position_photorealism_and_adherence() -> None:
    need = need_of(BAKERY)
    assert need["text"] == 0.85
    assert need["counting"] == 0.85  # two counted subjects (three baguettes, two croissants)
    assert need["position"] == 0.80  # four relations
    assert need["photorealism"] == 0.70  # "photorealistic"
    assert need["adherence"] == 0.90  # long, many subjects
    assert need["attributes"] == 0.0


@pytest.mark.parametrize(("prompt", "skill", "level"), [
    ("a sign that says OPEN", "text", 0.85),
    ('a poster with "SALE" and "50% OFF"', "text", 0.90),
    ("three apples", "counting", 0.80),
    ("several apples", "counting", 0.40),
    ("a cat on a sofa", "position", 0.30),
    ("a red car and a blue truck", "attributes", 0.45),
    ("a red car", "attributes", 0.20),
    ("a photo of a dog", "photorealism", 0.50),
    ("a dog, 35mm, bokeh", "photorealism", 0.70),
    ("an oil painting of a dog", "photorealism", 0.0),
])
def test_each_feature_asks_for_its_skill(prompt: str, skill: str, level: float) -> None:
    assert need_of(prompt)[skill] == pytest.approx(level)


@pytest.mark.parametrize(("tag", "asked"), [
    ("single_object", {}), ("two_object", {}), ("counting", {"counting": 0.8}), ("colors", {"attributes": 0.2}),
    ("position", {"position": 0.3}), ("color_attr", {"attributes": 0.45}),
])
def test_each_geneval_tag_asks_for_its_own_skill(tag: str, asked: dict[str, float]) -> None:
    """GenEval's prompts (ground truth nobody here wrote): each tag's prompts need that tag's skill alone
    (besides adherence, and photorealism for their "a photo of ..." wording)."""
    rows = [json.loads(line) for line in GENEVAL.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = [r["prompt"] for r in rows if r["tag"] == tag]
    assert len(prompts) >= 80
    for prompt in prompts:
        need = {k: v for k, v in need_of(prompt).items() if v and k not in ("adherence", "photorealism")}
        assert set(need) == set(asked), prompt
        assert all(need[k] >= level for k, level in asked.items()), (prompt, need)


def test_without_the_prompt_text_no_photo_cue_is_read() -> None:
    assert needs(score_prompt("a photo of a dog").features)["photorealism"] == 0.0


def test_a_simple_prompt_needs_little() -> None:
    need = need_of(SIMPLE)
    assert {k for k, v in need.items() if v} == {"photorealism", "adherence"}
    assert max(need.values()) <= 0.5


# --- fit --------------------------------------------------------------------------------------


def test_the_bakery_prompt_fits_the_strong_text_models_and_text_decides_against_sdxl_and_sd15(
        table: ProfileTable) -> None:
    need = need_of(BAKERY)
    strong = {key: fit(need, table.entries[key]) for key in STRONG}
    weak = {key: fit(need, table.entries[key]) for key in WEAK}
    assert min(f.score for f in strong.values()) >= 0.6, strong
    assert max(f.score for f in weak.values()) == 0.0, weak
    assert {f.deciding for f in weak.values()} == {"text"}
    assert all(f.shortfalls["text"] > 0.8 for f in weak.values())
    assert "text" not in strong["openai/gpt-image-2"].shortfalls


def test_a_simple_prompt_fits_every_generating_model_equally(table: ProfileTable) -> None:
    need = need_of(SIMPLE)
    scores = {key: fit(need, p).score for key, p in table.entries.items()}
    assert set(scores.values()) == {1.0}, {k: s for k, s in scores.items() if s < 1}
    assert fit(need, table.entries["local/sd15"]).deciding is None


def test_the_worst_shortfall_decides_and_the_others_count_a_quarter() -> None:
    profile = Profile.flat(0.5).with_overrides({"skills": {"text": 0.05, "counting": 0.7}})
    result = fit({"text": 0.85, "counting": 0.8, "position": 0.0}, profile)
    assert result.deciding == "text"
    assert dict(result.shortfalls) == {"text": 0.8, "counting": pytest.approx(0.1)}
    assert result.score == 0.0
    small = fit({"counting": 0.8, "position": 0.6}, profile)  # shortfalls 0.1 and 0.1
    assert small.score == pytest.approx(1 - 3.0 * (0.1 + 0.25 * 0.1))
    score, deciding, shortfalls = small  # a plain (score, deciding skill, shortfalls) tuple too
    assert deciding in shortfalls and score == small.score


def test_a_flat_profile_reproduces_the_single_float_fit() -> None:
    need = need_of("three red apples on a wooden table, a sign that says SALE, oil painting, in the style of "
                   "Van Gogh")
    assert fit(need, Profile.flat(0.9)).score == 1.0
    assert fit(need, Profile.flat(0.65)).score == pytest.approx(0.25, abs=0.06)
    assert fit(need, Profile.flat(0.5)).score == 0.0


def test_explain_names_the_deciding_skill_and_its_evidence(table: ProfileTable) -> None:
    need = need_of(BAKERY)
    profile = table.entries["local/sdxl"]
    text = describe_fit(fit(need, profile), need, profile)
    assert text.startswith("decided by text rendering: needs 0.85, model has 0.03 (verified)")
    assert "also short: position" in text
    assert describe_fit(fit(need_of(SIMPLE), profile), need_of(SIMPLE), profile) == \
        "meets every skill the prompt needs"


def test_fit_takes_microseconds(table: ProfileTable) -> None:
    need = needs(score_prompt(BAKERY).features, BAKERY)
    profiles = list(table.entries.values())
    start = time.perf_counter()
    for _ in range(200):
        for p in profiles:
            fit(need, p)
    per_call = (time.perf_counter() - start) / (200 * len(profiles))
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} µs per fit"


# --- the shipped data -------------------------------------------------------------------------


def test_every_shipped_value_has_a_source_a_date_and_a_verified_flag(table: ProfileTable) -> None:
    assert DATE.match(table.version.split(".")[0])
    for mid, profile in table.models.items():
        assert set(profile.evidence) == {"overall", *SKILLS}, mid
        for name, ev in profile.evidence.items():
            where = f"{mid}.{name}"
            assert 0.0 <= ev.value <= 1.0, where
            assert ev.source.strip(), where
            assert DATE.match(ev.date), where
            assert isinstance(ev.verified, bool), where
            if not ev.verified:
                assert len(ev.note) > 20, f"{where}: a prior must say why"
        assert profile.overall == profile.evidence["overall"].value
        assert all(profile.skills[s] == profile.evidence[s].value for s in SKILLS)


def test_published_figures_are_marked_verified_and_priors_are_not(table: ProfileTable) -> None:
    sdxl = table.models["sdxl-1.0"].evidence
    assert sdxl["counting"].verified and "GenEval" in sdxl["counting"].source and sdxl["counting"].value == 0.39
    assert sdxl["text"].verified and "OneIG-Bench" in sdxl["text"].source
    assert not sdxl["photorealism"].verified
    flux2 = table.models["flux.2-pro"].evidence
    assert flux2["text"].verified and flux2["text"].measured_on == "FLUX.2 [dev]"
    schnell = table.models["flux.1-schnell"].evidence
    assert not any(schnell[s].verified for s in SKILLS)
    assert "FLUX.1 [dev]" in schnell["counting"].note


def test_every_model_a_provider_offers_and_every_local_family_has_a_profile(table: ProfileTable) -> None:
    from providers import bfl, fal, google, ideogram, openai, replicate, stability, together, xai
    from providers.local.catalog import FAMILIES

    offered = {f"{mod.__name__.rsplit('.', 1)[1]}/{m}"
               for mod in (bfl, fal, google, ideogram, openai, replicate, stability, together, xai) for m in mod.MODELS}
    offered |= {f"local/{family}" for family in FAMILIES}
    from providers.comfyui import FAMILIES as COMFYUI_FAMILIES

    offered |= {f"comfyui/{family}" for family in COMFYUI_FAMILIES}
    assert offered <= set(table.entries), sorted(offered - set(table.entries))
    assert set(table.entries) <= offered, sorted(set(table.entries) - offered)


def test_a_local_model_takes_its_catalog_familys_profile(table: ProfileTable) -> None:
    from providers.local.provider import LocalProvider

    local = LocalProvider(catalog={"models": {"my-xl": {"path": "/models/my-xl", "family": "sdxl"},
                                              "tiny": {"path": "/models/tiny", "family": "sd15"}}})
    assert profile_for(local, "my-xl", table) is table.entries["local/sdxl"]
    assert profile_for(local, "tiny", table) is table.entries["local/sd15"]
    assert table.get("local", "flux-krea") is table.entries["local/flux"]  # no catalog: the name's prefix
    assert table.get("local", "mystery") is None
    hosted = SimpleNamespace(kind="openai")
    assert profile_for(hosted, "gpt-image-2", table) is table.entries["openai/gpt-image-2"]


# --- overrides --------------------------------------------------------------------------------


def test_policy_overrides_replace_skills_in_the_price_override_shape(table: ProfileTable) -> None:
    changed = table.with_overrides({"openai/gpt-image-2": {"skills": {"text": 0.2}, "overall": 0.95}})
    p = changed.entries["openai/gpt-image-2"]
    assert p.skills["text"] == 0.2 and p.overall == 0.95
    assert p.skills["counting"] == table.entries["openai/gpt-image-2"].skills["counting"]
    assert p.evidence["text"].source == "policy file override" and not p.evidence["text"].verified
    assert changed.version.endswith("+local") and table.entries["openai/gpt-image-2"].skills["text"] == 0.9
    assert fit(need_of(BAKERY), p).deciding == "text"


def test_an_override_can_name_a_model_or_family_for_a_local_model(table: ProfileTable) -> None:
    changed = table.with_overrides({
        "local/my-finetune": {"model": "flux.1-dev", "skills": {"photorealism": {"value": 0.95,
                                                                                 "source": "our eval"}}},
        "local/anime-xl": {"family": "sdxl"},
    })
    mine = changed.get("local", "my-finetune")
    assert mine is not None and mine.model == "flux.1-dev" and mine.skills["photorealism"] == 0.95
    assert mine.evidence["photorealism"].source == "our eval"
    assert changed.get("local", "anime-xl") is not None
    assert changed.entries["local/anime-xl"].skills == table.entries["local/sdxl"].skills


@pytest.mark.parametrize(("override", "message"), [
    ({"openai/gpt-image-2": {"skills": {"typing": 0.5}}}, "unknown skill 'typing'"),
    ({"openai/gpt-image-2": {"skills": {"text": 1.5}}}, r"text\.value: a number in \[0, 1\]"),
    ({"local/x": {"model": "nope"}}, "unknown model 'nope'"),
    ({"local/brand-new": {"skills": {"text": 0.5}}}, "no shipped profile to start from"),
    ({"gpt-image-2": {"overall": 0.5}}, "keys are '<provider kind>/<model>'"),
])
def test_a_bad_override_is_a_clear_error(table: ProfileTable, override: dict, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        table.with_overrides(override)


def test_a_new_model_can_be_given_whole_in_an_override(table: ProfileTable) -> None:
    changed = table.with_overrides({"local/brand-new": {"overall": 0.7, "skills": {"text": 0.5}}})
    p = changed.entries["local/brand-new"]
    assert p.overall == 0.7 and p.skills["text"] == 0.5 and p.skills["counting"] == 0.7


# --- the loader refuses unsourced data ---------------------------------------------------------


def _folder(tmp_path: Path, body: str) -> Path:
    (tmp_path / "_table.toml").write_text('version = "t"\n')
    (tmp_path / "v.toml").write_text(body)
    return tmp_path


def _model(text: str) -> str:
    skill = 'value = 0.5\nsource = "s"\ndate = "2026-01-01"\nverified = true\n'
    out = f'[models.m]\nname = "m"\n[models.m.overall]\n{skill}'
    for s in SKILLS:
        out += f"[models.m.skills.{s}]\n" + (text if s == "text" else skill)
    return out + '[profiles."k/m"]\nmodel = "m"\n'


def test_a_profile_round_trips_through_its_table_shape(table: ProfileTable) -> None:
    for profile in table.entries.values():
        raw = profile.to_dict()
        assert Profile.from_dict({"overall": raw["overall"], "skills": raw["skills"]}, model=raw["model"]) == profile


def test_the_loader_reads_a_sourced_table(tmp_path: Path) -> None:
    table = load_profiles(_folder(tmp_path, _model('value = 0.4\nsource = "s"\ndate = "2026-01-01"\n'
                                                    'verified = true\n')))
    assert table.version == "t" and table.entries["k/m"].skills["text"] == 0.4


@pytest.mark.parametrize(("text", "message"), [
    ('value = 0.4\ndate = "2026-01-01"\nverified = true\n', "missing source"),
    ('value = 0.4\nsource = "s"\nverified = true\n', "missing date"),
    ('value = 0.4\nsource = "s"\ndate = "2026-01-01"\n', "missing verified"),
    ('value = 0.4\nsource = "s"\ndate = "2026-01-01"\nverified = false\n', "a prior .* needs a note"),
])
def test_the_loader_refuses_a_value_without_its_evidence(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        load_profiles(_folder(tmp_path, _model(text)))


def test_a_profile_must_rate_every_skill() -> None:
    ev = {"value": 0.5, "source": "s", "date": "2026-01-01", "verified": True}
    with pytest.raises(ProfileError, match="missing adherence"):
        Profile.from_dict({"overall": ev, "skills": {s: ev for s in SKILLS if s != "adherence"}})
