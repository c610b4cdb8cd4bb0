"""xAI (Grok Imagine) end to end: the openai SDK over real loopback HTTP to the xAI sandbox."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest

from providers.sandbox import Fault
from providers.sandbox.xai import XAISandbox
from providers.xai import XAIProvider
from router import AllProvidersFailed, AuthenticationError, ContentPolicyError, InsufficientCredits, RateLimited
from router.ledger import Ledger
from router.request import ImageRequest
from tests.conftest import make_router, png

KEY = "xai-sandbox-key"
MODEL = "grok-imagine-image"


@pytest.fixture
def sb() -> Iterator[XAISandbox]:
    with XAISandbox(api_key=KEY) as server:
        yield server


def provider(sb: XAISandbox, key: str = KEY) -> XAIProvider:
    return XAIProvider(api_key=key, base_url=sb.base_url)


async def test_generation_sends_ratio_in_the_body_and_bills_the_vendors_ticks(sb: XAISandbox) -> None:
    ledger = Ledger(":memory:")
    async with make_router(provider(sb), ledger=ledger) as router:
        result = await router.agenerate("a lighthouse", model=MODEL, n=3, aspect_ratio="16:9",
                                        provider_options={"xai": {"resolution": "1k"}})
    sent = sb.requests[0]
    assert sent.path == "/v1/images/generations" and sent.headers["authorization"] == "[REDACTED]"
    assert sent.json == {"model": MODEL, "prompt": "a lighthouse", "n": 3, "response_format": "b64_json",
                         "aspect_ratio": "16:9", "resolution": "1k"}
    assert [(i.width, i.height, i.mime) for i in result.images] == [(1376, 768, "image/jpeg")] * 3
    assert result.cost.details["billed_by"] == "vendor" and result.cost.details["cost_in_usd_ticks"] == 600_000_000
    assert result.cost.actual_usd == Decimal("0.06") == sb.billed_usd == ledger.spent()
    assert any("returning jpeg" in w for w in result.warnings)


async def test_edit_posts_json_with_the_image_as_a_data_url(sb: XAISandbox) -> None:
    async with make_router(provider(sb)) as router:
        result = await router.agenerate("make it night", model=MODEL, init_image=png(300, 200), aspect_ratio="1:1")
    sent = sb.requests[0]
    assert sent.path == "/v1/images/edits" and sent.json is not None
    assert sent.json["image"]["url"].startswith("data:image/png;base64,") and "aspect_ratio" not in sent.json
    assert (result.images[0].width, result.images[0].height) == (1248, 832)  # the init image's 3:2
    assert any("keeps the init image's aspect ratio" in w for w in result.warnings)
    assert result.cost.actual_usd == Decimal("0.022") == sb.billed_usd  # one output and one input image


async def test_without_reported_cost_the_price_table_bills(sb: XAISandbox) -> None:
    sb.report_cost = False
    async with make_router(provider(sb)) as router:
        result = await router.agenerate("a cat", model="grok-imagine-image-pro", n=2)
    assert result.cost.details["billed_by"] == "price table" and result.cost.actual_usd == Decimal("0.14")


async def test_a_moderated_request_is_a_content_policy_error(sb: XAISandbox) -> None:
    p = provider(sb)
    sb.faults.push(Fault.moderation())
    with pytest.raises(ContentPolicyError):
        await p.generate(ImageRequest(prompt="refused"), MODEL, timeout_s=30)
    await p.aclose()


@pytest.mark.parametrize(("fault", "kind"), [
    (Fault.rate_limit(retry_after=3), RateLimited),
    (Fault.insufficient_credits(), InsufficientCredits),
])
async def test_vendor_errors_map_to_router_errors(sb: XAISandbox, fault: Fault, kind: type[Exception]) -> None:
    p = provider(sb)
    sb.faults.push(fault)
    with pytest.raises(kind) as info:
        await p.generate(ImageRequest(prompt="a cat"), MODEL, timeout_s=30)
    await p.aclose()
    assert sb.hits() == 1  # max_retries=0: the SDK does not retry
    if isinstance(info.value, RateLimited):
        assert info.value.retry_after == 3


async def test_a_refused_key_is_an_authentication_error_without_the_key(sb: XAISandbox) -> None:
    p = provider(sb, key="canary-xai-key-987")
    with pytest.raises(AuthenticationError) as info:
        await p.generate(ImageRequest(prompt="a cat"), MODEL, timeout_s=30)
    await p.aclose()
    assert "canary-xai-key-987" not in repr(info.value)


async def test_server_errors_are_retried_by_the_router(sb: XAISandbox) -> None:
    sb.faults.push(Fault.server_error(503))
    async with make_router(provider(sb)) as router:
        result = await router.agenerate("a cat", model=MODEL)
    assert len(result.attempts) == 2 and sb.hits() == 2


async def test_hostile_output_fails_and_the_bill_is_kept(sb: XAISandbox) -> None:
    sb.faults.push(Fault.hostile_image("huge_image"))
    ledger = Ledger(":memory:")
    async with make_router(provider(sb), ledger=ledger) as router:
        with pytest.raises(AllProvidersFailed):
            await router.agenerate("a cat", model=MODEL)
    assert ledger.spent() == Decimal("0.02") == sb.billed_usd


async def test_malformed_body_is_a_malformed_response(sb: XAISandbox) -> None:
    from router.errors import MalformedResponse

    p = provider(sb)
    sb.faults.push(Fault.malformed())
    with pytest.raises(MalformedResponse):
        await p.generate(ImageRequest(prompt="a cat"), MODEL, timeout_s=30)
    await p.aclose()


async def test_the_sandbox_refuses_multipart_edits_and_unsupported_size(sb: XAISandbox) -> None:
    import httpx

    async with httpx.AsyncClient(headers={"authorization": f"Bearer {KEY}"}) as client:
        multipart = await client.post(f"{sb.base_url}/images/edits", data={"prompt": "x"}, files={"image": b"x"})
        sized = await client.post(f"{sb.base_url}/images/generations", json={"prompt": "x", "size": "1024x1024"})
    assert multipart.status_code == 400 and sized.status_code == 400
    assert sized.json() == {"code": "Client specified an invalid argument", "error": "Argument not supported: size"}
