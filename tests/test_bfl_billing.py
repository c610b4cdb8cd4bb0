"""BFL billing over real loopback HTTP: a Ready task is paid for once, whatever happens to its sample.

The sandboxes bill like BFL (a task is billed when it is Ready, never when it ends Error or
moderated) and record it in ``billed_usd``; the router's ledger must end equal to what they billed.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest

from providers.bfl import BFLProvider
from providers.sandbox import Fault
from providers.sandbox.bfl import SAMPLE_PATH, BFLSandbox
from router import AllProvidersFailed, AsyncRouter, ContentPolicyError, ImageRequest
from router.fetch import SafeFetcher
from router.ledger import Ledger
from tests.conftest import Sleeps, png

KEY = "bfl-sandbox-billing-key"
TXT = "/v1/flux-pro-1.1"


@pytest.fixture
def bfl() -> Iterator[BFLSandbox]:
    with BFLSandbox(api_key=KEY) as sb:
        yield sb


@pytest.fixture
def bfl2() -> Iterator[BFLSandbox]:
    with BFLSandbox(api_key=KEY) as sb:
        yield sb


def provider(sb: BFLSandbox, name: str = "bfl", model: str = "flux-pro-1.1") -> BFLProvider:
    return BFLProvider(name=name, api_key=KEY, base_url=sb.base_url, models=(model,), poll_interval_s=0.01,
                       download_backoff_s=0.01, fetcher=SafeFetcher(allow_loopback=True))


def make_router(*providers: BFLProvider, ledger: Ledger | None = None, **kw: object) -> AsyncRouter:
    return AsyncRouter(list(providers), ledger=ledger or Ledger(":memory:"), sleep=Sleeps(),
                       **kw)  # type: ignore[arg-type]


def downloads(sb: BFLSandbox) -> list[int | None]:
    return [r.status for r in sb.requests if r.path == SAMPLE_PATH]


# --- never pay twice ------------------------------------------------------------------------


async def test_a_sample_that_fails_twice_is_downloaded_again_not_regenerated(bfl: BFLSandbox,
                                                                             bfl2: BFLSandbox) -> None:
    bfl.fail_downloads(2)
    ledger = Ledger(":memory:")
    async with make_router(provider(bfl), provider(bfl2, "bfl-backup"), ledger=ledger) as router:
        result = await router.agenerate("a lighthouse", seed=3)
    assert result.provider == "bfl" and len(result.images) == 1 and result.images[0].seed == 3
    assert downloads(bfl) == [503, 503, 200]
    assert bfl.submitted() == 1 and bfl2.hits() == 0  # one task, paid once
    assert bfl.hits("/v1/get_result") == 2 + 2  # Pending, Ready, then a fresh sample URL before each new try
    assert [(a.outcome, a.cost_usd) for a in result.attempts] == [("success", Decimal("0.04"))]
    assert result.cost.actual_usd == bfl.billed_usd == ledger.spent() == Decimal("0.04")


async def test_a_sample_that_never_downloads_is_charged_and_falls_back(bfl2: BFLSandbox) -> None:
    ledger = Ledger(":memory:")
    # the first account bills twice the public rate: the ledger must follow what BFL billed, not the table
    with BFLSandbox(api_key=KEY, bill_multiplier=2) as bfl:
        bfl.fail_downloads(None)
        async with make_router(provider(bfl), provider(bfl2, "bfl-backup"), ledger=ledger) as router:
            result = await router.agenerate("a lighthouse")
        assert downloads(bfl) == [503, 503, 503, 503]
        assert bfl.submitted() == 1 and bfl2.submitted() == 1  # the paid task was never re-run
        first, second = result.attempts
        assert (first.provider, first.error, first.cost_usd) == ("bfl", "ProviderUnavailable", Decimal("0.08"))
        assert "paid for and was not generated again" in (first.message or "")
        assert (second.provider, second.outcome, second.cost_usd) == ("bfl-backup", "success", Decimal("0.04"))
        assert result.provider == "bfl-backup"
        assert result.cost.actual_usd == ledger.spent() == bfl.billed_usd + bfl2.billed_usd == Decimal("0.12")


async def test_an_undecodable_sample_is_charged_as_malformed_and_falls_back(bfl: BFLSandbox,
                                                                            bfl2: BFLSandbox) -> None:
    bfl.faults.push(Fault.malformed(b"<html>not an image</html>"), path=SAMPLE_PATH)
    ledger = Ledger(":memory:")
    async with make_router(provider(bfl), provider(bfl2, "bfl-backup"), ledger=ledger) as router:
        result = await router.agenerate("a lighthouse")
    assert [(a.provider, a.error, a.cost_usd) for a in result.attempts] == [
        ("bfl", "MalformedResponse", Decimal("0.04")), ("bfl-backup", None, Decimal("0.04"))]
    assert bfl.submitted() == 1 and downloads(bfl) == [200]
    assert ledger.spent() == bfl.billed_usd + bfl2.billed_usd == result.cost.actual_usd == Decimal("0.08")


async def test_running_out_of_time_after_ready_still_charges_the_task(bfl: BFLSandbox, bfl2: BFLSandbox) -> None:
    bfl.faults.push(Fault.timeout(seconds=5.0), path=SAMPLE_PATH)
    ledger = Ledger(":memory:")
    async with make_router(provider(bfl), provider(bfl2, "bfl-backup"), ledger=ledger,
                           attempt_timeout_s=0.6) as router:
        result = await router.agenerate("a lighthouse")
    assert [(a.provider, a.error, a.cost_usd) for a in result.attempts] == [
        ("bfl", "ProviderTimeout", Decimal("0.04")), ("bfl-backup", None, Decimal("0.04"))]
    assert bfl.submitted() == 1 and ledger.spent() == bfl.billed_usd + bfl2.billed_usd


async def test_a_partial_fan_out_returns_what_arrived_and_bills_every_ready_task(bfl: BFLSandbox) -> None:
    bfl.faults.push(Fault.malformed(b"garbage"), path=SAMPLE_PATH)  # one of the two samples is unreadable
    ledger = Ledger(":memory:")
    async with make_router(provider(bfl), ledger=ledger) as router:
        result = await router.agenerate("a lighthouse", n=2, seed=10)
    assert len(result.images) == 1 and bfl.submitted() == 2
    assert any("1 of 2 images returned" in w and "MalformedResponse" in w for w in result.warnings)
    assert result.cost.actual_usd == bfl.billed_usd == ledger.spent() == Decimal("0.08")
    assert result.cost.quantity == 8


@pytest.mark.parametrize("status", ["Content Moderated", "Request Moderated"])
async def test_moderated_tasks_are_not_billed(bfl: BFLSandbox, status: str) -> None:
    bfl.faults.push(Fault.moderation(status))
    ledger = Ledger(":memory:")
    async with make_router(provider(bfl), ledger=ledger) as router:
        with pytest.raises(ContentPolicyError) as info:
            await router.agenerate("something refused")
    # help.bfl.ai: "You are not charged for requests that return a moderated status"
    assert info.value.code == status and info.value.cost_usd == 0
    assert bfl.billed_usd == 0 and ledger.spent() == 0 and bfl.submitted() == 1


async def test_a_failed_task_is_not_billed_and_is_retried(bfl: BFLSandbox) -> None:
    bfl.faults.push(Fault("task_error"))
    ledger = Ledger(":memory:")
    async with make_router(provider(bfl), ledger=ledger) as router:
        result = await router.agenerate("a cat")
    assert [(a.error, a.cost_usd) for a in result.attempts] == [("ProviderUnavailable", 0), (None, Decimal("0.04"))]
    assert bfl.submitted() == 2 and bfl.billed_usd == ledger.spent() == Decimal("0.04")


# --- what BFL bills -------------------------------------------------------------------------


async def test_the_bill_is_what_bfl_reports_even_above_the_price_table() -> None:
    ledger = Ledger(":memory:")
    with BFLSandbox(api_key=KEY, bill_multiplier=2) as sb:
        async with make_router(provider(sb), ledger=ledger) as router:
            result = await router.agenerate("a cat")
        assert result.cost.estimated_usd == Decimal("0.04")  # the table: 4 credits
        assert result.cost.actual_usd == sb.billed_usd == ledger.spent() == Decimal("0.08")
        assert result.cost.quantity == 8 and result.cost.details["billed_by"] == "vendor"
        assert any("BFL billed 8 credits" in w and "expects 4" in w for w in result.warnings)


@pytest.mark.parametrize(("width", "height", "credits"), [
    (1024, 1024, Decimal(3)),  # 1 MP: the first megapixel
    (2048, 1024, Decimal("4.5")),  # 2 MP: + 1.5
    (2048, 2048, Decimal("7.5")),  # 4 MP: + 3 x 1.5
])
async def test_flux_2_pro_is_billed_per_megapixel_of_output(bfl: BFLSandbox, width: int, height: int,
                                                            credits: Decimal) -> None:
    p = provider(bfl, model="flux-2-pro")
    estimate = p.estimate(ImageRequest.from_kwargs("a cat", width=width, height=height), "flux-2-pro")
    ledger = Ledger(":memory:")
    async with make_router(p, ledger=ledger) as router:
        result = await router.agenerate("a cat", width=width, height=height)
    assert (result.images[0].width, result.images[0].height) == (width, height)
    assert estimate.quantity == result.cost.quantity == credits
    assert estimate.cost_usd == result.cost.actual_usd == credits / 100 == bfl.billed_usd == ledger.spent()
    assert result.cost.details["output_mp"] == round(width * height / 2**20, 2)


async def test_a_flux_2_pro_edit_also_pays_for_its_input_megapixels(bfl: BFLSandbox) -> None:
    ledger = Ledger(":memory:")
    async with make_router(provider(bfl, model="flux-2-pro"), ledger=ledger) as router:
        result = await router.agenerate("make it blue", init_image=png(1024, 1024, (10, 10, 200)))
    sent = bfl.requests[0].json or {}
    assert "input_image" in sent and (sent["width"], sent["height"]) == (1024, 1024)
    # 1 MP out (3 credits) + 1 MP in (1.5): BFL's "1MP I2I $0.045"
    assert result.cost.quantity == Decimal("4.5") and result.cost.details["input_mp"] == 1.0
    assert result.cost.actual_usd == result.cost.estimated_usd == bfl.billed_usd == ledger.spent()


async def test_an_input_image_of_unknown_size_is_reserved_at_its_worst_case(bfl: BFLSandbox) -> None:
    request = ImageRequest.from_kwargs("make it blue", init_image="https://example.com/photo.png",
                                       model="flux-2-pro", max_cost_usd=0.05)
    estimate = provider(bfl, model="flux-2-pro").estimate(request, "flux-2-pro")
    # counted at 1 MP for the estimate, at the 4 MP BFL resizes inputs to for the worst case
    assert estimate.cost_usd == Decimal("0.045") and estimate.max_cost_usd == Decimal("0.09")
    async with make_router(provider(bfl, model="flux-2-pro")) as router:
        decision = router.route(request)
    assert not decision.chain and [r.code for r in decision.rejections] == ["cost-cap"]
    assert "$0.09" in decision.rejections[0].reason and bfl.hits() == 0


async def test_a_fan_out_whose_samples_all_fail_is_charged_for_every_task(bfl: BFLSandbox) -> None:
    bfl.fail_downloads(None)
    ledger = Ledger(":memory:")
    async with make_router(provider(bfl), ledger=ledger) as router:
        with pytest.raises(AllProvidersFailed) as info:
            await router.agenerate("a cat", n=3)
    assert bfl.submitted() == 3 and len(downloads(bfl)) == 12
    assert [(a.error, a.cost_usd) for a in info.value.attempts] == [("ProviderUnavailable", Decimal("0.12"))]
    assert info.value.cost_usd == bfl.billed_usd == ledger.spent() == Decimal("0.12")
