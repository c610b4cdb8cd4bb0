"""Cost beside quality, per policy: run a prompt file through each policy and report what it cost and scored.

:func:`evaluate` sends every prompt through an :class:`~router.router.AsyncRouter` once per policy,
against the loopback sandboxes by default (offline, fake keys, nothing billed) or the backends the
environment configures, then scores each image against its prompt with a local CLIP model when one
is given (:mod:`router.quality`). :func:`write_report` writes, per policy, the total and per-image
cost, latency percentiles, the mean CLIP score with its 95 % confidence interval (Student's t), the
share of prompts each provider/model served, as ``report.md`` and ``report.json``, and a scatter
plot of cost against CLIP score (``cost_vs_clip.png``, matplotlib)::

    report = evaluate(load_prompts("prompts.txt"), ["cheapest", "balanced", "quality"], clip="/models/clip")
    write_report(report, "eval-out")

A prompt file is one prompt a line (blank lines and ``#`` comments skipped) or JSONL with a
``prompt`` field per line; a JSONL line's request fields (``width``, ``seed``, ``negative_prompt``,
…) go to its request, ``tag`` groups the CLIP means, and the rest is kept as metadata. The default
is the GenEval prompts (MIT, djghosh13/geneval), read where the project keeps them.

With ``--calibrate OUT.toml`` (a CLIP model is needed) the run's CLIP scores per model and prompt skill
also become a profile override file a policy loads (:mod:`router.calibrate`).

:func:`main` is the ``eval`` command's body (``main(["prompts.txt", "--policy", "cheapest"])``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from router.errors import ConfigurationError, ImageRouterError, RequestValidationError

__all__ = [
    "GENEVAL_ENV",
    "EvalReport",
    "PolicySummary",
    "PromptCase",
    "PromptRun",
    "ServedModel",
    "add_arguments",
    "aevaluate",
    "default_prompts",
    "evaluate",
    "load_prompts",
    "main",
    "run_args",
    "write_report",
]

GENEVAL_ENV = "IMAGEROUTER_GENEVAL"
"""A path to GenEval's ``evaluation_metadata.jsonl``, used when no prompt file is given."""

_ROOT = Path(__file__).resolve().parents[1]
_GENEVAL_PLACES = (
    _ROOT / "tests" / "data" / "geneval" / "evaluation_metadata.jsonl",
    _ROOT.parent / "shared" / "data" / "geneval" / "evaluation_metadata.jsonl",
)
PERCENTILES = (50, 90, 95, 99)


# --- prompts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptCase:
    """One prompt of the file: its text, its tag (a skill such as ``counting``), request fields, the rest."""

    prompt: str
    tag: str | None = None
    request: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _request_fields() -> frozenset[str]:
    from router.request import Constraints, ImageRequest

    return frozenset(ImageRequest.model_fields) | frozenset(Constraints.model_fields)


def default_prompts() -> Path:
    """Where the GenEval prompts are: ``$IMAGEROUTER_GENEVAL``, else the project's data folders."""
    env = os.environ.get(GENEVAL_ENV, "").strip()
    if env:
        if not Path(env).is_file():
            raise ConfigurationError(f"{GENEVAL_ENV}={env!r} is not a file: point it at GenEval's "
                                     "evaluation_metadata.jsonl, or give a prompt file")
        return Path(env)
    for place in _GENEVAL_PLACES:
        if place.is_file():
            return place
    raise ConfigurationError(f"no prompt file was given and the GenEval prompts are not at {GENEVAL_ENV} or "
                             f"{', '.join(str(p) for p in _GENEVAL_PLACES)}: give a prompt file (one prompt a line, "
                             "or JSONL with a prompt field)")


def _spread(items: list[PromptCase], limit: int | None) -> list[PromptCase]:
    """``limit`` items spread evenly over the list (every tag of a sorted file gets its share), in order."""
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise RequestValidationError([("limit", "use 1 or more")])
    return [items[(i * len(items)) // limit] for i in range(limit)]


def load_prompts(path: str | os.PathLike[str] | None = None, *, limit: int | None = None) -> list[PromptCase]:
    """The prompts of ``path`` (default: GenEval's), ``limit`` of them spread evenly over the file."""
    source = Path(path) if path is not None else default_prompts()
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise RequestValidationError([("prompts", f"cannot read {str(source)!r}: {exc.strerror or exc}")]) from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    jsonl = source.suffix.lower() in (".jsonl", ".ndjson") or bool(lines and lines[0][1].startswith("{"))
    known = _request_fields()
    cases: list[PromptCase] = []
    for n, line in lines:
        if not jsonl:
            cases.append(PromptCase(prompt=line))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RequestValidationError([("prompts", f"{source.name} line {n} is not JSON ({exc.msg})")]) from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise RequestValidationError([("prompts", f"{source.name} line {n} has no \"prompt\" string")])
        tag = row.get("tag")
        request = {k: v for k, v in row.items() if k in known and k != "prompt"}
        meta = {k: v for k, v in row.items() if k not in known and k != "tag"}
        cases.append(PromptCase(prompt=row["prompt"], tag=str(tag) if tag is not None else None, request=request,
                                meta=meta))
    if not cases:
        raise RequestValidationError([("prompts", f"{str(source)!r} holds no prompts")])
    return _spread(cases, limit)


# --- running -----------------------------------------------------------------------------------


@dataclass
class PromptRun:
    """One prompt under one policy: who served it, what it cost, how long it took, how it scored."""

    policy: str
    index: int
    prompt: str
    tag: str | None
    ok: bool
    provider: str | None = None
    model: str | None = None
    images: int = 0
    cost_usd: Decimal = Decimal(0)
    latency_s: float | None = None
    clip: float | None = None
    error: str | None = None
    message: str | None = None
    image: bytes | None = field(default=None, repr=False)  # the first image, for scoring and saving

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "index": self.index, "prompt": self.prompt, "tag": self.tag, "ok": self.ok,
                "provider": self.provider, "model": self.model, "images": self.images,
                "cost_usd": str(self.cost_usd), "latency_s": self.latency_s, "clip": self.clip,
                "error": self.error, "message": self.message}


@dataclass(frozen=True)
class ServedModel:
    """A provider/model that served prompts in the run, with what its profile is looked up by: the
    provider's kind, the model's catalog family (local models) and its quality tier (without a profile)."""

    provider: str
    kind: str
    model: str
    family: str | None
    quality: float

    def to_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "kind": self.kind, "model": self.model, "family": self.family,
                "quality": self.quality}


def _served(providers: dict[str, Any], runs: Sequence[PromptRun]) -> dict[str, ServedModel]:
    """``provider/model`` → :class:`ServedModel` for every pair that served a prompt."""
    out: dict[str, ServedModel] = {}
    for r in runs:
        if not r.ok or r.provider is None or r.model is None or f"{r.provider}/{r.model}" in out:
            continue
        provider = providers.get(r.provider)
        if provider is None:
            continue
        catalog = getattr(provider, "catalog", None)
        family = str(catalog.get(r.model).family) if catalog is not None and r.model in catalog else None
        out[f"{r.provider}/{r.model}"] = ServedModel(r.provider, str(provider.kind), r.model, family,
                                                     float(provider.capabilities(r.model).quality))
    return out


def _percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation between ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """(mean, low, high): the mean and its Student-t confidence interval; None without values."""
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    try:
        from scipy.stats import t
    except ImportError:
        raise ConfigurationError("the CLIP confidence interval needs scipy: install the quality extra, "
                                 "pip install 'pixroute[quality]'") from None
    half = float(t.ppf((1 + level) / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


@dataclass
class PolicySummary:
    """One policy's line of the report."""

    policy: str
    prompts: int
    ok: int
    failed: int
    images: int
    total_cost_usd: Decimal
    cost_per_image_usd: Decimal | None
    latency_s: dict[str, float]
    clip_mean: float | None
    clip_ci95: tuple[float, float] | None
    clip_by_tag: dict[str, float]
    served: dict[str, float]  # "provider/model" → share of the successful prompts
    errors: dict[str, int]

    @classmethod
    def of(cls, policy: str, runs: Sequence[PromptRun]) -> PolicySummary:
        ok = [r for r in runs if r.ok]
        images = sum(r.images for r in ok)
        total = sum((r.cost_usd for r in runs), Decimal(0))
        latencies = [r.latency_s for r in ok if r.latency_s is not None]
        scores = [r.clip for r in ok if r.clip is not None]
        ci = _mean_ci(scores)
        by_tag: dict[str, list[float]] = {}
        for r in ok:
            if r.clip is not None and r.tag is not None:
                by_tag.setdefault(r.tag, []).append(r.clip)
        served = Counter(f"{r.provider}/{r.model}" for r in ok)
        return cls(
            policy=policy, prompts=len(runs), ok=len(ok), failed=len(runs) - len(ok), images=images,
            total_cost_usd=total, cost_per_image_usd=(total / images) if images else None,
            latency_s={f"p{q}": _percentile(latencies, q) for q in PERCENTILES} if latencies else {},
            clip_mean=ci[0] if ci else None,
            clip_ci95=(ci[1], ci[2]) if ci and not math.isnan(ci[1]) else None,
            clip_by_tag={tag: statistics.fmean(v) for tag, v in sorted(by_tag.items())},
            served={k: n / len(ok) for k, n in served.most_common()},
            errors=dict(Counter(r.error for r in runs if r.error)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "prompts": self.prompts, "ok": self.ok, "failed": self.failed,
                "images": self.images, "total_cost_usd": str(self.total_cost_usd),
                "cost_per_image_usd": str(self.cost_per_image_usd) if self.cost_per_image_usd is not None else None,
                "latency_s": self.latency_s, "clip_mean": self.clip_mean,
                "clip_ci95": list(self.clip_ci95) if self.clip_ci95 else None, "clip_by_tag": self.clip_by_tag,
                "served": self.served, "errors": self.errors}


@dataclass
class EvalReport:
    """Every prompt run and each policy's summary."""

    policies: list[str]
    runs: list[PromptRun]
    backend: str  # "sandbox" or "configured"
    prompts_source: str
    clip: str | None = None
    notes: list[str] = field(default_factory=list)
    caption: str | None = None  # a line shown under the report's title and the plot's (e.g. "random weights")
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    served: dict[str, ServedModel] = field(default_factory=dict)  # "provider/model" → kind, family, quality

    def summary(self, policy: str) -> PolicySummary:
        return PolicySummary.of(policy, [r for r in self.runs if r.policy == policy])

    def to_dict(self) -> dict[str, Any]:
        return {"created": self.created, "caption": self.caption, "backend": self.backend,
                "prompts": self.prompts_source, "clip": self.clip, "notes": self.notes,
                "policies": {p: self.summary(p).to_dict() for p in self.policies},
                "models": {k: v.to_dict() for k, v in self.served.items()},
                "runs": [r.to_dict() for r in self.runs]}

    def to_markdown(self) -> str:
        out = ["# Policy evaluation", ""] + ([f"**{self.caption}**", ""] if self.caption else []) + [
               f"- prompts: {self.prompts_source} ({len({r.index for r in self.runs})} prompts)",
               f"- backends: {self.backend}", f"- CLIP model: {self.clip or '(none: no CLIP scores)'}",
               f"- created: {self.created}"]
        out += [f"- note: {n}" for n in self.notes]
        out += ["", "| policy | ok / prompts | total $ | $ / image | latency p50 / p90 / p99 s | CLIP mean [95 % CI] "
                "| served by |", "|---|---|---|---|---|---|---|"]
        for p in self.policies:
            s = self.summary(p)
            lat = " / ".join(f"{s.latency_s[k]:.3f}" for k in ("p50", "p90", "p99")) if s.latency_s else "–"
            per = f"{s.cost_per_image_usd:.4f}" if s.cost_per_image_usd is not None else "–"
            clip = "–" if s.clip_mean is None else f"{s.clip_mean:.2f}" + (
                f" [{s.clip_ci95[0]:.2f}, {s.clip_ci95[1]:.2f}]" if s.clip_ci95 else "")
            served = ", ".join(f"{k} {v:.0%}" for k, v in s.served.items()) or "–"
            out.append(f"| {p} | {s.ok} / {s.prompts} | {s.total_cost_usd:.4f} | {per} | {lat} | {clip} | {served} |")
        failures = {p: self.summary(p).errors for p in self.policies if self.summary(p).errors}
        if failures:
            out += ["", "Failures: " + "; ".join(f"{p}: " + ", ".join(f"{k} ×{n}" for k, n in e.items())
                                                for p, e in failures.items())]
        return "\n".join(out) + "\n"


def _sandbox_fleet() -> Any:
    from router.sandboxes import Sandboxes

    return Sandboxes()


async def _one(router: Any, policy: str, index: int, case: PromptCase, defaults: dict[str, Any],
               clock: Callable[[], float]) -> PromptRun:
    run = PromptRun(policy=policy, index=index, prompt=case.prompt, tag=case.tag, ok=False)
    start = clock()
    try:
        result = await router.agenerate(case.prompt, policy=policy, **(defaults | case.request))
    except ImageRouterError as exc:
        run.error, run.message = exc.kind, exc.message
        run.cost_usd = exc.cost_usd
        return run
    run.ok, run.provider, run.model = True, result.provider, result.model
    run.images, run.cost_usd = len(result.images), result.cost.actual_usd
    run.latency_s = result.latency.total_s if result.latency.total_s else clock() - start
    run.image = result.images[0].data if result.images else None
    return run


async def aevaluate(prompts: Sequence[PromptCase], policies: Sequence[str], *, providers: Sequence[Any] | None = None,
                    router: Any = None, clip: str | os.PathLike[str] | None = None, concurrency: int = 4,
                    defaults: dict[str, Any] | None = None, progress: Callable[[int, int], None] | None = None,
                    clip_device: str = "cpu", source: str = "") -> EvalReport:
    """Run every prompt through every policy and score the images (see the module's docstring).

    The backends: ``router`` (an :class:`AsyncRouter` you made), else ``providers`` (a fresh router
    over them, in-memory ledger), else the loopback sandboxes, started for the run. ``clip``: a local
    CLIP model directory (checked before anything is generated); ``defaults``: request fields for every
    prompt (a prompt's own fields win); ``progress(done, total)`` is called after each request.
    """
    if not policies:
        raise RequestValidationError([("policy", "name at least one policy (a preset or a policy file)")])
    if concurrency < 1:
        raise RequestValidationError([("concurrency", "use 1 or more")])
    scorer = None
    if clip is not None:
        from router.quality import clip_scorer

        scorer = await asyncio.to_thread(clip_scorer, clip, device=clip_device)
    from router.router import AsyncRouter

    fleet = None
    backend = "configured"
    if router is None and providers is None:
        fleet = _sandbox_fleet().start()
        providers, backend = fleet.providers(), "sandbox"
    owned = router is None
    if router is None:
        router = AsyncRouter(list(providers or ()), ledger=":memory:", backoff=(0.01, 0.05))
    total, done = len(prompts) * len(policies), 0
    gate = asyncio.Semaphore(concurrency)

    async def task(policy: str, i: int, case: PromptCase) -> PromptRun:
        nonlocal done
        async with gate:
            run = await _one(router, policy, i, case, dict(defaults or {}), time.monotonic)
        done += 1
        if progress is not None:
            progress(done, total)
        return run

    runs: list[PromptRun] = []
    try:
        for policy in policies:
            policy_runs = await asyncio.gather(*(task(policy, i, c) for i, c in enumerate(prompts)))
            if scorer is not None:
                scored = [r for r in policy_runs if r.ok and r.image is not None]
                values = await scorer.ascore([r.image for r in scored], [r.prompt for r in scored])
                for r, v in zip(scored, values, strict=True):
                    r.clip = v
            runs.extend(policy_runs)
        served = _served(dict(getattr(router, "providers", {}) or {}), runs)
    finally:
        if owned:
            await router.aclose()
        if fleet is not None:
            fleet.stop()
    notes = []
    if backend == "sandbox":
        notes.append("sandbox backends: the images are the sandboxes' placeholders and the costs are the price "
                     "table's; nothing was billed")
    return EvalReport(policies=list(policies), runs=runs, backend=backend, prompts_source=source,
                      clip=str(scorer.path) if scorer is not None else None, notes=notes, served=served)


def evaluate(prompts: Sequence[PromptCase], policies: Sequence[str], **kw: Any) -> EvalReport:
    """:func:`aevaluate` from synchronous code."""
    return asyncio.run(aevaluate(prompts, policies, **kw))


# --- the report --------------------------------------------------------------------------------


def plot(report: EvalReport, path: str | os.PathLike[str]) -> Path | None:
    """A scatter of cost per image against CLIP score: each prompt faint, each policy's mean with its
    95 % interval bold. None (nothing written) when no prompt was scored."""
    if not any(r.clip is not None for r in report.runs):
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, policy in enumerate(report.policies):
        color = f"C{i}"
        pts = [(float(r.cost_usd) / max(r.images, 1), r.clip) for r in report.runs
               if r.policy == policy and r.ok and r.clip is not None]
        if not pts:
            continue
        ax.scatter([x for x, _ in pts], [y for _, y in pts], s=14, alpha=0.3, color=color)
        s = report.summary(policy)
        if s.clip_mean is None:
            continue
        x = float(s.cost_per_image_usd or 0)
        yerr = None
        if s.clip_ci95 and s.clip_mean is not None:
            yerr = [[s.clip_mean - s.clip_ci95[0]], [s.clip_ci95[1] - s.clip_mean]]
        ax.errorbar([x], [s.clip_mean], yerr=yerr, fmt="o", ms=8, color=color, capsize=4, label=policy)
    ax.set_xlabel("cost per image (USD)")
    ax.set_ylabel("CLIP score (100 × cosine)")
    ax.set_title("Cost against CLIP score, per policy" + (f"\n{report.caption}" if report.caption else ""),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out


def write_report(report: EvalReport, out_dir: str | os.PathLike[str], *, save_images: bool = False) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` and (with CLIP scores) ``cost_vs_clip.png`` into ``out_dir``;
    ``save_images`` also writes each prompt's first image as ``images/<policy>/<index>.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "json": out / "report.json"}
    paths["markdown"].write_text(report.to_markdown(), encoding="utf-8")
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    png = plot(report, out / "cost_vs_clip.png")
    if png is not None:
        paths["plot"] = png
    if save_images:
        for r in report.runs:
            if r.image is not None:
                folder = out / "images" / _safe(r.policy)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{r.index:04d}.png").write_bytes(r.image)
        paths["images"] = out / "images"
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).stem or name)


# --- the command -------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    """The ``eval`` command's arguments (for ``pixroute eval`` and :func:`main`); ``json_flag=False``
    when the parser already has ``--json`` (the CLI's common options)."""
    p.add_argument("prompts", nargs="?", help="a prompt file: one prompt a line, or JSONL with a prompt field "
                                              f"(default: the GenEval prompts, or ${GENEVAL_ENV})")
    p.add_argument("--policy", action="append", dest="policies", default=[], metavar="POLICY",
                   help="a preset or a policy file (repeat; default: cheapest, balanced, quality)")
    p.add_argument("--limit", type=int, help="use N prompts, spread evenly over the file")
    p.add_argument("--clip", help="a local CLIP model directory to score the images with (never downloaded)")
    p.add_argument("--clip-device", default="cpu")
    p.add_argument("--backends", choices=("sandbox", "env"), default="sandbox",
                   help="sandbox: the offline loopback sandboxes (default); env: the backends the environment "
                        "configures (real calls, real charges)")
    p.add_argument("--out", default="eval-report", help="the report folder (default: eval-report)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-images", action="store_true", help="also write each prompt's image")
    p.add_argument("--caption", help="a line shown under the report's and the plot's title")
    p.add_argument("--calibrate", metavar="OUT.toml",
                   help="also write the run's CLIP scores per model and prompt skill as a profile override file "
                        "(needs --clip); a policy file loads it with profiles_file: OUT.toml")
    p.add_argument("--calibrate-min", type=int, default=None, metavar="N",
                   help="prompts of a skill a model must have served for that skill to be calibrated (default 10)")
    p.add_argument("--calibrate-method", choices=("minmax", "rank"), default="minmax",
                   help="how mean CLIP scores map onto the published scale (see router/calibrate.py)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the JSON report")


def run_args(ns: argparse.Namespace, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the ``eval`` command for parsed arguments; return the exit code (0: every request served)."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    calibrate_to = getattr(ns, "calibrate", None)
    minimum = getattr(ns, "calibrate_min", None)
    if calibrate_to and not ns.clip:
        raise ConfigurationError("--calibrate needs CLIP scores: give --clip, a local CLIP model directory")
    if minimum is not None and minimum < 1:
        raise RequestValidationError([("calibrate-min", "use 1 or more")])
    source = Path(ns.prompts) if ns.prompts else default_prompts()
    prompts = load_prompts(source, limit=ns.limit)
    policies = ns.policies or ["cheapest", "balanced", "quality"]
    router = None
    if ns.backends == "env":
        from router.router import AsyncRouter

        router = AsyncRouter.from_env()

    def progress(done: int, total: int) -> None:
        if not ns.json:
            stderr.write(f"\r{done}/{total} requests")
            if done == total:
                stderr.write("\n")
            stderr.flush()

    report = evaluate(prompts, policies, router=router, clip=ns.clip, clip_device=ns.clip_device,
                      concurrency=ns.concurrency, progress=progress,
                      defaults={"width": ns.width, "height": ns.height, "seed": ns.seed}, source=str(source))
    report.caption = ns.caption
    paths = write_report(report, ns.out, save_images=ns.save_images)
    calibration = None
    if calibrate_to:
        from router.calibrate import DEFAULT_MIN_PROMPTS, calibrate

        calibration = calibrate(report, min_prompts=minimum or DEFAULT_MIN_PROMPTS, method=ns.calibrate_method)
        paths["calibration"] = calibration.write(calibrate_to)
    if ns.json:
        extra: dict[str, Any] = {"files": {k: str(v) for k, v in paths.items()}}
        if calibration is not None:
            extra["calibration"] = calibration.to_dict()
        json.dump(report.to_dict() | extra, stdout, indent=2)
        stdout.write("\n")
    else:
        stdout.write(report.to_markdown())
        if calibration is not None:
            stdout.write("\n" + calibration.to_markdown())
        stdout.write("\n" + "\n".join(f"wrote {v}" for v in paths.values()) + "\n")
    return 0 if all(r.ok for r in report.runs) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m router.evaluate PROMPTS --policy cheapest --policy quality --clip DIR``."""
    parser = argparse.ArgumentParser(prog="pixroute eval", description=__doc__.splitlines()[0] if __doc__ else None)
    add_arguments(parser)
    ns = parser.parse_args(argv)
    try:
        return run_args(ns)
    except ImageRouterError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 3 if isinstance(exc, ConfigurationError | RequestValidationError) else 1


if __name__ == "__main__":
    sys.exit(main())
