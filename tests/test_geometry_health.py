"""Size adaptation and the circuit breaker: small pure parts with exact expectations."""

from __future__ import annotations

import pytest

from router.geometry import SizeRules, plan_size
from router.health import CircuitBreaker

GPT_IMAGE = SizeRules(multiple=16, min_side=256, max_side=3840, min_pixels=655_360, max_pixels=3840 * 2160,
                      max_ratio=3.0, native=(1024, 1024))
FIXED = SizeRules(fixed=((1024, 1024), (1536, 1024), (1024, 1536)), native=(1024, 1024))


@pytest.mark.parametrize(
    ("rules", "size", "ratio", "expected", "warns"),
    [
        (GPT_IMAGE, (1024, 1024), None, (1024, 1024), False),
        (GPT_IMAGE, (1000, 1000), None, (1008, 1008), True),
        (GPT_IMAGE, (512, 512), None, (816, 816), True),  # under the pixel minimum: grown, ratio kept
        (GPT_IMAGE, (4096, 1024), None, (3552, 1184), True),  # ratio clamped to 3:1
        (GPT_IMAGE, None, "16:9", (1360, 768), False),
        (GPT_IMAGE, None, "1:1", (1024, 1024), False),
        (FIXED, (1024, 1024), None, (1024, 1024), False),
        (FIXED, (800, 600), None, (1536, 1024), True),
        (FIXED, None, "16:9", (1536, 1024), True),
        (FIXED, None, None, (1024, 1024), False),
    ],
)
def test_plan_size(rules: SizeRules, size: tuple[int, int] | None, ratio: str | None,
                   expected: tuple[int, int], warns: bool) -> None:
    w, h = size or (None, None)
    plan = plan_size(w, h, ratio, rules)
    assert (plan.width, plan.height) == expected
    assert rules.allows(plan.width, plan.height)
    assert (plan.warning is not None) == warns and plan.exact == (not warns)


@pytest.mark.parametrize(
    ("rules", "size", "outside", "adapted"),
    [
        (GPT_IMAGE, (4096, 4096), "4096x4096 is outside its range: sides 256-3840 px in multiples of 16", None),
        (GPT_IMAGE, (512, 512), "512x512 is outside its range: ", None),  # under the 0.66 MP minimum
        (GPT_IMAGE, (4096, 1024), "4096x1024 is outside its range: ", None),  # longer than 3840 px
        (GPT_IMAGE, (2400, 600), "long side at most 3x the short", None),  # more elongated than 3:1
        (GPT_IMAGE, (1000, 1000), None, "size 1000x1000 adapted to 1008x1008"),  # within: rounded to 16
        (FIXED, (2048, 2048), "2048x2048 is outside its range: one of 1024x1024, 1536x1024, 1024x1536", None),
        (FIXED, (1500, 1000), None, "size 1500x1000 adapted to 1536x1024"),  # the nearest fixed shape
        (FIXED, (512, 512), None, "size 512x512 adapted to 1024x1024"),  # below the smallest shape: rounded up
    ],
)
def test_a_size_outside_the_range_is_refused_and_one_inside_is_rounded(
        rules: SizeRules, size: tuple[int, int], outside: str | None, adapted: str | None) -> None:
    plan = plan_size(*size, None, rules)
    if outside is None:
        assert plan.out_of_range is None and plan.warning is not None and plan.warning.startswith(adapted or "-")
        assert rules.within_range(*size) and rules.allows(plan.width, plan.height)
    else:
        assert plan.out_of_range is not None and outside in plan.out_of_range and not rules.within_range(*size)


def test_the_router_refuses_an_out_of_range_size_naming_the_range() -> None:
    from providers.openai import OpenAIProvider
    from router import NoRouteError, Router

    router = Router([OpenAIProvider(api_key="sk-test")], ledger=":memory:")
    decision = router.route("a cat", width=4096, height=4096)
    assert not decision.chain
    reasons = {r.model: (r.code, r.reason) for r in decision.rejections if r.provider == "openai"}
    code, reason = reasons["gpt-image-2"]
    assert code == "size" and "4096x4096 is outside its range: sides 256-3840 px" in reason
    with pytest.raises(NoRouteError, match="outside its range"):
        router.generate("a cat", width=4096, height=4096)
    adapted = router.route("a cat", width=1000, height=1000)
    assert adapted.chain and any("adapted to 1008x1008" in w for w in adapted.chain[0].warnings)
    router.close()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_and_probes_once_after_cooldown() -> None:
    clock = Clock()
    cb = CircuitBreaker(failure_threshold=3, cooldown_s=30, clock=clock)
    for _ in range(2):
        assert cb.before_call("p")
        cb.record_failure("p")
    assert cb.state("p") == "closed"
    assert cb.before_call("p")
    cb.record_failure("p")
    assert cb.state("p") == "open" and not cb.before_call("p")
    clock.now = 31
    assert cb.state("p") == "half-open"
    assert cb.before_call("p")  # the probe
    assert not cb.before_call("p")  # only one probe at a time
    cb.record_failure("p")
    assert cb.state("p") == "open"  # a failed probe reopens at once
    clock.now = 62
    assert cb.before_call("p")
    cb.record_success("p")
    assert cb.state("p") == "closed" and cb.before_call("p")


def test_request_errors_do_not_count_against_the_provider() -> None:
    cb = CircuitBreaker(failure_threshold=1, cooldown_s=30, clock=Clock())
    cb.before_call("p")
    cb.release("p")
    assert cb.state("p") == "closed"


def test_retry_after_reads_ms_seconds_and_http_dates() -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    from providers.vendor import retry_after_s

    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "2"}) == 2.0
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < (retry_after_s({"retry-after": soon}) or 0) <= 30
    assert retry_after_s({"retry-after": "soon"}) is None and retry_after_s(None) is None


def test_a_wide_size_over_the_side_limit_stays_wide() -> None:
    rules = SizeRules(multiple=32, min_side=256, max_side=1440, max_pixels=1440 * 1440, native=(1024, 1024))
    w, h = rules.nearest(1920, 1080)
    assert rules.allows(w, h) and w == 1440 and abs(w / h - 16 / 9) < 0.05  # not the 1024x1024 default
    w, h = rules.for_ratio(21 / 9)
    assert rules.allows(w, h) and w / h > 2.2
    assert plan_size(1080, 1920, None, rules).height == 1440
