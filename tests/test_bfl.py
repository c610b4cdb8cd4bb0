"""BFL (FLUX API) end to end over real loopback HTTP through httpx: the router, the provider, the sandbox."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest
from PIL import Image

from providers.bfl import BFLProvider
from providers.sandbox import Fault
from providers.sandbox.bfl import SAMPLE_PATH, BFLSandbox
from router import (
    AllProvidersFailed,
    AuthenticationError,
    ContentPolicyError,
    ImageRequest,
    InsufficientCredits,
    InvalidRequestError,
    NoRouteError,
)
from router.fetch import SafeFetcher
from router.ledger import Ledger
from tests.conftest import Sleeps, half_mask, make_router, png

KEY = "bfl-sandbox-primary-key"
TXT = "/v1/flux-pro-1.1"


@pytest.fixture
def bfl() -> Iterator[BFLSandbox]:
    with BFLSandbox(api_key=KEY) as sb:
        yield sb


@pytest.fixture
def bfl2() -> Iterator[BFLSandbox]:
    with BFLSandbox(api_key=KEY) as sb:
        yield sb


def provider(sb: BFLSandbox, name: str = "bfl", **kw: object) -> BFLProvider:
    kw.setdefault("api_key", KEY)
    kw.setdefault("base_url", sb.base_url)
    kw.setdefault("download_backoff_s", 0.01)
    return BFLProvider(name=name, fetcher=SafeFetcher(allow_loopback=True), poll_interval_s=0.01,
                       **kw)  # type: ignore[arg-type]



def one_model(sb: BFLSandbox, name: str = "bfl", model: str = "flux-pro-1.1") -> BFLProvider:
    return provider(sb, name, models=(model,))


# --- txt2img -------------------------------------------------------------------------


async def test_txt2img_polls_downloads_echoes_the_seed_and_bills_credits(bfl: BFLSandbox) -> None:
    ledger = Ledger(":memory:")
    async with make_router(provider(bfl), ledger=ledger) as router:
        result = await router.agenerate("a lighthouse at dusk", model="flux-pro-1.1", width=1000, height=1008,
                                        seed=41, provider_options={"bfl": {"safety_tolerance": 2,
                                                                           "prompt_upsampling": True}})
    assert result.provider == "bfl" and result.model == "flux-pro-1.1"
    image = result.images[0]
    # flux-pro-1.1 takes multiples of 32 (FluxPro11Inputs): 1000x1008 snaps to 992x992
    assert (image.width, image.height, image.mime, image.seed) == (992, 992, "image/png", 41)
    assert image.to_pil().size == (992, 992)
    assert any("1000x1008 adapted to 992x992" in w and "multiples of 32" in w for w in result.warnings)
    sent = bfl.requests[0]
    assert sent.path == TXT and sent.headers["x-key"] == "[REDACTED]"
    assert sent.json == {"prompt": "a lighthouse at dusk", "output_format": "png", "safety_tolerance": 2,
                         "prompt_upsampling": True, "seed": 41, "width": 992, "height": 992}
    polls = [r for r in bfl.requests if r.path == "/v1/get_result"]
    assert len(polls) == 2 and polls[0].headers["x-key"] == "[REDACTED]"  # Pending, then Ready
    assert bfl.requests[-1].path == SAMPLE_PATH
    assert result.provider_request_id == next(iter(bfl.tasks))
    # flux-pro-1.1: 4 credits per image at $0.01
    assert result.cost.unit == "credits" and result.cost.quantity == 4
    assert result.cost.actual_usd == Decimal("0.04") == ledger.spent() == bfl.billed_usd


async def test_n_fans_out_one_task_per_image_with_consecutive_seeds(bfl: BFLSandbox) -> None:
    async with make_router(provider(bfl)) as router:
        result = await router.agenerate("a cat", model="flux-pro-1.1", n=3, seed=7, output_format="jpeg")
    assert [i.seed for i in result.images] == [7, 8, 9]
    assert {i.mime for i in result.images} == {"image/jpeg"}
    assert bfl.hits(TXT) == 3 and sorted((r.json or {})["seed"] for r in bfl.requests if r.path == TXT) == [7, 8, 9]
    assert result.cost.actual_usd == 3 * 4 * Decimal("0.01")
    assert result.images[0].data != result.images[1].data


async def test_unseeded_requests_echo_the_seed_the_provider_chose(bfl: BFLSandbox) -> None:
    async with make_router(provider(bfl)) as router:
        result = await router.agenerate("a cat", model="flux-pro-1.1")
    task = next(iter(bfl.tasks.values()))
    assert result.images[0].seed == task.seed and "seed" not in (bfl.requests[0].json or {})


async def test_webp_and_unknown_options_are_adapted_with_warnings(bfl: BFLSandbox) -> None:
    async with make_router(provider(bfl)) as router:
        result = await router.agenerate("a cat", model="flux-pro-1.1", output_format="webp",
                                        provider_options={"bfl": {"colour": "red"}})
    assert result.images[0].mime == "image/png" and bfl.requests[0].json["output_format"] == "png"  # type: ignore
    assert any("webp not offered" in w for w in result.warnings)
    assert any("bfl.colour" in w for w in result.warnings)
    assert "colour" not in (bfl.requests[0].json or {})


async def test_ultra_sends_an_aspect_ratio_and_bills_six_credits(bfl: BFLSandbox) -> None:
    async with make_router(provider(bfl)) as router:
        result = await router.agenerate("a valley", model="flux-pro-1.1-ultra", aspect_ratio="16:9", n=2)
    assert bfl.requests[0].json["aspect_ratio"] == "16:9"  # type: ignore[index]
    assert "width" not in (bfl.requests[0].json or {})
    img = result.images[0]
    assert abs(img.width / img.height - 16 / 9) < 0.02 and img.width * img.height > 3.5 * 1024**2
    assert result.cost.actual_usd == Decimal("0.12")


async def test_flux_2_pro_takes_width_and_height_and_bills_per_megapixel(bfl: BFLSandbox) -> None:
    async with make_router(provider(bfl)) as router:
        result = await router.agenerate("a cat", model="flux-2-pro", width=1440, height=816, seed=1,
                                        idempotency_key="abc", provider_options={"bfl": {"raw": True}})
    sent = bfl.requests[0]
    assert sent.path == "/v1/flux-2-pro" and sent.json is not None
    assert (sent.json["width"], sent.json["height"]) == (1440, 816) and "raw" not in sent.json
    assert (result.images[0].width, result.images[0].height, result.images[0].seed) == (1440, 816, 1)
    assert any("raw ignored" in w for w in result.warnings) and any("idempotency_key" in w for w in result.warnings)
    # 1440x816 is 1.12 MP of 1024x1024: the first MP 3 credits, the second (started) 1.5
    assert result.cost.quantity == Decimal("4.5") and result.cost.actual_usd == Decimal("0.045") == bfl.billed_usd


async def test_ultra_takes_the_raw_option(bfl: BFLSandbox) -> None:
    async with make_router(provider(bfl)) as router:
        await router.agenerate("a cat", model="flux-pro-1.1-ultra", provider_options={"bfl": {"raw": True}})
    assert bfl.requests[0].json == {"prompt": "a cat", "output_format": "png", "raw": True, "aspect_ratio": "1:1"}


# --- inpaint and img2img ----------------------------------------------------------------


async def test_fill_sends_base64_image_and_a_white_repaint_mask_resized_to_the_image(bfl: BFLSandbox) -> None:
    init = png(256, 256, (10, 200, 10))
    alpha_mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))  # OpenAI polarity: alpha 0 = repaint
    alpha_mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    buf = io.BytesIO()
    alpha_mask.save(buf, format="PNG")
    async with make_router(provider(bfl)) as router:
        result = await router.agenerate("a red door", init_image=init, mask_image=buf.getvalue(), steps=30,
                                        guidance_scale=40.0, seed=3)
    assert result.model == "flux-pro-1.0-fill"
    sent = bfl.requests[0]
    assert sent.path == "/v1/flux-pro-1.0-fill" and sent.json is not None
    assert (sent.json["steps"], sent.json["guidance"], sent.json["seed"]) == (30, 40.0, 3)
    assert base64.b64decode(sent.json["image"]) == init
    mask = Image.open(io.BytesIO(base64.b64decode(sent.json["mask"])))
    assert mask.size == (256, 256) and mask.mode == "L"
    assert mask.getpixel((10, 128)) == 255 and mask.getpixel((250, 128)) == 0  # white = repaint
    out = result.images[0].to_pil().convert("RGB")
    assert out.size == (256, 256) and out.getpixel((250, 128)) == (10, 200, 10)
    assert out.getpixel((10, 128)) != (10, 200, 10)
    assert result.cost.actual_usd == Decimal("0.05")


async def test_fill_takes_the_white_mask_as_is(bfl: BFLSandbox) -> None:
    async with make_router(provider(bfl)) as router:
        result = await router.agenerate("x", init_image=png(128, 128, (0, 0, 255)), mask_image=half_mask(128, 128))
    out = result.images[0].to_pil().convert("RGB")
    assert out.getpixel((120, 64)) == (0, 0, 255) and out.getpixel((5, 64)) != (0, 0, 255)


async def test_kontext_edits_the_init_image_at_its_aspect_ratio(bfl: BFLSandbox) -> None:
    init = png(300, 200, (200, 30, 30))
    async with make_router(provider(bfl)) as router:
        result = await router.agenerate("make it blue", init_image=init, seed=9, model="flux-kontext-pro")
    assert result.model == "flux-kontext-pro"
    sent = bfl.requests[0].json
    assert sent is not None and base64.b64decode(sent["input_image"]) == init and "aspect_ratio" not in sent
    img = result.images[0]
    assert (img.width, img.height) == (1248, 832) and img.seed == 9
    assert result.cost.actual_usd == Decimal("0.04")


async def test_kontext_with_a_size_sends_the_ratio_and_warns_about_the_shape(bfl: BFLSandbox) -> None:
    async with make_router(provider(bfl)) as router:
        result = await router.agenerate("make it blue", init_image=png(64, 64), width=1536, height=1024,
                                        strength=0.4, model="flux-kontext-pro")
    assert bfl.requests[0].json["aspect_ratio"] == "3:2"  # type: ignore[index]
    assert (result.images[0].width, result.images[0].height) == (1248, 832)
    assert any("1536x1024 adapted to 1248x832" in w and "about 1 MP" in w for w in result.warnings)
    assert any("strength ignored" in w for w in result.warnings)


async def test_requests_it_cannot_serve_are_rejected_at_routing_with_the_reason(bfl: BFLSandbox) -> None:
    async with make_router(provider(bfl)) as router:
        decision = router.route(ImageRequest(prompt="x", controls=[{"kind": "canny", "image": png()}]))
        with pytest.raises(NoRouteError) as info:
            await router.agenerate(ImageRequest(prompt="x", controls=[{"kind": "canny", "image": png()}]))
    assert not decision.chain and "does not do control" in decision.explain()
    assert "does not do control" in str(info.value) and bfl.hits() == 0


# --- errors --------------------------------------------------------------------------------


async def test_429_is_retried_after_the_wait_the_provider_asked_for(bfl: BFLSandbox) -> None:
    bfl.faults.push(Fault.rate_limit(retry_after=2.0))
    sleeps = Sleeps()
    async with make_router(one_model(bfl), sleep=sleeps) as router:
        result = await router.agenerate("a cat")
    assert sleeps.waits == [2.0]
    assert [(a.outcome, a.error) for a in result.attempts] == [("error", "RateLimited"), ("success", None)]
    assert bfl.hits(TXT) == 2


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_is_provider_unavailable_then_fallback(bfl: BFLSandbox, bfl2: BFLSandbox, status: int) -> None:
    bfl.faults.push(Fault.server_error(status), times=None)
    async with make_router(one_model(bfl), one_model(bfl2, "bfl-backup"), max_retries=1) as router:
        result = await router.agenerate("a cat")
    assert [(a.provider, a.error, a.status_code) for a in result.attempts] == [
        ("bfl", "ProviderUnavailable", status), ("bfl", "ProviderUnavailable", status), ("bfl-backup", None, None)]
    assert result.attempts[0].cost_usd == 0 and result.cost.actual_usd == Decimal("0.04")


@pytest.mark.parametrize("status", ["Content Moderated", "Request Moderated"])
async def test_moderated_tasks_are_content_policy_errors(bfl: BFLSandbox, bfl2: BFLSandbox, status: str) -> None:
    bfl.faults.push(Fault.moderation(status))
    async with make_router(one_model(bfl), one_model(bfl2, "bfl-backup")) as router:
        with pytest.raises(ContentPolicyError) as info:
            await router.agenerate("something refused")
    assert info.value.code == status and bfl2.hits() == 0


async def test_insufficient_credits_402_falls_back_at_once(bfl: BFLSandbox, bfl2: BFLSandbox) -> None:
    bfl.faults.push(Fault.insufficient_credits())
    sleeps = Sleeps()
    async with make_router(one_model(bfl), one_model(bfl2, "bfl-backup"), sleep=sleeps) as router:
        result = await router.agenerate("a cat")
    assert result.attempts[0].error == InsufficientCredits.__name__ and result.attempts[0].status_code == 402
    assert result.provider == "bfl-backup" and sleeps.waits == []


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_keys_are_authentication_errors_without_the_key(bfl: BFLSandbox, status: int) -> None:
    if status == 401:
        bfl.faults.push(Fault.auth())
        bad = one_model(bfl)
    else:
        bad = provider(bfl, api_key="key-wrong-0123456789abcdef", models=("flux-pro-1.1",))
    async with make_router(bad) as router:
        with pytest.raises(AuthenticationError) as info:
            await router.agenerate("a cat")
    assert info.value.status_code == status and "0123456789" not in str(info.value) and KEY not in str(info.value)


@pytest.mark.parametrize("status", [400, 422])
async def test_a_refused_request_falls_back_to_the_next_candidate(bfl: BFLSandbox, bfl2: BFLSandbox,
                                                                  status: int) -> None:
    bfl.faults.push(Fault("invalid_request", status=status, param="width", message="bad width"))
    sleeps = Sleeps()
    async with make_router(one_model(bfl), one_model(bfl2, "bfl-backup"), sleep=sleeps) as router:
        result = await router.agenerate("a cat")
    first = result.attempts[0]
    assert (first.provider, first.error, first.status_code) == ("bfl", "InvalidRequestError", status)
    assert "width" in (first.message or "") and "bad width" in (first.message or "")
    assert result.provider == "bfl-backup" and sleeps.waits == [] and bfl.hits(TXT) == 1  # not retried
    assert first.cost_usd == 0 and result.cost.actual_usd == Decimal("0.04") == bfl2.billed_usd


async def test_sandbox_validation_422_reaches_the_caller_in_the_attempt_trail(bfl: BFLSandbox) -> None:
    async with make_router(one_model(bfl)) as router:
        with pytest.raises(AllProvidersFailed) as info:
            await router.agenerate("a cat", provider_options={"bfl": {"safety_tolerance": 9}})
    [attempt] = info.value.attempts
    assert (attempt.error, attempt.status_code) == (InvalidRequestError.__name__, 422)
    assert "safety_tolerance" in (attempt.message or "") and "less than or equal to 6" in (attempt.message or "")
    assert bfl.submitted() == 0 and info.value.cost_usd == 0


@pytest.mark.parametrize("fault", [Fault.malformed(), Fault.malformed(b'{"id": 5}'), Fault.malformed(b"[1]")])
async def test_malformed_bodies_fall_back(bfl: BFLSandbox, bfl2: BFLSandbox, fault: Fault) -> None:
    bfl.faults.push(fault)
    async with make_router(one_model(bfl), one_model(bfl2, "bfl-backup")) as router:
        result = await router.agenerate("a cat")
    assert result.attempts[0].error == "MalformedResponse" and result.provider == "bfl-backup"


async def test_a_malformed_poll_answer_is_malformed(bfl: BFLSandbox) -> None:
    bfl.faults.push(Fault.malformed(b'{"status": "Ready", "result": {"seed": 1}}'), path="/v1/get_result")
    async with make_router(one_model(bfl), max_retries=0) as router:
        with pytest.raises(Exception) as info:
            await router.agenerate("a cat")
    assert [a.error for a in info.value.attempts] == ["MalformedResponse"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["task_error", "task_not_found"])
async def test_failed_and_lost_tasks_are_unbilled_and_retried(bfl: BFLSandbox, kind: str) -> None:
    bfl.faults.push(Fault(kind))
    async with make_router(one_model(bfl)) as router:
        result = await router.agenerate("a cat")
    assert [(a.error, a.cost_usd) for a in result.attempts] == [("ProviderUnavailable", 0), (None, Decimal("0.04"))]
    # nothing is billed for a task that never got Ready (help.bfl.ai: only status Ready consumes credits)
    assert bfl.submitted() == 2 and bfl.billed_usd == Decimal("0.04") == result.cost.actual_usd


async def test_an_expired_sample_is_billed_and_never_paid_twice(bfl: BFLSandbox) -> None:
    bfl.faults.push(Fault("expired_output"))
    async with make_router(one_model(bfl)) as router:
        with pytest.raises(AllProvidersFailed) as info:
            await router.agenerate("a cat")
    assert [(a.error, a.cost_usd) for a in info.value.attempts] == [("ProviderUnavailable", Decimal("0.04"))]
    downloads = [r.status for r in bfl.requests if r.path == SAMPLE_PATH]
    assert downloads == [403, 403, 403, 403]  # four tries, each with the URL a fresh poll gave
    assert bfl.submitted() == 1 and info.value.cost_usd == Decimal("0.04") == bfl.billed_usd


async def test_a_polling_url_off_the_api_hosts_never_gets_the_key(bfl: BFLSandbox, bfl2: BFLSandbox) -> None:
    bfl.faults.push(Fault.malformed(b'{"id": "t1", "polling_url": "' + bfl2.base_url.encode() +
                                    b'/v1/get_result?id=t1"}'))
    async with make_router(one_model(bfl), max_retries=0) as router:
        with pytest.raises(Exception) as info:
            await router.agenerate("a cat")
    assert [a.error for a in info.value.attempts] == ["MalformedResponse"]  # type: ignore[attr-defined]
    assert bfl2.hits() == 0


async def test_timeout_is_provider_timeout_then_retried(bfl: BFLSandbox) -> None:
    bfl.faults.push(Fault.timeout(seconds=3.0))
    async with make_router(one_model(bfl), attempt_timeout_s=0.5) as router:
        result = await router.agenerate("a cat")
    assert [a.error for a in result.attempts] == ["ProviderTimeout", None]


async def test_a_task_that_stays_pending_times_out(bfl: BFLSandbox) -> None:
    bfl.pending_polls = 10_000
    async with make_router(one_model(bfl), attempt_timeout_s=0.3, max_retries=0) as router:
        with pytest.raises(Exception) as info:
            await router.agenerate("a cat")
    assert [a.error for a in info.value.attempts] == ["ProviderTimeout"]  # type: ignore[attr-defined]


# --- regions ---------------------------------------------------------------------------------


async def test_eu_residency_goes_only_to_the_eu_host(bfl: BFLSandbox, bfl2: BFLSandbox) -> None:
    p = provider(bfl, region_base_urls={"eu": bfl2.base_url})
    assert p.capabilities("flux-pro-1.1").regions == {"global", "eu"}
    async with make_router(p) as router:
        result = await router.agenerate("a cat", model="flux-pro-1.1", residency={"eu"})
        assert result.provider == "bfl" and bfl.hits() == 0
        assert bfl2.hits(TXT) == 1 and all(r.path != TXT for r in bfl.requests)
        assert bfl2.requests[-1].path == SAMPLE_PATH
        await router.agenerate("a cat", model="flux-pro-1.1")
        assert bfl.hits(TXT) == 1 and bfl2.hits(TXT) == 1


async def test_a_region_without_a_host_is_no_route_naming_the_regions(bfl: BFLSandbox, bfl2: BFLSandbox) -> None:
    p = provider(bfl, region_base_urls={"eu": bfl2.base_url})
    async with make_router(p) as router:
        with pytest.raises(NoRouteError) as info:
            await router.agenerate("a cat", residency={"jp"})
    residency = [r for r in info.value.rejections if r.code == "residency"]
    assert {r.model for r in residency} == {"flux-pro-1.1", "flux-kontext-pro", "flux-pro-1.1-ultra", "flux-2-pro"}
    assert all("eu, global" in r.reason and "jp" in r.reason for r in residency)
    assert "eu, global" in str(info.value)
    assert bfl.hits() == 0 and bfl2.hits() == 0


def test_default_regions_are_the_three_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BFL_BASE_URL", raising=False)
    p = BFLProvider(api_key="k")
    assert p.capabilities("flux-pro-1.1").regions == {"global", "eu", "us"}
    with pytest.raises(ValueError):
        BFLProvider(api_key="k", region_base_urls={"jp": "http://127.0.0.1:1"})


def test_a_missing_key_is_a_configuration_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BFL_API_KEY", raising=False)
    assert BFLProvider().configuration_problem() == "not configured: set BFL_API_KEY"
    monkeypatch.setenv("BFL_API_KEY", "from-env")
    assert BFLProvider().configuration_problem() is None


# --- the sandbox itself --------------------------------------------------------------------------


def test_sandbox_is_strict_about_fields_sizes_and_keys(bfl: BFLSandbox) -> None:
    url = bfl.base_url + TXT
    with httpx.Client(headers={"x-key": KEY}) as client:
        for body, loc, kind in (
            ({"prompt": "x", "steps": 20}, "steps", "extra_forbidden"),
            ({"prompt": "x", "width": 1008, "height": 1024}, "width", "multiple_of"),  # FluxPro11Inputs: of 32
            ({"prompt": "x", "width": 1024, "height": 1472}, "height", "less_than_equal"),  # maximum 1440
            ({"prompt": "x", "width": 224, "height": 1024}, "width", "greater_than_equal"),  # minimum 256
            ({"prompt": "x", "output_format": "webp"}, "output_format", "enum"),
        ):
            r = client.post(url, json=body)
            assert r.status_code == 422, body
            assert r.json()["detail"][0]["loc"] == ["body", loc] and r.json()["detail"][0]["type"] == kind
        assert client.post(bfl.base_url + "/v1/flux-pro-1.0-fill", json={"prompt": "x"}).status_code == 422
        assert client.post(bfl.base_url + "/v1/flux-kontext-pro", json={}).json()["detail"][0]["type"] == "missing"
        assert client.post(bfl.base_url + "/v1/no-such-model", json={"prompt": "x"}).json() == {"detail": "Not Found"}
        ok = client.post(url, json={"prompt": "x", "width": 1024, "height": 768})
        assert ok.status_code == 200 and ok.headers["x-request-id"]
        assert ok.json() | {"id": "", "polling_url": ""} == {"id": "", "polling_url": "", "cost": 4.0,
                                                             "input_mp": 0, "output_mp": 0.75}
        polled = client.get(ok.json()["polling_url"]).json()
        assert polled["status"] == "Pending" and polled["result"] is None and bfl.billed_usd == 0
        ready = client.get(ok.json()["polling_url"]).json()
        assert ready["status"] == "Ready" and set(ready["result"]) >= {"sample", "seed"}
        assert bfl.billed_usd == Decimal("0.04")  # billed once Ready, once
        client.get(ok.json()["polling_url"])
        assert bfl.billed_usd == Decimal("0.04")
        assert client.get(bfl.base_url + "/v1/get_result?id=nope").json() == {"id": "nope", "status": "Task not found"}
    assert httpx.post(url, json={"prompt": "x"}).status_code == 403
    assert httpx.post(url, json={"prompt": "x"}, headers={"x-key": "other"}).status_code == 403
    sample = ready["result"]["sample"]
    assert httpx.get(sample).status_code == 200
    assert httpx.get(sample.replace("sig=", "sig=0")).status_code == 403


def test_sandbox_samples_expire_after_their_ttl() -> None:
    with BFLSandbox(api_key=KEY, pending_polls=0, sample_ttl_s=-5) as sb, httpx.Client(headers={"x-key": KEY}) as c:
        sub = c.post(sb.base_url + TXT, json={"prompt": "x"}).json()
        sample = c.get(sub["polling_url"]).json()["result"]["sample"]
        r = httpx.get(sample)
    assert r.status_code == 403 and b"Signed expiry time has passed" in r.content
