"""OpenAI bills a 200 answer by its ``usage``, whatever its images hold; and the worst-case bound of a call.

Over real HTTP to the loopback sandbox, through the official SDK and the router.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from decimal import Decimal

import pytest

from providers.openai import OpenAIProvider
from providers.sandbox import Fault, OpenAISandbox
from router import BudgetExceeded, ImageRequest, NoRouteError
from router.ledger import Budget, Ledger
from tests.conftest import make_router, png

USAGE = {"input_tokens": 20, "input_tokens_details": {"text_tokens": 20, "image_tokens": 0},
         "output_tokens": 1056, "total_tokens": 1076}
# gpt-image-2 (PROVIDERS.md): $5 / 1M text-in, $30 / 1M image-out
USAGE_USD = (20 * Decimal(5) + 1056 * Decimal(30)) / Decimal(1_000_000)


def provider(sb: OpenAISandbox, name: str = "openai") -> OpenAIProvider:
    return OpenAIProvider(name=name, api_key=sb.api_key, base_url=sb.base_url)



def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 100_000) -> bytes:
    """A well-formed PNG whose header claims side × side pixels (10 gigapixels): a decompression bomb."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def answer(*b64: str, usage: dict[str, object] | None = USAGE) -> bytes:
    """A 200 body in the API's shape, with the given ``b64_json`` items and ``usage``."""
    body: dict[str, object] = {"created": 1, "data": [{"b64_json": b} for b in b64], "output_format": "png",
                               "size": "1024x1024", "quality": "medium"}
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


UNREADABLE = {
    "bad-base64": "iVBO@@@not base64@@@",
    "not-an-image": b64(b"GIF89a this is no png, jpeg or webp"),
    "truncated-png": b64(png(64, 64)[:60]),
    "bomb-header": b64(bomb_png()),
}


@pytest.mark.parametrize("image", list(UNREADABLE.values()), ids=list(UNREADABLE))
async def test_an_unreadable_image_in_a_200_is_charged_and_the_router_falls_back(
    sandbox: OpenAISandbox, sandbox2: OpenAISandbox, image: str
) -> None:
    sandbox.faults.push(Fault.malformed(answer(image)))
    ledger = Ledger(":memory:")
    async with make_router(provider(sandbox), provider(sandbox2, "openai-backup"), ledger=ledger) as router:
        result = await router.agenerate("a cat", width=1024, height=1024)
    assert result.provider == "openai-backup" and len(result.images) == 1
    first, second = result.attempts
    assert (first.provider, first.outcome, first.error, first.cost_usd) == (
        "openai", "error", "MalformedResponse", USAGE_USD)
    assert (second.provider, second.outcome) == ("openai-backup", "success") and second.cost_usd > 0
    assert result.cost.actual_usd == first.cost_usd + second.cost_usd
    assert ledger.spent() == first.cost_usd + second.cost_usd
    assert sandbox.hits() == 1  # a billed failure is never run again on the same backend


async def test_the_readable_images_of_a_partly_broken_answer_are_kept_and_the_whole_answer_billed(
    sandbox: OpenAISandbox, sandbox2: OpenAISandbox
) -> None:
    good = png(1024, 1024, (1, 2, 3))
    sandbox.faults.push(Fault.malformed(answer(UNREADABLE["bomb-header"], b64(good))))
    async with make_router(provider(sandbox), provider(sandbox2, "openai-backup")) as router:
        result = await router.agenerate("a cat", width=1024, height=1024, n=2)
    assert result.provider == "openai" and [i.data for i in result.images] == [good]
    assert result.cost.actual_usd == USAGE_USD and [a.outcome for a in result.attempts] == ["success"]
    assert any("1 of 2 images returned" in w for w in result.warnings)
    assert sandbox2.hits() == 0


async def test_without_usage_nothing_can_be_charged(sandbox: OpenAISandbox, sandbox2: OpenAISandbox) -> None:
    sandbox.faults.push(Fault.malformed(answer(UNREADABLE["bad-base64"], usage=None)))
    ledger = Ledger(":memory:")
    async with make_router(provider(sandbox), provider(sandbox2, "openai-backup"), ledger=ledger) as router:
        result = await router.agenerate("a cat")
    assert result.attempts[0].error == "MalformedResponse" and result.attempts[0].cost_usd == 0
    assert ledger.spent() == result.attempts[1].cost_usd == result.cost.actual_usd


async def test_a_billed_failure_with_nowhere_to_fall_back_reports_its_cost(sandbox: OpenAISandbox) -> None:
    from router import AllProvidersFailed

    sandbox.faults.push(Fault.malformed(answer(UNREADABLE["not-an-image"])))
    ledger = Ledger(":memory:")
    async with make_router(provider(sandbox), ledger=ledger) as router:
        with pytest.raises(AllProvidersFailed) as info:
            await router.agenerate("a cat")
    assert info.value.cost_usd == USAGE_USD == ledger.spent() == info.value.attempts[0].cost_usd
    assert "charged $" in str(info.value) and sandbox.hits() == 1


# --- the worst case a call can be billed ----------------------------------------------------------


def test_the_worst_case_comes_from_size_quality_n_prompt_bytes_and_input_size(sandbox: OpenAISandbox) -> None:
    p = provider(sandbox)
    auto = p.estimate(ImageRequest(prompt="a cat", width=1024, height=1536, n=2), "gpt-image-2")
    # expected: 2 × round(1056 × 1.5) output tokens, ceil(5 / 4) text tokens
    assert auto.cost_usd == (2 * Decimal(5) + 3168 * Decimal(30)) / Decimal(1_000_000)
    # worst: quality auto may be high: 2 × ceil(4160 × 1.5) output tokens; one text token per prompt byte
    assert auto.max_cost_usd == (5 * Decimal(5) + 12480 * Decimal(30)) / Decimal(1_000_000)
    low = p.estimate(ImageRequest(prompt="a cat", width=1024, height=1536, n=2,
                                  provider_options={"openai": {"quality": "low"}}), "gpt-image-2")
    assert low.max_cost_usd == (5 * Decimal(5) + 816 * Decimal(30)) / Decimal(1_000_000)
    wide = p.estimate(ImageRequest(prompt="猫", width=1024, height=1024), "gpt-image-2")
    assert wide.max_cost_usd == (3 * Decimal(5) + 4160 * Decimal(30)) / Decimal(1_000_000)  # 猫 is 3 bytes
    known = p.estimate(ImageRequest(prompt="a cat", init_image=png(1024, 1024), width=1024, height=1024,
                                    provider_options={"openai": {"quality": "high"}}), "gpt-image-2")
    # a 1024² input: scaled to 768², 2 × 2 tiles → 65 + 129 × 4 vision tokens at $8 / 1M
    assert known.max_cost_usd == (5 * Decimal(5) + 581 * Decimal(8) + 4160 * Decimal(30)) / Decimal(1_000_000)
    unknown = p.estimate(ImageRequest(prompt="a cat", init_image="https://example.invalid/x.png", width=1024,
                                      height=1024, provider_options={"openai": {"quality": "high"}}), "gpt-image-2")
    # an input of unknown size: the most tiles any image takes (4 × 2 after the 2048 / 768 fit)
    assert unknown.max_cost_usd == (5 * Decimal(5) + 1097 * Decimal(8) + 4160 * Decimal(30)) / Decimal(1_000_000)


@pytest.mark.parametrize("quality", ["low", "medium", "high", "auto"])
@pytest.mark.parametrize(("width", "height", "n"), [(1024, 1024, 1), (1536, 1024, 3), (3840, 2160, 1),
                                                    (1008, 672, 2)])
async def test_what_the_sandbox_bills_never_exceeds_the_bound(sandbox: OpenAISandbox, quality: str, width: int,
                                                              height: int, n: int) -> None:
    request = ImageRequest(prompt="ein Leuchtturm in der Dämmerung, Ölgemälde", width=width, height=height, n=n,
                           provider_options={"openai": {"quality": quality}})
    async with make_router(provider(sandbox)) as router:
        bound = router.route(request).chain[0].estimate.max_cost_usd
        result = await router.agenerate(request)
    assert bound is not None and result.cost.actual_usd <= bound
    assert result.cost.details["output_tokens"] <= n * 4160 * width * height / 1024**2 + n


async def test_a_budget_between_the_estimate_and_the_worst_case_refuses_before_any_call(
    sandbox: OpenAISandbox,
) -> None:
    ledger = Ledger(":memory:")
    async with make_router(provider(sandbox), ledger=ledger) as router:
        estimate = router.route("a cat", width=1024, height=1024).chain[0].estimate
        assert estimate.max_cost_usd is not None and estimate.cost_usd < Decimal("0.10") < estimate.max_cost_usd
        ledger.set_budget(Budget(Decimal("0.10"), "day"))
        with pytest.raises((BudgetExceeded, NoRouteError)):
            await router.agenerate("a cat", width=1024, height=1024)
        assert sandbox.hits() == 0
        low = await router.agenerate("a cat", width=1024, height=1024, provider_options={"openai": {"quality": "low"}})
    assert low.provider == "openai" and ledger.spent(period="day") == low.cost.actual_usd <= Decimal("0.10")


async def test_a_cost_cap_applies_to_the_worst_case(sandbox: OpenAISandbox) -> None:
    async with make_router(provider(sandbox)) as router:
        decision = router.route("a cat", width=1024, height=1024, max_cost_usd=Decimal("0.10"))
    assert not decision.chain and [r.code for r in decision.rejections] == ["cost-cap"]
