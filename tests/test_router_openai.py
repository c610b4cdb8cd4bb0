"""The router end to end through the official openai SDK, over real HTTP to the loopback sandbox."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from providers.openai import OpenAIProvider
from providers.sandbox import Fault, OpenAISandbox
from router import (
    AllProvidersFailed,
    AuthenticationError,
    BudgetExceeded,
    ContentPolicyError,
    ImageRequest,
    InsufficientCredits,
    NoRouteError,
)
from router.ledger import Budget, Ledger
from tests.conftest import Sleeps, half_mask, make_router, png


def provider(sb: OpenAISandbox, name: str = "openai", **kw: object) -> OpenAIProvider:
    return OpenAIProvider(name=name, api_key=sb.api_key, base_url=sb.base_url, **kw)  # type: ignore[arg-type]



async def test_generation_returns_normalized_images_and_settled_cost(sandbox: OpenAISandbox) -> None:
    async with make_router(provider(sandbox)) as router:
        result = await router.agenerate("a lighthouse at dusk, oil painting", width=1536, height=1024, n=2,
                                        seed=7, negative_prompt="blurry")
    assert result.provider == "openai" and result.model == "gpt-image-2"
    assert [(i.width, i.height, i.mime) for i in result.images] == [(1536, 1024, "image/png")] * 2
    assert result.images[0].to_pil().size == (1536, 1024)
    assert result.cost.unit == "tokens" and result.cost.actual_usd > 0
    assert [a.outcome for a in result.attempts] == ["success"]
    assert result.provider_request_id and result.provider_request_id.startswith("req_")
    assert any("negative_prompt ignored" in w for w in result.warnings)
    assert any("seed ignored" in w for w in result.warnings)
    sent = sandbox.requests[-1].json
    assert sent is not None and sent["size"] == "1536x1024" and sent["n"] == 2
    assert "negative_prompt" not in sent and "seed" not in sent


async def test_cost_is_settled_from_the_usage_tokens(sandbox: OpenAISandbox) -> None:
    sandbox.usage_override = {
        "input_tokens": 1050, "input_tokens_details": {"text_tokens": 50, "image_tokens": 1000},
        "output_tokens": 4000, "total_tokens": 5050,
    }
    ledger = Ledger(":memory:")
    async with make_router(provider(sandbox), ledger=ledger) as router:
        result = await router.agenerate("a cat", width=1024, height=1024)
    # gpt-image-2: $5 / 1M text-in, $8 / 1M image-in, $30 / 1M image-out
    expected = (50 * Decimal(5) + 1000 * Decimal(8) + 4000 * Decimal(30)) / Decimal(1_000_000)
    assert expected == Decimal("0.12825")
    assert result.cost.actual_usd == expected
    assert result.cost.quantity == 5050
    assert result.cost.details == {"text_input_tokens": 50, "image_input_tokens": 1000, "output_tokens": 4000}
    assert result.cost.estimated_usd != expected  # the estimate was a prior, the settlement is the bill
    assert ledger.spent() == expected


async def test_edit_with_a_white_repaint_mask_is_sent_as_alpha_zero(sandbox: OpenAISandbox) -> None:
    init = png(1024, 1024, (10, 200, 10))
    async with make_router(provider(sandbox)) as router:
        result = await router.agenerate("paint a red door", init_image=init, mask_image=half_mask(1024, 1024),
                                        width=1024, height=1024)
    req = sandbox.requests[-1]
    assert req.path == "/v1/images/edits" and "mask" in req.files and "image" in (req.files.keys() | {"image"})
    import io

    from PIL import Image

    mask = Image.open(io.BytesIO(req.files["mask"][0]))
    assert mask.mode == "RGBA"
    alpha = mask.getchannel("A")
    assert alpha.getpixel((10, 500)) == 0  # white (repaint) in our mask → alpha 0 for OpenAI
    assert alpha.getpixel((1000, 500)) == 255  # black (keep) → opaque
    out = result.images[0].to_pil().convert("RGB")
    assert out.getpixel((1000, 500)) == (10, 200, 10)  # the kept half is the init image
    assert out.getpixel((10, 500)) != (10, 200, 10)


async def test_429_is_retried_after_the_wait_the_provider_asked_for(sandbox: OpenAISandbox) -> None:
    sandbox.faults.push(Fault.rate_limit(retry_after=2.0))
    sleeps = Sleeps()
    async with make_router(provider(sandbox), sleep=sleeps) as router:
        result = await router.agenerate("a cat")
    assert sleeps.waits == [2.0]
    assert [(a.outcome, a.error, a.retry) for a in result.attempts] == [
        ("error", "RateLimited", 0), ("success", None, 1)]
    assert sandbox.hits("/v1/images/generations") == 2


async def test_5xx_retries_with_backoff_then_falls_back_to_the_next_provider(
    sandbox: OpenAISandbox, sandbox2: OpenAISandbox
) -> None:
    sandbox.faults.push(Fault.server_error(503), times=None)
    sleeps = Sleeps()
    router = make_router(provider(sandbox, "openai"), provider(sandbox2, "openai-backup"), sleep=sleeps,
                         max_retries=2, rng=lambda: 1.0)
    async with router:
        result = await router.agenerate("a cat")
    assert result.provider == "openai-backup"
    assert [(a.provider, a.error) for a in result.attempts] == [
        ("openai", "ProviderUnavailable"), ("openai", "ProviderUnavailable"), ("openai", "ProviderUnavailable"),
        ("openai-backup", None)]
    assert sleeps.waits == [0.5, 1.0]  # jittered exponential backoff, jitter pinned at its top
    assert sandbox.hits() == 3 and sandbox2.hits() == 1  # (retries + 1) upstream hits, exactly
    assert result.cost.actual_usd > 0 and all(a.cost_usd == 0 for a in result.attempts[:3])


@pytest.mark.parametrize(("fault", "status"), [
    (Fault.invalid_request(param="size"), 400),
    (Fault("invalid_request", status=404, code="model_not_found", message="The model does not exist."), 404),
    (Fault("invalid_request", status=422, message="Unprocessable request."), 422),
])
async def test_a_4xx_answer_falls_back_to_the_next_candidate(sandbox: OpenAISandbox, sandbox2: OpenAISandbox,
                                                             fault: Fault, status: int) -> None:
    sandbox.faults.push(fault)
    ledger = Ledger(":memory:")
    async with make_router(provider(sandbox), provider(sandbox2, "openai-backup"), ledger=ledger) as router:
        result = await router.agenerate("a cat")
    assert result.provider == "openai-backup"
    assert [(a.provider, a.error, a.status_code, a.cost_usd) for a in result.attempts] == [
        ("openai", "InvalidRequestError", status, 0), ("openai-backup", None, None, result.cost.actual_usd)]
    assert sandbox.hits() == 1 and sandbox2.hits() == 1  # not retried: the same call would fail the same way
    assert ledger.spent() == result.cost.actual_usd  # the refused call cost nothing


async def test_a_4xx_answer_on_the_last_candidate_is_the_error_raised(sandbox: OpenAISandbox) -> None:
    sandbox.faults.push(Fault.invalid_request(param="size"))
    async with make_router(provider(sandbox)) as router:
        with pytest.raises(AllProvidersFailed) as info:
            await router.agenerate("a cat")
    assert [(a.error, a.status_code) for a in info.value.attempts] == [("InvalidRequestError", 400)]
    assert "InvalidRequestError" in str(info.value) and sandbox.hits() == 1


@pytest.mark.parametrize("status", [408, 409])
async def test_408_and_409_are_retried_on_the_same_candidate(sandbox: OpenAISandbox, status: int) -> None:
    # RFC 9110 §15.5.9 / §15.5.10: a request timeout and a conflict are transient; the openai SDK retries
    # both itself (PROVIDERS.md), and the router does it in its place (the SDK runs with max_retries=0).
    sandbox.faults.push(Fault("invalid_request", status=status, message="try again"))
    async with make_router(provider(sandbox), rng=lambda: 1.0) as router:
        result = await router.agenerate("a cat")
    assert [(a.error, a.status_code, a.retry) for a in result.attempts] == [("RateLimited", status, 0),
                                                                           (None, None, 1)]
    assert sandbox.hits() == 2


async def test_moderation_refusal_is_a_content_policy_error(sandbox: OpenAISandbox, sandbox2: OpenAISandbox) -> None:
    sandbox.faults.push(Fault.moderation())
    async with make_router(provider(sandbox), provider(sandbox2, "openai-backup")) as router:
        with pytest.raises(ContentPolicyError) as info:
            await router.agenerate("something the moderator refuses")
    assert info.value.code == "moderation_blocked" and sandbox.hits() == 1 and sandbox2.hits() == 0


async def test_content_policy_falls_back_only_when_the_policy_allows(
    sandbox: OpenAISandbox, sandbox2: OpenAISandbox
) -> None:
    from policies import Policy

    sandbox.faults.push(Fault.moderation())
    policy = Policy(name="lenient", fallback_on_content_policy=True)
    async with make_router(provider(sandbox), provider(sandbox2, "openai-backup"), policy=policy) as router:
        result = await router.agenerate("x")
    assert result.provider == "openai-backup" and result.attempts[0].error == "ContentPolicyError"


async def test_auth_error_does_not_fall_back(sandbox: OpenAISandbox, sandbox2: OpenAISandbox) -> None:
    wrong = OpenAIProvider(api_key="sk-wrong-key-0123456789", base_url=sandbox.base_url)
    async with make_router(wrong, provider(sandbox2, "openai-backup")) as router:
        with pytest.raises(AuthenticationError) as info:
            await router.agenerate("a cat")
    assert "sk-wrong-key-0123456789" not in str(info.value) and sandbox2.hits() == 0


async def test_insufficient_quota_falls_back_at_once(sandbox: OpenAISandbox, sandbox2: OpenAISandbox) -> None:
    sandbox.faults.push(Fault.insufficient_quota())
    sleeps = Sleeps()
    async with make_router(provider(sandbox), provider(sandbox2, "openai-backup"), sleep=sleeps) as router:
        result = await router.agenerate("a cat")
    assert result.provider == "openai-backup" and sleeps.waits == []
    assert result.attempts[0].error == InsufficientCredits.__name__


async def test_malformed_body_falls_back(sandbox: OpenAISandbox, sandbox2: OpenAISandbox) -> None:
    sandbox.faults.push(Fault.malformed())
    async with make_router(provider(sandbox), provider(sandbox2, "openai-backup")) as router:
        result = await router.agenerate("a cat")
    assert result.attempts[0].error == "MalformedResponse" and result.provider == "openai-backup"
    assert result.attempts[0].cost_usd == 0  # a truncated body has no usage: no bill can be read from it


async def test_timeout_is_retried_within_the_deadline(sandbox: OpenAISandbox) -> None:
    sandbox.faults.push(Fault.timeout(seconds=3.0))
    async with make_router(provider(sandbox), attempt_timeout_s=0.5) as router:
        result = await router.agenerate("a cat")
    assert [a.error for a in result.attempts] == ["ProviderTimeout", None]


async def test_every_provider_failing_raises_all_providers_failed_with_the_trail(
    sandbox: OpenAISandbox, sandbox2: OpenAISandbox
) -> None:
    sandbox.faults.push(Fault.server_error(500), times=None)
    sandbox2.faults.push(Fault.server_error(502), times=None)
    async with make_router(provider(sandbox), provider(sandbox2, "openai-backup"), max_retries=1) as router:
        with pytest.raises(AllProvidersFailed) as info:
            await router.agenerate("a cat")
    assert [(a.provider, a.status_code) for a in info.value.attempts] == [
        ("openai", 500), ("openai", 500), ("openai-backup", 502), ("openai-backup", 502)]
    assert "openai-backup" in str(info.value)


async def test_circuit_opens_after_consecutive_failures_and_skips_the_provider(
    sandbox: OpenAISandbox, sandbox2: OpenAISandbox
) -> None:
    sandbox.faults.push(Fault.server_error(503), times=None)
    async with make_router(provider(sandbox), provider(sandbox2, "openai-backup"), max_retries=0) as router:
        for _ in range(5):
            result = await router.agenerate("a cat")
            assert result.provider == "openai-backup"
        decision = router.route("a cat")
    assert sandbox.hits() == 3  # the breaker opened after three failures; no calls while open
    assert ("openai", "circuit-open") in {(r.provider, r.code) for r in decision.rejections}


async def test_budget_is_never_exceeded_by_50_concurrent_requests(sandbox: OpenAISandbox) -> None:
    ledger = Ledger(":memory:")
    async with make_router(provider(sandbox), ledger=ledger) as router:
        one = router.route("a cat").chain[0].estimate.cost_usd
        limit = one * 10 + one / 2
        ledger.set_budget(Budget(limit, "day"))
        outcomes = await asyncio.gather(*(router.agenerate("a cat") for _ in range(50)), return_exceptions=True)
    ok = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(e, BudgetExceeded | NoRouteError) for e in refused), refused[:3]
    assert 1 <= len(ok) <= 10
    assert ledger.spent(period="day") <= limit
    assert ledger.spent(period="day") == sum(r.cost.actual_usd for r in ok)
    assert sandbox.hits() == len(ok)  # no request was sent that the budget could not cover


async def test_residency_routes_to_the_regional_host(sandbox: OpenAISandbox) -> None:
    with OpenAISandbox(api_key=sandbox.api_key) as eu_host:
        eu = provider(sandbox, region_base_urls={"eu": eu_host.base_url})
        async with make_router(eu) as router:
            result = await router.agenerate("a cat", residency={"eu"})
            assert result.provider == "openai" and eu_host.hits() == 1 and sandbox.hits() == 0
            await router.agenerate("a cat")
            assert sandbox.hits() == 1 and eu_host.hits() == 1


async def test_no_route_lists_every_rejection(sandbox: OpenAISandbox) -> None:
    async with make_router(provider(sandbox)) as router:
        with pytest.raises(NoRouteError) as info:
            await router.agenerate("a cat", residency={"jp"})
        with pytest.raises(NoRouteError) as info2:
            await router.agenerate(ImageRequest(prompt="x", controls=[{"kind": "canny", "image": png()}]))
    assert [r.code for r in info.value.rejections] == ["residency"]
    assert "does not do control" in str(info2.value)
    assert sandbox.hits() == 0


def test_sync_router_generates_from_plain_code(sandbox: OpenAISandbox, tmp_path) -> None:
    from router import Router

    with Router([provider(sandbox)], ledger=":memory:") as router:
        result = router.generate("a cat", width=1024, height=1024, output_format="webp")
    path = result.images[0].save(tmp_path / "cat", metadata=False)
    assert path.suffix == ".webp" and path.read_bytes() == result.images[0].data
    assert list(tmp_path.iterdir()) == [path]  # no partial files left behind


async def test_retry_after_longer_than_the_cap_falls_back_instead_of_waiting(
    sandbox: OpenAISandbox, sandbox2: OpenAISandbox
) -> None:
    sandbox.faults.push(Fault.rate_limit(retry_after=120.0))
    sleeps = Sleeps()
    router = make_router(provider(sandbox), provider(sandbox2, "openai-backup"), sleep=sleeps, max_retry_after_s=60)
    async with router:
        result = await router.agenerate("a cat")
    assert result.provider == "openai-backup" and sleeps.waits == []
    assert [a.error for a in result.attempts] == ["RateLimited", None]


async def test_the_deadline_bounds_the_whole_request(sandbox: OpenAISandbox) -> None:
    from router import DeadlineExceeded, ProviderTimeout

    sandbox.faults.push(Fault.timeout(seconds=3.0), times=None)
    async with make_router(provider(sandbox), sleep=asyncio.sleep) as router:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises((DeadlineExceeded, AllProvidersFailed)) as info:
            await router.agenerate("a cat", deadline_s=0.6)
        elapsed = loop.time() - start
    assert elapsed < 1.5
    assert info.value.attempts and info.value.attempts[0].error == ProviderTimeout.__name__


async def test_policy_file_prices_override_the_shipped_table(sandbox: OpenAISandbox) -> None:
    from policies.policy import policy_from_dict

    sandbox.usage_override = {
        "input_tokens": 10, "input_tokens_details": {"text_tokens": 10, "image_tokens": 0},
        "output_tokens": 1000, "total_tokens": 1010,
    }
    policy = policy_from_dict({"extends": "balanced", "prices": {"openai/gpt-image-2": {
        "image_output_per_mtok": "10.00"}}})
    async with make_router(provider(sandbox), policy=policy) as router:
        result = await router.agenerate("a cat")
    assert result.cost.actual_usd == (10 * Decimal(5) + 1000 * Decimal(10)) / Decimal(1_000_000)
    assert result.cost.price_table_version.endswith("+local")


async def test_provider_options_reach_the_api_and_misplaced_ones_are_warned(sandbox: OpenAISandbox) -> None:
    options = {"openai": {"quality": "low", "input_fidelity": "high", "style": "vivid"}}
    async with make_router(provider(sandbox)) as router:
        result = await router.agenerate("a cat", provider_options=options)
    sent = sandbox.requests[-1].json
    assert sent is not None and sent["quality"] == "low"
    assert "input_fidelity" not in sent and "style" not in sent
    assert any("input_fidelity does not apply to generations" in w for w in result.warnings)
    assert any("openai.style is not an option" in w for w in result.warnings)


def test_module_level_generate_uses_a_router_from_the_environment(
    sandbox: OpenAISandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    import router
    import router.router as core

    monkeypatch.setenv("OPENAI_API_KEY", sandbox.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", sandbox.base_url)
    monkeypatch.setenv("IMAGEROUTER_POLICY", "cheapest")
    monkeypatch.setattr(core, "_default", None)
    result = router.generate("a cat", width=1024, height=1024, max_cost_usd=1)
    assert result.provider == "openai" and result.decision.policy == "cheapest"
    assert sandbox.hits() == 1


async def test_module_level_agenerate(sandbox: OpenAISandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    import router

    monkeypatch.setenv("OPENAI_API_KEY", sandbox.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", sandbox.base_url)
    result = await router.agenerate(ImageRequest(prompt="a cat", n=2))
    assert len(result.images) == 2 and sandbox.hits() == 1


async def test_a_policy_given_per_call_sets_the_retries(sandbox: OpenAISandbox, sandbox2: OpenAISandbox) -> None:
    from policies.policy import Policy

    sandbox.faults.push(Fault.server_error(503), times=None)
    sleeps = Sleeps()
    router = make_router(provider(sandbox, "openai"), provider(sandbox2, "openai-backup"), sleep=sleeps,
                         rng=lambda: 1.0)
    async with router:
        result = await router.agenerate("a cat", policy=Policy(name="no-retries", max_retries=0))
        assert [a.provider for a in result.attempts] == ["openai", "openai-backup"] and not sleeps.waits
        again = await router.agenerate("a cat", policy=Policy(name="one-retry", max_retries=1))
    assert [a.provider for a in again.attempts] == ["openai", "openai", "openai-backup"]
    assert sleeps.waits == [0.5]
