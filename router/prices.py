"""Prices as data: the dated, versioned table shipped in ``providers/prices/*.toml``.

``_table.toml`` holds the version; every other file holds one provider's rows as
``[prices."<provider>/<model>"]`` with ``unit``, ``source``, ``date`` and the rates.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from importlib import resources
from typing import Any


@dataclass(frozen=True, slots=True)
class PriceRow:
    """One provider/model's rates: ``unit`` names the billing unit; ``rates`` hold the numbers."""

    key: str
    unit: str
    rates: Mapping[str, Any]
    source: str = ""
    date: str = ""

    def rate(self, name: str) -> Decimal:
        return Decimal(str(self.rates[name]))


@dataclass(frozen=True, slots=True)
class PriceTable:
    version: str
    rows: Mapping[str, PriceRow]

    def get(self, provider_kind: str, model: str) -> PriceRow | None:
        """The row for ``provider/model``; a model id extends its family's row (gpt-image-2.5 → gpt-image-2)."""
        key = f"{provider_kind}/{model}"
        if key in self.rows:
            return self.rows[key]
        family = [k for k in self.rows if key.startswith(k)]
        return self.rows[max(family, key=len)] if family else None

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]], version: str | None = None) -> PriceTable:
        """A table with rows replaced or added (from a policy file)."""
        rows = dict(self.rows)
        for key, raw in overrides.items():
            base = dict(rows[key].rates) | {"unit": rows[key].unit} if key in rows else {}
            rows[key] = _row(key, base | dict(raw))
        return PriceTable(version or f"{self.version}+local", rows)


def _row(key: str, raw: Mapping[str, Any]) -> PriceRow:
    data = dict(raw)
    return PriceRow(key, str(data.pop("unit")), data, str(data.pop("source", "")), str(data.pop("date", "")))


@cache
def default_prices() -> PriceTable:
    """The table shipped with the package."""
    folder = resources.files("providers").joinpath("prices")
    version = tomllib.loads(folder.joinpath("_table.toml").read_text(encoding="utf-8"))["version"]
    rows: dict[str, PriceRow] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml") and entry.name != "_table.toml":
            doc = tomllib.loads(entry.read_text(encoding="utf-8"))
            rows |= {k: _row(k, v) for k, v in doc.get("prices", {}).items()}
    return PriceTable(version, rows)
