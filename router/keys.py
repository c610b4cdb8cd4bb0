"""API keys for the HTTP server's clients: stored hashed, each with a name that tags its spend.

A key file (TOML, or YAML with the same fields) lists one entry per client::

    # keys.toml — make an entry with: pixroute keys NAME --file keys.toml [--budget 5 --period day]
    [[keys]]
    name = "team-a"                          # becomes the ledger tag "key:team-a"
    sha256 = "3b4c…"                         # hex SHA-256 of the key; the key itself is never stored
    budget_usd = "5.00"                      # optional: a budget on the key's tag
    period = "day"                           # day | month (default) | total
    tags = ["client-eu"]                     # optional: more tags for every request of this key
    rpm = 60                                 # optional: image requests per minute (429 beyond)
    provider_options = ["quality", "local.safety_checker"]   # optional: what this key may set (below)

``provider_options`` lists the provider options this key's requests may set: ``"quality"`` (for any
provider), ``"<provider>.background"`` (for one), ``"<provider>.*"`` or ``"*"`` (every option of one provider,
or of all). Left out, the server's default list applies (``pixroute serve --client-options``; by
default ``*``). The safety switches (:data:`SAFETY_OPTIONS`: ``safety_checker``,
``disable_safety_checker``, ``safety_tolerance``, ``moderation``) are never matched by ``*`` nor by the
server's default: a key may set one only when its own list names it.

The file must not be writable by group or others (whoever can write it can add a key): the server
refuses to start otherwise, and :meth:`ServerKeys.save` writes it readable and writable by its owner only.

Keys are long random tokens (``sk-ir-`` + 43 url-safe characters, 256 bits), so one
SHA-256 round is enough to store them: there is nothing to brute-force. Lookups hash
the presented key and compare it with every stored digest in constant time.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
import time
import tomllib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from router.errors import KeyFileError
from router.ledger import PERIODS, Budget, LedgerBackend, Period

KEY_PREFIX = "sk-ir-"
TAG_PREFIX = "key:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_OPTION = re.compile(r"^(\*|[A-Za-z0-9_]+|[A-Za-z0-9][A-Za-z0-9_.\-]*\.(\*|[A-Za-z0-9_]+))$")
_FIELDS = frozenset({"name", "sha256", "budget_usd", "period", "tags", "rpm", "provider_options"})

SAFETY_OPTIONS = frozenset({"safety_checker", "disable_safety_checker", "safety_tolerance", "moderation"})
"""Provider options that switch a safety system off or down: only a key's own allow-list can grant them."""


def is_safety_option(option: str) -> bool:
    """Whether ``option`` is a safety switch (compared without case, ``-`` read as ``_``)."""
    return option.strip().lower().replace("-", "_") in SAFETY_OPTIONS


def option_entries(entries: Iterable[str], *, where: str) -> frozenset[str]:
    """``entries`` checked as an allow-list of provider options (see the module docstring)."""
    if isinstance(entries, str):
        raise ValueError(f"{where}: provider_options must be a list of option names, not one string")
    out = frozenset(entries)
    bad = sorted(e for e in out if not isinstance(e, str) or not _OPTION.match(e))
    if bad:
        raise ValueError(
            f"{where}: provider_options entries look like 'quality', '<provider>.quality', '<provider>.*' or '*'; "
            f"got {bad!r}"
        )
    return out


def option_allowed(entries: Collection[str], provider: str, option: str) -> bool:
    """Whether the allow-list ``entries`` lets a client set ``provider_options[provider][option]``.

    A safety switch must be named (``"safety_checker"`` or ``"local.safety_checker"``); wildcards never
    match one."""
    if is_safety_option(option):
        return option in entries or f"{provider}.{option}" in entries
    return not {"*", option, f"{provider}.*", f"{provider}.{option}"}.isdisjoint(entries)


def hash_key(key: str) -> str:
    """The hex SHA-256 of ``key``, as stored in a key file."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random client key (``sk-ir-…``, 256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class ServerKey:
    """One client's entry: its name, the key's digest, an optional budget, extra tags and rate limit."""

    name: str
    sha256: str
    budget_usd: Decimal | None = None
    period: Period = "month"
    tags: frozenset[str] = frozenset()
    rpm: int | None = None
    """Image requests per minute this key may make (a token bucket of that size); None: no limit."""
    provider_options: frozenset[str] | None = None
    """The provider options this key may set (see the module docstring); None: the server's default."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"key name {self.name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if not _HEX.match(self.sha256):
            raise ValueError(f"key {self.name!r}: sha256 must be 64 lower-case hex digits")
        if self.period not in PERIODS:
            raise ValueError(f"key {self.name!r}: period must be one of {', '.join(PERIODS)}, got {self.period!r}")
        if self.budget_usd is not None:
            object.__setattr__(self, "budget_usd", Decimal(str(self.budget_usd)))
        if self.rpm is not None and (isinstance(self.rpm, bool) or not isinstance(self.rpm, int) or self.rpm < 1):
            raise ValueError(f"key {self.name!r}: rpm must be a whole number ≥ 1, got {self.rpm!r}")
        if self.provider_options is not None:
            object.__setattr__(
                self, "provider_options", option_entries(self.provider_options, where=f"key {self.name!r}")
            )

    @property
    def tag(self) -> str:
        """The ledger tag every request made with this key carries (``key:<name>``)."""
        return TAG_PREFIX + self.name

    @property
    def budget(self) -> Budget | None:
        """The budget on this key's tag, if it has one."""
        return None if self.budget_usd is None else Budget(self.budget_usd, self.period, self.tag)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "sha256": self.sha256}
        if self.budget_usd is not None:
            out |= {"budget_usd": str(self.budget_usd), "period": self.period}
        if self.tags:
            out["tags"] = sorted(self.tags)
        if self.rpm is not None:
            out["rpm"] = self.rpm
        if self.provider_options is not None:
            out["provider_options"] = sorted(self.provider_options)
        return out


class ServerKeys:
    """The server's client keys. Empty means no authentication (see :func:`router.server.create_app`)."""

    def __init__(self, entries: Iterable[ServerKey] = ()) -> None:
        self._entries: list[ServerKey] = []
        for entry in entries:
            self._append(entry)

    def _append(self, entry: ServerKey) -> None:
        if any(e.name == entry.name for e in self._entries):
            raise KeyFileError(f"duplicate key name {entry.name!r}: each key needs a name of its own")
        if any(hmac.compare_digest(e.sha256, entry.sha256) for e in self._entries):
            raise KeyFileError(f"key {entry.name!r} has the same key as another entry")
        self._entries.append(entry)

    def add(
        self,
        name: str,
        key: str | None = None,
        *,
        budget_usd: Decimal | str | float | None = None,
        period: Period = "month",
        tags: Iterable[str] = (),
        rpm: int | None = None,
        provider_options: Iterable[str] | None = None,
    ) -> str:
        """Add a client; returns its key (a new random one unless ``key`` is given). Only the hash is kept."""
        key = key or new_key()
        if len(key) < 16:
            raise ValueError("a client key must be at least 16 characters")
        budget = None if budget_usd is None else Decimal(str(budget_usd))
        options = None if provider_options is None else frozenset(provider_options)
        self._append(ServerKey(name, hash_key(key), budget, period, frozenset(tags), rpm, options))
        return key

    def verify(self, key: str) -> ServerKey | None:
        """The entry whose key is ``key``, or None. Compares against every entry in constant time."""
        digest = hash_key(key)
        found: ServerKey | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found

    def apply_budgets(self, ledger: LedgerBackend) -> None:
        """Make ``ledger``'s key budgets (those on ``key:<name>`` tags) exactly the ones these keys set.

        A budget left in a ledger file by a key since removed or changed in the key file is dropped.
        """
        wanted = {(b.period, b.tag): b for e in self._entries if (b := e.budget) is not None}
        for old in ledger.budgets():
            if old.tag is not None and old.tag.startswith(TAG_PREFIX) and (old.period, old.tag) not in wanted:
                ledger.remove_budget(old.period, old.tag)
        for budget in wanted.values():
            ledger.set_budget(budget)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ServerKey]:
        return iter(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    # --- files ------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> ServerKeys:
        """Read a key file (``.toml``, ``.yaml`` or ``.yml``); errors (:class:`KeyFileError`) name the file
        and the entry. A file that group or others may write is refused: whoever can write it can add a key."""
        path = Path(path)
        check_permissions(path)
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = tomllib.loads(text)
        except Exception as exc:
            raise KeyFileError(f"{path}: not a readable key file ({type(exc).__name__})") from None
        rows = data.get("keys", []) if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise KeyFileError(f"{path}: expected a list under 'keys'")
        entries = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise KeyFileError(f"{path}: keys[{i}] must be a table")
            unknown = set(row) - _FIELDS
            if unknown:
                raise KeyFileError(f"{path}: keys[{i}]: unknown fields {sorted(unknown)}")
            try:
                budget = row.get("budget_usd")
                options = row.get("provider_options")
                entries.append(
                    ServerKey(
                        name=str(row.get("name", "")),
                        sha256=str(row.get("sha256", "")).lower(),
                        budget_usd=None if budget is None else Decimal(str(budget)),
                        period=row.get("period", "month"),
                        tags=frozenset(row.get("tags", ())),
                        rpm=row.get("rpm"),
                        provider_options=None if options is None else option_entries(options, where="provider_options"),
                    )
                )
            except (ValueError, TypeError, ArithmeticError) as exc:
                raise KeyFileError(f"{path}: keys[{i}]: {exc}") from None
        try:
            return cls(entries)
        except ValueError as exc:
            raise KeyFileError(f"{path}: {exc}") from None

    def to_toml(self) -> str:
        """The key file in TOML (digests only)."""
        return "".join(_toml_entry(e) for e in self._entries)

    def save(self, path: str | Path) -> Path:
        """Write the key file as TOML, or YAML for a ``.yaml``/``.yml`` path; a new file is readable and
        writable by its owner only (0600), an existing one loses any group and world write permission."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump({"keys": [e.to_dict() for e in self._entries]}, sort_keys=False)
        else:
            text = self.to_toml()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        if os.name == "posix":
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o022:
                path.chmod(mode & ~0o022)
        return path


def check_permissions(path: Path) -> None:
    """Refuse a key file that group or others may write (POSIX): anyone who can write it can add a key."""
    if os.name != "posix":
        return
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key file ({exc.strerror or type(exc).__name__})") from None
    if mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)
        raise KeyFileError(
            f"{path} is writable by {who} (mode {mode:04o}): anyone who can write it can add a "
            f"key. Make it writable by its owner only: chmod go-w {path}"
        )


class RateLimiter:
    """A token bucket per key name: ``rpm`` requests at once, refilled at ``rpm`` per minute."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, when)

    def take(self, name: str, rpm: int) -> float:
        """0 when ``name`` may make a request now (and it is counted); else the seconds until it may."""
        now = self._clock()
        tokens, when = self._buckets.get(name, (float(rpm), now))
        tokens = min(float(rpm), tokens + (now - when) * rpm / 60.0)
        if tokens >= 1.0:
            self._buckets[name] = (tokens - 1.0, now)
            return 0.0
        self._buckets[name] = (tokens, now)
        return (1.0 - tokens) * 60.0 / rpm


def _toml_entry(entry: ServerKey) -> str:
    lines = ["[[keys]]", f'name = "{entry.name}"', f'sha256 = "{entry.sha256}"']
    if entry.budget_usd is not None:
        lines += [f'budget_usd = "{entry.budget_usd}"', f'period = "{entry.period}"']
    if entry.tags:
        lines.append("tags = [" + ", ".join(_toml_str(t) for t in sorted(entry.tags)) + "]")
    if entry.rpm is not None:
        lines.append(f"rpm = {entry.rpm}")
    if entry.provider_options is not None:
        lines.append("provider_options = [" + ", ".join(_toml_str(o) for o in sorted(entry.provider_options)) + "]")
    return "\n".join(lines) + "\n\n"


def _toml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``keys`` command's arguments (``pixroute keys`` and ``python -m router.keys`` share them)."""
    parser.add_argument("name", help="the client's name: 1-64 letters, digits, '.', '_' or '-' (its ledger tag "
                                     "is key:NAME)")
    parser.add_argument("--budget", type=Decimal, help="budget in USD on this key's spend")
    parser.add_argument("--period", choices=PERIODS, default="month")
    parser.add_argument("--tag", action="append", default=[], help="an extra ledger tag (repeat for several)")
    parser.add_argument("--rpm", type=int, help="image requests per minute this key may make")
    parser.add_argument(
        "--allow-option",
        action="append",
        dest="options",
        metavar="[PROVIDER.]OPTION",
        help="a provider option this key may set, e.g. quality, <provider>.background, "
        "local.safety_checker (repeat for several; default: the server's list)",
    )
    parser.add_argument("--file", type=Path, help="append the entry to this key file (TOML or YAML)")
    return parser


def run(ns: argparse.Namespace, *, as_json: bool = False) -> int:
    """Make the key ``ns`` describes: print it once on stdout, and append its entry to ``--file`` (or print the
    entry on stderr). Raises :class:`KeyFileError` for a key file that cannot be used or a name it already has.
    ``as_json``: print ``{"name", "key", "file"}`` (and the entry as ``"entry"`` without a file) instead."""
    keys = ServerKeys.from_file(ns.file) if ns.file and ns.file.exists() else ServerKeys()
    try:
        key = keys.add(
            ns.name, budget_usd=ns.budget, period=ns.period, tags=ns.tag, rpm=ns.rpm, provider_options=ns.options
        )
    except KeyFileError as exc:
        where = f"{ns.file}: " if ns.file else ""
        raise KeyFileError(f"{where}{exc.message}; choose another name, or remove the old entry first") from None
    except ValueError as exc:
        raise KeyFileError(str(exc)) from None
    entry = ServerKeys([list(keys)[-1]]).to_toml()
    if ns.file:
        keys.save(ns.file)
    if as_json:
        doc = {"name": ns.name, "key": key, "file": str(ns.file) if ns.file else None}
        print(json.dumps(doc if ns.file else doc | {"entry": entry}))
        return 0
    if ns.file:
        print(f"added {ns.name!r} to {ns.file}", file=sys.stderr)
    else:
        print(entry, end="", file=sys.stderr)
    print(key)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m router.keys NAME [--budget USD --period day] [--file keys.toml]``: make a key (the same as
    ``pixroute keys``).

    Prints the new key once (hand it to the client) and the entry to add to the key file,
    or appends the entry to ``--file``.
    """
    parser = add_arguments(argparse.ArgumentParser(prog="python -m router.keys",
                                                   description="make a client key for the server"))
    try:
        return run(parser.parse_args(argv))
    except KeyFileError as exc:
        print(f"error: {exc.kind}: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
