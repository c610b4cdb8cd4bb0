"""Replicate: paid work is never paid twice, every bill reaches the ledger, and predictions end when
Replicate says they ended. Router, provider and sandbox over real loopback HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from providers.replicate import ReplicateProvider
from providers.sandbox import Fault
from providers.sandbox.replicate import SENSITIVE_ERROR, ReplicateSandbox
from router import ContentPolicyError, ImageRequest, InvalidRequestError
from router.errors import AllProvidersFailed, ImageRouterError, MalformedResponse, ProviderTimeout, ProviderUnavailable
from router.fetch import SafeFetcher
from router.ledger import Ledger
from tests.conftest import make_router

TOKEN = "r8_sandbox_token_billing"
SCHNELL = "/v1/models/black-forest-labs/flux-schnell/predictions"
PINNED = "/v1/predictions"


@pytest.fixture
def rep() -> Iterator[ReplicateSandbox]:
    with ReplicateSandbox(api_token=TOKEN) as sb:
        yield sb


@pytest.fixture
def rep2() -> Iterator[ReplicateSandbox]:
    with ReplicateSandbox(api_token=TOKEN) as sb:
        yield sb


def provider(sb: ReplicateSandbox, **kw: Any) -> ReplicateProvider:
    return ReplicateProvider(api_token=TOKEN, base_url=sb.base_url, fetcher=SafeFetcher(allow_loopback=True),
                             poll_interval_s=0.01, download_backoff_s=0.01, **kw)



async def direct(sb: ReplicateSandbox, model: str = "flux-schnell", timeout_s: float = 5.0, **kw: Any) -> Any:
    p = provider(sb)
    try:
        return await p.generate(ImageRequest(prompt=kw.pop("prompt", "a cat"), **kw), model, timeout_s=timeout_s)
    finally:
        await p.aclose()


def gets(sb: ReplicateSandbox, path: str) -> int:
    return sum(1 for r in sb.requests if r.method == "GET" and r.path == path)


# --- a succeeded prediction's outputs are downloaded again, never generated again -------------------


async def test_an_output_that_fails_twice_is_downloaded_again_not_regenerated(rep: ReplicateSandbox) -> None:
    rep.next_ids = ["q1"]
    out = rep.output_path("q1", 0, "png")
    rep.faults.push(Fault("output_unavailable", status=503), times=2, path=out)
    ledger = Ledger(":memory:")
    async with make_router(provider(rep), ledger=ledger) as router:
        result = await router.agenerate("a cat", model="flux-schnell", output_format="png")
    assert rep.hits(SCHNELL) == 1  # one prediction: the one that was paid for
    assert gets(rep, out) == 3 and gets(rep, "/v1/predictions/q1") == 2  # re-read between tries
    assert len(result.images) == 1 and result.provider_request_id == "q1"
    assert [a.error for a in result.attempts] == [None]
    assert result.cost.actual_usd == rep.billed_usd == ledger.spent() == Decimal("0.003")


async def test_an_output_that_never_downloads_is_charged_and_the_next_candidate_runs(
        rep: ReplicateSandbox, rep2: ReplicateSandbox) -> None:
    rep.next_ids = ["q1"]
    out = rep.output_path("q1", 0, "png")
    rep.faults.push(Fault("output_unavailable", status=503), times=None, path=out)
    ledger = Ledger(":memory:")
    async with make_router(provider(rep), provider(rep2, name="replicate-b"), ledger=ledger) as router:
        result = await router.agenerate("a cat", model="flux-schnell", output_format="png")
    assert rep.hits(SCHNELL) == 1 and gets(rep, out) == 4  # the same candidate is never run again
    assert rep.billed_usd == rep2.billed_usd == Decimal("0.003")
    assert [(a.provider, a.error, a.cost_usd) for a in result.attempts] == [
        ("replicate", "ProviderUnavailable", rep.billed_usd), ("replicate-b", None, rep2.billed_usd)]
    assert result.provider == "replicate-b"
    assert result.cost.actual_usd == ledger.spent() == rep.billed_usd + rep2.billed_usd


async def test_when_every_candidate_loses_its_output_the_error_carries_the_bill(rep: ReplicateSandbox) -> None:
    rep.next_ids = ["q1"]
    rep.faults.push(Fault("output_unavailable", status=404), times=None, path=rep.output_path("q1", 0, "png"))
    ledger = Ledger(":memory:")
    async with make_router(provider(rep), ledger=ledger) as router:
        with pytest.raises(AllProvidersFailed) as info:
            await router.agenerate("a cat", model="flux-schnell", output_format="png")
    assert rep.hits(SCHNELL) == 1
    assert info.value.cost_usd == ledger.spent() == rep.billed_usd == Decimal("0.003")
    assert [(a.error, a.cost_usd) for a in info.value.attempts] == [("ProviderUnavailable", Decimal("0.003"))]


async def test_removed_output_files_stop_the_downloads_at_once(rep: ReplicateSandbox) -> None:
    rep.next_ids = ["q1"]
    rep.faults.push(Fault("expired_output"))
    with pytest.raises(ProviderUnavailable, match="removed") as info:
        await direct(rep, output_format="png")
    assert gets(rep, rep.output_path("q1", 0, "png")) == 1  # the re-read said the files are gone
    assert info.value.billed is not None and info.value.billed.cost_usd == rep.billed_usd == Decimal("0.003")


async def test_an_undecodable_output_is_malformed_and_charged(rep: ReplicateSandbox) -> None:
    rep.next_ids = ["q1"]
    out = rep.output_path("q1", 0, "png")
    rep.faults.push(Fault("corrupt_output"), times=None, path=out)
    with pytest.raises(MalformedResponse) as info:
        await direct(rep, output_format="png")
    assert gets(rep, out) == 1
    assert info.value.billed is not None and info.value.billed.cost_usd == rep.billed_usd == Decimal("0.003")


async def test_outputs_that_downloaded_are_returned_with_the_whole_bill(rep: ReplicateSandbox) -> None:
    rep.next_ids = ["q1"]
    rep.faults.push(Fault("output_unavailable"), times=None, path=rep.output_path("q1", 1, "png"))
    result = await direct(rep, n=2, output_format="png")
    assert len(result.images) == 1 and rep.hits(SCHNELL) == 1
    assert any("1 of 2 outputs of prediction q1" in w for w in result.warnings)
    assert result.billing.cost_usd == rep.billed_usd == Decimal("0.006")


# --- what failed, cancelled and aborted predictions cost ------------------------------------------


async def test_a_failed_pinned_version_is_charged_its_predict_time(rep: ReplicateSandbox) -> None:
    rep.predict_time = 3.0
    rep.faults.push(Fault("model_error"))
    ledger = Ledger(":memory:")
    async with make_router(provider(rep), ledger=ledger) as router:
        with pytest.raises(AllProvidersFailed) as info:
            await router.agenerate("a fox", model="sdxl")
    assert rep.hits(PINNED) == 1  # billed: not run again on the same candidate
    assert rep.billed_usd == Decimal("3.0") * Decimal("0.001525")
    assert info.value.cost_usd == ledger.spent() == rep.billed_usd
    assert [(a.error, a.cost_usd) for a in info.value.attempts] == [("ProviderUnavailable", rep.billed_usd)]


async def test_a_failed_official_model_bills_nothing_and_is_retried(rep: ReplicateSandbox) -> None:
    rep.faults.push(Fault("model_error"))
    ledger = Ledger(":memory:")
    async with make_router(provider(rep), ledger=ledger) as router:
        result = await router.agenerate("a cat", model="flux-schnell")
    assert rep.hits(SCHNELL) == 2 and [a.error for a in result.attempts] == ["ProviderUnavailable", None]
    assert result.attempts[0].cost_usd == 0 and ledger.spent() == rep.billed_usd == Decimal("0.003")


@pytest.mark.parametrize(("model", "outcome", "billed"), [
    ("sdxl", "canceled", Decimal("1.25") * Decimal("0.001525")),
    ("sdxl", "aborted", Decimal(0)),
    ("flux-schnell", "canceled", Decimal(0)),
])
async def test_canceled_and_aborted_predictions_end_and_carry_what_they_cost(
        rep: ReplicateSandbox, model: str, outcome: str, billed: Decimal) -> None:
    rep.faults.push(Fault(outcome))
    with pytest.raises(ProviderUnavailable, match=outcome) as info:
        await direct(rep, model=model)
    assert rep.billed_usd == billed
    assert (info.value.billed.cost_usd if info.value.billed else Decimal(0)) == billed


async def test_an_aborted_prediction_is_final_not_polled_until_the_deadline(rep: ReplicateSandbox) -> None:
    rep.wait_completes, rep.next_ids = False, ["q1"]
    rep.faults.push(Fault("aborted"))
    with pytest.raises(ProviderUnavailable, match="aborted"):
        await direct(rep, timeout_s=30.0)
    assert gets(rep, "/v1/predictions/q1") == rep.pending_polls + 1
    assert rep.hits("/v1/predictions/q1/cancel") == 0 and rep.prediction("q1").status == "aborted"


async def test_a_pinned_version_cancelled_at_the_deadline_is_charged_the_time_it_ran(rep: ReplicateSandbox) -> None:
    rep.wait_completes, rep.next_ids = False, ["q1"]
    rep.faults.push(Fault("slow"))
    with pytest.raises(ProviderTimeout) as info:
        await direct(rep, model="sdxl", timeout_s=2.0)
    assert rep.prediction("q1").started is not None  # it was polled into running before the deadline
    assert rep.prediction("q1").status == "canceled" and rep.billed_usd > 0
    assert info.value.billed is not None and info.value.billed.cost_usd == rep.billed_usd
    assert info.value.billed.quantity == Decimal(str(rep.prediction("q1").predict_time))


# --- content policy: Replicate's error codes first, then words ------------------------------------


@pytest.mark.parametrize(("message", "cls", "code"), [
    (SENSITIVE_ERROR, ContentPolicyError, "E005"),
    ("Prediction failed. (E005)", ContentPolicyError, "E005"),
    ("invalid input image (E005)", ContentPolicyError, "E005"),  # the code outranks the words
    ("CUDA out of memory (E1001)", InvalidRequestError, "E1001"),
    ("The output was blocked by moderation.", ContentPolicyError, None),
    ("NSFW content detected. Try running it again, or try a different prompt.", ContentPolicyError, None),
])
async def test_failed_predictions_map_by_code_then_by_words(rep: ReplicateSandbox, message: str,
                                                            cls: type[ImageRouterError], code: str | None) -> None:
    rep.faults.push(Fault("model_error", message=message))
    with pytest.raises(cls) as info:
        await direct(rep)
    assert type(info.value) is cls and info.value.code == code


async def test_a_refused_pinned_version_is_fatal_and_charged(rep: ReplicateSandbox,
                                                            rep2: ReplicateSandbox) -> None:
    rep.faults.push(Fault.moderation(SENSITIVE_ERROR))
    ledger = Ledger(":memory:")
    async with make_router(provider(rep), provider(rep2, name="replicate-b"), ledger=ledger) as router:
        with pytest.raises(ContentPolicyError) as info:
            await router.agenerate("a fox", model="sdxl")
    assert info.value.code == "E005" and rep2.hits() == 0
    assert info.value.cost_usd == ledger.spent() == rep.billed_usd == Decimal("1.25") * Decimal("0.001525")


# --- the sandbox's bill against the adapter's -------------------------------------------------------


async def test_a_pinned_version_costs_what_the_sandbox_billed(rep: ReplicateSandbox) -> None:
    rep.predict_time = 4.5
    result = await direct(rep, model="sdxl", n=2)
    assert result.billing.cost_usd == rep.billed_usd == Decimal("4.5") * Decimal("0.001525")
    assert result.billing.quantity == Decimal("4.5")


async def test_a_price_change_shows_in_the_bill_not_in_the_metrics(rep: ReplicateSandbox) -> None:
    # Replicate's predictions carry no price: when the vendor's rate doubles, predict_time does not,
    # so the adapter's cost (price table × predict_time) is half the bill until the table is updated.
    rep.predict_time, rep.bill_multiplier = 2.0, Decimal(2)
    result = await direct(rep, model="sdxl")
    assert result.billing.quantity == Decimal("2.0")
    assert rep.billed_usd == 2 * result.billing.cost_usd == 2 * Decimal("2.0") * Decimal("0.001525")
