"""Stability AI (REST v2beta over httpx) end to end, over real HTTP to the loopback sandbox."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from decimal import Decimal

import httpx
import pytest
from PIL import Image

from providers.sandbox._server import Fault
from providers.sandbox.stability import StabilitySandbox
from providers.stability import StabilityProvider
from router import (
    AllProvidersFailed,
    AuthenticationError,
    ContentPolicyError,
    ImageRequest,
    NoRouteError,
)
from router.fetch import SafeFetcher
from tests.conftest import Sleeps, half_mask, make_router, png

GEN = "/v2beta/stable-image/generate"


def provider(server: StabilitySandbox, *models: str, name: str = "stability") -> StabilityProvider:
    return StabilityProvider(name=name, api_key=server.api_key, base_url=server.base_url,
                             models=models or ("stable-image-core",), fetcher=SafeFetcher(allow_loopback=True),
                             poll_interval_s=0.01)



def mask_rgba(width: int, height: int) -> bytes:
    """OpenAI's polarity: transparent (alpha 0) on the left half = repaint."""
    img = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- txt2img --------------------------------------------------------------------------------


async def test_core_txt2img_maps_fields_echoes_the_seed_and_bills_credits(sb: StabilitySandbox) -> None:
    async with make_router(provider(sb)) as router:
        result = await router.agenerate("a lighthouse at dusk", aspect_ratio="16:9", negative_prompt="blurry",
                                        seed=42, output_format="webp")
    req = sb.requests[-1]
    assert req.path == f"{GEN}/core" and req.headers["authorization"] == "[REDACTED]"
    assert req.headers["content-type"].startswith("multipart/form-data") and req.headers["accept"] == "image/*"
    assert req.form == {"prompt": "a lighthouse at dusk", "negative_prompt": "blurry", "seed": "42",
                        "aspect_ratio": "16:9", "output_format": "webp"}
    image = result.images[0]
    assert (image.width, image.height, image.mime, image.seed, image.nsfw) == (1344, 768, "image/webp", 42, False)
    assert result.warnings == [] or not any("aspect" in w for w in result.warnings)
    assert result.cost.unit == "credits" and result.cost.quantity == Decimal(3)
    assert result.cost.actual_usd == Decimal("0.03") == Decimal(3) * Decimal("0.01")


async def test_unlisted_shapes_snap_to_a_documented_ratio_with_a_warning(sb: StabilitySandbox) -> None:
    async with make_router(provider(sb, "stable-image-ultra")) as router:
        by_ratio = await router.agenerate("a cat", aspect_ratio="4:3")
        by_size = await router.agenerate("a cat", width=1000, height=1000)
        exact = router.route("a cat", width=1000, height=1000, size_mode="exact")
    sent = [r.form["aspect_ratio"] for r in sb.requests]
    assert sent[0] in ("5:4", "3:2") and sent[1] == "1:1"
    assert any("aspect ratio 4:3 adapted" in w for w in by_ratio.warnings)
    assert any("size 1000x1000 adapted to 1024x1024" in w for w in by_size.warnings)
    assert (by_size.images[0].width, by_size.images[0].height) == (1024, 1024)
    assert by_ratio.cost.actual_usd == Decimal("0.08")  # ultra: 8 credits
    assert not exact.chain and "cannot make the exact size" in exact.explain()


async def test_n_fans_out_parallel_calls_with_consecutive_seeds(sb: StabilitySandbox) -> None:
    async with make_router(provider(sb, "sd3.5-large")) as router:
        result = await router.agenerate("a red fox", n=3, seed=100, guidance_scale=5.0)
    assert sb.hits(f"{GEN}/sd3") == 3
    assert sorted(int(r.form["seed"]) for r in sb.requests) == [100, 101, 102]
    assert all(r.form["model"] == "sd3.5-large" and r.form["cfg_scale"] == "5" for r in sb.requests)
    assert [i.seed for i in result.images] == [100, 101, 102]
    assert result.cost.actual_usd == 3 * Decimal("6.5") * Decimal("0.01") == Decimal("0.195")
    assert result.cost.quantity == Decimal("19.5")


async def test_random_seed_is_echoed_from_the_seed_header(sb: StabilitySandbox) -> None:
    async with make_router(provider(sb)) as router:
        result = await router.agenerate("a cat")
    assert "seed" not in sb.requests[-1].form
    assert result.images[0].seed is not None and 1 <= result.images[0].seed <= 4_294_967_294


async def test_content_filtered_is_an_nsfw_flag_not_an_error(sb: StabilitySandbox) -> None:
    sb.faults.push(Fault("content_filtered"))
    async with make_router(provider(sb)) as router:
        result = await router.agenerate("something borderline", n=2)
    assert sorted(i.nsfw for i in result.images) == [False, True]
    assert [a.outcome for a in result.attempts] == ["success"]
    assert result.cost.actual_usd == Decimal("0.06")


async def test_sd3_webp_falls_back_to_png_with_a_warning(sb: StabilitySandbox) -> None:
    async with make_router(provider(sb, "sd3.5-flash")) as router:
        result = await router.agenerate("a cat", output_format="webp")
    assert sb.requests[-1].form["output_format"] == "png" and result.images[0].mime == "image/png"
    assert any("output_format webp not offered" in w for w in result.warnings)
    assert result.cost.actual_usd == Decimal("0.025")


# --- img2img, inpaint, control, upscale ---------------------------------------------------------


async def test_sd3_img2img_sends_mode_image_and_strength(sb: StabilitySandbox) -> None:
    init = png(832, 1216, (10, 200, 10))
    async with make_router(provider(sb, "sd3.5-medium")) as router:
        result = await router.agenerate("make it autumn", init_image=init, strength=0.35, seed=5)
    req = sb.requests[-1]
    assert req.form["mode"] == "image-to-image" and req.form["strength"] == "0.35"
    assert "aspect_ratio" not in req.form and req.files["image"] == [init]
    assert (result.images[0].width, result.images[0].height) == (832, 1216)
    assert result.cost.actual_usd == Decimal("0.035")


async def test_core_rejects_img2img_at_routing(sb: StabilitySandbox) -> None:
    async with make_router(provider(sb)) as router:
        decision = router.route("x", init_image=png(), strength=0.5)
        with pytest.raises(NoRouteError):
            await router.agenerate("x", init_image=png(), strength=0.5)
    assert not decision.chain and "does not do img2img" in decision.explain()
    assert sb.hits() == 0


@pytest.mark.parametrize("mask", [half_mask(256, 256), mask_rgba(128, 128)], ids=["white", "alpha-resized"])
async def test_inpaint_sends_a_white_repaint_mask_at_the_image_size(sb: StabilitySandbox, mask: bytes) -> None:
    init = png(256, 256, (10, 200, 10))
    async with make_router(provider(sb, "stable-image-inpaint")) as router:
        result = await router.agenerate("a red door", init_image=init, mask_image=mask,
                                        provider_options={"stability": {"grow_mask": 0}})
    req = sb.requests[-1]
    assert req.path == "/v2beta/stable-image/edit/inpaint" and req.form["grow_mask"] == "0"
    sent = Image.open(io.BytesIO(req.files["mask"][0]))
    assert sent.mode == "L" and sent.size == (256, 256)
    assert sent.getpixel((10, 128)) == 255 and sent.getpixel((250, 128)) == 0  # white = repaint
    out = result.images[0].to_pil().convert("RGB")
    assert out.getpixel((250, 128)) == (10, 200, 10) and out.getpixel((10, 128)) != (10, 200, 10)
    assert result.cost.actual_usd == Decimal("0.05")


@pytest.mark.parametrize(("kind", "endpoint", "approximate"), [
    ("scribble", "sketch", False), ("lineart", "sketch", False), ("depth", "structure", True),
    ("canny", "structure", True), ("softedge", "sketch", True), ("seg", "structure", True),
])
async def test_controls_map_to_sketch_or_structure(sb: StabilitySandbox, kind: str, endpoint: str,
                                                   approximate: bool) -> None:
    control = png(512, 768, (255, 255, 255))
    async with make_router(provider(sb, "stable-image-control")) as router:
        result = await router.agenerate(ImageRequest(prompt="a castle", controls=[
            {"kind": kind, "image": control, "scale": 0.4}]))
    req = sb.requests[-1]
    assert req.path == f"/v2beta/stable-image/control/{endpoint}"
    assert req.form["control_strength"] == "0.4" and req.files["image"] == [control]
    assert (result.images[0].width, result.images[0].height) == (512, 768)
    assert any("approximated" in w for w in result.warnings) == approximate
    assert result.cost.actual_usd == Decimal("0.03")


async def test_unsupported_control_and_lora_are_rejected_at_routing(sb: StabilitySandbox) -> None:
    async with make_router(provider(sb, "stable-image-control", "stable-image-core")) as router:
        pose = router.route(ImageRequest(prompt="x", controls=[{"kind": "pose", "image": png()}]))
        lora = router.route(ImageRequest(prompt="x", loras=[{"ref": "some/lora"}]))
    assert not pose.chain and "no ControlNet for pose" in pose.explain()
    assert not lora.chain and "takes no LoRA" in lora.explain()


async def test_fast_upscale_is_sync_and_4x(sb: StabilitySandbox) -> None:
    init = png(200, 100)
    async with make_router(provider(sb, "stable-image-upscale-fast")) as router:
        result = await router.agenerate(ImageRequest(prompt="", init_image=init, upscale=4))
    req = sb.requests[-1]
    assert req.path == "/v2beta/stable-image/upscale/fast" and "prompt" not in req.form
    assert (result.images[0].width, result.images[0].height) == (800, 400) and result.warnings == []
    assert result.cost.actual_usd == Decimal("0.02")


async def test_conservative_upscale_is_sync(sb: StabilitySandbox) -> None:
    async with make_router(provider(sb, "stable-image-upscale-conservative")) as router:
        result = await router.agenerate(ImageRequest(prompt="a photo", init_image=png(512, 512), upscale=4))
    assert sb.requests[-1].path == "/v2beta/stable-image/upscale/conservative"
    assert (result.images[0].width, result.images[0].height) == (2048, 2048)
    assert result.cost.actual_usd == Decimal("0.40")


async def test_creative_upscale_polls_results_until_done(sb: StabilitySandbox) -> None:
    sb.job_polls = 3
    async with make_router(provider(sb, "stable-image-upscale-creative")) as router:
        result = await router.agenerate(ImageRequest(prompt="a photo", init_image=png(256, 256), upscale=8, seed=9,
                                                     provider_options={"stability": {"creativity": 0.3}}))
    paths = [(r.method, r.path.rsplit("/", 1)[0], r.status) for r in sb.requests]
    assert paths == [("POST", "/v2beta/stable-image/upscale", 200)] + [("GET", "/v2beta/results", 202)] * 3 + [
        ("GET", "/v2beta/results", 200)]
    assert sb.requests[0].form["creativity"] == "0.3"
    assert (result.images[0].width, result.images[0].height) == (2048, 2048) and result.images[0].seed == 9
    assert result.cost.actual_usd == Decimal("0.60")


async def test_creative_upscale_unfinished_within_the_timeout_is_a_timeout(sb: StabilitySandbox) -> None:
    sb.job_polls = 10_000
    async with make_router(provider(sb, "stable-image-upscale-creative"), attempt_timeout_s=0.3,
                           max_retries=0) as router:
        with pytest.raises((AllProvidersFailed, NoRouteError)) as info:
            await router.agenerate(ImageRequest(prompt="a photo", init_image=png(256, 256), upscale=4))
    assert info.value.attempts[0].error == "ProviderTimeout"


# --- errors --------------------------------------------------------------------------------------


async def test_429_with_retry_after_is_retried_after_that_wait(sb: StabilitySandbox) -> None:
    sb.faults.push(Fault.rate_limit(retry_after=3.0))
    sleeps = Sleeps()
    async with make_router(provider(sb), sleep=sleeps) as router:
        result = await router.agenerate("a cat")
    assert sleeps.waits == [3.0]
    assert [(a.error, a.status_code) for a in result.attempts] == [("RateLimited", 429), (None, None)]


async def test_5xx_is_retried_then_falls_back(sb: StabilitySandbox, sb2: StabilitySandbox) -> None:
    sb.faults.push(Fault.server_error(500), times=None)
    router = make_router(provider(sb), provider(sb2, name="stability-backup"), max_retries=1)
    async with router:
        result = await router.agenerate("a cat")
    assert result.provider == "stability-backup"
    assert [a.error for a in result.attempts] == ["ProviderUnavailable", "ProviderUnavailable", None]


async def test_moderation_403_is_a_content_policy_error(sb: StabilitySandbox, sb2: StabilitySandbox) -> None:
    sb.faults.push(Fault.moderation())
    async with make_router(provider(sb), provider(sb2, name="stability-backup")) as router:
        with pytest.raises(ContentPolicyError) as info:
            await router.agenerate("refused")
    assert info.value.status_code == 403 and info.value.code == "content_moderation" and sb2.hits() == 0


async def test_402_insufficient_credits_falls_back_at_once(sb: StabilitySandbox, sb2: StabilitySandbox) -> None:
    sb.faults.push(Fault.insufficient_credits())
    sleeps = Sleeps()
    async with make_router(provider(sb), provider(sb2, name="stability-backup"), sleep=sleeps) as router:
        result = await router.agenerate("a cat")
    assert result.provider == "stability-backup" and sleeps.waits == []
    assert (result.attempts[0].error, result.attempts[0].status_code) == ("InsufficientCredits", 402)


async def test_401_is_an_authentication_error_without_the_key(sb: StabilitySandbox,
                                                              sb2: StabilitySandbox) -> None:
    wrong = StabilityProvider(api_key="sk-wrong-key-0123456789", base_url=sb.base_url, models=("stable-image-core",))
    async with make_router(wrong, provider(sb2, name="stability-backup")) as router:
        with pytest.raises(AuthenticationError) as info:
            await router.agenerate("a cat")
    assert "sk-wrong-key-0123456789" not in str(info.value) and sb2.hits() == 0


@pytest.mark.parametrize("status", [400, 404, 413, 422])
async def test_a_4xx_answer_falls_back_to_the_next_candidate(sb: StabilitySandbox, sb2: StabilitySandbox,
                                                             status: int) -> None:
    sb.faults.push(Fault("invalid_request", status=status, param="prompt"))
    async with make_router(provider(sb), provider(sb2, name="stability-backup")) as router:
        result = await router.agenerate("a cat")
    assert result.provider == "stability-backup"
    assert [(a.provider, a.error, a.status_code, a.cost_usd) for a in result.attempts] == [
        ("stability", "InvalidRequestError", status, 0), ("stability-backup", None, None, Decimal("0.03"))]
    assert sb.hits() == 1 and sb2.hits() == 1 and sb.billed_usd == 0


@pytest.mark.parametrize("status", [408, 409])
async def test_408_and_409_are_retried_not_refused(sb: StabilitySandbox, status: int) -> None:
    # RFC 9110 §15.5.9 / §15.5.10: transient answers, retried like 429 and 5xx (this adapter once took
    # them for a fatal invalid request).
    sb.faults.push(Fault("invalid_request", status=status))
    async with make_router(provider(sb), rng=lambda: 1.0) as router:
        result = await router.agenerate("a cat")
    assert [(a.error, a.status_code, a.retry) for a in result.attempts] == [("RateLimited", status, 0),
                                                                           (None, None, 1)]
    assert sb.hits() == 2 and result.cost.actual_usd == sb.billed_usd == Decimal("0.03")


async def test_malformed_image_falls_back(sb: StabilitySandbox, sb2: StabilitySandbox) -> None:
    sb.faults.push(Fault.malformed())
    async with make_router(provider(sb), provider(sb2, name="stability-backup")) as router:
        result = await router.agenerate("a cat")
    assert result.attempts[0].error == "MalformedResponse" and result.provider == "stability-backup"


async def test_timeout_is_retried(sb: StabilitySandbox) -> None:
    sb.faults.push(Fault.timeout(seconds=3.0))
    async with make_router(provider(sb), attempt_timeout_s=0.5) as router:
        result = await router.agenerate("a cat")
    assert [a.error for a in result.attempts] == ["ProviderTimeout", None]


async def test_provider_timeout_from_httpx_directly(sb: StabilitySandbox) -> None:
    from router import ProviderTimeout

    sb.faults.push(Fault.timeout(seconds=2.0))
    prov = provider(sb)
    try:
        with pytest.raises(ProviderTimeout):
            await prov.generate(ImageRequest(prompt="a cat"), "stable-image-core", timeout_s=0.3)
    finally:
        await prov.aclose()


async def test_unverified_rates_are_overridable_from_a_policy(sb: StabilitySandbox) -> None:
    from policies.policy import policy_from_dict

    row = provider(sb).prices.get("stability", "stable-image-inpaint")
    assert row is not None and "UNVERIFIED" in row.source
    policy = policy_from_dict({"extends": "balanced", "prices": {"stability/stable-image-inpaint": {"credits": "3"}}})
    async with make_router(provider(sb, "stable-image-inpaint"), policy=policy) as router:
        result = await router.agenerate("a door", init_image=png(128, 128), mask_image=half_mask(128, 128))
    assert result.cost.actual_usd == Decimal("0.03") and result.cost.price_table_version.endswith("+local")


def test_missing_key_is_a_configuration_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STABILITY_API_KEY", raising=False)
    assert StabilityProvider().configuration_problem() == "not configured: set STABILITY_API_KEY"
    monkeypatch.setenv("STABILITY_API_KEY", "sk-env")
    assert StabilityProvider().configuration_problem() is None


# --- the sandbox's own strictness ------------------------------------------------------------------


def _post(server: StabilitySandbox, route: str, fields: Sequence[tuple[str, str]],
          files: dict[str, bytes] | None = None, accept: str = "image/*") -> httpx.Response:
    parts: list[tuple[str, tuple[str | None, bytes | str, str | None]]] = [(k, (None, v, None)) for k, v in fields]
    parts += [(k, (f"{k}.png", v, "image/png")) for k, v in (files or {}).items()]
    return httpx.post(f"{server.base_url}/v2beta/stable-image/{route}", files=parts, timeout=10,
                      headers={"authorization": f"Bearer {server.api_key}", "accept": accept})


def test_sandbox_rejects_unknown_and_invalid_fields_in_stabilitys_error_shape(sb: StabilitySandbox) -> None:
    cases = [
        ("generate/core", [("prompt", "x"), ("cfg_scale", "5")], None),
        ("generate/core", [("prompt", "x"), ("aspect_ratio", "4:3")], None),
        ("generate/core", [("prompt", "")], None),
        ("generate/sd3", [("prompt", "x"), ("model", "sd3.5-large"), ("seed", "4294967295")], None),
        ("generate/sd3", [("prompt", "x"), ("mode", "image-to-image")], None),
        ("generate/sd3", [("prompt", "x"), ("aspect_ratio", "1:1"), ("mode", "image-to-image"),
                          ("strength", "0.5")], {"image": png(256, 256)}),
        ("edit/inpaint", [("prompt", "x")], {"image": png(256, 256), "mask": png(128, 128)}),
        ("control/sketch", [("prompt", "x"), ("control_strength", "1.5")], {"image": png()}),
        ("upscale/fast", [("prompt", "x")], {"image": png()}),
    ]
    for route, fields, files in cases:
        response = _post(sb, route, fields, files)
        body = response.json()
        assert response.status_code == 400, (route, fields)
        assert set(body) == {"id", "name", "errors"} and body["name"] == "bad_request" and body["errors"]
    unauthorized = httpx.post(f"{sb.base_url}/v2beta/stable-image/generate/core", files={"prompt": (None, "x")})
    assert unauthorized.status_code == 401 and unauthorized.json()["name"] == "unauthorized"
    missing = httpx.get(f"{sb.base_url}/v2beta/results/nope", headers={"authorization": f"Bearer {sb.api_key}"})
    assert missing.status_code == 404 and missing.json()["name"] == "not_found"


def test_sandbox_answers_json_when_asked(sb: StabilitySandbox) -> None:
    response = _post(sb, "generate/core", [("prompt", "x"), ("seed", "7"), ("aspect_ratio", "9:21")],
                     accept="application/json")
    body = response.json()
    assert response.status_code == 200 and set(body) == {"image", "finish_reason", "seed"}
    assert body["finish_reason"] == "SUCCESS" and body["seed"] == 7
    import base64

    assert Image.open(io.BytesIO(base64.b64decode(body["image"]))).size == (640, 1536)
    raw = _post(sb, "generate/core", [("prompt", "x"), ("seed", "7")])
    assert raw.headers["finish-reason"] == "SUCCESS" and raw.headers["seed"] == "7"
    assert raw.headers["content-type"] == "image/png"


async def test_ultra_img2img_sends_image_and_strength_without_mode(sb: StabilitySandbox) -> None:
    init = png(512, 512, (10, 10, 200))
    async with make_router(provider(sb, "stable-image-ultra")) as router:
        result = await router.agenerate("a watercolour", init_image=init, strength=0.7,
                                        provider_options={"stability": {"style_preset": "anime", "grow_mask": 5}})
    req = sb.requests[-1]
    assert req.path == f"{GEN}/ultra" and "mode" not in req.form and req.form["strength"] == "0.7"
    assert req.form["style_preset"] == "anime" and "grow_mask" not in req.form
    assert any("grow_mask ignored" in w for w in result.warnings)
    assert (result.images[0].width, result.images[0].height) == (512, 512)


async def test_an_expired_async_result_is_a_provider_failure(sb: StabilitySandbox) -> None:
    from router import ProviderUnavailable

    sb.job_polls = 10_000
    prov = provider(sb, "stable-image-upscale-creative")
    request = ImageRequest(prompt="a photo", init_image=png(256, 256), upscale=4)

    async def expire_soon() -> None:
        while sb.hits() < 3:
            await asyncio.sleep(0.01)
        sb.expire_jobs()

    try:
        with pytest.raises(ProviderUnavailable) as info:
            await asyncio.gather(prov.generate(request, "stable-image-upscale-creative", timeout_s=10), expire_soon())
    finally:
        await prov.aclose()
    assert info.value.status_code == 404 and sb.requests[-1].status == 404
