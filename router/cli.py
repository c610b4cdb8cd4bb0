"""The ``imagerouter`` command: a thin shell over the public API; every command has ``--json``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from router.errors import (
    AllProvidersFailed,
    AuthenticationError,
    BudgetExceeded,
    ContentPolicyError,
    DeadlineExceeded,
    ImageRouterError,
    InvalidRequestError,
    NoRouteError,
)

EXIT_CODES: tuple[tuple[type[ImageRouterError], int], ...] = (
    (InvalidRequestError, 3),
    (AuthenticationError, 4),
    (BudgetExceeded, 5),
    (NoRouteError, 6),
    (AllProvidersFailed, 7),
    (ContentPolicyError, 8),
    (DeadlineExceeded, 9),
    (ImageRouterError, 1),
)


def _request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--negative-prompt")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--aspect-ratio")
    p.add_argument("-n", "--n", type=int, default=1)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--init-image", help="path or URL of the image to edit")
    p.add_argument("--strength", type=float)
    p.add_argument("--mask", dest="mask_image", help="path of the mask (white = repaint)")
    p.add_argument("--scheduler", help="dpmpp_2m_karras, euler, euler_a, unipc, ddim or lcm (local models)")
    p.add_argument("--control", action="append", dest="controls", default=[], metavar="KIND=IMAGE[,scale=S,...]",
                   help="a ControlNet input, e.g. canny=edges.png,scale=0.8,start=0,end=1,preprocess=false "
                        "(repeat for several)")
    p.add_argument("--lora", action="append", dest="loras", default=[], metavar="PATH[:WEIGHT]",
                   help="a LoRA .safetensors file or directory, with its weight (repeat for several)")
    p.add_argument("--format", dest="output_format", choices=("png", "jpeg", "webp"), default="png")
    p.add_argument("--provider", help="pin a provider")
    p.add_argument("--model", help="pin a model")
    p.add_argument("--policy", help="a preset or a .yaml/.toml policy file")
    p.add_argument("--max-cost", dest="max_cost_usd", type=Decimal)
    p.add_argument("--max-latency", dest="max_latency_s", type=float)
    p.add_argument("--residency", help="allowed regions, comma-separated (e.g. eu,local)")
    p.add_argument("--quality-floor", choices=("low", "medium", "high"))
    p.add_argument("--tag", action="append", dest="tags", default=[])
    p.add_argument("--json", action="store_true", help="print JSON")


def _request_kwargs(ns: argparse.Namespace) -> dict[str, Any]:
    names = ("negative_prompt", "width", "height", "aspect_ratio", "n", "steps", "guidance_scale", "seed",
             "init_image", "strength", "mask_image", "output_format", "provider", "model", "max_cost_usd",
             "max_latency_s", "quality_floor", "scheduler")
    kw = {k: getattr(ns, k) for k in names if getattr(ns, k) is not None}
    if ns.controls:
        kw["controls"] = [_control(spec) for spec in ns.controls]
    if ns.loras:
        kw["loras"] = [_lora(spec) for spec in ns.loras]
    if ns.residency:
        kw["residency"] = {r.strip() for r in ns.residency.split(",") if r.strip()}
    if ns.tags:
        kw["tags"] = set(ns.tags)
    return kw


def _control(spec: str) -> dict[str, Any]:
    """``canny=edges.png,scale=0.8,start=0,end=1,preprocess=false`` → a ``controls`` entry."""
    first, *rest = spec.split(",")
    kind, sep, image = first.partition("=")
    if not sep or not image:
        raise InvalidRequestError(f"--control {spec!r}: start with KIND=IMAGE, e.g. canny=photo.png")
    out: dict[str, Any] = {"kind": kind.strip(), "image": image.strip()}
    for item in rest:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("scale", "start", "end", "preprocess"):
            raise InvalidRequestError(f"--control {spec!r}: {item!r} is not scale=, start=, end= or preprocess=")
        out[key] = value.strip().lower() in ("1", "true", "yes") if key == "preprocess" else float(value)
    return out


def _lora(spec: str) -> dict[str, Any]:
    """``path/to/lora.safetensors:0.7`` → a ``loras`` entry (weight 1 when left out)."""
    ref, sep, weight = spec.rpartition(":")
    if sep and ref:
        try:
            return {"ref": ref, "weight": float(weight)}
        except ValueError:
            pass
    return {"ref": spec}


class _ProgressBar:
    """A one-line progress bar on stderr for backends that report denoising steps."""

    def __init__(self, stream: Any = None, width: int = 30) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.shown = False

    def __call__(self, event: Any) -> None:
        filled = int(self.width * event.fraction)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{event.provider}/{event.model} [{bar}] {event.step}/{event.total} "
                          f"{event.elapsed_s:.1f}s")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagerouter", description="Route image generation to the best backend.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images")
    _request_args(gen)
    gen.add_argument("--out", default="out", help="directory for the images (default: ./out)")
    gen.add_argument("--no-metadata", action="store_true", help="save without provenance metadata")
    gen.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="a progress bar for local generations (default: when stderr is a terminal)")
    route = sub.add_parser("route", help="show where a request would go (a dry run; needs no keys: providers "
                                         "without one are ranked as if configured, and marked)")
    _request_args(route)
    route.add_argument("--explain", action="store_true", help="print the ranking and every rejection")
    route.add_argument("--configured-only", action="store_true",
                       help="rank only the providers configured now (the decision generate would make)")
    prov = sub.add_parser("providers", help="list providers: configured or not, capabilities, regions")
    prov.add_argument("--json", action="store_true")
    led = sub.add_parser("ledger", help="spend by provider, tag or period, and budgets")
    led.add_argument("--by", default="provider", help="comma-separated: provider, model, tag, day, month")
    led.add_argument("--since", type=datetime.fromisoformat, help="ISO date, e.g. 2026-11-01")
    led.add_argument("--json", action="store_true")
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over the router (needs [server])")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--policy", help="a preset or a .yaml/.toml policy file")
    srv.add_argument("--ledger", help="the ledger file (or :memory:)")
    srv.add_argument("--keys", dest="keys_file", help="client key file (default: IMAGEROUTER_SERVER_KEYS)")
    srv.add_argument("--allow-open", action="store_true", help="serve a non-loopback host without client keys")
    srv.add_argument("--max-body-bytes", type=int, help="the largest request body (default: 64 MiB)")
    srv.add_argument("--max-image-bytes", type=int, help="the largest uploaded or inline image (default: 50 MiB)")
    srv.add_argument("--max-inflight-body-bytes", type=int,
                     help="the bodies of all requests in flight together (default: --max-body-bytes)")
    srv.add_argument("--body-wait-s", type=float,
                     help="how long a request waits for room among the bodies in flight before a 503 (default: 30)")
    srv.add_argument("--lora-dir", action="append", dest="lora_dirs", default=[], metavar="DIR",
                     help="a directory whose LoRAs clients may name (repeat for several; none: no client LoRAs)")
    srv.add_argument("--client-options", metavar="LIST",
                     help="provider options a key without its own list may set, comma-separated: quality, "
                          "<provider>.background, <provider>.*, * (default: *; '' for none; safety switches "
                          "only per key)")
    srv.add_argument("--unknown-model", choices=("route", "reject"), default="route",
                     help="a model name no provider offers: route by policy (default) or answer 404")
    srv.add_argument("--log-level", default="info")
    keys = sub.add_parser("keys", help="make a client key for the server (printed once; stored hashed)",
                          add_help=False)
    keys.add_argument("args", nargs=argparse.REMAINDER)
    demo = sub.add_parser("demo", help="a few routed requests against the offline sandboxes (no keys needed)")
    demo.add_argument("--out", default=None, help="directory for the images (default: a new temp directory)")
    demo.add_argument("--no-local", dest="local", action="store_false", default=None,
                      help="skip the local backend even when its extra is installed")
    demo.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        commands = {"generate": _generate, "route": _route, "providers": _providers, "ledger": _ledger,
                    "serve": _serve, "keys": _keys, "demo": _demo}
        return commands[ns.command](ns)
    except ImageRouterError as exc:
        code = next(c for cls, c in EXIT_CODES if isinstance(exc, cls))
        if getattr(ns, "json", False):
            print(json.dumps({"error": exc.kind, "message": str(exc)}))
        else:
            print(f"error: {exc.kind}: {exc}", file=sys.stderr)
            decision = getattr(exc, "decision", None)
            if decision is not None:
                print(decision.explain(), file=sys.stderr)
        return code


def _router() -> Any:
    from router.router import Router

    return Router.from_env()


def _generate(ns: argparse.Namespace) -> int:
    show = ns.progress if ns.progress is not None else (sys.stderr.isatty() and not ns.json)
    bar = _ProgressBar() if show else None
    try:
        with _router() as router:
            result = router.generate(ns.prompt, policy=ns.policy, on_progress=bar, **_request_kwargs(ns))
    finally:
        if bar is not None:
            bar.close()
    paths = result.save(ns.out, stem=result.request_id, metadata=False if ns.no_metadata else None)
    if ns.json:
        print(json.dumps(result.to_dict() | {"files": [str(p) for p in paths]}, indent=2))
        return 0
    print(f"{result.provider}/{result.model}: {len(result.images)} image(s) in {result.latency.total_s:.2f}s, "
          f"cost ${result.cost.actual_usd} (estimated ${result.cost.estimated_usd})")
    for w in result.warnings:
        print(f"  warning: {w}")
    for p in paths:
        print(f"  wrote {p}")
    return 0


def _route(ns: argparse.Namespace) -> int:
    with _router() as router:
        decision = router.route(ns.prompt, policy=ns.policy, assume_configured=not ns.configured_only,
                                **_request_kwargs(ns))
    if ns.json:
        print(decision.to_json())
    elif ns.explain:
        print(decision.explain())
    else:
        chosen = decision.chosen
        if chosen is None:
            print("no route (use --explain to see why)")
        else:
            problem = f"  [{chosen.configuration_problem}]" if chosen.configuration_problem else ""
            print(f"{chosen.provider}/{chosen.model}{problem}")
    return 0 if decision.chain else dict(EXIT_CODES)[NoRouteError]


def _providers(ns: argparse.Namespace) -> int:
    with _router() as router:
        rows = []
        for provider in router.providers.values():
            problem = provider.configuration_problem()
            rows.append({
                "name": provider.name,
                "kind": provider.kind,
                "configured": problem is None,
                "problem": problem,
                "models": {m: provider.capabilities(m).to_dict() for m in provider.models()},
            })
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        state = "configured" if row["configured"] else row["problem"]
        print(f"{row['name']} ({row['kind']}): {state}")
        for model, caps in row["models"].items():
            print(f"  {model}: tasks {', '.join(caps['tasks'])}; n ≤ {caps['max_n']}; "
                  f"regions {', '.join(caps['regions'])}; quality {caps['quality']}")
    return 0


def _ledger(ns: argparse.Namespace) -> int:
    from router.ledger import Ledger

    ledger = Ledger(os.environ.get("IMAGEROUTER_LEDGER") or None)
    group = [g.strip() for g in ns.by.split(",") if g.strip()]
    since = ns.since.replace(tzinfo=UTC) if ns.since and ns.since.tzinfo is None else ns.since
    rows = ledger.report(since=since, group_by=group)
    budgets = [(b, ledger.headroom([b.tag] if b.tag else [])) for b in ledger.budgets()]
    ledger.close()
    if ns.json:
        print(json.dumps({
            "spend": [{"key": r.key, "requests": r.requests, "usd": str(r.usd)} for r in rows],
            "budgets": [{"name": b.name, "limit_usd": str(b.limit_usd), "headroom_usd": str(h)} for b, h in budgets],
        }, indent=2))
        return 0
    if not rows:
        print("no spend recorded")
    for r in rows:
        key = ", ".join(f"{k}={v}" for k, v in r.key.items())
        print(f"{key}: {r.requests} request(s), ${r.usd}")
    for b, h in budgets:
        print(f"budget {b.name}: limit ${b.limit_usd}, headroom ${h}")
    return 0


def _serve(ns: argparse.Namespace) -> int:
    try:
        from router.server import serve
    except ImportError as exc:
        print(f"error: the server needs its extra: pip install 'imagerouter[server]' ({exc.name} missing)",
              file=sys.stderr)
        return 1
    limits: dict[str, Any] = {k: v for k, v in (("max_body_bytes", ns.max_body_bytes),
                                                ("max_image_bytes", ns.max_image_bytes),
                                                ("max_inflight_body_bytes", ns.max_inflight_body_bytes),
                                                ("body_wait_s", ns.body_wait_s))
                              if v is not None}
    if ns.client_options is not None:
        limits["client_options"] = [o.strip() for o in ns.client_options.split(",") if o.strip()]
    try:
        serve(ns.host, ns.port, policy=ns.policy, ledger=ns.ledger, keys_file=ns.keys_file,
              allow_open=ns.allow_open, unknown_model=ns.unknown_model, lora_dirs=ns.lora_dirs,
              log_level=ns.log_level, **limits)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _keys(ns: argparse.Namespace) -> int:
    from router.keys import main as keys_main

    return keys_main(ns.args)


def _demo(ns: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from router.demo import run_demo

    out = Path(ns.out) if ns.out else Path(tempfile.mkdtemp(prefix="imagerouter-demo-"))
    return run_demo(out, as_json=ns.json, local=ns.local)


if __name__ == "__main__":
    sys.exit(main())
