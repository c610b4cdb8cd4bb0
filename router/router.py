"""The router: decide, then walk the chain — retry, fall back, account — and return one result.

This module is the one place for retries, backoff, deadlines, circuit breaking and
cost accounting. Providers stay thin; policies stay pure.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import dataclasses
import functools
import json
import logging
import random
import secrets
import threading
import time
import types
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar, cast

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from policies.decision import CandidateInfo, RankedCandidate, Rejection, RoutingDecision
from policies.engine import PolicyEngine, RoutingContext
from policies.policy import Policy, resolve_policy
from providers.base import Capabilities, Plan, Provider, ProviderResponse
from router import provenance
from router.errors import (
    AllProvidersFailed,
    BudgetExceeded,
    ContentPolicyError,
    DeadlineExceeded,
    Disposition,
    ImageRouterError,
    MalformedResponse,
    NoRouteError,
    ProviderTimeout,
    ProviderUnavailable,
    RequestValidationError,
)
from router.ledger import Budget, LedgerBackend, Reservation, open_ledger
from router.logs import install_redaction
from router.profiles import ProfileTable, default_profiles, profile_for
from router.progress import (
    AttemptFailed,
    AttemptStarted,
    Completed,
    FellBack,
    ProgressCallback,
    Routed,
    current_sink,
    reporting_to,
)
from router.request import ImageRequest, Selection
from router.result import Attempt, Cost, GenerationResult, Latency, Outcome
from router.state import Breaker, CachedResult, Latencies, RouterState, cache_key, open_state
from router.telemetry import Tracing

T = TypeVar("T")
log = install_redaction(logging.getLogger("imagerouter"))
_PROVIDER_FAULTS = (ProviderUnavailable, ProviderTimeout, MalformedResponse)


class AsyncRouter:
    """Routes requests across providers under a policy. Async at the core.

    ``providers`` are tried in the order the policy ranks them; ``ledger`` is a
    :class:`~router.ledger.LedgerBackend`, a SQLite path, ``":memory:"``, a ``postgresql://`` URL
    (:class:`~router.ledger_pg.PostgresLedger`, the ``postgres`` extra) or None (the user's data dir).
    ``state`` holds the circuit breakers, latency statistics and result cache: None (this process), a
    ``redis://`` URL (shared by every process using it; the ``redis`` extra) or a :class:`~router.state.RouterState`.
    ``sleep``, ``clock`` and ``rng`` are injectable so tests can check waits exactly.
    ``tracer_provider`` receives the OpenTelemetry spans (default: the global provider; False: none),
    and ``record_prompts`` puts prompts on spans and log records (see :mod:`router.telemetry`).
    """

    def __init__(
        self,
        providers: Sequence[Provider],
        *,
        policy: Policy | str | Path | None = None,
        ledger: LedgerBackend | str | Path | None = None,
        budgets: Iterable[Budget] = (),
        max_retries: int | None = None,
        backoff: tuple[float, float] = (0.5, 8.0),
        max_retry_after_s: float = 60.0,
        deadline_s: float = 300.0,
        attempt_timeout_s: float = 180.0,
        breaker: Breaker | None = None,
        state: RouterState | str | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        tracer_provider: Any = None,
        record_prompts: bool | None = None,
    ) -> None:
        names = [p.name for p in providers]
        if len(set(names)) != len(names):
            raise ValueError(f"provider names must be unique, got {names}")
        self.providers: dict[str, Provider] = {p.name: p for p in providers}
        """The providers as given (never modified: a policy's price overrides apply to copies)."""
        self.policy = resolve_policy(policy)
        self.ledger: LedgerBackend = open_ledger(ledger)
        self._ledger = _LedgerCalls(self.ledger)
        self._priced: dict[str, dict[str, Provider]] = {}
        self._profiled: dict[str, ProfileTable] = {}
        self._budgeted: set[tuple[object, ...]] = set()
        self._overbilled: dict[tuple[str, str], Decimal] = {}  # (provider, model) → largest bill ÷ reservation
        self._apply_budgets(self.policy)
        for budget in budgets:
            self.ledger.set_budget(budget)
        self._max_retries = max_retries
        self.backoff = backoff
        self.max_retry_after_s = max_retry_after_s
        self.deadline_s = deadline_s
        self.attempt_timeout_s = attempt_timeout_s
        self.state = open_state(state) if state is not None else open_state(None, clock=clock)
        self.breaker: Breaker = breaker or self.state.breaker
        self.stats: Latencies = self.state.stats
        self._sleep = sleep
        self._clock = clock
        self._rng = rng
        self._engines: dict[str, PolicyEngine] = {}
        self._views: dict[int, tuple[Provider, Provider]] = {}  # id(provider) → (provider, its planning view)
        self._tracing = Tracing(tracer_provider, record_prompts=record_prompts)
        self._spent = Decimal(0)  # billed on requests so far: what hedges may add a fraction of
        self._volume: tuple[float, int] = (-1e9, 0)  # (when read, requests in the last day): the ladder's volume
        self._hedge_extra = Decimal(0)  # what hedges added (the losers' charges)
        self._hedge_held = Decimal(0)  # the worst case of hedges in flight

    @classmethod
    def from_env(cls, *, sandbox: bool | None = None, **kw: Any) -> AsyncRouter:
        """A router configured from environment variables (see :mod:`router.config`); ``sandbox=True`` runs
        every hosted backend against its offline loopback sandbox (fake keys; nothing reaches a vendor)."""
        from router.config import router_kwargs_from_env

        return cls(**(router_kwargs_from_env(sandbox=sandbox) | kw))

    # --- a policy's prices and budgets ----------------------------------------------------

    def providers_for(self, policy: Policy) -> dict[str, Provider]:
        """The providers as ``policy`` prices them: shallow copies carrying its price overrides, made once
        per set of overrides (the caller's provider objects are never changed)."""
        if not policy.prices:
            return self.providers
        key = json.dumps(policy.prices, sort_keys=True, default=str)
        priced = self._priced.get(key)
        if priced is None:
            priced = {}
            for name, provider in self.providers.items():
                twin = copy.copy(provider)
                twin.prices = provider.prices.with_overrides(policy.prices)
                priced[name] = twin
            self._priced[key] = priced
        return priced

    def profiles_for(self, policy: Policy) -> ProfileTable:
        """The per-skill model profiles routing uses under ``policy`` (the shipped table with its overrides)."""
        key = json.dumps(policy.profiles, sort_keys=True, default=str)
        table = self._profiled.get(key)
        if table is None:
            table = self._profiled[key] = default_profiles().with_overrides(policy.profiles)
        return table

    def _apply_budgets(self, policy: Policy) -> None:
        """Write ``policy``'s budgets into the ledger (once per distinct set)."""
        key = tuple(policy.budgets)
        if key and key not in self._budgeted:
            for rule in policy.budgets:
                self.ledger.set_budget(Budget(rule.limit_usd, rule.period, rule.tag))
            self._budgeted.add(key)

    def _may_hedge(self, worst: Decimal, fraction: float) -> bool:
        """Whether a hedge that may cost ``worst`` keeps hedging within ``fraction`` of the spend so far."""
        return self._hedge_extra + self._hedge_held + worst <= Decimal(str(fraction)) * self._spent

    def reservation_for(self, provider: str, cand: RankedCandidate) -> Decimal:
        """What to hold in the ledger before calling: the call's worst case, scaled up by the largest
        factor this provider/model has billed beyond its reservation so far (a vendor that bills more
        than its published rates overshoots a budget once, not on every call)."""
        worst = cand.estimate.worst_usd
        factor = self._overbilled.get((provider, cand.model))
        return worst if factor is None else worst * factor

    def learn_bill(self, provider: str, cand: RankedCandidate, reserved: Decimal, billed: Decimal) -> None:
        worst = cand.estimate.worst_usd
        if billed > reserved and worst > 0:
            key = (provider, cand.model)
            self._overbilled[key] = max(self._overbilled.get(key, Decimal(1)), billed / worst)

    # --- routing ---------------------------------------------------------------------

    def route(self, request: ImageRequest | str, *, policy: Policy | str | Path | None = None,
              assume_configured: bool = True, **kw: Any) -> RoutingDecision:
        """The decision for ``request`` without calling anything (a dry run).

        Providers that are not configured (no key, say) are ranked as if they were and marked with what to
        set (``RankedCandidate.configuration_problem``, ``decision.not_configured``);
        ``decision.configured_chain`` is what :meth:`agenerate` would try as things are.
        ``assume_configured=False``: the decision exactly as :meth:`agenerate` makes it, unconfigured
        providers rejected.
        """
        req = ImageRequest.from_kwargs(request, **kw)
        check_names(self.providers, req)
        pol = resolve_policy(policy) if policy is not None else self.policy
        self._apply_budgets(pol)
        if self._volume_due(pol):
            self._read_volume()
        return self._decide(req, pol, self.ledger.headroom(req.tags), self.candidates(req, pol),
                            assume_configured=assume_configured)

    def _engine(self, policy: Policy) -> PolicyEngine:
        engine = self._engines.get(policy.name)
        if engine is None or engine.policy is not policy:
            engine = self._engines[policy.name] = PolicyEngine(policy)
        return engine

    def candidates(self, request: ImageRequest, policy: Policy | None = None) -> list[CandidateInfo]:
        """Every (provider, model) pair with its capabilities, plan and estimate (priced by ``policy``).

        Each provider's ``plan()`` and ``capabilities()`` run once per model here, also where its
        ``estimate()`` asks for them again (see :func:`_planning_view`).
        """
        out: list[CandidateInfo] = []
        stats, breaker, pinned = self.stats, self.breaker, request.model
        profiles = self.profiles_for(policy or self.policy)
        token = _MEMO.set(_Memo(request))
        try:
            for position, provider in enumerate(self.providers_for(policy or self.policy).values()):
                view = self._view(provider)
                models = view.models()
                if pinned is not None:
                    models = [pinned] if view.supports_model(pinned) else []
                if not models:
                    continue
                name, kind = provider.name, provider.kind
                problem = view.configuration_problem()
                circuit_open = not breaker.available(name)
                for model in models:
                    out.append(CandidateInfo(
                        name, kind, model, view.capabilities(model), view.plan(request, model),
                        view.estimate(request, model), problem, circuit_open, stats.p50(name, model), position,
                        profile_for(provider, model, profiles),
                    ))
        finally:
            _MEMO.reset(token)
        return out

    def _view(self, provider: Provider) -> Provider:
        held = self._views.get(id(provider))
        if held is None or held[0] is not provider:
            held = self._views[id(provider)] = (provider, _planning_view(provider))
        return held[1]

    def _decide(self, request: ImageRequest, policy: Policy, headroom: Decimal | None,
                candidates: list[CandidateInfo], *, assume_configured: bool = False) -> RoutingDecision:
        empty = tuple(
            Rejection(p.name, "-", "not-configured", p.configuration_problem() or "offers no model")
            for p in self.providers.values() if not p.models()
        )
        volume = self._volume[1] if policy.order == "ladder" and policy.ladder_gpu_usd_per_day else None
        context = RoutingContext(headroom, empty, assume_configured, volume)
        return self._engine(policy).decide(request, candidates, context)

    def _volume_due(self, policy: Policy) -> bool:
        """Whether a ladder policy with a GPU rate needs the last day's volume read again (once a minute)."""
        return (policy.order == "ladder" and policy.ladder_gpu_usd_per_day is not None
                and time.monotonic() - self._volume[0] > 60)

    def _read_volume(self) -> None:
        """The requests the ledger settled in the last 24 hours, for the ladder's volume rule (a ledger read:
        from async code, run it on the ledger's thread)."""
        since = datetime.now(UTC) - timedelta(days=1)
        rows = self.ledger.report(since=since, group_by=())
        self._volume = (time.monotonic(), sum(r.requests for r in rows))

    # --- generation ------------------------------------------------------------------

    async def agenerate(self, request: ImageRequest | str, *, policy: Policy | str | Path | None = None,
                        on_progress: ProgressCallback | None = None, **kw: Any) -> GenerationResult:
        """Generate images for ``request`` (or a prompt and request fields as keywords).

        ``on_progress`` receives the request's progress events (:mod:`router.progress`): the route,
        each attempt, a polled vendor's status, denoising steps and partial images where the backend
        reports them. It may run on a backend's thread; :meth:`astream` gives the same events as an
        async iterator.
        """
        if on_progress is not None:
            with reporting_to(on_progress):
                return await self.agenerate(request, policy=policy, **kw)
        start = self._clock()
        req = await ImageRequest.afrom_kwargs(request, **kw)
        check_names(self.providers, req)
        pol = resolve_policy(policy) if policy is not None else self.policy
        select = req.select or pol.select
        if select is not None:
            return await self._best_of(req.model_copy(update={"select": None}), pol, select)
        if pol.quality is not None:  # load the scorer now: a wrong path fails before anything is charged
            from router.quality import clip_scorer

            await asyncio.to_thread(clip_scorer, pol.quality.clip)
        if pol is not self.policy:
            await self._ledger.run(self._apply_budgets, pol)
        if self._volume_due(pol):
            await self._ledger.run(self._read_volume)
        request_id = f"ir_{secrets.token_hex(10)}"
        if req.idempotency_key is None:
            req = req.model_copy(update={"idempotency_key": request_id})
        deadline = start + (req.deadline_s or self.deadline_s)
        with self._tracing.request(req, pol.name, request_id) as span:
            walk = _Walk(self, req, pol, request_id, deadline, span)
            try:
                headroom = self._ledger.headroom(req.tags)  # read while the candidates are built
                if self.state.shared:  # the fleet's circuits and latencies, as of now (throttled per key)
                    await asyncio.gather(self.breaker.arefresh(self.providers), self.stats.arefresh(
                        [(p.name, m) for p in self.providers.values() for m in p.models()]))
                candidates = self.candidates(req, pol)
                decision = self._decide(req, pol, await headroom, candidates)
                routed = self._clock()
                self._tracing.routed(span, len(decision.chain))
                if not decision.chain:
                    raise _refusal(req, decision, request_id)
                if walk.sink is not None:
                    walk.sink(Routed(request_id, pol.name, tuple(f"{c.provider}/{c.model}" for c in decision.chain)))
                if decision.residency is not None and decision.residency != req.constraints.residency:
                    # A policy's residency must reach the providers too: they pick regional hosts from it.
                    constraints = req.constraints.model_copy(update={"residency": decision.residency})
                    walk.request = req = req.model_copy(update={"constraints": constraints})
                served = await walk.cached(decision)
                if served is None:
                    served = await walk.run(decision)
                    if served is not None:
                        await walk.remember(served[0], served[2])
                if served is not None:
                    cand, rank, response = served
                    return walk.result(cand, response, decision, start, routed, rank)
                raise walk.failure(decision)
            except ImageRouterError as exc:
                walk.failed(exc, start)
                raise
            finally:
                self._spent += walk.billed

    async def _best_of(self, req: ImageRequest, pol: Policy, select: Selection) -> GenerationResult:
        """Best-of-n: ``select.n`` candidates from the head of the chain (or its top ``select.across``
        backends at once, each making its share), scored by CLIP against the prompt; the best ``req.n``
        are returned, every candidate is charged, each attempt carries its images' scores."""
        clip = select.clip or (pol.quality.clip if pol.quality is not None else None)
        if clip is None:
            raise RequestValidationError([("select.clip", "best-of-n by CLIP needs a local CLIP model directory: "
                                                          "select={..., 'clip': PATH}, or quality: {clip: PATH} "
                                                          "in the policy")])
        if select.n < req.n:
            raise RequestValidationError([("select.n", f"makes {select.n} candidates but the request keeps "
                                                       f"n={req.n}; raise select.n")])
        from router.quality import clip_scorer

        scorer = clip_scorer(clip)  # a wrong path fails here, before anything is called or charged
        failed: list[BaseException] = []
        if select.across == 1:
            results = [await self.agenerate(req.model_copy(update={"n": select.n}), policy=pol)]
        else:
            headroom = self._ledger.headroom(req.tags)  # the ledger is read on its own thread, not the loop
            decision = self._decide(req, pol, await headroom, self.candidates(req, pol))
            if not decision.chain:
                raise _refusal(req, decision, "-")
            heads = decision.chain[:select.across]
            share = -(-select.n // len(heads))
            outcomes = await asyncio.gather(*(self.agenerate(req.model_copy(update={
                "n": share, "provider": c.provider, "model": c.model}), policy=pol) for c in heads),
                return_exceptions=True)
            results = [r for r in outcomes if isinstance(r, GenerationResult)]
            failed = [r for r in outcomes if isinstance(r, BaseException)]
            for exc in failed:
                if not isinstance(exc, ImageRouterError):
                    raise exc
            if not results:
                raise failed[0]
        images = [(img, i) for i, r in enumerate(results) for img in r.images]
        scores = await scorer.ascore([img for img, _ in images], req.prompt)
        order = sorted(range(len(images)), key=lambda k: -scores[k])[:req.n]
        best = results[images[order[0]][1]]
        attempts: list[Attempt] = []
        for i, r in enumerate(results):
            mine = [round(s, 4) for s, (_, j) in zip(scores, images, strict=True) if j == i]
            attempts += [dataclasses.replace(a, scores=mine) if a.outcome == "success" else a for a in r.attempts]
        charged = sum((getattr(e, "cost_usd", None) or Decimal(0) for e in failed), Decimal(0))
        cost = dataclasses.replace(best.cost, actual_usd=sum((r.cost.actual_usd for r in results), charged),
                                   estimated_usd=sum((r.cost.estimated_usd for r in results), Decimal(0)))
        warnings = list(dict.fromkeys(w for r in results for w in r.warnings))
        warnings += [f"one backend of the best-of-{select.n} failed ({type(e).__name__}: {e}); its charge, if "
                     f"any, is in the ledger" for e in failed]
        return dataclasses.replace(best, images=[images[k][0] for k in order], cost=cost, attempts=attempts,
                                   warnings=warnings, quality={"clip": [round(scores[k], 4) for k in order]})

    async def astream(self, request: ImageRequest | str, *, policy: Policy | str | Path | None = None,
                      **kw: Any) -> AsyncGenerator[Any, None]:
        """Generate like :meth:`agenerate`, yielding the request's progress events as they happen and then
        :class:`~router.progress.Completed` with the result (an error is raised after the events before it).

            async for event in router.astream("a fox", partial_images=2):
                if event.kind == "partial_image": show(event.data)
                elif event.kind == "completed": result = event.result

        Closing the iterator cancels the request: leave a loop early inside
        ``async with contextlib.aclosing(router.astream(...)) as events:``.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def put(event: Any) -> None:  # from the loop or from a backend's thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(queue.put_nowait, event)

        task = asyncio.create_task(self.agenerate(request, policy=policy, on_progress=put, **kw))
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, _END))
        try:
            while (event := await queue.get()) is not _END:
                yield event
            yield Completed(task.result())
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
            elif not task.cancelled():
                task.exception()  # retrieved: raised above or seen by the caller

    async def aclose(self) -> None:
        for priced in self._priced.values():
            for provider in priced.values():
                await provider.aclose()
        for provider in self.providers.values():
            await provider.aclose()
        self._ledger.shutdown()
        await self.state.aclose()

    async def __aenter__(self) -> AsyncRouter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- retry timing ----------------------------------------------------------------

    def _delay(self, calls: int, exc: BaseException | None) -> float:
        """The wait before the next call after ``calls`` failed ones: Retry-After, else jittered backoff."""
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return float(retry_after)
        base, cap = self.backoff
        ceiling = min(cap, base * 2 ** (calls - 1))
        return ceiling * (0.5 + 0.5 * self._rng())


def check_names(providers: Mapping[str, Provider], request: ImageRequest) -> None:
    """An unknown provider or model pin is called unknown, with the names there are (before any routing):
    :class:`RequestValidationError`."""
    pinned, model = request.provider, request.model
    if pinned is not None and pinned not in providers:
        raise RequestValidationError([("provider", f"unknown provider {pinned!r}; the providers are "
                                                   f"{', '.join(sorted(providers))}")])
    if model is None:
        return
    scope = [providers[pinned]] if pinned is not None else list(providers.values())
    if any(p.supports_model(model) for p in scope):
        return
    names = sorted({m for p in scope for m in p.models()})
    idle = [f"{p.name} offers none ({p.configuration_problem()})" for p in scope
            if not p.models() and p.configuration_problem()]
    where = f" on {pinned}" if pinned is not None else ""
    known = f"the models{where} are {', '.join(names)}" if names else f"no model is offered{where}"
    raise RequestValidationError([("model", "; ".join([f"unknown model {model!r}{where}", known, *idle]))])


_END = object()
"""The end of :meth:`AsyncRouter.astream`'s queue."""


def _refusal(request: ImageRequest, decision: RoutingDecision, request_id: str) -> ImageRouterError:
    """Why no candidate is left: over budget when budgets alone ruled them out, else no route."""
    reasons = "; ".join(f"{r.provider}/{r.model}: {r.reason}" for r in decision.rejections)
    offered = [r for r in decision.rejections if r.code != "not-configured"]
    if offered and all(r.code == "budget" for r in offered):
        return BudgetExceeded(f"every backend that could serve this {request.task} request is over budget "
                              f"({reasons})", decision=decision, request_id=request_id)
    return NoRouteError(f"no provider can serve this {request.task} request ({reasons or 'none registered'})",
                        decision=decision, request_id=request_id)


def _exception(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome else None


def _retried(exc: BaseException) -> bool:
    """Whether to call the same candidate again after ``exc``: a transient fault, and no paid work lost
    (a billed failure is never re-run on the same backend: that would pay twice for one image)."""
    return (isinstance(exc, ImageRouterError) and exc.disposition is Disposition.RETRY
            and exc.billed is None)


class _Memo:
    """One request's plans and capabilities, while :meth:`AsyncRouter.candidates` builds its candidates."""

    __slots__ = ("request", "values")

    def __init__(self, request: ImageRequest) -> None:
        self.request = request
        self.values: dict[tuple[str, int, str], Any] = {}


_MEMO: contextvars.ContextVar[_Memo | None] = contextvars.ContextVar("imagerouter_plan_memo", default=None)
_view_classes: dict[type, type | None] = {}


class _Planning(Provider):
    """Put before a provider's class: ``plan`` and ``capabilities`` answered from the current :class:`_Memo`
    (the provider's own methods run once per request and model; outside a memo they are called as they are)."""

    __slots__ = ()

    def plan(self, request: ImageRequest, model: str) -> Plan:
        memo = _MEMO.get()
        if memo is None or request is not memo.request:
            return super().plan(request, model)
        key = ("plan", id(self), model)
        found = memo.values.get(key)
        if found is None:
            found = memo.values[key] = super().plan(request, model)
        return cast(Plan, found)

    def capabilities(self, model: str) -> Capabilities:
        memo = _MEMO.get()
        if memo is None:
            return super().capabilities(model)  # type: ignore[safe-super]
        key = ("capabilities", id(self), model)
        found = memo.values.get(key)
        if found is None:
            found = memo.values[key] = super().capabilities(model)  # type: ignore[safe-super]
        return cast(Capabilities, found)


def _planning_class(cls: type[Provider]) -> type[Provider] | None:
    """``cls`` with :class:`_Planning` before it (made once per class; None where ``cls`` cannot be subclassed)."""
    if cls in _view_classes:
        return _view_classes[cls]
    sub: type[Provider] | None
    try:
        sub = types.new_class(f"_Planning{cls.__name__}", (_Planning, cls),
                              exec_body=lambda ns: ns.update(__module__=__name__, __slots__=()))
    except Exception:  # a class that refuses subclasses: no memo, the same answers
        sub = None
    _view_classes[cls] = sub
    return sub


def _planning_view(provider: Provider) -> Provider:
    """``provider`` itself, seen through a subclass that memoizes ``plan`` and ``capabilities`` per request.

    Most providers' ``estimate()`` calls ``self.plan()`` again; the view shares the provider's own
    attribute dictionary (every read and write is the provider's), only those two methods change, and
    only while :meth:`AsyncRouter.candidates` runs (outside it they call straight through). A provider
    without an instance dictionary (``__slots__``) is used as it is.
    """
    sub = _planning_class(type(provider))
    if sub is None:
        return provider
    try:
        view = object.__new__(sub)
        view.__dict__ = provider.__dict__
    except (TypeError, AttributeError):
        return provider
    return view


_HEDGED = "hedged: another candidate answered first"
_FLUSH_AFTER_S = 0.05
"""How long writes no budget watches may wait in the ledger's queue (readers apply it first; closing
the router or the ledger, or the process exiting, applies it too)."""
_FLUSH_AT = 64


class _LedgerCalls:
    """The ledger's calls from the event loop. A file ledger runs on one dedicated thread, where
    SQLite may wait on another process's write lock without stalling the loop; a private in-memory
    ledger (no file, no other connection) answers inline in microseconds. Writes no budget watches
    are not waited for: they are queued in the ledger (readers apply the queue first) and the thread
    applies them right after, so a request's path never waits on SQLite unless a budget applies."""

    def __init__(self, ledger: LedgerBackend) -> None:
        self.ledger = ledger
        self._pool = None if ledger.private else ThreadPoolExecutor(1, thread_name_prefix="imagerouter-ledger")
        self._flush_due = False
        self._flush_timer: asyncio.TimerHandle | None = None

    async def run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await self.start(fn, *args, **kw)

    def start(self, fn: Callable[..., T], *args: Any, **kw: Any) -> asyncio.Future[T]:
        """``fn`` started now; its result awaited later (so other work can overlap the thread hop)."""
        loop = asyncio.get_running_loop()
        if self._pool is None:
            done: asyncio.Future[T] = loop.create_future()
            try:
                done.set_result(fn(*args, **kw))
            except Exception as exc:
                done.set_exception(exc)
            return done
        return loop.run_in_executor(self._pool, functools.partial(fn, *args, **kw))

    def headroom(self, tags: Iterable[str]) -> asyncio.Future[Decimal | None]:
        if self._pool is not None and self.ledger.watches(tags) is False:
            done: asyncio.Future[Decimal | None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return self.start(self.ledger.headroom, tags)

    def _flush_soon(self) -> None:
        """Have the ledger thread apply the queued writes within :data:`_FLUSH_AFTER_S`, in one transaction
        however many were queued meanwhile (a transaction per write would cost the machine more than
        the requests themselves); at once when :data:`_FLUSH_AT` are waiting."""
        if self._pool is None or self._flush_due:
            return
        self._flush_due = True
        if self.ledger.queued >= _FLUSH_AT:
            self._pool.submit(self._flush)
        else:
            self._flush_timer = asyncio.get_running_loop().call_later(_FLUSH_AFTER_S, self._submit_flush)

    def _submit_flush(self) -> None:
        self._flush_timer = None
        if self._pool is not None:
            self._pool.submit(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        try:
            self.ledger.flush()
        except Exception:  # the writes stay queued; the next flush or read applies them
            log.exception("the ledger could not apply its queued writes; they stay queued")

    async def settle(self, reservation: Reservation, cost: Decimal, **kw: Any) -> None:
        if self._pool is not None and self.ledger.settle_behind(reservation, cost, **kw):
            self._flush_soon()
            return
        await self.run(self.ledger.settle, reservation, cost, **kw)

    async def reserve(self, **kw: Any) -> Reservation:
        """A reservation; if the caller is cancelled while it is being made, it is released once made."""
        if self._pool is None:
            return self.ledger.reserve(**kw)
        queued = self.ledger.reserve_behind(**kw)
        if queued is not None:
            self._flush_soon()
            return queued
        future = asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(self.ledger.reserve, **kw))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._release_made)
            raise

    def _release_made(self, future: asyncio.Future[Reservation]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.release_soon(future.result(), reason="cancelled")

    def settle_soon(self, reservation: Reservation, cost: Decimal, **kw: Any) -> None:
        """Settle without waiting (from cancellation paths, where nothing may be awaited)."""
        if self._pool is None:
            self.ledger.settle(reservation, cost, **kw)
        elif self.ledger.settle_behind(reservation, cost, **kw):
            self._flush_soon()
        else:
            self._pool.submit(self.ledger.settle, reservation, cost, **kw)

    def release_soon(self, reservation: Reservation, *, reason: str) -> None:
        """Release without waiting (from cancellation paths, where nothing may be awaited)."""
        if self._pool is None:
            self.ledger.release(reservation, reason=reason)
        else:
            self._pool.submit(self.ledger.release, reservation, reason=reason)

    def shutdown(self) -> None:
        if self._flush_timer is not None:  # the flush it would start runs now, below
            self._flush_timer.cancel()
            self._flush_timer = None
        self._flush_due = False
        if self._pool is not None:
            if self.ledger.queued:
                self._pool.submit(self._flush)
            self._pool.shutdown(wait=True)
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="imagerouter-ledger")


class _Walk:
    """One request's walk down the chain: its attempts, charges and deadline."""

    def __init__(self, router: AsyncRouter, request: ImageRequest, policy: Policy, request_id: str,
                 deadline: float, span: Any = None) -> None:
        self.r = router
        self.request = request
        self.policy = policy
        self.request_id = request_id
        self.deadline = deadline
        self.span = span  # the request's span (a no-op one when tracing is off)
        self.providers = router.providers_for(policy)
        self.attempts: list[Attempt] = []
        self.errors: list[ImageRouterError] = []
        self.billed = Decimal(0)
        self.calls = 0
        self.timed_out: set[str] = set()  # backends that timed out in this request: their other models are skipped
        self.sink = current_sink()
        self._last_tried: RankedCandidate | None = None
        self.quality: dict[str, list[float]] | None = None

    def remaining(self) -> float:
        return self.deadline - self.r._clock()

    async def run(self, decision: RoutingDecision) -> tuple[RankedCandidate, int, ProviderResponse] | None:
        """Walk the decision's chain until a candidate serves the request; with a hedge policy, a slow head
        gets a second candidate raced against it. A candidate skipped without a call (its circuit is open,
        or its backend timed out earlier in this request) does not count against the chain's length: the
        next ranked candidate beyond the chain takes its place. None when every one failed."""
        chain: Sequence[RankedCandidate] = decision.chain
        limit = len(chain)
        rank = tried = 0
        while tried < limit:
            if rank == len(chain):
                if len(chain) > limit or not decision.beyond:
                    break
                chain = [*chain, *decision.beyond]  # only read when something was skipped
            cand = chain[rank]
            calls = self.calls
            wait = self._hedge_wait(cand) if rank + 1 < len(chain) and tried + 1 < limit else None
            if wait is None:
                response = await self.try_candidate(cand, rank)
                if response is not None:
                    return cand, rank, response
                rank += 1
                tried += self.calls > calls
                continue
            head = asyncio.create_task(self.try_candidate(cand, rank))
            try:
                done, _ = await asyncio.wait({head}, timeout=wait)
            except BaseException:
                head.cancel()
                raise
            backup = chain[rank + 1]
            worst = self.r.reservation_for(backup.provider, backup)
            hedge = self.policy.hedge
            if done or hedge is None or not self.r._may_hedge(worst, hedge.max_extra_fraction):
                response = await head
                if response is not None:
                    return cand, rank, response
                rank += 1
                tried += self.calls > calls
                continue
            served = await self._race({head: (cand, rank), asyncio.create_task(
                self.try_candidate(backup, rank + 1)): (backup, rank + 1)}, worst)
            if served is not None:
                return served
            rank += 2
            tried += 2
        return None

    def _cache_key(self, cand: RankedCandidate) -> str | None:
        """The result cache's key for ``cand``: only under a policy with ``cache`` on, for a request with a
        seed, on a backend that takes the seed (the same seed makes the same image there)."""
        if not self.policy.cache or self.request.seed is None:
            return None
        if not self.providers[cand.provider].capabilities(cand.model).seed:
            return None
        return cache_key(self.request, cand.provider, cand.model)

    async def cached(self, decision: RoutingDecision) -> tuple[RankedCandidate, int, ProviderResponse] | None:
        """The best-ranked candidate's cached result for this request: no call, $0, one attempt
        recorded as a cache hit. None when nothing is cached (or the policy does not cache)."""
        keyed = [(rank, cand, key) for rank, cand in enumerate(decision.chain)
                 if (key := self._cache_key(cand)) is not None]
        if not keyed:
            return None
        t0 = self.r._clock()
        found = await self.r.state.cache.aget_many([key for _, _, key in keyed])
        for (rank, cand, _), hit in zip(keyed, found, strict=True):
            if hit is not None:
                self._record(cand, "cache-hit", self.r._clock() - t0)
                return cand, rank, hit.response()
        return None

    async def remember(self, cand: RankedCandidate, response: ProviderResponse) -> None:
        """Keep a served result for the next identical seeded request (under a caching policy)."""
        key = self._cache_key(cand)
        if key is not None:
            await self.r.state.cache.aput(key, CachedResult.from_response(cand.provider, response))

    def _hedge_wait(self, cand: RankedCandidate) -> float | None:
        """How long to wait on ``cand`` before hedging; None: no hedge (not configured, or no p95 yet)."""
        hedge = self.policy.hedge
        if hedge is None:
            return None
        if hedge.after == "p95":
            return self.r.stats.p95(cand.provider, cand.model)
        return float(hedge.after)

    async def _race(self, tasks: dict[asyncio.Task[ProviderResponse | None], tuple[RankedCandidate, int]],
                    worst: Decimal) -> tuple[RankedCandidate, int, ProviderResponse] | None:
        """The first success of the raced candidates; the other is cancelled (and charged what it may
        have been billed). None when both failed."""
        r = self.r
        r._hedge_held += worst
        billed_before = self.billed
        won: tuple[RankedCandidate, int, ProviderResponse] | None = None
        pending = set(tasks)
        try:
            log.info("request %s: hedging %s/%s after its p95 wait with %s/%s", self.request_id,
                     *(f"{c.provider}/{c.model}" for c, _ in tasks.values()))
            while pending and won is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    response = task.result()  # a fatal error propagates; the finally cancels the other
                    if response is not None and won is None:
                        won = (*tasks[task], response)
        finally:
            for task in pending:
                task.cancel(_HEDGED)
            if pending:
                await asyncio.wait(pending)
            r._hedge_held -= worst
            winner_cost = won[2].billing.cost_usd if won is not None else Decimal(0)
            r._hedge_extra += max(Decimal(0), self.billed - billed_before - winner_cost)
        return won

    async def try_candidate(self, cand: RankedCandidate, rank: int = 0) -> ProviderResponse | None:
        """Call one candidate (``rank`` in the chain) with retries; None means: go on to the next."""
        r = self.r
        provider = self.providers[cand.provider]
        if not r.breaker.available(provider.name):
            self._record(cand, "skipped", 0.0, error=ProviderUnavailable("circuit open", provider=provider.name))
            return None
        if provider.name in self.timed_out:
            self._record(cand, "skipped", 0.0, error=ProviderTimeout(
                "timed out earlier in this request: the deadline is spent on another backend", provider=provider.name))
            return None
        try:
            # The common case, one successful call, runs without the retry machinery.
            try:
                return await self._attempt(provider, cand, rank, retry=0)
            except ImageRouterError as exc:
                if not _retried(exc):
                    raise
                wait = r._delay(1, exc)
                if self._give_up(1, wait, exc, provider):
                    raise
                await r._sleep(wait)
            # tenacity numbers the retries from 1; one call has been made already.
            retrying = AsyncRetrying(
                stop=lambda s: self._give_up(s.attempt_number + 1, s.upcoming_sleep, _exception(s), provider),
                wait=lambda s: r._delay(s.attempt_number + 1, _exception(s)),
                retry=retry_if_exception(_retried),
                sleep=r._sleep,
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(provider, cand, rank, retry=attempt.retry_state.attempt_number)
        except ImageRouterError as exc:
            self.errors.append(exc)
            if isinstance(exc, ProviderTimeout):
                self.timed_out.add(provider.name)
            if isinstance(exc, BudgetExceeded):
                return None  # a cheaper candidate further down may still fit the budget
            if exc.disposition is Disposition.FATAL and not (
                isinstance(exc, ContentPolicyError) and self.policy.fallback_on_content_policy
            ):
                raise self._attach(exc) from None
        return None

    async def _attempt(self, provider: Provider, cand: RankedCandidate, rank: int, retry: int) -> ProviderResponse:
        """One call of ``provider`` in its own attempt span."""
        self.calls += 1
        if self.sink is not None:
            last, self._last_tried = self._last_tried, cand
            if last is not None and last is not cand:
                self.sink(FellBack(last.provider, last.model, cand.provider, cand.model))
            self.sink(AttemptStarted(cand.provider, cand.model, rank, retry))
        tracing = self.r._tracing
        with tracing.attempt(
            provider=provider.name, provider_kind=provider.kind, model=cand.model, request_id=self.request_id,
            rank=rank, number=self.calls, retry=retry, estimated_usd=cand.estimate.cost_usd, seed=self.request.seed,
        ) as span:
            response = await self._call(provider, cand, retry)
            tracing.attempt_done(span, response)
            return response

    def _give_up(self, calls: int, wait: float, exc: BaseException | None, provider: Provider) -> bool:
        """Whether to stop retrying a candidate after ``calls`` failed calls, the next one ``wait`` s away."""
        limit = self.policy.max_retries if self.r._max_retries is None else self.r._max_retries
        if calls > limit:
            return True
        if isinstance(exc, ProviderTimeout) and not (provider.retry_timeouts or self.policy.retry_own_timeouts):
            return True  # the same compute on the same machines would run out of time again: fall back
        if getattr(exc, "retry_after", None) is not None and wait > self.r.max_retry_after_s:
            return True  # told to wait longer than we are willing to: fall back instead
        if isinstance(exc, ProviderTimeout) and self.remaining() - wait < self.r.attempt_timeout_s:
            return True  # a retry after a timeout needs a whole attempt's time left; else try another backend
        return self.r._clock() + wait >= self.deadline

    async def _call(self, provider: Provider, cand: RankedCandidate, retry: int) -> ProviderResponse:
        r = self.r
        remaining = self.remaining()
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed", request_id=self.request_id)
        if not await r.breaker.abefore_call(provider.name):
            refused = ProviderUnavailable("circuit open", provider=provider.name)
            refused.disposition = Disposition.FALLBACK  # routing saw it closed a moment ago: go on, don't retry
            raise refused
        reservation: Reservation | None = None
        t0 = r._clock()
        try:
            reservation = await r._ledger.reserve(
                request_id=self.request_id, provider=provider.name, model=cand.model,
                amount=r.reservation_for(provider.name, cand), tags=self.request.tags,
            )
            timeout = min(remaining, r.attempt_timeout_s)
            try:
                async with asyncio.timeout(timeout):
                    response = await provider.generate(self.request, cand.model, timeout_s=timeout)
            except TimeoutError:
                raise ProviderTimeout(f"no answer within {timeout:.1f}s", provider=provider.name) from None
        except ImageRouterError as exc:
            exc.detach().provider = exc.provider or provider.name
            cost = Decimal(0)
            if reservation is not None:
                if exc.billed is not None:  # the vendor billed work before failing: charge it
                    cost = exc.billed.cost_usd
                    self.billed += cost
                    r.learn_bill(provider.name, cand, reservation.amount, cost)
                    await r._ledger.settle(reservation, cost, unit=exc.billed.unit, quantity=exc.billed.quantity,
                                           details=exc.billed.details | {"failed": exc.kind})
                else:
                    await r._ledger.run(r.ledger.release, reservation, reason=exc.kind)
            if isinstance(exc, _PROVIDER_FAULTS):
                await r.breaker.arecord_failure(provider.name)
            else:
                await r.breaker.arelease(provider.name)
            self._record(cand, "error", r._clock() - t0, error=exc, retry=retry, cost=cost)
            if self.sink is not None:
                self.sink(AttemptFailed(cand.provider, cand.model, exc.kind, exc.message, retry, cost))
            raise
        except asyncio.CancelledError as exc:
            if reservation is not None and _HEDGED in exc.args:
                # A hedge's loser, cancelled mid-call: the vendor may bill a call it finishes after we hang up,
                # so its reservation is charged, never assumed free.
                self.billed += reservation.amount
                r._ledger.settle_soon(reservation, reservation.amount, details={"hedge": "cancelled",
                                                                                "billed": "assumed"})
                self._record(cand, "cancelled", r._clock() - t0, retry=retry, cost=reservation.amount)
            elif reservation is not None:
                r._ledger.release_soon(reservation, reason="cancelled")
            r.breaker.release_soon(provider.name)
            raise
        except BaseException:
            if reservation is not None:
                r._ledger.release_soon(reservation, reason="cancelled")
            r.breaker.release_soon(provider.name)
            raise
        elapsed = r._clock() - t0
        billing = response.billing
        details = billing.details
        if self.policy.quality is not None:
            details = {**details, "clip_score": await self._scores(response)}
        r.learn_bill(provider.name, cand, reservation.amount, billing.cost_usd)
        await r._ledger.settle(reservation, billing.cost_usd, unit=billing.unit, quantity=billing.quantity,
                               details=details)
        await r.breaker.arecord_success(provider.name)
        await r.stats.arecord(provider.name, response.model, elapsed)
        self.billed += billing.cost_usd
        self._record(cand, "success", elapsed, cost=billing.cost_usd, retry=retry)
        return response

    async def _scores(self, response: ProviderResponse) -> list[float]:
        """The policy's quality step: each image's CLIP score against the prompt (off the loop). A scoring
        failure is logged and gives no scores: the call was billed and is settled either way."""
        from router.quality import clip_scorer

        assert self.policy.quality is not None
        try:
            scorer = await asyncio.to_thread(clip_scorer, self.policy.quality.clip)
            scores = [round(s, 4) for s in await scorer.ascore(response.images, self.request.prompt)]
        except Exception as exc:
            log.warning("request %s: the quality step failed (%s); the result is not scored", self.request_id,
                        type(exc).__name__)
            return []
        self.quality = {"clip": scores}
        return scores

    def _record(self, cand: RankedCandidate, outcome: Outcome, latency: float, *,
                error: ImageRouterError | None = None, cost: Decimal = Decimal(0), retry: int = 0) -> None:
        level = logging.DEBUG if error is None else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "request %s attempt %s/%s retry %d: %s %s (%.3fs)", self.request_id, cand.provider,
                    cand.model, retry, outcome, error.kind if error else "", latency, extra={
                        "request_id": self.request_id, "provider": cand.provider, "model": cand.model,
                        "outcome": outcome, "cost_usd": str(cost), "latency_s": round(latency, 4), "retry": retry,
                        "error": error.kind if error else None,
                        "error_message": error.message if error else None,
                    })
        self.attempts.append(Attempt(
            provider=cand.provider, model=cand.model, outcome=outcome, latency_s=latency, cost_usd=cost,
            error=error.kind if error else None, message=error.message if error else None,
            status_code=error.status_code if error else None, retry=retry,
            scores=self.quality["clip"] if outcome == "success" and self.quality else None,
        ))

    def _attach(self, exc: ImageRouterError) -> ImageRouterError:
        exc.attempts = list(self.attempts)
        exc.request_id = exc.request_id or self.request_id
        exc.cost_usd = self.billed
        return exc

    def failure(self, decision: RoutingDecision) -> ImageRouterError:
        """The error to raise when the chain ran out."""
        if self.errors and all(isinstance(e, BudgetExceeded) for e in self.errors):
            return self._attach(self.errors[-1])
        trail = "; ".join(f"{a.provider}/{a.model}: {a.error} ({a.message})" for a in self.attempts
                          if a.outcome != "success")
        charged = f" (charged ${self.billed} for billed failed attempts)" if self.billed else ""
        if self.remaining() <= 0:
            return self._attach(DeadlineExceeded(f"the request's deadline passed{charged}: {trail}",
                                                 attempts=self.attempts, decision=decision,
                                                 request_id=self.request_id))
        return self._attach(AllProvidersFailed(f"every provider failed{charged}: {trail}", attempts=self.attempts,
                                               decision=decision, errors=self.errors, request_id=self.request_id))

    def failed(self, exc: ImageRouterError, start: float) -> None:
        """Log a request that ends in ``exc`` and add its attempt trail to the request span."""
        exc.cost_usd = self.billed
        self.r._tracing.request_failed(self.span, self.attempts)
        if log.isEnabledFor(logging.INFO):  # INFO, not WARNING: the caller gets the error; a log must not echo it
            log.info("request %s failed: %s", self.request_id, exc, extra=self._extra(
                provider=exc.provider, model=None, outcome="error", cost=self.billed,
                latency=self.r._clock() - start, error=exc.kind))

    def _extra(self, *, provider: str | None, model: str | None, outcome: str, cost: Decimal, latency: float,
               error: str | None = None) -> dict[str, Any]:
        extra = {"request_id": self.request_id, "provider": provider, "model": model, "outcome": outcome,
                 "cost_usd": str(cost), "latency_s": round(latency, 4), "error": error, "policy": self.policy.name,
                 "attempts": len(self.attempts)}
        if self.r._tracing.record_prompts:
            extra["prompt"] = self.request.prompt
        return extra

    def result(self, cand: RankedCandidate, response: ProviderResponse, decision: RoutingDecision,
               start: float, routed: float, rank: int = 0) -> GenerationResult:
        end = self.r._clock()
        billing = response.billing
        last = self.attempts[-1]
        cost = Cost(
            estimated_usd=cand.estimate.cost_usd,
            actual_usd=self.billed,
            unit=billing.unit,
            quantity=billing.quantity,
            price_table_version=billing.price_table_version,
            details=billing.details,
        )
        images = [dataclasses.replace(img, provenance={**(img.provenance or {}), **provenance.build(
            self.request, img, provider=cand.provider, model=response.model, cost=cost, request_id=self.request_id,
            policy=self.policy.name, provider_request_id=response.provider_request_id,
        )}) for img in response.images]
        self.r._tracing.request_done(
            self.span, provider=cand.provider, provider_kind=self.providers[cand.provider].kind,
            model=response.model, rank=rank, attempts=self.attempts, estimated_usd=cand.estimate.cost_usd,
            actual_usd=self.billed)
        if self.quality and self.span.is_recording():
            self.span.set_attribute("imagerouter.quality.clip", self.quality["clip"])
        if log.isEnabledFor(logging.INFO):
            log.info("request %s served by %s/%s ($%s, %.3fs)", self.request_id, cand.provider, response.model,
                     self.billed, end - start, extra=self._extra(provider=cand.provider, model=response.model,
                                                                  outcome="success", cost=self.billed,
                                                                  latency=end - start))
        return GenerationResult(
            images=images,
            provider=cand.provider,
            model=response.model,
            cost=cost,
            latency=Latency(
                total_s=end - start, routing_s=routed - start, provider_s=last.latency_s,
                queue_s=max(0.0, end - routed - last.latency_s),
            ),
            attempts=self.attempts,
            decision=decision,
            warnings=list(dict.fromkeys((*cand.warnings, *response.warnings))),
            request_id=self.request_id,
            provider_request_id=response.provider_request_id,
            quality=self.quality,
        )


async def _next_of(events: AsyncIterator[T]) -> T:
    return await anext(events)


class _Portal:
    """An event loop in a daemon thread, so sync code can call the async core safely
    (also from inside a running loop, e.g. a notebook)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="imagerouter-loop", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


_portal_lock = threading.Lock()
_the_portal: _Portal | None = None


def _portal() -> _Portal:
    global _the_portal
    with _portal_lock:
        if _the_portal is None:
            _the_portal = _Portal()
        return _the_portal


class Router:
    """The synchronous router: the same API as :class:`AsyncRouter`, blocking.

    It runs the async core on a private event loop thread, so it works in scripts,
    web servers and notebooks alike.
    """

    def __init__(self, providers: Sequence[Provider] | None = None, **kw: Any) -> None:
        if providers is None:
            self._async = AsyncRouter.from_env(**kw)
        else:
            self._async = AsyncRouter(providers, **kw)

    @classmethod
    def from_env(cls, **kw: Any) -> Router:
        return cls(None, **kw)

    @property
    def async_router(self) -> AsyncRouter:
        return self._async

    @property
    def ledger(self) -> LedgerBackend:
        return self._async.ledger

    @property
    def providers(self) -> dict[str, Provider]:
        return self._async.providers

    def route(self, request: ImageRequest | str, **kw: Any) -> RoutingDecision:
        return self._async.route(request, **kw)

    def generate(self, request: ImageRequest | str, **kw: Any) -> GenerationResult:
        return _portal().call(self._async.agenerate(request, **kw))

    def stream(self, request: ImageRequest | str, **kw: Any) -> Iterator[Any]:
        """:meth:`AsyncRouter.astream` for sync code: the progress events, then ``Completed(result)``."""
        portal = _portal()
        events = self._async.astream(request, **kw)
        try:
            while True:
                try:
                    event = portal.call(_next_of(events))
                except StopAsyncIteration:
                    return
                yield event
        finally:
            portal.call(events.aclose())

    def close(self) -> None:
        _portal().call(self._async.aclose())

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: Router | None = None
_default_lock = threading.Lock()


def default_router() -> Router:
    """The router that module-level :func:`generate` uses, configured from the environment."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Router.from_env()
        return _default


def generate(request: ImageRequest | str, **kw: Any) -> GenerationResult:
    """Generate with the default router: ``generate("a cat", width=512, height=512)``."""
    return default_router().generate(request, **kw)


_async_defaults: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncRouter] = weakref.WeakKeyDictionary()


async def agenerate(request: ImageRequest | str, **kw: Any) -> GenerationResult:
    """Async :func:`generate` with a default router for the running event loop."""
    loop = asyncio.get_running_loop()
    router = _async_defaults.get(loop)
    if router is None:
        router = _async_defaults[loop] = AsyncRouter.from_env()
    return await router.agenerate(request, **kw)
