"""Typed progress events for every backend, through the callback and ``astream``: routing, attempts,
fallbacks, polled vendor status, denoising steps, partial images (OpenAI streams, local previews)."""

from __future__ import annotations

import asyncio
import io
from contextlib import aclosing
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from providers.bfl import BFLProvider
from providers.local import LocalProvider
from providers.openai import OpenAIProvider
from providers.replicate import ReplicateProvider
from providers.sandbox import BFLSandbox, Fault, OpenAISandbox, ReplicateSandbox, StabilitySandbox
from providers.stability import StabilityProvider
from router import (
    AllProvidersFailed,
    AsyncRouter,
    AttemptFailed,
    AttemptStarted,
    Completed,
    FellBack,
    PartialImage,
    ProgressEvent,
    Routed,
    Router,
    Status,
)
from router.fetch import SafeFetcher
from router.progress import event_dict
from tests.conftest import make_router, png


def openai(sb: OpenAISandbox, name: str = "openai") -> OpenAIProvider:
    return OpenAIProvider(name=name, api_key=sb.api_key, base_url=sb.base_url)


def kinds(events: list[Any]) -> list[str]:
    return [e.kind for e in events]


async def test_routing_attempts_and_fallback_are_reported_in_order(sandbox: OpenAISandbox,
                                                                   sandbox2: OpenAISandbox) -> None:
    sandbox.faults.push(Fault.invalid_request(message="bad prompt for this one"), times=None)
    events: list[Any] = []
    async with make_router(openai(sandbox, "first"), openai(sandbox2, "second")) as router:
        result = await router.agenerate("a red fox", policy="cheapest", on_progress=events.append,
                                        constraints={"allow_providers": {"first", "second"}})
    routed, started, failed, fell, started2 = events
    assert isinstance(routed, Routed) and routed.chain[:2] == ("first/gpt-image-2", "second/gpt-image-2")
    assert routed.request_id == result.request_id and routed.policy == "cheapest"
    assert isinstance(started, AttemptStarted) and (started.provider, started.rank, started.retry) == ("first", 0, 0)
    assert isinstance(failed, AttemptFailed) and failed.provider == "first"
    assert failed.error == "InvalidRequestError" and "bad prompt" in failed.message and failed.cost_usd == 0
    assert isinstance(fell, FellBack) and (fell.from_provider, fell.to_provider) == ("first", "second")
    assert isinstance(started2, AttemptStarted) and (started2.provider, started2.rank) == ("second", 1)
    assert result.provider == "second"


async def test_openai_partial_images_stream_as_events_and_the_final_image_is_billed(sandbox: OpenAISandbox) -> None:
    async with make_router(openai(sandbox)) as router:
        events = [e async for e in router.astream("a lighthouse", width=1024, height=1024, partial_images=2)]
    assert kinds(events) == ["routed", "attempt_started", "partial_image", "partial_image", "completed"]
    partials = [e for e in events if isinstance(e, PartialImage)]
    assert [p.index for p in partials] == [0, 1] and all(p.provider == "openai" for p in partials)
    assert Image.open(io.BytesIO(partials[0].data)).size == (1024, 1024)
    done = events[-1]
    assert isinstance(done, Completed)
    result = done.result
    assert len(result.images) == 1 and result.images[0].data not in {p.data for p in partials}
    assert result.cost.actual_usd == sandbox.billed_usd > 0  # the completed event's usage, as the vendor billed
    sent = sandbox.requests[-1].json
    assert sent is not None and sent["stream"] is True and sent["partial_images"] == 2


async def test_partial_images_are_not_requested_without_a_listener_or_for_several_images(
        sandbox: OpenAISandbox) -> None:
    async with make_router(openai(sandbox)) as router:
        await router.agenerate("a cat", partial_images=2)  # no one listens: a plain call
        events = [e async for e in router.astream("a cat", n=2, partial_images=2)]
    assert [r.json.get("stream") for r in sandbox.requests if r.json] == [None, None]
    assert "partial_image" not in kinds(events) and len(events[-1].result.images) == 2
    assert any("partial_images not streamed" in w for w in events[-1].result.warnings)


async def test_an_error_event_in_the_stream_is_the_vendors_error(sandbox: OpenAISandbox) -> None:
    sandbox.faults.push(Fault.auth())
    with pytest.raises(Exception) as caught:
        async with make_router(openai(sandbox)) as router:
            async for _ in router.astream("a cat", partial_images=1):
                pass
    assert type(caught.value).__name__ in ("AuthenticationError", "AllProvidersFailed")


async def test_replicate_reports_queued_then_running_statuses() -> None:
    with ReplicateSandbox(api_token="r8_t", wait_completes=False, pending_polls=2) as sb:
        p = ReplicateProvider(api_token="r8_t", base_url=sb.base_url, fetcher=SafeFetcher(allow_loopback=True),
                              poll_interval_s=0.01)
        events: list[Any] = []
        async with make_router(p) as router:
            await router.agenerate("a fox", model="flux-schnell", on_progress=events.append)
    statuses = [(e.status, e.vendor_status) for e in events if isinstance(e, Status)]
    assert statuses == [("queued", "starting"), ("running", "processing"), ("succeeded", "succeeded")]
    assert all(e.job_id and e.model == "flux-schnell" for e in events if isinstance(e, Status))


async def test_bfl_reports_pending_until_ready() -> None:
    with BFLSandbox(api_key="k") as sb:
        p = BFLProvider(api_key="k", base_url=sb.base_url, fetcher=SafeFetcher(allow_loopback=True),
                        poll_interval_s=0.01)
        events: list[Any] = []
        async with make_router(p) as router:
            await router.agenerate("a fox", model="flux-pro-1.1", on_progress=events.append)
    statuses = [(e.status, e.vendor_status) for e in events if isinstance(e, Status)]
    assert statuses[0] == ("queued", "submitted") and statuses[-1] == ("succeeded", "Ready")
    assert ("pending", "Pending") in statuses


async def test_stability_creative_upscale_reports_its_polled_job(sb: StabilitySandbox) -> None:
    sb.job_polls = 2
    p = StabilityProvider(api_key=sb.api_key, base_url=sb.base_url, models=("stable-image-upscale-creative",),
                          fetcher=SafeFetcher(allow_loopback=True), poll_interval_s=0.01)
    events: list[Any] = []
    async with make_router(p) as router:
        await router.agenerate("a photo", init_image=png(256, 256), upscale=8, on_progress=events.append)
    statuses = [(e.status, e.vendor_status) for e in events if isinstance(e, Status)]
    assert statuses == [("queued", "submitted"), ("pending", "HTTP 202 (in progress)"), ("succeeded", "HTTP 200")]


@pytest.fixture(scope="module")
def preview_dir(models_root: Path) -> Path:
    from providers.local.tiny import build_preview_vae

    return build_preview_vae(models_root / "tiny-taesd")


def local(sd15_dir: Path, **kw: Any) -> LocalProvider:
    entry = {"path": str(sd15_dir), "family": "sd15", "native": [64, 64], "min_side": 32, "steps": 6} | kw
    return LocalProvider({"tiny": entry}, device="cpu")


async def test_local_steps_and_latent_previews(sd15_dir: Path, preview_dir: Path) -> None:
    async with AsyncRouter([local(sd15_dir, preview_vae=str(preview_dir))], ledger=":memory:") as router:
        events = [e async for e in router.astream("a fox", width=64, height=64, steps=6, partial_images=2, seed=1)]
        plain = await router.agenerate("a fox", width=64, height=64, steps=6, seed=1)
    steps = [e.step for e in events if isinstance(e, ProgressEvent)]
    previews = [e for e in events if isinstance(e, PartialImage)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [(p.index, p.step) for p in previews] == [(0, 2), (1, 4)]
    assert all(Image.open(io.BytesIO(p.data)).size == (64, 64) for p in previews)
    assert previews[0].data != previews[1].data
    result = events[-1].result
    assert result.images[0].data == plain.images[0].data  # previews change nothing in the image


async def test_local_without_a_preview_vae_sends_steps_only(sd15_dir: Path) -> None:
    async with AsyncRouter([local(sd15_dir)], ledger=":memory:") as router:
        events = [e async for e in router.astream("a fox", width=64, height=64, steps=2, partial_images=2)]
    assert "partial_image" not in kinds(events) and kinds(events).count("step") == 2


async def test_a_request_that_fails_raises_after_its_events(sandbox: OpenAISandbox) -> None:
    sandbox.faults.push(Fault.server_error(503), times=None)
    seen: list[Any] = []
    with pytest.raises(AllProvidersFailed):
        async with make_router(openai(sandbox), max_retries=1) as router:
            async for event in router.astream("a cat"):
                seen.append(event)
    assert kinds(seen) == ["routed", "attempt_started", "attempt_failed", "attempt_started", "attempt_failed"]
    assert [e.retry for e in seen if isinstance(e, AttemptStarted)] == [0, 1]


async def test_leaving_the_stream_early_cancels_the_request(sd15_dir: Path) -> None:
    provider = local(sd15_dir)
    async with AsyncRouter([provider], ledger=":memory:") as router:
        async with aclosing(router.astream("a fox", width=64, height=64, steps=40)) as events:
            async for event in events:
                if isinstance(event, ProgressEvent):
                    break
        for _ in range(200):
            if provider.worker.interrupted:
                break
            await asyncio.sleep(0.05)
        assert provider.worker.interrupted == 1 and provider.worker.completed == 0  # the device call stopped
        report = router.ledger.report(group_by=())
    assert sum(r.requests for r in report) == 0 and sum(r.usd for r in report) == Decimal(0)  # nothing settled


def test_sync_stream_and_json_events(sandbox: OpenAISandbox) -> None:
    with Router([openai(sandbox)], ledger=":memory:") as router:
        events = list(router.stream("a cat", partial_images=1))
    assert kinds(events) == ["routed", "attempt_started", "partial_image", "completed"]
    as_json = [event_dict(e) for e in events[:-1]]
    assert as_json[0]["type"] == "routed" and as_json[0]["chain"] == ["openai/gpt-image-2"]
    assert as_json[2]["type"] == "partial_image" and as_json[2]["b64_json"] and "data" not in as_json[2]


async def test_fal_reports_its_queue_then_running_statuses() -> None:
    from providers.fal import FalProvider
    from providers.sandbox import FalSandbox

    with FalSandbox(api_key="fal-k", queued_polls=2, running_polls=2) as sb:
        p = FalProvider(api_key="fal-k", base_url=sb.base_url, models=("fal-ai/flux/dev",), poll_interval_s=0.01,
                        fetcher=SafeFetcher(allow_loopback=True))
        events: list[Any] = []
        async with make_router(p) as router:
            await router.agenerate("a fox", on_progress=events.append)
    statuses = [(e.status, e.vendor_status) for e in events if isinstance(e, Status)]
    assert statuses == [("queued", "submitted"), ("queued", "IN_QUEUE"), ("running", "IN_PROGRESS"),
                        ("succeeded", "COMPLETED")]


async def test_a_local_call_cut_off_by_its_deadline_leaves_no_unretrieved_future(
        sd15_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    import gc

    provider = local(sd15_dir)
    await provider.warm(["tiny"])  # loaded: the call below only denoises
    worker = provider.worker
    async with AsyncRouter([provider], ledger=":memory:", attempt_timeout_s=0.3) as router:
        with pytest.raises(Exception) as caught:
            await router.agenerate("a fox", width=64, height=64, steps=500, deadline_s=5)
        for _ in range(100):
            if worker.interrupted:
                break
            await asyncio.sleep(0.05)
    gc.collect()
    assert type(caught.value).__name__ in ("AllProvidersFailed", "DeadlineExceeded")
    assert [a.outcome for a in caught.value.attempts] == ["error"]  # type: ignore[attr-defined]
    assert worker.interrupted == 1  # stopped on the device, and not tried again on the same model
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
