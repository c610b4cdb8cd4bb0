"""An offline tour of the router: no keys, no network.

:func:`run_demo` starts the project's loopback sandboxes (OpenAI, with an EU host; Stability;
Black Forest Labs, with an EU host; Together) in this process, points the real provider adapters
at them and routes a few requests under different policies: a cheap simple prompt, a complex
prompt that needs a strong model, an EU-residency request, a fallback (the first provider's
sandbox is switched to fail), and a request a budget refuses. With the local backend it also
writes a tiny random-weight SD1.5 pipeline and serves a ``private`` request from it. For each
run it prints the decision in short, the provider and model, the estimated and actual cost,
the attempts and the files written.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TextIO

from policies.decision import RoutingDecision
from policies.policy import Policy
from providers.base import Provider
from providers.sandbox import Fault
from router.errors import ImageRouterError
from router.ledger import Budget
from router.request import ImageRequest
from router.result import GenerationResult
from router.router import Router
from router.sandboxes import Sandboxes

__all__ = ["DemoRun", "local_available", "run_demo"]

SIMPLE_PROMPT = "a red apple"
COMPLEX_PROMPT = "three red apples on a wooden table, a sign that says SALE, oil painting, in the style of Van Gogh"
BUDGET_TAG = "demo-intern"
_EU_HOSTS = frozenset({"openai-eu", "bfl-eu"})


@dataclass
class DemoRun:
    """One routed request of the demo and what became of it."""

    name: str
    title: str
    policy: str
    prompt: str
    outcome: str = "ok"  # "ok", or "refused" (an expected refusal), or "error"
    provider: str | None = None
    model: str | None = None
    hosts: dict[str, int] = field(default_factory=dict)  # sandbox host -> requests it received in this run
    estimated_usd: str | None = None
    actual_usd: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    chain: list[str] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)
    error: str | None = None
    message: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def region(self) -> str | None:
        """``eu`` when only EU hosts were called, ``local`` for the local backend, else ``global``."""
        if self.provider == "local":
            return "local"
        if not self.hosts:
            return None
        return "eu" if set(self.hosts) <= _EU_HOSTS else "global"

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["region"] = self.region
        return d


def local_available() -> bool:
    """Whether torch and diffusers are importable (the local backend can run)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers"))


def run_demo(out_dir: Path, *, as_json: bool = False, local: bool | None = None, stream: TextIO = sys.stdout) -> int:
    """Route a few requests offline against loopback sandboxes and report each; return an exit code.

    ``out_dir`` receives the images (and, with the local backend, the tiny model). ``as_json``
    prints one JSON document ``{"out_dir": ..., "runs": [...]}`` instead of text. ``local``
    adds a request served by the local Diffusers backend (default: when torch and diffusers
    are importable). Returns 0 when every run ended as expected (the budget run is expected
    to be refused), else 1.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if local is None:
        local = local_available()
    runs: list[DemoRun] = []
    report = (lambda run: None) if as_json else (lambda run: _print_run(run, stream))
    with _quiet_router_log(), _Fleet() as fleet:
        with Router(fleet.providers(), ledger=":memory:", backoff=(0.01, 0.05),
                    budgets=[Budget(Decimal("0.001"), "day", BUDGET_TAG)]) as router:
            for run in _hosted_runs(router, fleet, out_dir):
                report(run)
                runs.append(run)
        if local:
            run = _local_run(out_dir)
            report(run)
            runs.append(run)
    ok = all(r.outcome != "error" for r in runs)
    if as_json:
        json.dump({"out_dir": str(out_dir), "ok": ok, "runs": [r.to_dict() for r in runs]}, stream, indent=2)
        stream.write("\n")
    else:
        stream.write(f"{len(runs)} runs, images in {out_dir}\n")
    return 0 if ok else 1


# --- the sandboxes -----------------------------------------------------------------------------


class _Fleet(Sandboxes):
    """The hosted sandboxes the demo uses (:class:`~router.sandboxes.Sandboxes`), with an EU host of their own
    for OpenAI and BFL so each run can show which hosts served it."""

    def __init__(self) -> None:
        super().__init__(("stability", "bfl", "openai", "together"), region_hosts={"openai": ("eu",), "bfl": ("eu",)})

    def providers(self) -> list[Provider]:
        # one model each where a vendor offers several, so the tour's decisions read simply
        return [
            self.provider("stability", models=("stable-image-core",)),
            self.provider("bfl", models=("flux-pro-1.1",)),
            self.provider("openai"),
            self.provider("together", models=("black-forest-labs/FLUX.1-schnell",)),
        ]


# --- the runs ----------------------------------------------------------------------------------


def _hosted_runs(router: Router, fleet: Sandboxes, out_dir: Path) -> Iterator[DemoRun]:
    ordered = Policy(name="stability-first", fallback_order=("stability", "together", "openai"))
    cases: list[tuple[str, str, Policy | str, ImageRequest]] = [
        ("cheap", "a simple prompt under the cheapest policy", "cheapest",
         ImageRequest(prompt=SIMPLE_PROMPT, width=1024, height=1024, seed=1)),
        ("quality", "a complex prompt under the quality policy", "quality",
         ImageRequest(prompt=COMPLEX_PROMPT, width=1024, height=1024, seed=2)),
        ("eu", "EU data residency", "balanced",
         ImageRequest.from_kwargs("a portrait of a lighthouse keeper", width=1024, height=1024, seed=3,
                                  residency={"eu"})),
        ("fallback", "fallback: Stability's sandbox answers 503 to every call", ordered,
         ImageRequest(prompt="a lighthouse at dusk", width=1024, height=1024, seed=4)),
        ("budget", f"a $0.001/day budget on tag {BUDGET_TAG!r}", "balanced",
         ImageRequest(prompt="a lighthouse at dusk", width=1024, height=1024, seed=5, tags={BUDGET_TAG})),
    ]
    for name, title, policy, request in cases:
        policy_name = policy if isinstance(policy, str) else policy.name
        run = DemoRun(name=name, title=title, policy=policy_name, prompt=request.prompt)
        if name == "fallback":
            fleet.hosts["stability"].faults.push(Fault.server_error(503), times=None)
        before = fleet.hits()
        try:
            result = router.generate(request, policy=policy)
        except ImageRouterError as exc:
            _record_error(run, exc, expected=name == "budget")
        else:
            _record_result(run, result, out_dir)
            if name == "budget":
                run.outcome, run.message = "error", "the budget should have refused this request"
        finally:
            fleet.hosts["stability"].faults.clear()
        after = fleet.hits()
        run.hosts = {host: after[host] - before[host] for host in after if after[host] > before[host]}
        yield run


def _local_run(out_dir: Path) -> DemoRun:
    from providers.local import LocalProvider
    from providers.local.tiny import build_sd15

    run = DemoRun(name="local", title="the private policy: a tiny random-weight SD1.5 on this machine",
                  policy="private", prompt="a lighthouse at dusk, watercolor")
    with _local_env():
        model = out_dir / "models" / "tiny-sd15"
        if not (model / "model_index.json").exists():
            build_sd15(model)
        catalog = {"tiny-sd15": {"path": str(model), "family": "sd15", "native": [64, 64], "min_side": 64,
                                 "steps": 4}}
        with Router([LocalProvider(catalog, device="cpu")], policy="private", ledger=":memory:") as router:
            try:
                result = router.generate(run.prompt, width=64, height=64, seed=6)
            except ImageRouterError as exc:
                _record_error(run, exc, expected=False)
            else:
                _record_result(run, result, out_dir)
    return run


def _record_result(run: DemoRun, result: GenerationResult, out_dir: Path) -> None:
    run.provider, run.model = result.provider, result.model
    run.estimated_usd, run.actual_usd = str(result.cost.estimated_usd), str(result.cost.actual_usd)
    run.attempts = [a.to_dict() for a in result.attempts]
    run.warnings = list(result.warnings)
    run.files = [str(p) for p in result.save(out_dir, stem=run.name)]
    _record_decision(run, result.decision)


def _record_error(run: DemoRun, exc: ImageRouterError, *, expected: bool) -> None:
    run.outcome = "refused" if expected else "error"
    run.error, run.message = type(exc).__name__, exc.message
    run.attempts = [a.to_dict() for a in getattr(exc, "attempts", None) or []]
    decision = getattr(exc, "decision", None)
    if isinstance(decision, RoutingDecision):
        _record_decision(run, decision)


def _record_decision(run: DemoRun, decision: RoutingDecision) -> None:
    run.chain = [f"{c.provider}/{c.model} (score {c.score:.2f}, est ${c.estimate.cost_usd:.4f})"
                 for c in decision.chain]
    run.rejections = [f"{r.provider}/{r.model}: [{r.code}] {r.reason}" for r in decision.rejections]


def _print_run(run: DemoRun, out: TextIO) -> None:
    out.write(f"== {run.name}: {run.title}\n")
    out.write(f"   policy {run.policy!r}; prompt {run.prompt!r}\n")
    out.write(f"   chain: {' > '.join(run.chain) or '(empty)'}\n")
    for rejection in run.rejections[:3]:
        out.write(f"   rejected {rejection}\n")
    if len(run.rejections) > 3:
        out.write(f"   ... and {len(run.rejections) - 3} more rejections\n")
    for i, a in enumerate(run.attempts, 1):
        how = {"success": "ok", "cache-hit": "cached"}.get(a["outcome"]) or f"{a['error']}: {a['message']}"
        out.write(f"   attempt {i}: {a['provider']}/{a['model']} retry {a['retry']} -> {how}\n")
    if run.provider is not None:
        where = f" (region {run.region}" + (f", hosts {', '.join(run.hosts)})" if run.hosts else ")")
        out.write(f"   served by {run.provider}/{run.model}{where}; "
                  f"cost estimated ${run.estimated_usd}, actual ${run.actual_usd}\n")
    if run.error is not None:
        label = "refused" if run.outcome == "refused" else "FAILED"
        out.write(f"   {label}: {run.error}: {run.message}\n")
    for path in run.files:
        out.write(f"   wrote {path}\n")
    out.write("\n")


@contextmanager
def _quiet_router_log() -> Iterator[None]:
    """The refusals and failures the demo provokes are reported by it; keep the log from repeating them."""
    logger = logging.getLogger("imagerouter")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


_LOCAL_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DIFFUSERS_VERBOSITY": "error",
              "TRANSFORMERS_VERBOSITY": "error"}


@contextmanager
def _local_env() -> Iterator[None]:
    """No hub access, and no loading progress bars, while the tiny model is built and served."""
    old = {name: os.environ.get(name) for name in _LOCAL_ENV}
    os.environ.update(_LOCAL_ENV)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


if __name__ == "__main__":
    import tempfile

    sys.exit(run_demo(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="pixroute-demo-"))))
