"""Skill profiles from the user's own prompts: an eval run's CLIP scores, per model and skill, as a profile
override file the policy loads (``pixroute eval --calibrate calibrated.toml``).

Each prompt of the run is put under the skills it needs, by the same classifier routing uses
(:func:`policies.skills.needs` on :func:`policies.complexity.score_prompt`: a skill counts where the need
is above 0, so every prompt counts for ``adherence``). Per model (``<provider kind>/<model>``, the key
the profiles use) and skill, the CLIP scores of the prompts it served are averaged, one score per
prompt (a prompt two policies sent to the same model counts once, with the mean of its scores). A
skill is calibrated only where at least two models each have ``min_prompts`` prompts of it.

**How a CLIP score becomes a profile value.** CLIP score (100 × cosine between the image and prompt
embeddings, ~15–35 for real models) has no fixed relation to the profiles' scales (GenEval accuracy,
word accuracy, DPG-Bench / 100), so it is not converted one-to-one. It is calibrated against the
published values of the same models, for each skill on its own:

- ``minmax`` (default): the models measured on the skill keep the published range of their values
  (lowest to highest published value among them); the model with the lowest mean CLIP score gets the
  bottom of that range, the highest the top, and the others fall in between in proportion to their
  mean CLIP score. Your measurements decide the order and the spacing; the published values decide
  the scale. ``value = p_lo + (clip - clip_lo) / (clip_hi - clip_lo) × (p_hi - p_lo)``.
- ``rank``: the same models' published values, sorted, handed out in the order of their mean CLIP
  scores (the spacing stays the published one; only the order is yours).

A skill is skipped (and the file says why) when fewer than two models have enough prompts, when
their mean CLIP scores are all equal, or when their published values are all equal (no scale to map
onto). Means over different prompts mix prompt difficulty into the comparison: where the policies
sent different prompts to different models, a model that got the hard prompts looks worse than it
is; the file records each mean's prompt count and standard error beside its value.

:func:`calibrate` computes it from an :class:`~router.evaluate.EvalReport`; :meth:`Calibration.write`
writes the TOML that :func:`router.profiles.load_profile_overrides` reads (a policy names it with
``profiles_file``); the published profiles are left as they are for every other model and skill.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from policies.complexity import score_prompt
from policies.skills import SKILL_LABELS, SKILLS, needs
from router.errors import ConfigurationError, RequestValidationError
from router.profiles import ProfileTable, default_profiles

if TYPE_CHECKING:
    from router.evaluate import EvalReport

__all__ = ["DEFAULT_MIN_PROMPTS", "METHODS", "Calibration", "Measured", "calibrate", "prompt_skills"]

Method = Literal["minmax", "rank"]
METHODS: Final = ("minmax", "rank")
DEFAULT_MIN_PROMPTS: Final = 10
"""How many prompts of a skill a model must have served (and been scored on) for that skill to count."""

_MAPPING: Final[Mapping[str, str]] = {
    "minmax": "min-max: per skill, the measured models keep the range of their published values; the lowest "
              "mean CLIP score maps to its bottom, the highest to its top, linearly in between",
    "rank": "rank: per skill, the measured models' published values, sorted, are given out in the order of "
            "their mean CLIP scores",
}


def prompt_skills(prompt: str) -> tuple[str, ...]:
    """The skills ``prompt`` needs (routing's classifier: a need above 0), in :data:`SKILLS` order."""
    need = needs(score_prompt(prompt).features, prompt)
    return tuple(s for s in SKILLS if need[s] > 0)


@dataclass(frozen=True)
class Measured:
    """One model's mean CLIP score on one skill's prompts, and the profile value it calibrates to."""

    key: str
    """``<provider kind>/<model>``, the profiles' key."""
    skill: str
    prompts: int
    clip_mean: float
    clip_se: float | None
    """The mean's standard error (None with one prompt)."""
    published: float
    """The value routing used before: the published profile's, or the model's quality tier without one."""
    value: float | None = None
    """The calibrated value; None where the skill was not calibrated (too few prompts or models)."""


@dataclass
class Calibration:
    """What :func:`calibrate` measured and the profile overrides it gives."""

    source: str
    date: str
    run: str
    method: Method
    min_prompts: int
    prompts: int
    prompts_per_skill: dict[str, int]
    measured: list[Measured]
    skipped: dict[str, str]
    bases: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per model key, what its override must name to start from the profile routing used when the key is not
    in the shipped table (a local model's ``family``; an ``overall`` for a model with no profile)."""
    notes: list[str] = field(default_factory=list)
    clip: str | None = None
    backend: str = ""
    policies: list[str] = field(default_factory=list)
    prompts_source: str = ""

    @property
    def calibrated(self) -> list[Measured]:
        return [m for m in self.measured if m.value is not None]

    def overrides(self) -> dict[str, dict[str, Any]]:
        """The calibrated values in the policy-file override shape (``{"<kind>/<model>": {"skills": …}}``)."""
        out: dict[str, dict[str, Any]] = {}
        groups: dict[str, list[Measured]] = {}
        for m in self.calibrated:
            groups.setdefault(m.key, []).append(m)
        for key, ms in sorted(groups.items()):
            skills = {m.skill: self._evidence(m) for m in sorted(ms, key=lambda m: SKILLS.index(m.skill))}
            out[key] = dict(self.bases.get(key, {})) | {"skills": skills}
        return out

    def _evidence(self, m: Measured) -> dict[str, Any]:
        peers = [p for p in self.calibrated if p.skill == m.skill]
        lo, hi = min(p.published for p in peers), max(p.published for p in peers)
        se = f" ± {m.clip_se:.2f} (s.e.)" if m.clip_se is not None else ""
        return {"value": m.value, "source": self.source, "date": self.date, "verified": True,
                "note": (f"mean CLIP score {m.clip_mean:.2f}{se} over {m.prompts} {SKILL_LABELS[m.skill]} prompts; "
                         f"{self.method} onto the published {lo:.2f}-{hi:.2f} of the {len(peers)} models measured "
                         f"on this skill (published value of this model: {m.published:.2f})")}

    def to_dict(self) -> dict[str, Any]:
        """The file's content as plain data (what :meth:`to_toml` writes, for ``--json``)."""
        measured: dict[str, dict[str, Any]] = {}
        for m in self.measured:
            row: dict[str, Any] = {"clip": round(m.clip_mean, 4), "prompts": m.prompts, "published": m.published}
            if m.clip_se is not None:
                row["clip_se"] = round(m.clip_se, 4)
            if m.value is not None:
                row["value"] = m.value
            measured.setdefault(m.key, {})[m.skill] = row
        calibration: dict[str, Any] = {
            "source": self.source, "date": self.date, "run": self.run, "prompts_file": self.prompts_source,
            "policies": self.policies, "backend": self.backend, "clip": self.clip or "", "prompts": self.prompts,
            "method": self.method, "mapping": _MAPPING[self.method], "min_prompts": self.min_prompts,
            "notes": self.notes, "prompts_per_skill": self.prompts_per_skill, "skipped": self.skipped,
            "measured": measured,
        }
        return {"calibration": calibration, "profiles": self.overrides()}

    def to_toml(self) -> str:
        """The override file: a header saying how to use it, then ``[calibration]`` and ``[profiles]``."""
        head = [
            "# Skill profiles measured on your own prompts by `pixroute eval --calibrate` (router/calibrate.py).",
            "# Load it from a policy file:   extends: balanced",
            "#                               profiles_file: <this file>   (relative to the policy file)",
            "# Each [profiles.\"<kind>/<model>\".skills.<skill>] replaces that model's published value for that",
            "# skill; every other model and skill keeps its published profile (providers/profiles/*.toml).",
            f"# Mapping: {_MAPPING[self.method]}.",
            "# [calibration.measured] lists every mean CLIP score behind it, with its prompt count.",
        ]
        head += [f"# NOTE: {n}" for n in self.notes]
        return "\n".join(head) + "\n\n" + _toml(self.to_dict()) + "\n"

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_toml` to ``path`` (its folder is made)."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(self.to_toml(), encoding="utf-8")
        return out

    def to_markdown(self) -> str:
        """A short table of what changed, for the ``eval`` command's output."""
        out = ["## Calibrated skill profiles", "",
               f"- {self.prompts} prompts; per skill: "
               + ", ".join(f"{s} {n}" for s, n in self.prompts_per_skill.items()),
               f"- method: {_MAPPING[self.method]}; at least {self.min_prompts} prompts per model and skill"]
        out += [f"- note: {n}" for n in self.notes]
        rows = self.calibrated
        if rows:
            out += ["", "| model | skill | prompts | mean CLIP | published | calibrated |", "|---|---|---|---|---|---|"]
            out += [f"| {m.key} | {m.skill} | {m.prompts} | {m.clip_mean:.2f} | {m.published:.2f} | {m.value:.3f} |"
                    for m in rows]
        else:
            out += ["", "No skill had enough prompts on two or more models: nothing was calibrated."]
        if self.skipped:
            out += [""] + [f"- {skill} not calibrated: {why}" for skill, why in self.skipped.items()]
        return "\n".join(out) + "\n"


def calibrate(report: EvalReport, *, min_prompts: int = DEFAULT_MIN_PROMPTS, method: Method = "minmax",
              table: ProfileTable | None = None) -> Calibration:
    """The calibrated skill values of every model the run scored (see the module's docstring).

    ``table``: the profiles to calibrate against (default: the published ones shipped with the package).
    """
    if isinstance(min_prompts, bool) or not isinstance(min_prompts, int) or min_prompts < 1:
        raise RequestValidationError([("min_prompts", "use 1 or more")])
    if method not in METHODS:
        raise RequestValidationError([("method", f"use one of {', '.join(METHODS)}")])
    table = table or default_profiles()
    skills_of: dict[int, tuple[str, ...]] = {}
    for r in report.runs:
        if r.index not in skills_of:
            skills_of[r.index] = prompt_skills(r.prompt)
    per_skill = {s: sum(1 for sk in skills_of.values() if s in sk) for s in SKILLS}

    scores: dict[tuple[str, int], list[float]] = {}  # (model key, prompt index) → its CLIP scores
    published: dict[str, dict[str, float]] = {}
    bases: dict[str, dict[str, Any]] = {}
    for r in report.runs:
        if not r.ok or r.clip is None or r.provider is None or r.model is None:
            continue
        served = report.served.get(f"{r.provider}/{r.model}")
        if served is None:
            continue
        key = f"{served.kind}/{served.model}"
        scores.setdefault((key, r.index), []).append(r.clip)
        if key not in published:
            published[key], bases[key] = _published(table, served.kind, served.model, served.family, served.quality)
    if not scores:
        raise ConfigurationError("nothing to calibrate: no image of the run has a CLIP score (run the eval with a "
                                 "local CLIP model, --clip DIR)")

    by_skill: dict[str, dict[str, list[float]]] = {}  # skill → model key → one score per prompt
    for (key, index), values in sorted(scores.items()):
        for skill in skills_of[index]:
            by_skill.setdefault(skill, {}).setdefault(key, []).append(statistics.fmean(values))
    measured: list[Measured] = []
    skipped: dict[str, str] = {}
    for skill in SKILLS:
        rows = [_measure(key, skill, values, published[key][skill])
                for key, values in sorted(by_skill.get(skill, {}).items())]
        enough = [m for m in rows if m.prompts >= min_prompts]
        why = _why_not(skill, rows, enough, min_prompts)
        if why:
            skipped[skill] = why
            measured += rows
            continue
        mapped = _map(enough, method)
        measured += [_with(m, mapped[m.key]) if m.key in mapped else m for m in rows]

    run_prompts = len(skills_of)
    source = (f"pixroute eval --calibrate: run of {report.created}, {run_prompts} prompts from "
              f"{report.prompts_source or 'the given prompts'}, policies {', '.join(report.policies)}, "
              f"{report.backend} backends, CLIP model {report.clip or '(none)'}")
    notes = []
    if report.backend == "sandbox":
        notes.append("measured on the sandboxes' placeholder images: these values say nothing about the models "
                     "(for trying the feature out); calibrate on real backends (--backends env) before routing on it")
    used = {m.key for m in measured if m.value is not None}
    return Calibration(source=source, date=report.created[:10], run=report.created, method=method,
                       min_prompts=min_prompts, prompts=run_prompts, prompts_per_skill=per_skill, measured=measured,
                       skipped=skipped, bases={k: v for k, v in bases.items() if v and k in used}, notes=notes,
                       clip=report.clip, backend=report.backend, policies=list(report.policies),
                       prompts_source=report.prompts_source)


def _published(table: ProfileTable, kind: str, model: str, family: str | None,
               quality: float) -> tuple[dict[str, float], dict[str, Any]]:
    """A model's published skill values (its quality tier for each, without a profile) and what an override
    of ``kind/model`` must name to start from the same profile on its own (a local model's ``family``; an
    ``overall`` for a model with no profile)."""
    profile = table.get(kind, model, family)
    if profile is None:
        prior = {"value": quality, "source": "the provider's quality tier", "date": "", "verified": False,
                 "note": "no published profile for this model; routing used its quality tier for every skill"}
        return dict.fromkeys(SKILLS, quality), {"overall": prior}
    if f"{kind}/{model}" not in table.entries and family and f"{kind}/{family}" in table.entries:
        return dict(profile.skills), {"family": family}
    return dict(profile.skills), {}  # the key itself, or the entry it starts with (found the same way on load)


def _measure(key: str, skill: str, values: list[float], published: float) -> Measured:
    """One model's mean over its prompts of ``skill`` (one score each), with the mean's standard error."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return Measured(key, skill, len(values), statistics.fmean(values), se, published)


def _why_not(skill: str, rows: list[Measured], enough: list[Measured], min_prompts: int) -> str | None:
    if len(enough) < 2:
        have = ", ".join(f"{m.key} {m.prompts}" for m in rows) or "none"
        return (f"needs two or more models with at least {min_prompts} scored prompts each "
                f"(prompts per model: {have})")
    if max(m.clip_mean for m in enough) - min(m.clip_mean for m in enough) < 1e-9:
        return "every model measured on it has the same mean CLIP score: nothing to tell them apart"
    if max(m.published for m in enough) - min(m.published for m in enough) < 1e-9:
        return (f"the published values of the models measured on it are all {enough[0].published:.2f}: "
                "no scale to map the CLIP scores onto")
    return None


def _map(rows: list[Measured], method: Method) -> dict[str, float]:
    """Each model's calibrated value (see the module's docstring)."""
    p_lo, p_hi = min(m.published for m in rows), max(m.published for m in rows)
    if method == "rank":
        ordered = sorted(rows, key=lambda m: (m.clip_mean, m.key))
        return {m.key: v for m, v in zip(ordered, sorted(m.published for m in rows), strict=True)}
    c_lo, c_hi = min(m.clip_mean for m in rows), max(m.clip_mean for m in rows)
    return {m.key: round(p_lo + (m.clip_mean - c_lo) / (c_hi - c_lo) * (p_hi - p_lo), 3) for m in rows}


def _with(m: Measured, value: float) -> Measured:
    return Measured(m.key, m.skill, m.prompts, m.clip_mean, m.clip_se, m.published, value)


# --- TOML --------------------------------------------------------------------------------------

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE.match(name) else _string(name)


def _string(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; DEL, which JSON leaves bare, is escaped too)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} to TOML")
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(str(k))} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml(doc: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """``doc`` as TOML: plain values first, then each nested table under its own header (short tables of
    plain values, such as one measured skill, stay inline)."""
    plain = [(k, v) for k, v in doc.items() if not _is_table(v)]
    tables = [(k, v) for k, v in doc.items() if _is_table(v)]
    lines = []
    if prefix and (plain or not tables):
        lines.append("[" + ".".join(_key(p) for p in prefix) + "]")
    lines += [f"{_key(str(k))} = {_value(v)}" for k, v in plain]
    out = "\n".join(lines)
    for k, v in tables:
        block = _toml(v, (*prefix, str(k)))
        out = f"{out}\n\n{block}" if out else block
    return out


def _is_table(value: Any) -> bool:
    """A mapping written under a header of its own rather than inline: an empty one, one holding a table or
    a list, or one too long for a line."""
    if not isinstance(value, Mapping):
        return False
    if not value or any(isinstance(v, (Mapping, list, tuple)) for v in value.values()):
        return True
    return len(_value(value)) > 100
