"""fal.ai end to end over real loopback HTTP: the router, the provider, the queue sandbox (and fal's own client)."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from PIL import Image

from providers.fal import FalProvider
from providers.sandbox import Fault
from providers.sandbox.fal import MEDIA_PATH, FalSandbox
from router import AllProvidersFailed, AuthenticationError, ContentPolicyError, InsufficientCredits, NoRouteError
from router.fetch import SafeFetcher
from router.ledger import Ledger
from tests.conftest import Sleeps, half_mask, make_router, png

KEY = "fal-sandbox-primary-key"
DEV = "fal-ai/flux/dev"


@pytest.fixture
def fal() -> Iterator[FalSandbox]:
    with FalSandbox(api_key=KEY) as sb:
        yield sb


@pytest.fixture
def fal2() -> Iterator[FalSandbox]:
    with FalSandbox(api_key=KEY) as sb:
        yield sb


def provider(sb: FalSandbox, name: str = "fal", *models: str, **kw: Any) -> FalProvider:
    kw.setdefault("api_key", KEY)
    return FalProvider(name=name, base_url=sb.base_url, models=models or (DEV,), poll_interval_s=0.01,
                       download_backoff_s=0.01, fetcher=SafeFetcher(allow_loopback=True), **kw)


def submits(sb: FalSandbox, endpoint: str = DEV) -> list[dict[str, Any]]:
    return [r.json or {} for r in sb.requests if r.method == "POST" and r.path == f"/{endpoint}"]


def calls(sb: FalSandbox) -> list[tuple[str, str]]:
    """Each request's method and path, with the request id cut out."""
    return [(r.method, r.path.rsplit("/requests/", 1)[0] + ("/requests/…" + r.path.rsplit("/requests/", 1)[1][36:]
                                                            if "/requests/" in r.path else "")) for r in sb.requests]


# --- the queue, end to end --------------------------------------------------------------------------


async def test_dev_submits_polls_with_logs_fetches_the_result_and_bills_per_megapixel(fal: FalSandbox) -> None:
    ledger = Ledger(":memory:")
    async with make_router(provider(fal), ledger=ledger) as router:
        result = await router.agenerate("a lighthouse at dusk", width=1440, height=1024, seed=41, steps=20,
                                        guidance_scale=4.0, provider_options={"fal": {"acceleration": "regular"}})
    assert submits(fal) == [{"prompt": "a lighthouse at dusk", "acceleration": "regular", "num_images": 1, "seed": 41,
                             "image_size": {"width": 1440, "height": 1024}, "output_format": "png",
                             "num_inference_steps": 20, "guidance_scale": 4.0}]
    assert fal.requests[0].headers["authorization"] == "[REDACTED]"
    # status and result drop the endpoint's subpath (/dev): fal-ai/flux/requests/{id}
    assert calls(fal) == [("POST", "/fal-ai/flux/dev")] + [("GET", "/fal-ai/flux/requests/…/status")] * 3 + [
        ("GET", "/fal-ai/flux/requests/…"), ("GET", MEDIA_PATH)]
    assert all(r.query == {"logs": "1"} for r in fal.requests if r.path.endswith("/status"))
    image = result.images[0]
    assert (image.width, image.height, image.seed, image.mime) == (1440, 1024, 41, "image/png")
    assert result.provider_request_id == next(iter(fal.jobs))
    # 1440x1024 is 1.41 MP of 1024x1024: two started megapixels at $0.025
    assert result.cost.unit == "megapixels" and result.cost.quantity == 2
    assert result.cost.actual_usd == Decimal("0.05") == fal.billed_usd == ledger.spent()


async def test_n_is_num_images_in_one_request(fal: FalSandbox) -> None:
    async with make_router(provider(fal)) as router:
        result = await router.agenerate("a cat", n=3, seed=7, output_format="jpeg")
    assert fal.submitted() == 1 and submits(fal)[0]["num_images"] == 3 and submits(fal)[0]["output_format"] == "jpeg"
    assert len(result.images) == 3 and {i.mime for i in result.images} == {"image/jpeg"}
    assert result.cost.actual_usd == 3 * Decimal("0.025") == fal.billed_usd


async def test_schnell_clamps_steps_to_its_range_with_a_warning(fal: FalSandbox) -> None:
    async with make_router(provider(fal, "fal", "fal-ai/flux/schnell")) as router:
        result = await router.agenerate("a cat", steps=20)
    assert submits(fal, "fal-ai/flux/schnell")[0]["num_inference_steps"] == 12
    assert any("steps 20 adapted to 12" in w for w in result.warnings)
    assert result.cost.actual_usd == Decimal("0.003")


async def test_img2img_sends_a_data_url_and_strength_and_keeps_the_input_size(fal: FalSandbox) -> None:
    init = png(320, 256, (200, 30, 30))
    endpoint = "fal-ai/flux/dev/image-to-image"
    async with make_router(provider(fal, "fal", endpoint)) as router:
        result = await router.agenerate("make it blue", init_image=init, strength=0.6, seed=2)
    body = submits(fal, endpoint)[0]
    assert body["image_url"].startswith("data:image/png;base64,")
    assert base64.b64decode(body["image_url"].split(",", 1)[1]) == init
    assert body["strength"] == 0.6 and "image_size" not in body
    assert (result.images[0].width, result.images[0].height) == (320, 256)
    assert result.cost.actual_usd == Decimal("0.03") == fal.billed_usd


async def test_inpainting_sends_a_white_repaint_mask_and_loras(fal: FalSandbox) -> None:
    init = png(256, 256, (10, 200, 10))
    endpoint = "fal-ai/flux-lora/inpainting"
    async with make_router(provider(fal, "fal", endpoint)) as router:
        result = await router.agenerate("a red door", init_image=init, mask_image=half_mask(64, 64),
                                        loras=[{"ref": "owner/door-lora", "weight": 0.8}])
    body = submits(fal, endpoint)[0]
    assert body["loras"] == [{"path": "owner/door-lora", "scale": 0.8}]
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask_url"].split(",", 1)[1])))
    assert mask.size == (256, 256) and mask.getpixel((10, 128)) == 255 and mask.getpixel((250, 128)) == 0
    out = result.images[0].to_pil().convert("RGB")
    assert out.size == (256, 256) and out.getpixel((250, 128)) == (10, 200, 10) and out.getpixel((10, 128)) != (
        10, 200, 10)


async def test_sd35_takes_a_negative_prompt_and_bills_per_image(fal: FalSandbox) -> None:
    endpoint = "fal-ai/stable-diffusion-v35-large"
    async with make_router(provider(fal, "fal", endpoint)) as router:
        result = await router.agenerate("a cat", negative_prompt="blurry", n=2)
    assert submits(fal, endpoint)[0]["negative_prompt"] == "blurry"
    assert result.cost.unit == "images" and result.cost.actual_usd == Decimal("0.130") == fal.billed_usd


@pytest.mark.parametrize(("style", "usd"), [("realistic_image", "0.08"), ("vector_illustration/line_art", "0.16")])
async def test_recraft_fans_out_one_request_per_image(fal: FalSandbox, style: str, usd: str) -> None:
    endpoint = "fal-ai/recraft/v3/text-to-image"
    async with make_router(provider(fal, "fal", endpoint)) as router:
        result = await router.agenerate("a logo", n=2, seed=3, provider_options={"fal": {"style": style}})
    bodies = submits(fal, endpoint)
    assert len(bodies) == 2 and all("num_images" not in b and "seed" not in b for b in bodies)
    assert any("seed ignored" in w for w in result.warnings)
    assert len(result.images) == 2 and result.cost.actual_usd == Decimal(usd) == fal.billed_usd


async def test_ideogram_on_fal_bills_its_rendering_speed(fal: FalSandbox) -> None:
    endpoint = "fal-ai/ideogram/v3"
    async with make_router(provider(fal, "fal", endpoint)) as router:
        result = await router.agenerate("a sign that says OPEN", seed=4,
                                        provider_options={"fal": {"rendering_speed": "TURBO", "expand_prompt": False}})
    body = submits(fal, endpoint)[0]
    assert body["rendering_speed"] == "TURBO" and body["expand_prompt"] is False and "output_format" not in body
    assert result.images[0].seed == 4 and result.cost.actual_usd == Decimal("0.03") == fal.billed_usd


async def test_status_answers_are_observed_in_one_place(fal: FalSandbox, caplog: pytest.LogCaptureFixture) -> None:
    fal.queued_polls, fal.running_polls = 2, 2
    with caplog.at_level(logging.DEBUG, logger="imagerouter"):
        async with make_router(provider(fal)) as router:
            await router.agenerate("a cat")
    seen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fal/fal-ai/flux/dev")]
    assert [m.split(": ", 1)[1] for m in seen] == ["in queue at position 1", "in queue at position 0",
                                                    "Step 1/4", "Step 2/4", "Step 3/4", "Step 4/4"]


async def test_eu_residency_never_routes_to_the_global_only_queue(fal: FalSandbox) -> None:
    p = provider(fal, "fal", *FalProvider(api_key="k").models())
    assert {r for m in p.models() for r in p.capabilities(m).regions} == {"global"}
    async with make_router(p) as router:
        with pytest.raises(NoRouteError) as info:
            await router.agenerate("a cat", residency={"eu"})
    residency = [r for r in info.value.rejections if r.code == "residency"]
    assert {r.model for r in residency} == {"fal-ai/flux/schnell", "fal-ai/flux/dev", "fal-ai/flux-lora",
                                            "fal-ai/flux-pro/v1.1", "fal-ai/stable-diffusion-v35-large",
                                            "fal-ai/recraft/v3/text-to-image", "fal-ai/ideogram/v3"}
    assert fal.hits() == 0


async def test_requests_it_cannot_serve_are_rejected_at_routing(fal: FalSandbox) -> None:
    async with make_router(provider(fal)) as router:
        with pytest.raises(NoRouteError) as info:
            await router.agenerate("x", controls=[{"kind": "canny", "image": png()}])
    assert "does not do control" in str(info.value) and fal.hits() == 0


# --- errors ------------------------------------------------------------------------------------------------


async def test_429_is_retried_after_the_wait_asked_for(fal: FalSandbox) -> None:
    fal.faults.push(Fault.rate_limit(retry_after=2.0))
    sleeps = Sleeps()
    async with make_router(provider(fal), sleep=sleeps) as router:
        result = await router.agenerate("a cat")
    assert sleeps.waits == [2.0] and [a.error for a in result.attempts] == ["RateLimited", None]
    assert len(submits(fal)) == 2 and fal.submitted() == 1


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_is_retried_then_falls_back(fal: FalSandbox, fal2: FalSandbox, status: int) -> None:
    fal.faults.push(Fault.server_error(status), times=None)
    async with make_router(provider(fal), provider(fal2, "fal-backup"), max_retries=1) as router:
        result = await router.agenerate("a cat")
    assert [(a.provider, a.error, a.status_code) for a in result.attempts] == [
        ("fal", "ProviderUnavailable", status), ("fal", "ProviderUnavailable", status), ("fal-backup", None, None)]
    assert fal.billed_usd == 0 and result.cost.actual_usd == fal2.billed_usd


async def test_a_flagged_prompt_is_an_unbilled_content_policy_error(fal: FalSandbox, fal2: FalSandbox) -> None:
    fal.faults.push(Fault.moderation())
    ledger = Ledger(":memory:")
    async with make_router(provider(fal), provider(fal2, "fal-backup"), ledger=ledger) as router:
        with pytest.raises(ContentPolicyError) as info:
            await router.agenerate("something refused")
    assert info.value.code == "content_policy_violation" and info.value.status_code == 422
    assert fal2.hits() == 0 and fal.billed_usd == 0 == ledger.spent()


async def test_a_failed_request_is_unbilled_and_retried(fal: FalSandbox) -> None:
    fal.faults.push(Fault("request_error"))
    async with make_router(provider(fal)) as router:
        result = await router.agenerate("a cat")
    assert [(a.error, a.cost_usd) for a in result.attempts] == [("ProviderUnavailable", 0), (None, Decimal("0.025"))]
    assert fal.submitted() == 2 and fal.billed_usd == Decimal("0.025")


async def test_an_exhausted_balance_is_insufficient_credits(fal: FalSandbox, fal2: FalSandbox) -> None:
    fal.faults.push(Fault.insufficient_credits())
    sleeps = Sleeps()
    async with make_router(provider(fal), provider(fal2, "fal-backup"), sleep=sleeps) as router:
        result = await router.agenerate("a cat")
    first = result.attempts[0]
    assert (first.error, first.status_code) == (InsufficientCredits.__name__, 403)
    assert result.provider == "fal-backup" and sleeps.waits == []


async def test_a_refused_key_is_an_authentication_error_without_the_key(fal: FalSandbox) -> None:
    async with make_router(provider(fal, api_key="wrong-key-0123456789abcdef")) as router:
        with pytest.raises(AuthenticationError) as info:
            await router.agenerate("a cat")
    assert info.value.status_code == 401 and "0123456789" not in str(info.value) and KEY not in repr(info.value)


async def test_invalid_input_falls_back_without_retry(fal: FalSandbox, fal2: FalSandbox) -> None:
    async with make_router(provider(fal), provider(fal2, "fal-backup")) as router:
        result = await router.agenerate("a cat", provider_options={"fal": {"acceleration": "ludicrous"}})
    first = result.attempts[0]
    assert (first.error, first.status_code) == ("InvalidRequestError", 422)
    assert "acceleration" in (first.message or "") and result.provider == "fal-backup" and fal.submitted() == 0


async def test_malformed_answers_fall_back(fal: FalSandbox, fal2: FalSandbox) -> None:
    fal.faults.push(Fault.malformed())
    async with make_router(provider(fal), provider(fal2, "fal-backup")) as router:
        result = await router.agenerate("a cat")
    assert result.attempts[0].error == "MalformedResponse" and result.provider == "fal-backup"


async def test_queue_urls_off_the_api_hosts_never_get_the_key(fal: FalSandbox, fal2: FalSandbox) -> None:
    other = fal2.base_url.encode()
    fal.faults.push(Fault.malformed(b'{"request_id": "r1", "status_url": "' + other + b'/a/b/requests/r1/status", '
                                    b'"response_url": "' + other + b'/a/b/requests/r1", "cancel_url": "' + other +
                                    b'/a/b/requests/r1/cancel"}'))
    async with make_router(provider(fal), max_retries=0) as router:
        with pytest.raises(AllProvidersFailed) as info:
            await router.agenerate("a cat")
    assert [a.error for a in info.value.attempts] == ["MalformedResponse"] and fal2.hits() == 0


async def test_a_request_past_its_deadline_is_cancelled_and_unbilled(fal: FalSandbox) -> None:
    fal.queued_polls = 10_000
    async with make_router(provider(fal), attempt_timeout_s=0.4, max_retries=0) as router:
        with pytest.raises(AllProvidersFailed) as info:
            await router.agenerate("a cat")
    assert [(a.error, a.cost_usd) for a in info.value.attempts] == [("ProviderTimeout", 0)]
    cancels = [r for r in fal.requests if r.method == "PUT"]
    assert len(cancels) == 1 and cancels[0].path.endswith("/cancel") and cancels[0].status == 202
    assert next(iter(fal.jobs.values())).cancelled and fal.billed_usd == 0


class _FinishesAsCancelled(FalSandbox):
    """A queue whose request completes just as the cancel arrives (the race fal's ALREADY_COMPLETED answers)."""

    def _cancel(self, job: Any) -> Any:
        self.queued_polls = self.running_polls = 0
        self._advance(job)
        return super()._cancel(job)


async def test_a_request_that_completes_as_it_is_cancelled_is_charged() -> None:
    with _FinishesAsCancelled(api_key=KEY, queued_polls=10_000) as sb:
        ledger = Ledger(":memory:")
        async with make_router(provider(sb), ledger=ledger, attempt_timeout_s=0.4, max_retries=0) as router:
            with pytest.raises(AllProvidersFailed) as info:
                await router.agenerate("a cat")
        assert [r.status for r in sb.requests if r.method == "PUT"] == [400]
        assert [(a.error, a.cost_usd) for a in info.value.attempts] == [("ProviderTimeout", Decimal("0.025"))]
        assert ledger.spent() == sb.billed_usd == Decimal("0.025")


# --- paid outputs ------------------------------------------------------------------------------------------


async def test_a_failed_download_is_downloaded_again_not_regenerated(fal: FalSandbox) -> None:
    fal.faults.push(Fault.server_error(503), times=2, path=MEDIA_PATH)
    async with make_router(provider(fal)) as router:
        result = await router.agenerate("a cat")
    assert [r.status for r in fal.requests if r.path == MEDIA_PATH] == [503, 503, 200]
    assert fal.submitted() == 1 and result.cost.actual_usd == Decimal("0.025") == fal.billed_usd


async def test_an_image_that_never_downloads_is_charged_and_falls_back(fal: FalSandbox, fal2: FalSandbox) -> None:
    fal.faults.push(Fault.server_error(503), times=None, path=MEDIA_PATH)
    ledger = Ledger(":memory:")
    async with make_router(provider(fal), provider(fal2, "fal-backup"), ledger=ledger) as router:
        result = await router.agenerate("a cat")
    assert [(a.provider, a.error, a.cost_usd) for a in result.attempts] == [
        ("fal", "ProviderUnavailable", Decimal("0.025")), ("fal-backup", None, Decimal("0.025"))]
    assert fal.submitted() == 1 and ledger.spent() == fal.billed_usd + fal2.billed_usd == Decimal("0.05")


@pytest.mark.parametrize("kind", ["bomb_image", "truncated_image", "wrong_format_image", "huge_image"])
async def test_a_hostile_image_is_a_charged_malformed_response(fal: FalSandbox, kind: str) -> None:
    fal.faults.push(Fault.hostile_image(kind))
    async with make_router(provider(fal), max_retries=0) as router:
        with pytest.raises(AllProvidersFailed) as info:
            await router.agenerate("a cat")
    assert [(a.error, a.cost_usd) for a in info.value.attempts] == [("MalformedResponse", Decimal("0.025"))]
    assert info.value.cost_usd == fal.billed_usd


async def test_images_flagged_by_the_safety_checker_are_marked_and_billed(fal: FalSandbox) -> None:
    fal.faults.push(Fault("nsfw"))
    async with make_router(provider(fal)) as router:
        result = await router.agenerate("a cat", n=2)
    assert [i.nsfw for i in result.images] == [True, True]
    assert any("flagged by fal's safety checker" in w for w in result.warnings)
    assert result.cost.actual_usd == Decimal("0.05") == fal.billed_usd


def test_a_missing_key_is_a_configuration_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    assert FalProvider().configuration_problem() == "not configured: set FAL_KEY"
    monkeypatch.setenv("FAL_KEY", "from-env")
    assert FalProvider().configuration_problem() is None


# --- the sandbox: strict, and read by fal's own client --------------------------------------------------


def test_sandbox_is_strict_about_inputs_and_the_queue_order(fal: FalSandbox) -> None:
    url = f"{fal.base_url}/{DEV}"
    with httpx.Client(headers={"Authorization": f"Key {KEY}"}) as client:
        for body, loc, kind in (
            ({"prompt": "x", "strength": 0.5}, "strength", "extra_forbidden"),
            ({"prompt": "x", "num_images": 5}, "num_images", "less_than_equal"),
            ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "greater_than_equal"),
            ({"prompt": "x", "output_format": "webp"}, "output_format", "enum"),
            ({"prompt": "x", "image_size": "huge"}, "image_size", "value_error"),
            ({"seed": 1}, "prompt", "missing"),
        ):
            r = client.post(url, json=body)
            assert r.status_code == 422, body
            assert r.json()["detail"][0]["loc"] == ["body", loc] and r.json()["detail"][0]["type"] == kind
        sub = client.post(url, json={"prompt": "x"}).json()
        assert sub["status"] == "IN_QUEUE" and "/fal-ai/flux/requests/" in sub["status_url"]
        assert client.get(sub["response_url"]).status_code == 400  # not done yet
        states = [client.get(sub["status_url"], params={"logs": 1}).json()["status"] for _ in range(3)]
        assert states == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"] and fal.billed_usd == Decimal("0.025")
        assert client.put(sub["cancel_url"]).json() == {"status": "ALREADY_COMPLETED"}
        assert client.get(f"{fal.base_url}/fal-ai/other/requests/{sub['request_id']}").status_code == 404
    assert httpx.post(url, json={"prompt": "x"}).status_code == 401


async def test_fal_client_reads_the_sandbox_queue_answers() -> None:
    """The official client's request handle (status with logs, result, cancel) over real HTTP to the sandbox:
    its own parser accepts every answer. (Only its submit cannot be pointed here: it builds an https URL.)"""
    fal_client = pytest.importorskip("fal_client")
    with FalSandbox(api_key=KEY, queued_polls=1, running_polls=1) as sb:
        async with httpx.AsyncClient(headers={"Authorization": f"Key {KEY}"}) as http:
            submitted = (await http.post(f"{sb.base_url}/{DEV}", json={"prompt": "x", "seed": 3})).json()
            handle = fal_client.AsyncRequestHandle(
                request_id=submitted["request_id"], response_url=submitted["response_url"],
                status_url=submitted["status_url"], cancel_url=submitted["cancel_url"], client=http)
            events = [event async for event in handle.iter_events(with_logs=True, interval=0.01)]
            assert [type(e).__name__ for e in events] == ["Queued", "InProgress", "Completed"]
            assert events[0].position == 0 and events[-1].logs and events[-1].metrics == {"inference_time": 0.42}
            result = await handle.get(interval=0.01)
            assert result["seed"] == 3 and result["images"][0]["width"] == 1024
            queued = (await http.post(f"{sb.base_url}/{DEV}", json={"prompt": "y"})).json()
            await fal_client.AsyncRequestHandle(
                request_id=queued["request_id"], response_url=queued["response_url"],
                status_url=queued["status_url"], cancel_url=queued["cancel_url"], client=http).cancel()
    assert sb.jobs[queued["request_id"]].cancelled and sb.billed_usd == Decimal("0.025")
