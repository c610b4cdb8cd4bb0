"""The ``pixroute`` command: a thin shell over the public API; every command has ``--json``.

An error is one line on stderr, ``error: <class>: <what to change>``, and the exit code of its kind
(:data:`EXIT_CODES`): 0 ok, 1 other, 2 usage (a flag or argument the command does not take), 3 invalid
request or configuration (a policy file, a model catalog, a key file, an unknown provider or model name),
4 auth, 5 budget, 6 no route, 7 all providers failed, 8 content policy, 9 deadline, 130 interrupted.
``--verbose`` adds the explanation (every rejection or attempt; a traceback for a bug); ``--json`` prints one
JSON object on stdout instead (``{"error": class, "message": ..., "detail": ..., "exit_code": N}``) and
nothing on stderr. A closed pipe (``pixroute route ... | head``) ends the command quietly, with 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NoReturn

from router.errors import (
    AllProvidersFailed,
    AuthenticationError,
    BudgetExceeded,
    ConfigurationError,
    ContentPolicyError,
    DeadlineExceeded,
    ImageRouterError,
    InvalidRequestError,
    NoRouteError,
    RequestValidationError,
)

PROG = "pixroute"
USAGE_EXIT = 2
INTERRUPTED_EXIT = 130

EXIT_CODES: tuple[tuple[type[ImageRouterError], int], ...] = (
    (InvalidRequestError, 3),
    (ConfigurationError, 3),
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
    def bad(why: str) -> RequestValidationError:
        return RequestValidationError([("--control", f"{spec!r}: {why}")])

    first, *rest = spec.split(",")
    kind, sep, image = first.partition("=")
    if not sep or not image:
        raise bad("start with KIND=IMAGE, e.g. canny=photo.png")
    out: dict[str, Any] = {"kind": kind.strip(), "image": image.strip()}
    for item in rest:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in ("scale", "start", "end", "preprocess"):
            raise bad(f"{item!r} is not scale=, start=, end= or preprocess=")
        if key == "preprocess":
            if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise bad(f"preprocess takes true or false, not {value!r}")
            out[key] = value.lower() in ("1", "true", "yes")
            continue
        try:
            out[key] = float(value)
        except ValueError:
            raise bad(f"{key} takes a number, e.g. {key}={'0.8' if key == 'scale' else '0.5'}; "
                      f"got {value!r}") from None
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
    """Progress on stderr: a redrawn bar for denoising steps on a terminal, else one line per 10 % of the
    steps; one line for each fallback, failed attempt, vendor status change and partial image."""

    def __init__(self, stream: Any = None, width: int = 30, *, terminal: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.shown = False  # a bar is on the current line
        self._tenths = -1
        self._failed: Any = None  # the last failed attempt, told when the router falls back from it

    def __call__(self, event: Any) -> None:
        kind = getattr(event, "kind", "")
        if kind == "step":
            self._step(event)
            return
        line = self._line(event)
        if line:
            self.close()
            self.stream.write(line + "\n")
            self.stream.flush()

    def _step(self, event: Any) -> None:
        where = f"{event.provider}/{event.model}"
        if self.terminal:
            filled = int(self.width * event.fraction)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r{where} [{bar}] {event.step}/{event.total} {event.elapsed_s:.1f}s")
            self.shown = True
        else:
            tenths = int(event.fraction * 10)
            if tenths == self._tenths:
                return
            self._tenths = tenths
            self.stream.write(f"{where}: {tenths * 10}% (step {event.step}/{event.total}, "
                              f"{event.elapsed_s:.1f}s)\n")
        self.stream.flush()

    def _line(self, event: Any) -> str | None:
        kind = getattr(event, "kind", "")
        if kind == "attempt_started":
            self._tenths = -1
            return None
        if kind == "attempt_failed":  # told with the fallback, if there is one; else the error line says it
            self._failed = event
            return None
        if kind == "fell_back":
            why = f" after {self._failed.error}" if self._failed is not None else ""
            return (f"{event.from_provider}/{event.from_model} failed{why}; "
                    f"falling back to {event.to_provider}/{event.to_model}")
        if kind == "status":
            return f"{event.provider}/{event.model}: {event.status} ({event.vendor_status}, {event.elapsed_s:.1f}s)"
        if kind == "partial_image":
            return f"{event.provider}/{event.model}: preview {event.index + 1}"
        return None

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


class UsageError(Exception):
    """A command line the parser does not take (exit 2)."""

    kind = "UsageError"


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as :class:`UsageError` (one line, not usage and a message)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _group_by(value: str) -> list[str]:
    from router.ledger import GROUP_KEYS

    group = [g.strip() for g in value.split(",") if g.strip()]
    unknown = [g for g in group if g not in GROUP_KEYS]
    if unknown:
        raise argparse.ArgumentTypeError(f"cannot group by {', '.join(unknown)}; choose from {', '.join(GROUP_KEYS)}")
    return group


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON (errors too: one JSON object on stdout)")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="on an error, also print its explanation (every rejection or attempt)")
    sandboxed = _Parser(add_help=False)
    sandboxed.add_argument("--sandbox", action="store_true",
                           help="use the loopback sandboxes of every hosted API, started in this process, with "
                                "fake keys: nothing reaches a vendor (also IMAGEROUTER_SANDBOX=1)")
    parser = _Parser(prog=PROG, description="Route image generation to the best backend.",
                     epilog="Exit codes: 0 ok, 1 other, 2 usage, 3 invalid request or configuration, 4 auth, "
                            "5 budget, 6 no route, 7 all providers failed, 8 content policy, 9 deadline.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="generate images", parents=[common, sandboxed])
    _request_args(gen)
    gen.add_argument("--out", default="out", help="directory for the images (default: ./out)")
    gen.add_argument("--no-metadata", action="store_true", help="save without provenance metadata")
    gen.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress on stderr: a bar on a terminal, else a line per 10%% of the steps, and a "
                          "line per fallback or vendor status (default: on, except with --json)")
    route = sub.add_parser("route", help="show where a request would go (a dry run; needs no keys: providers "
                                         "without one are ranked as if configured, and marked)",
                           parents=[common, sandboxed])
    _request_args(route)
    route.add_argument("--explain", action="store_true", help="print the ranking and every rejection")
    route.add_argument("--configured-only", action="store_true",
                       help="rank only the providers configured now (the decision generate would make)")
    sub.add_parser("providers", help="list providers: configured or not (and why), capabilities, regions",
                   parents=[common, sandboxed])
    led = sub.add_parser("ledger", help="spend by provider, tag or period, and budgets", parents=[common])
    led.add_argument("--by", default=["provider"], type=_group_by,
                     help="comma-separated: provider, model, tag, day, month")
    led.add_argument("--since", type=datetime.fromisoformat, help="ISO date, e.g. 2026-11-01")
    from router.jobs import add_worker_arguments

    add_worker_arguments(sub.add_parser("worker", help="run a jobs worker: queued generations from Redis "
                                        "(needs [jobs])", parents=[common, sandboxed]))
    gpu = sub.add_parser("serve-gpu", help="the local models as a Ray Serve GPU pool (needs [ray])")
    gpu.add_argument("--catalog", required=True, help="the model catalog (models.yaml)")
    gpu.add_argument("--host", default="127.0.0.1")
    gpu.add_argument("--port", type=int, default=8100)
    gpu.add_argument("--address", help="a Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    gpu.add_argument("--max-batch-size", type=int, default=8)
    gpu.add_argument("--batch-wait-s", type=float, default=0.05)
    gpu.add_argument("--allow-open", action="store_true",
                     help="serve a non-loopback host without IMAGEROUTER_RAY_TOKEN")
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over the router (needs [server])",
                         parents=[common, sandboxed])
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
    from router.keys import add_arguments as key_arguments

    key_arguments(sub.add_parser("keys", help="make a client key for the server (printed once; stored hashed)",
                                 description="Make a client key for `pixroute serve --keys FILE`: the key is "
                                             "printed once on stdout and stored as its SHA-256 digest.",
                                 parents=[common]))
    demo = sub.add_parser("demo", help="a few routed requests against the offline sandboxes (no keys needed)",
                          parents=[common])
    demo.add_argument("--out", default=None, help="directory for the images (default: a new temp directory)")
    demo.add_argument("--no-local", dest="local", action="store_false", default=None,
                      help="skip the local backend even when its extra is installed")
    demo.add_argument("--sandbox", action="store_true",
                      help="the demo always runs on the loopback sandboxes; accepted like on the other commands")
    from router.evaluate import add_arguments as eval_arguments

    ev = sub.add_parser("eval", parents=[common],
                        help="run a prompt file through each policy and report cost, latency, CLIP score and share "
                             "served (sandboxes by default; CLIP needs [quality] and a local model)")
    eval_arguments(ev, json_flag=False)
    from router.inspect_image import add_arguments as inspect_arguments

    inspect_arguments(sub.add_parser("inspect", parents=[common],
                                     help="show an image file's format, provenance record and invisible watermark"),
                      json_flag=False)
    sand = sub.add_parser(
        "sandbox", parents=[common],
        help="run every hosted API's loopback sandbox and print the environment lines that use them",
        description="Start the loopback sandboxes of every hosted API in this process (fake keys: nothing "
                    "reaches a vendor) and print the environment lines that point the providers at them; they run "
                    "until Ctrl-C. With `-- COMMAND ...`, run that one command with those lines set instead, and "
                    "exit with its code.",
        epilog="e.g. pixroute sandbox --fault stability=server_error:503 -- pixroute generate 'a lighthouse'")
    sand.add_argument("--fault", action="append", dest="faults", default=[], metavar="PROVIDER=KIND[:ARG][,times=N]",
                      help="make a sandbox fail (every request, or the next N): rate_limit[:RETRY_AFTER_S], "
                           "server_error[:STATUS], timeout[:SECONDS], disconnect, moderation, malformed, "
                           "insufficient_credits, invalid_request, auth, or the sandbox's own kinds (repeatable)")
    sand.add_argument("run", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                      help="a command to run with the sandboxes' environment")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ours = args[: args.index("--")] if "--" in args else args
    as_json, verbose = "--json" in ours, bool({"-v", "--verbose"} & set(ours))
    try:
        try:
            ns, extra = build_parser().parse_known_args(args)
            if extra:
                where = f"{PROG} {ns.command}"
                raise UsageError(f"{where}: unrecognized arguments: {' '.join(extra)} (see {where} --help)")
            as_json, verbose = bool(getattr(ns, "json", False)), bool(getattr(ns, "verbose", False))
            code = COMMANDS[ns.command](ns)
        except (ImageRouterError, UsageError) as exc:
            code = _report(exc, as_json=as_json, verbose=verbose)
        except KeyboardInterrupt:
            code = INTERRUPTED_EXIT
        except BrokenPipeError:
            raise
        except Exception as exc:  # a bug, or the system's refusal (a file we cannot write): still one line
            code = _report(exc, as_json=as_json, verbose=verbose)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `pixroute ... | head`: the reader has all it wants
        _silence_stdout()
        return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush does not complain about the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def exit_code(exc: BaseException) -> int:
    """The documented exit code of an error."""
    if isinstance(exc, UsageError):
        return USAGE_EXIT
    if isinstance(exc, ImageRouterError):
        return next(c for cls, c in EXIT_CODES if isinstance(exc, cls))
    return 1


def _report(exc: BaseException, *, as_json: bool, verbose: bool) -> int:
    """Tell the person (one line on stderr) or the program (one JSON object on stdout) what went wrong."""
    code = exit_code(exc)
    kind = exc.kind if isinstance(exc, (ImageRouterError, UsageError)) else type(exc).__name__
    line = _headline(exc)
    detail = _explanation(exc, verbose=verbose)
    if as_json:
        doc: dict[str, Any] = {"error": kind, "message": line, "exit_code": code}
        if isinstance(exc, ImageRouterError):
            doc |= {"detail": str(exc) if _one_line(str(exc)) != line else None, "request_id": exc.request_id}
        if verbose and detail:
            doc["explanation"] = detail
        print(json.dumps(doc))
    else:
        print(f"error: {kind}: {line}", file=sys.stderr)
        if verbose and detail:
            print(detail, file=sys.stderr)
    return code


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _headline(exc: BaseException) -> str:
    """What went wrong and what to change, in one line (the whole story is in ``--verbose``)."""
    if isinstance(exc, ImageRouterError):
        decision = getattr(exc, "decision", None)
        rejections = list(getattr(decision, "rejections", None) or [])
        charged = f" (charged ${exc.cost_usd})" if exc.cost_usd else ""
        if isinstance(exc, NoRouteError) and rejections and all(r.code == "not-configured" for r in rejections):
            return ("no provider is configured: set a key (e.g. OPENAI_API_KEY) or IMAGEROUTER_MODELS, or add "
                    "--sandbox to use the loopback sandboxes; `pixroute providers` says what each one needs")
        if isinstance(exc, (NoRouteError, BudgetExceeded)) and rejections:
            head = exc.message.split(" (", 1)[0]
            counts = Counter(r.code for r in rejections)
            example = next((r for r in rejections if r.code != "not-configured"), rejections[0])
            return _one_line(f"{head}: {len(rejections)} candidate(s) rejected "
                             f"({', '.join(f'{code} {n}' for code, n in counts.most_common())}), e.g. "
                             f"{example.provider}/{example.model}: {example.reason}; --verbose lists each")
        failed = [a for a in exc.attempts if a.outcome not in ("success", "cache-hit")]
        if isinstance(exc, (AllProvidersFailed, DeadlineExceeded)) and failed:
            head = "every provider failed" if isinstance(exc, AllProvidersFailed) else "the request's deadline passed"
            last = failed[-1]
            return _one_line(f"{head} after {len(failed)} attempt(s){charged}; the last: {last.provider}/"
                             f"{last.model}: {last.error} ({last.message}); --verbose lists each")
        return _one_line(str(exc))
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return _one_line(f"{exc.strerror}{where}")
    text = _one_line(str(exc)) or "(no message)"
    return text if isinstance(exc, UsageError) else f"{text} (a bug? --verbose shows where)"


def _explanation(exc: BaseException, *, verbose: bool) -> str:
    """The rest of the story: the whole message, the decision, the attempts; a traceback for a bug."""
    if not verbose:
        return ""
    if not isinstance(exc, (ImageRouterError, UsageError)):
        return "".join(traceback.format_exception(exc)).rstrip()
    parts: list[str] = []
    if isinstance(exc, ImageRouterError):
        if _one_line(str(exc)) != _headline(exc):
            parts.append(str(exc))
        for i, a in enumerate(exc.attempts, 1):
            how = {"success": "ok", "cache-hit": "cached"}.get(a.outcome) or f"{a.error}: {a.message}"
            parts.append(f"attempt {i}: {a.provider}/{a.model} retry {a.retry} -> {how}")
        decision = getattr(exc, "decision", None)
        if decision is not None and hasattr(decision, "explain"):
            parts.append(decision.explain())
    return "\n".join(parts)


def _router(ns: argparse.Namespace) -> Any:
    from router.config import router_kwargs_from_env
    from router.router import Router

    kw = router_kwargs_from_env(sandbox=True if getattr(ns, "sandbox", False) else None)
    return Router(**kw)


def _generate(ns: argparse.Namespace) -> int:
    show = ns.progress if ns.progress is not None else not ns.json
    bar = _ProgressBar() if show else None
    try:
        with _router(ns) as router:
            kw = _request_kwargs(ns)
            result = router.generate(ns.prompt, policy=ns.policy, on_progress=bar, **kw)
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
    for a in result.attempts:
        if a.outcome == "cache-hit":
            print(f"  served from the result cache ({a.provider}/{a.model}, no call)")
        elif a.outcome != "success":
            print(f"  failed attempt: {a.provider}/{a.model}: {a.error} ({a.message})")
    for p in paths:
        print(f"  wrote {p}")
    return 0


def _route(ns: argparse.Namespace) -> int:
    with _router(ns) as router:
        kw = _request_kwargs(ns)
        decision = router.route(ns.prompt, policy=ns.policy, assume_configured=not ns.configured_only, **kw)
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
    with _router(ns) as router:
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
    from router.ledger import open_ledger

    ledger = open_ledger(os.environ.get("IMAGEROUTER_LEDGER") or None)
    since = ns.since.replace(tzinfo=UTC) if ns.since and ns.since.tzinfo is None else ns.since
    try:
        rows = ledger.report(since=since, group_by=ns.by)
        budgets = [(b, ledger.headroom([b.tag] if b.tag else [])) for b in ledger.budgets()]
    finally:
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
        raise ConfigurationError(f"the server needs its extra: pip install 'pixroute[server]' "
                                 f"({exc.name} is missing)") from None
    limits: dict[str, Any] = {k: v for k, v in (("max_body_bytes", ns.max_body_bytes),
                                                ("max_image_bytes", ns.max_image_bytes),
                                                ("max_inflight_body_bytes", ns.max_inflight_body_bytes),
                                                ("body_wait_s", ns.body_wait_s))
                              if v is not None}
    if ns.client_options is not None:
        limits["client_options"] = [o.strip() for o in ns.client_options.split(",") if o.strip()]
    if ns.sandbox:
        from router.sandboxes import SANDBOX_ENV

        os.environ[SANDBOX_ENV] = "1"  # serve() builds its router from the environment
    serve(ns.host, ns.port, policy=ns.policy, ledger=ns.ledger, keys_file=ns.keys_file,
          allow_open=ns.allow_open, unknown_model=ns.unknown_model, lora_dirs=ns.lora_dirs,
          log_level=ns.log_level, **limits)
    return 0


def _keys(ns: argparse.Namespace) -> int:
    from router.keys import run

    return run(ns, as_json=ns.json)


def _demo(ns: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from router.demo import run_demo

    out = Path(ns.out) if ns.out else Path(tempfile.mkdtemp(prefix="pixroute-demo-"))
    return run_demo(out, as_json=ns.json, local=ns.local)


def _sandbox(ns: argparse.Namespace) -> int:
    import shlex
    import signal
    import subprocess
    import threading

    from router.sandboxes import Sandboxes, parse_fault

    faults = [parse_fault(spec) for spec in ns.faults]
    command = ns.run[1:] if ns.run[:1] == ["--"] else ns.run
    with Sandboxes(faults=faults) as fleet:
        env = fleet.env()
        if command:
            try:
                return subprocess.run(command, env=os.environ | env, check=False).returncode
            except OSError as exc:
                raise ConfigurationError(f"cannot run {command[0]!r}: {exc.strerror or type(exc).__name__}") from None
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:  # Ctrl-C from the moment the lines are out (a reader may send it at once) stops cleanly
            if ns.json:
                print(json.dumps({"env": env, "faults": ns.faults, "pid": os.getpid()}))
            else:
                print(f"# {len(fleet.hosts)} sandboxes on 127.0.0.1 ({', '.join(fleet.hosts)}), fake keys: "
                      f"nothing reaches a vendor. In another shell, paste these lines; Ctrl-C here stops the "
                      f"sandboxes.", file=sys.stderr)
                for name, value in env.items():
                    print(f"export {name}={shlex.quote(value)}")
            sys.stdout.flush()
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


def _eval(ns: argparse.Namespace) -> int:
    from router.evaluate import run_args

    return run_args(ns)


def _worker(ns: argparse.Namespace) -> int:
    from router.jobs import worker_command

    return worker_command(ns)


def _serve_gpu(ns: argparse.Namespace) -> int:
    from providers.ray_pool import serve_gpu

    serve_gpu(ns.catalog, ns.host, ns.port, address=ns.address, max_batch_size=ns.max_batch_size,
              batch_wait_timeout_s=ns.batch_wait_s, allow_open=ns.allow_open)
    return 0


def _inspect(ns: argparse.Namespace) -> int:
    from router.inspect_image import run_args

    return run_args(ns)


COMMANDS = {"generate": _generate, "route": _route, "providers": _providers, "ledger": _ledger, "serve": _serve,
            "keys": _keys, "demo": _demo, "sandbox": _sandbox, "eval": _eval, "inspect": _inspect,
            "worker": _worker, "serve-gpu": _serve_gpu}


if __name__ == "__main__":
    sys.exit(main())
