"""What Stability bills: a fan-out that partly fails, calls that fail after a 200, and what the sandbox billed.

Stability's answers carry no billing (PROVIDERS.md: ``finish-reason`` and ``seed`` headers, or
``{image, finish_reason, seed}``): the adapter bills the price table's credits per image. The
sandbox keeps the account's side (``billed_usd``), so the ledger can be held against it.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from providers.sandbox import Fault, StabilitySandbox
from router import AllProvidersFailed, ImageRequest, InvalidRequestError, MalformedResponse
from router.ledger import Ledger
from tests.conftest import half_mask, png
from tests.test_stability import make_router, provider

CORE = Decimal("0.03")  # stable-image-core: 3 credits at $0.01 (PROVIDERS.md)


async def test_a_fan_out_with_one_failed_call_returns_the_other_images_billed_for_them(sb: StabilitySandbox) -> None:
    sb.faults.push(Fault.server_error(503))  # one of the four calls
    ledger = Ledger(":memory:")
    async with make_router(provider(sb), ledger=ledger) as router:
        result = await router.agenerate("a red fox", n=4, seed=10)
    assert len(result.images) == 3 and sb.hits() == 4
    assert [a.outcome for a in result.attempts] == ["success"]  # one attempt: the router saw no failure
    assert any("3 of 4 images returned: 1 call(s) failed (ProviderUnavailable)" in w for w in result.warnings)
    assert result.cost.actual_usd == 3 * CORE == sb.billed_usd == ledger.spent()
    assert result.cost.quantity == Decimal(9)
    sent = sorted(int(r.form["seed"]) for r in sb.requests if r.status == 200)
    assert sorted(i.seed or 0 for i in result.images) == sent  # each image keeps the seed it was made with


async def test_a_fan_out_where_every_call_fails_carries_the_bill_of_those_stability_billed(
    sb: StabilitySandbox, sb2: StabilitySandbox
) -> None:
    sb.faults.push(Fault.malformed(), times=2)  # 200 answers whose images do not decode: billed
    sb.faults.push(Fault.server_error(503), times=2)  # not billed
    ledger = Ledger(":memory:")
    async with make_router(provider(sb), provider(sb2, name="stability-backup"), ledger=ledger) as router:
        result = await router.agenerate("a red fox", n=4)
    first, second = result.attempts
    assert first.provider == "stability" and first.error in ("MalformedResponse", "ProviderUnavailable")
    assert first.cost_usd == 2 * CORE == sb.billed_usd
    assert sb.hits() == 4  # not retried: the failed attempt was paid for
    assert (second.provider, second.outcome, second.cost_usd) == ("stability-backup", "success", 4 * CORE)
    assert len(result.images) == 4 and result.cost.actual_usd == 6 * CORE
    assert ledger.spent() == sb.billed_usd + sb2.billed_usd == 6 * CORE


async def test_the_error_of_an_all_failed_fan_out_holds_the_combined_bill(sb: StabilitySandbox) -> None:
    sb.faults.push(Fault.malformed(), times=3)
    sb.faults.push(Fault("invalid_request", status=422))
    prov = provider(sb, "sd3.5-large")
    try:
        with pytest.raises((MalformedResponse, InvalidRequestError)) as info:  # the first call's error
            await prov.generate(ImageRequest(prompt="a red fox", n=4), "sd3.5-large", timeout_s=10)
    finally:
        await prov.aclose()
    billed = info.value.billed
    assert billed is not None and billed.unit == "credits"
    assert billed.quantity == 3 * Decimal("6.5") and billed.cost_usd == Decimal("0.195") == sb.billed_usd


async def test_a_lone_candidate_that_fails_after_a_200_reports_its_cost(sb: StabilitySandbox) -> None:
    sb.faults.push(Fault.malformed())
    ledger = Ledger(":memory:")
    async with make_router(provider(sb, "stable-image-ultra"), ledger=ledger) as router:
        with pytest.raises(AllProvidersFailed) as info:
            await router.agenerate("a cat")
    assert info.value.cost_usd == Decimal("0.08") == sb.billed_usd == ledger.spent()
    assert [(a.error, a.cost_usd) for a in info.value.attempts] == [("MalformedResponse", Decimal("0.08"))]


async def test_errors_before_any_image_cost_nothing(sb: StabilitySandbox, sb2: StabilitySandbox) -> None:
    sb.faults.push(Fault.server_error(500), times=None)
    ledger = Ledger(":memory:")
    async with make_router(provider(sb), provider(sb2, name="stability-backup"), ledger=ledger,
                           max_retries=1) as router:
        result = await router.agenerate("a cat", n=2)
    assert [a.cost_usd for a in result.attempts] == [0, 0, 2 * CORE]
    assert sb.billed_usd == 0 and ledger.spent() == sb2.billed_usd == 2 * CORE


# --- the ledger against what the account was billed ----------------------------------------------


async def test_the_ledger_matches_the_account_across_endpoints(sb: StabilitySandbox) -> None:
    ledger = Ledger(":memory:")
    models = ("stable-image-core", "sd3.5-flash", "stable-image-inpaint", "stable-image-upscale-creative")
    async with make_router(provider(sb, *models), ledger=ledger) as router:
        await router.agenerate("a cat", model="sd3.5-flash", n=2)
        await router.agenerate("a door", init_image=png(128, 128), mask_image=half_mask(128, 128))
        await router.agenerate(ImageRequest(prompt="a photo", init_image=png(256, 256), upscale=4))
    # flash 2.5 credits × 2; inpaint and creative upscale at the shipped table's (unverified) 5 and 60
    assert ledger.spent() == sb.billed_usd == Decimal("0.05") + Decimal("0.05") + Decimal("0.60")


async def test_a_vendor_billing_over_its_published_rate_is_not_seen_by_the_ledger(sb: StabilitySandbox) -> None:
    """A known limit: Stability's answers carry no billing, so the adapter bills the price table's rate.
    When the account is billed more (here 1.5 × the published credits), the ledger is short by the
    difference until the table is corrected (a policy's price override does that)."""
    from policies.policy import policy_from_dict

    sb.bill_multiplier = Decimal("1.5")
    ledger = Ledger(":memory:")
    async with make_router(provider(sb), ledger=ledger) as router:
        result = await router.agenerate("a cat", n=2)
    assert result.cost.actual_usd == ledger.spent() == 2 * CORE
    assert sb.billed_usd == Decimal("0.09") != ledger.spent()

    corrected = policy_from_dict({"extends": "balanced", "prices": {"stability/stable-image-core": {"credits": "4.5"}}})
    again = Ledger(":memory:")
    before = sb.billed_usd
    async with make_router(provider(sb), ledger=again, policy=corrected) as router:
        await router.agenerate("a cat", n=2)
    assert again.spent() == sb.billed_usd - before == Decimal("0.09")


# --- the sandbox's own account -----------------------------------------------------------------------


def test_the_sandbox_bills_image_answers_only(sb: StabilitySandbox) -> None:
    import httpx

    def post(route: str, **fields: str) -> httpx.Response:
        return httpx.post(f"{sb.base_url}/v2beta/stable-image/{route}",
                          files={k: (None, v) for k, v in fields.items()},
                          headers={"authorization": f"Bearer {sb.api_key}", "accept": "image/*"}, timeout=10)

    assert post("generate/sd3", prompt="x", model="sd3.5-large-turbo").status_code == 200
    assert sb.billed_usd == Decimal("0.04")
    assert post("generate/core", prompt="").status_code == 400  # refused: nothing billed
    sb.faults.push(Fault.rate_limit())
    assert post("generate/core", prompt="x").status_code == 429
    assert sb.billed_usd == Decimal("0.04")
    sb.faults.push(Fault("content_filtered"))
    assert post("generate/ultra", prompt="x").headers["finish-reason"] == "CONTENT_FILTERED"
    assert sb.billed_usd == Decimal("0.12")  # a filtered image is still an image answer


def test_a_creative_upscale_is_billed_once_however_often_its_result_is_read(sb: StabilitySandbox) -> None:
    import httpx

    sb.job_polls = 1
    auth = {"authorization": f"Bearer {sb.api_key}"}
    job = httpx.post(f"{sb.base_url}/v2beta/stable-image/upscale/creative", headers=auth, timeout=10,
                     files={"prompt": (None, "a photo"), "image": ("i.png", png(256, 256), "image/png")}).json()
    assert sb.billed_usd == 0
    statuses = [httpx.get(f"{sb.base_url}/v2beta/results/{job['id']}", headers=auth, timeout=10).status_code
                for _ in range(3)]
    assert statuses == [202, 200, 200] and sb.billed_usd == Decimal("0.60")
