"""Skill profiles as data: the dated, versioned table shipped in ``providers/profiles/*.toml``.

``_table.toml`` holds the version; every other file holds one vendor's data:

- ``[models."<id>"]``: a published model's ``overall`` and ``skills.<name>``, each a table of
  ``value``, ``source``, ``date``, ``verified`` and (for a prior) a ``note`` saying why;
- ``[profiles."<provider kind>/<model>"]``: which published model a provider's model id is,
  optionally with its own ``overall`` (a provider's hand-set tier).

Local Diffusers models are found by their catalog family: ``local/<family>`` (``local/sdxl``)
is the default for every local model of that family, and ``local/<model name>`` overrides it.

Users override any of it from their policy file, in the shape of price overrides::

    profiles:
      "openai/gpt-image-2": {skills: {text: 0.9}}
      "local/my-finetune": {model: flux.1-dev, skills: {photorealism: 0.9}}

or keep the overrides in a file of their own, as ``pixroute eval --calibrate`` writes them from the
user's measured CLIP scores (:mod:`router.calibrate`), and name it in the policy file::

    extends: balanced
    profiles_file: calibrated.toml     # relative to the policy file

An override file is TOML: ``[profiles."<kind>/<model>"]`` tables in the override shape above (each value a
number or an evidence table of ``value``, ``source``, ``date``, ``verified``, ``note``), and an optional
``[calibration]`` table saying how the values were measured (read by people, not by the router).
:func:`load_profile_overrides` reads and checks it; :func:`profiles_from_file` layers a policy's inline
``profiles`` over it. The merge is per model and skill: an override replaces the value of the skills it
names for the model it names, and every other model and skill keeps its published value.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from types import MappingProxyType
from typing import Any

from policies.skills import SKILLS, Profile, ProfileError
from router.errors import PolicyFileError

__all__ = [
    "OVERRIDE_TABLES",
    "ProfileTable",
    "default_profiles",
    "load_profile_overrides",
    "load_profiles",
    "merge_overrides",
    "profile_for",
    "profiles_from_file",
]

OVERRIDE_TABLES = frozenset({"calibration", "profiles"})
"""The top-level tables an override file may hold."""


@dataclass(frozen=True, slots=True)
class ProfileTable:
    """Published models' profiles, and which model each provider's model id is."""

    version: str
    models: Mapping[str, Profile]
    """Published model id (``flux.1-dev``) → its profile."""
    entries: Mapping[str, Profile]
    """``<provider kind>/<model>`` → the profile routing uses for it."""

    def get(self, kind: str, model: str, family: str | None = None) -> Profile | None:
        """The profile of ``kind/model``; else its ``family``'s (local models); else the longest
        entry the key starts with (``local/sdxl-turbo`` → ``local/sdxl``); else None."""
        key = f"{kind}/{model}"
        hit = self.entries.get(key)
        if hit is None and family:
            hit = self.entries.get(f"{kind}/{family}")
        if hit is None:
            prefixes = [k for k in self.entries if key.startswith(k)]
            hit = self.entries[max(prefixes, key=len)] if prefixes else None
        return hit

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]], version: str | None = None) -> ProfileTable:
        """A table with entries changed or added (from a policy file).

        Each override is keyed ``<kind>/<model>`` and may name a published ``model`` (or, for a local
        model, a ``family``) to start from, and replace ``overall`` and ``skills.<name>`` with numbers
        or evidence tables. A new key without a ``model`` or ``family`` starts from the entry it would
        match today.
        """
        entries = dict(self.entries)
        for key, raw in overrides.items():
            where = f"profiles.{key}"
            if not isinstance(raw, Mapping):
                raise ProfileError(f"{where}: a table of model, overall and skills")
            kind, _, model = key.partition("/")
            if not model:
                raise ProfileError(f"{where}: keys are '<provider kind>/<model>'")
            base: Profile | None
            if "model" in raw:
                base = self.models.get(str(raw["model"]))
                if base is None:
                    raise ProfileError(f"{where}.model: unknown model {raw['model']!r}; the table has "
                                       f"{', '.join(sorted(self.models))}")
            elif "family" in raw:
                base = self.entries.get(f"{kind}/{raw['family']}")
                if base is None:
                    raise ProfileError(f"{where}.family: no profile for {kind}/{raw['family']}")
            else:
                base = entries.get(key) or self.get(kind, model)
            if base is None:
                if "overall" not in raw:
                    raise ProfileError(f"{where}: no shipped profile to start from; give model, or overall")
                base = Profile.flat(_number(raw["overall"], f"{where}.overall"), source="policy file override")
            entries[key] = base.with_overrides(raw, where=where)
        return ProfileTable(version=version or f"{self.version}+local", models=self.models,
                            entries=MappingProxyType(entries))


def _number(raw: Any, where: str) -> float:
    value = raw.get("value") if isinstance(raw, Mapping) else raw
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(f"{where}: a number in [0, 1] is required, got {value!r}")
    return float(value)


def load_profiles(folder: Traversable) -> ProfileTable:
    """Read a folder of profile files (``_table.toml`` and one file per vendor)."""
    version = str(tomllib.loads(folder.joinpath("_table.toml").read_text(encoding="utf-8"))["version"])
    models: dict[str, Profile] = {}
    maps: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml") or entry.name == "_table.toml":
            continue
        try:
            doc = tomllib.loads(entry.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ProfileError(f"{entry.name}: {exc}") from None
        unknown = set(doc) - {"models", "profiles"}
        if unknown:
            raise ProfileError(f"{entry.name}: unknown tables {sorted(unknown)}; use models and profiles")
        for mid, raw in doc.get("models", {}).items():
            if mid in models:
                raise ProfileError(f"{entry.name}: model {mid!r} is defined twice")
            models[mid] = Profile.from_dict(raw, model=mid, where=f"{entry.name}: models.{mid}")
        for key, raw in doc.get("profiles", {}).items():
            if key in maps:
                raise ProfileError(f"{entry.name}: profile {key!r} is defined twice")
            maps[key] = (entry.name, raw)
    entries: dict[str, Profile] = {}
    for key, (name, raw) in maps.items():
        where = f"{name}: profiles.{key}"
        unknown = set(raw) - {"model", "overall"}
        if unknown:
            raise ProfileError(f"{where}: unknown keys {sorted(unknown)}; use model and overall")
        mid = raw.get("model")
        if mid not in models:
            raise ProfileError(f"{where}.model: unknown model {mid!r}")
        profile = models[mid]
        if "overall" in raw:
            # a provider's own overall, checked as strictly as the models' values
            profile = Profile.from_dict({"overall": raw["overall"],
                                         "skills": {s: profile.evidence[s].to_dict() for s in SKILLS}},
                                        model=profile.model, where=where)
        entries[key] = profile
    return ProfileTable(version=version, models=MappingProxyType(models), entries=MappingProxyType(entries))


@cache
def default_profiles() -> ProfileTable:
    """The table shipped with the package."""
    return load_profiles(resources.files("providers").joinpath("profiles"))


def profile_for(provider: Any, model: str, table: ProfileTable | None = None) -> Profile | None:
    """The profile routing uses for ``model`` on ``provider`` (None: no profile; fall back to its quality).

    A provider with a model ``catalog`` (the local backend) is asked for the model's ``family``.
    """
    table = table or default_profiles()
    family: str | None = None
    catalog = getattr(provider, "catalog", None)
    if catalog is not None and model in catalog:
        family = str(catalog.get(model).family)
    return table.get(str(provider.kind), model, family)


# --- override files ------------------------------------------------------------------------


def load_profile_overrides(path: str | os.PathLike[str], *,
                           table: ProfileTable | None = None) -> dict[str, dict[str, Any]]:
    """The ``[profiles]`` of an override file, in the policy-file override shape, checked against ``table``
    (default: the shipped one) so a wrong entry fails here, naming the file and the field.

    Raises :class:`~router.errors.PolicyFileError` for a file that is missing, not TOML, or holds a table,
    key, skill or value the profiles do not have.
    """
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyFileError(f"{p}: cannot read the profile override file ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyFileError(f"{p}: not a TOML profile override file ({exc})") from None
    unknown = set(doc) - OVERRIDE_TABLES
    if unknown:
        raise PolicyFileError(f"{p}: unknown tables {sorted(unknown)}; an override file holds "
                              f"{' and '.join(sorted(OVERRIDE_TABLES))}")
    for name in OVERRIDE_TABLES & set(doc):
        if not isinstance(doc[name], Mapping):
            raise PolicyFileError(f"{p}: {name} must be a table")
    overrides = {str(k): v for k, v in doc.get("profiles", {}).items()}
    try:
        (table or default_profiles()).with_overrides(overrides)
    except ProfileError as exc:
        raise PolicyFileError(f"{p}: {exc}") from None
    return overrides


def merge_overrides(*layers: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Profile overrides layered in order, a later layer winning per model and, within a model, per
    skill (and for ``overall``, ``model`` and ``family``)."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        if not isinstance(layer, Mapping):
            raise ProfileError(f"profiles: a table of '<provider kind>/<model>' entries, got {layer!r}")
        for key, raw in layer.items():
            if not isinstance(raw, Mapping):
                raise ProfileError(f"profiles.{key}: a table of model, overall and skills")
            entry = merged.setdefault(key, {})
            for field_name, value in raw.items():
                if field_name == "skills" and isinstance(value, Mapping) and isinstance(entry.get("skills"), Mapping):
                    entry["skills"] = {**entry["skills"], **value}
                else:
                    entry[field_name] = dict(value) if isinstance(value, Mapping) else value
    return merged


def profiles_from_file(file: str | os.PathLike[str], inline: Mapping[str, Mapping[str, Any]] | None = None, *,
                       policy_source: str = "policy") -> dict[str, dict[str, Any]]:
    """A policy's ``profiles``: the override file ``file`` (a path relative to the policy file
    ``policy_source``) with the policy's own ``inline`` overrides over it, per model and skill."""
    if not isinstance(file, (str, os.PathLike)) or not str(file).strip():
        raise PolicyFileError(f"{policy_source}: profiles_file: the path of a profile override file, got {file!r}")
    path = Path(file)
    if not path.is_absolute():
        path = Path(policy_source).parent / path
    try:
        return merge_overrides(load_profile_overrides(path), inline or {})
    except ProfileError as exc:
        raise PolicyFileError(f"{policy_source}: {exc}") from None
