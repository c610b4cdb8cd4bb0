"""What a prompt needs a model to be good at, what each model is good at, and how well they fit.

A model's quality is not one number: a model that renders text well may still miscount,
and one that counts well may still put things in the wrong place. A :class:`Profile`
holds a model's overall quality and its level in each skill of :data:`SKILLS`, each
value with its :class:`Evidence` (the published figure behind it, or the prior used
where none is published). The shipped profiles are data, read by ``router.profiles``
from ``providers/profiles/*.toml``.

:func:`needs` turns a prompt's :class:`~policies.complexity.ComplexityFeatures` into
the skill level the prompt requires in each skill (0: not needed). The levels are on
the skills' own scales (GenEval accuracy for counting, position and attribute binding,
word accuracy for text, dense-prompt alignment for adherence)::

    skill          needed when the prompt has               level needed
    text           text to render                           0.85; 0.90 for two or more strings
    counting       a count ("three", "2", "a dozen")        0.80 for a count of 2+; 0.85 for two counted
                                                            subjects; 0.40 vague ("several"); 0.30 "one"
    position       spatial relations                        0.30, 0.50, 0.65, 0.80 for 1, 2, 3, 4+
    attributes     attributes bound to two+ subjects        0.30 + 0.15 per further attribute (max 0.75);
                                                            0.20 for attributes on a single subject
    photorealism   photo cues in the prompt text            0.50 ("photo", "realistic", "portrait"),
                                                            0.70 ("photorealistic", "35mm", "dslr", ...)
    adherence      always                                   0.40 + 0.50 x min(1, words / 50)
                                                            + 0.02 per subject beyond two
                                                            + 0.02 per style constraint (max 0.90)

:func:`fit` compares them: each skill's shortfall is ``need - skill`` where the model
falls short; the worst shortfall decides (it names the skill, for ``explain()``) and
the others count a quarter each::

    fit = max(0, 1 - FIT_PENALTY * (worst + SPILL * (sum of the other shortfalls)))

A model that meets every need fits 1, as every model does for "a photo of a cat". The
functions are pure and take microseconds (:func:`needs` is cached per prompt).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from policies.complexity import ComplexityFeatures

__all__ = [
    "FIT_PENALTY",
    "SKILLS",
    "SKILL_LABELS",
    "SPILL",
    "Evidence",
    "Fit",
    "Profile",
    "ProfileError",
    "describe_fit",
    "fit",
    "needs",
]

SKILLS: Final = ("text", "counting", "position", "attributes", "photorealism", "adherence")
"""The skills a profile rates, each in [0, 1]."""

SKILL_LABELS: Final[Mapping[str, str]] = MappingProxyType({
    "text": "text rendering",
    "counting": "counting objects",
    "position": "spatial position",
    "attributes": "attribute binding",
    "photorealism": "photorealism",
    "adherence": "prompt adherence",
})

FIT_PENALTY: Final = 3.0
"""Each 0.1 of skill below what the prompt needs costs 0.3 of the fit term (as the single-float fit did)."""
SPILL: Final = 0.25
"""How much each shortfall other than the worst one counts."""

# --- needs ------------------------------------------------------------------------------------

_PHOTO_STRONG = re.compile(
    r"\b(photo-?realistic|photo-?realism|hyper-?realistic|hyper-?realism|hyper-?real|raw photo|dslr|"
    r"\d{2,3} ?mm|f/\d|bokeh|depth of field|shot on|long exposure|film grain)\b",
    re.IGNORECASE,
)
_PHOTO = re.compile(r"\b(photos?|photographs?|photography|photographic|realistic|realism|portrait|snapshot)\b",
                    re.IGNORECASE)
_POSITION_NEED: Final = (0.0, 0.30, 0.50, 0.65)
_POSITION_MAX: Final = 0.80


@functools.lru_cache(maxsize=4096)
def needs(features: ComplexityFeatures, prompt: str = "") -> Mapping[str, float]:
    """The skill level ``prompt`` needs in each skill, 0 where it needs none (see the module docstring).

    ``features`` come from :func:`policies.complexity.score_prompt`; ``prompt`` is read only for
    photo cues (the features count style constraints without telling a photo from a painting).
    """
    f = features
    need = dict.fromkeys(SKILLS, 0.0)
    if f.text_to_render:
        need["text"] = 0.90 if f.text_to_render > 1 else 0.85
    if f.counts:
        definite = sum(1 for v in f.count_values if v >= 2)
        levels = [0.80 if v >= 2 else 0.30 if v == 1 else 0.40 for v in f.count_values] or [0.40]
        need["counting"] = 0.85 if definite >= 2 else max(levels)
    if f.relations:
        need["position"] = _POSITION_NEED[f.relations] if f.relations < len(_POSITION_NEED) else _POSITION_MAX
    if f.attributes:
        need["attributes"] = round(min(0.75, 0.30 + 0.15 * (f.attributes - 1)), 4) if f.subjects >= 2 else 0.20
    if prompt:
        if _PHOTO_STRONG.search(prompt):
            need["photorealism"] = 0.70
        elif _PHOTO.search(prompt):
            need["photorealism"] = 0.50
    if f.words:
        need["adherence"] = round(min(0.90, 0.40 + 0.50 * min(1.0, f.words / 50) + 0.02 * max(0, f.subjects - 2)
                                      + 0.02 * f.style), 4)
    return MappingProxyType(need)


# --- profiles ---------------------------------------------------------------------------------


class ProfileError(ValueError):
    """A profile that cannot be read; the message names the profile and the field."""


@dataclass(frozen=True, slots=True)
class Evidence:
    """Where one value of a profile comes from.

    ``verified``: the number was read in ``source`` itself. ``measured_on`` names the model the
    source measured when that is not this model (a sibling used as a proxy). A value that is
    not verified is a prior, and ``note`` says why it is what it is.
    """

    value: float
    source: str
    date: str
    verified: bool
    measured_on: str = ""
    note: str = ""

    def describe(self) -> str:
        what = "verified" if self.verified else "prior"
        on = f", measured on {self.measured_on}" if self.measured_on else ""
        return f"{self.value:.2f} ({what}{on}: {self.source})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "source": self.source, "date": self.date,
                               "verified": self.verified}
        if self.measured_on:
            out["measured_on"] = self.measured_on
        if self.note:
            out["note"] = self.note
        return out


_OVERRIDE_SOURCE: Final = "policy file override"


def _evidence(raw: Any, where: str, *, shipped: bool) -> Evidence:
    """One value from a table (``{value, source, date, verified, ...}``) or, in an override, a bare number."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        if shipped:
            raise ProfileError(f"{where}: a shipped value needs source, date and verified, not a bare number")
        raw = {"value": raw}
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{where}: expected a number or a table with value, source, date and verified")
    known = {"value", "source", "date", "verified", "measured_on", "note"}
    unknown = set(raw) - known
    if unknown:
        raise ProfileError(f"{where}: unknown keys {sorted(unknown)}; use {', '.join(sorted(known))}")
    value = raw.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ProfileError(f"{where}.value: a number in [0, 1] is required, got {value!r}")
    if shipped:
        missing = [k for k in ("source", "date", "verified") if k not in raw or raw[k] in ("", None)]
        if missing:
            raise ProfileError(f"{where}: missing {', '.join(missing)}")
        if not isinstance(raw["verified"], bool):
            raise ProfileError(f"{where}.verified: true or false, got {raw['verified']!r}")
        if not raw["verified"] and not raw.get("note"):
            raise ProfileError(f"{where}: a prior (verified = false) needs a note saying why")
    return Evidence(
        value=float(value),
        source=str(raw.get("source") or _OVERRIDE_SOURCE),
        date=str(raw.get("date", "")),
        verified=bool(raw.get("verified", False)),
        measured_on=str(raw.get("measured_on", "")),
        note=str(raw.get("note", "" if shipped else "set in the policy file")),
    )


@dataclass(frozen=True, slots=True)
class Profile:
    """A model's overall quality and its level in each of :data:`SKILLS`, with the evidence for each.

    ``evidence`` is keyed by ``"overall"`` and the skill names.
    """

    overall: float
    skills: Mapping[str, float]
    evidence: Mapping[str, Evidence] = field(default_factory=dict, repr=False)
    model: str = ""
    """The published model the values describe (e.g. ``flux.1-dev``); empty for a flat prior."""

    @classmethod
    def flat(cls, quality: float, *, source: str = "the provider's hand-set quality tier") -> Profile:
        """Every skill at ``quality``: the prior for a model with no profile (the old single-float behaviour)."""
        ev = Evidence(quality, source, "", False, note="no profile for this model; every skill at its quality tier")
        return cls(quality, MappingProxyType(dict.fromkeys(SKILLS, quality)),
                   MappingProxyType({name: ev for name in ("overall", *SKILLS)}))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, model: str = "", where: str = "profile") -> Profile:
        """A profile from its table: ``overall`` and ``skills.<name>``, each ``{value, source, date, verified}``."""
        known = {"overall", "skills", "name"}
        unknown = set(raw) - known
        if unknown:
            raise ProfileError(f"{where}: unknown keys {sorted(unknown)}; use {', '.join(sorted(known))}")
        if "overall" not in raw:
            raise ProfileError(f"{where}: 'overall' is required")
        skills_raw = raw.get("skills")
        if not isinstance(skills_raw, Mapping):
            raise ProfileError(f"{where}: 'skills' must be a table of {', '.join(SKILLS)}")
        missing = [s for s in SKILLS if s not in skills_raw]
        extra = sorted(set(skills_raw) - set(SKILLS))
        if missing or extra:
            problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unknown {', '.join(extra)}"] if extra else [])
            raise ProfileError(f"{where}.skills: " + "; ".join(problems))
        evidence = {"overall": _evidence(raw["overall"], f"{where}.overall", shipped=True)}
        evidence |= {s: _evidence(skills_raw[s], f"{where}.skills.{s}", shipped=True) for s in SKILLS}
        return cls._of(evidence, model)

    @classmethod
    def _of(cls, evidence: Mapping[str, Evidence], model: str) -> Profile:
        return cls(evidence["overall"].value, MappingProxyType({s: evidence[s].value for s in SKILLS}),
                   MappingProxyType(dict(evidence)), model)

    def with_overrides(self, raw: Mapping[str, Any], *, where: str = "override") -> Profile:
        """This profile with ``overall`` and ``skills.<name>`` replaced (numbers or evidence tables)."""
        unknown = set(raw) - {"overall", "skills", "model", "family"}
        if unknown:
            raise ProfileError(f"{where}: unknown keys {sorted(unknown)}; use overall, skills, model")
        evidence = dict(self.evidence)
        if "overall" in raw:
            evidence["overall"] = _evidence(raw["overall"], f"{where}.overall", shipped=False)
        skills_raw = raw.get("skills") or {}
        if not isinstance(skills_raw, Mapping):
            raise ProfileError(f"{where}.skills: a table of skill names to values")
        for name, value in skills_raw.items():
            if name not in SKILLS:
                raise ProfileError(f"{where}.skills: unknown skill {name!r}; use {', '.join(SKILLS)}")
            evidence[name] = _evidence(value, f"{where}.skills.{name}", shipped=False)
        for name in ("overall", *SKILLS):  # a flat or partial base: fill what is missing from the values
            if name not in evidence:
                value = self.overall if name == "overall" else self.skills[name]
                evidence[name] = Evidence(value, "unrecorded", "", False, note="no evidence recorded")
        return Profile._of(evidence, self.model)

    def to_dict(self) -> dict[str, Any]:
        """The profile in its table shape (what :meth:`from_dict` reads), for ``--json`` output and tests."""
        def one(name: str, value: float) -> Any:
            ev = self.evidence.get(name)
            return ev.to_dict() if ev is not None else value

        return {"model": self.model, "overall": one("overall", self.overall),
                "skills": {s: one(s, self.skills[s]) for s in SKILLS}}


# --- fit --------------------------------------------------------------------------------------


class Fit(NamedTuple):
    """How well a profile meets a prompt's needs: the score in [0, 1], the skill that decided it
    (the worst shortfall; None when nothing falls short) and every shortfall (skill → need - level)."""

    score: float
    deciding: str | None
    shortfalls: Mapping[str, float]


_PERFECT: Final = Fit(1.0, None, MappingProxyType({}))


def fit(need: Mapping[str, float], profile: Profile) -> Fit:
    """Compare each skill ``need`` asks for with ``profile``'s level in it (pure; a few microseconds)."""
    skills = profile.skills
    shortfalls: dict[str, float] = {}
    worst_name: str | None = None
    worst = total = 0.0
    for name, level in need.items():
        if level <= 0.0:
            continue
        gap = level - skills[name]
        if gap > 1e-9:
            gap = round(gap, 4)
            shortfalls[name] = gap
            total += gap
            if gap > worst:
                worst, worst_name = gap, name
    if worst_name is None:
        return _PERFECT
    score = max(0.0, 1.0 - FIT_PENALTY * (worst + SPILL * (total - worst)))
    return Fit(round(score, 4), worst_name, MappingProxyType(shortfalls))


def describe_fit(result: Fit, need: Mapping[str, float], profile: Profile) -> str:
    """The fit in words for ``explain()``: which skill decided, and on what evidence."""
    if result.deciding is None:
        return "meets every skill the prompt needs"
    name = result.deciding
    level = profile.skills[name]
    ev = profile.evidence.get(name)
    basis = ""
    if ev is not None:
        basis = " (verified" if ev.verified else " (prior"
        basis += f", measured on {ev.measured_on})" if ev.measured_on else ")"
    others = [f"{s} -{g:.2f}" for s, g in sorted(result.shortfalls.items(), key=lambda kv: -kv[1]) if s != name]
    tail = f"; also short: {', '.join(others)}" if others else ""
    return (f"decided by {SKILL_LABELS[name]}: needs {need[name]:.2f}, model has {level:.2f}{basis}{tail}")
