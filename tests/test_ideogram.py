"""Ideogram end to end over real loopback HTTP through httpx: the router, the provider, the sandbox."""

from __future__ import annotations

import io
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from jsonschema import Draft202012Validator
from PIL import Image

from providers.ideogram import IdeogramProvider, image_weight
from providers.sandbox import Fault
from providers.sandbox.ideogram import MEDIA_PATH, IdeogramSandbox
from router import AllProvidersFailed, AuthenticationError, ContentPolicyError, InsufficientCredits, NoRouteError
from router.fetch import SafeFetcher
from router.ledger import Ledger
from tests.conftest import Sleeps, half_mask, make_router, png

KEY = "ideogram-sandbox-primary-key"
GEN = "/v1/ideogram-v3/generate"
SPEC = Path(__file__).resolve().parent / "specs" / "ideogram.openapi.yaml"


@pytest.fixture
def ideo() -> Iterator[IdeogramSandbox]:
    with IdeogramSandbox(api_key=KEY) as sb:
        yield sb


@pytest.fixture
def ideo2() -> Iterator[IdeogramSandbox]:
    with IdeogramSandbox(api_key=KEY) as sb:
        yield sb


def provider(sb: IdeogramSandbox, name: str = "ideogram", **kw: Any) -> IdeogramProvider:
    kw.setdefault("api_key", KEY)
    kw.setdefault("models", ("ideogram-v3",))
    return IdeogramProvider(name=name, base_url=sb.base_url, fetcher=SafeFetcher(allow_loopback=True),
                            download_backoff_s=0.01, **kw)


def sent(sb: IdeogramSandbox, path: str = GEN) -> dict[str, str]:
    return next(r.form for r in sb.requests if r.path == path)


# --- the three operations ---------------------------------------------------------------------


async def test_generate_sends_multipart_snaps_the_size_and_bills_per_image(ideo: IdeogramSandbox) -> None:
    ledger = Ledger(":memory:")
    async with make_router(provider(ideo), ledger=ledger) as router:
        result = await router.agenerate("a poster that says HELLO", width=1000, height=1000, seed=5,
                                        negative_prompt="blur",
                                        provider_options={"ideogram": {"magic_prompt": "OFF", "style_type": "DESIGN"}})
    request = next(r for r in ideo.requests if r.path == GEN)
    assert request.headers["api-key"] == "[REDACTED]"
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert request.form == {"prompt": "a poster that says HELLO", "rendering_speed": "DEFAULT", "num_images": "1",
                            "magic_prompt": "OFF", "style_type": "DESIGN", "seed": "5", "resolution": "1024x1024",
                            "negative_prompt": "blur"}
    image = result.images[0]
    assert (image.width, image.height, image.seed, image.mime) == (1024, 1024, 5, "image/png")
    assert any("1000x1000 adapted to 1024x1024" in w for w in result.warnings)
    assert result.cost.unit == "images" and result.cost.quantity == 1
    assert result.cost.actual_usd == Decimal("0.06") == ideo.billed_usd == ledger.spent()
    assert ideo.hits(MEDIA_PATH) == 1


async def test_n_is_one_call_with_num_images_and_consecutive_seeds(ideo: IdeogramSandbox) -> None:
    async with make_router(provider(ideo)) as router:
        result = await router.agenerate("a cat", n=3, seed=10, aspect_ratio="16:9")
    assert ideo.hits(GEN) == 1 and sent(ideo)["num_images"] == "3"
    assert [i.seed for i in result.images] == [10, 11, 12]
    # 16:9 on the ResolutionV3 list: the nearest shape is 1312x736
    assert {(i.width, i.height) for i in result.images} == {(1312, 736)} and sent(ideo)["resolution"] == "1312x736"
    assert result.cost.actual_usd == Decimal("0.18") == ideo.billed_usd


@pytest.mark.parametrize(("model", "speed", "usd"), [("ideogram-v3-turbo", "TURBO", "0.03"),
                                                       ("ideogram-v3-quality", "QUALITY", "0.09")])
async def test_each_model_is_a_rendering_speed_with_its_price(ideo: IdeogramSandbox, model: str, speed: str,
                                                             usd: str) -> None:
    async with make_router(provider(ideo, models=(model,))) as router:
        result = await router.agenerate("a cat", model=model)
    assert sent(ideo)["rendering_speed"] == speed
    assert result.cost.actual_usd == Decimal(usd) == ideo.billed_usd


async def test_inpaint_sends_a_black_edit_mask_at_the_image_size_and_keeps_the_rest(ideo: IdeogramSandbox) -> None:
    init = png(256, 192, (10, 200, 10))
    async with make_router(provider(ideo)) as router:
        result = await router.agenerate("a red door", init_image=init, mask_image=half_mask(64, 64), seed=3,
                                        negative_prompt="blur")
    path = "/v1/ideogram-v3/inpaint"
    request = next(r for r in ideo.requests if r.path == path)
    assert request.files["image"] == [init] and "resolution" not in request.form
    assert "negative_prompt" not in request.form
    mask = Image.open(io.BytesIO(request.files["mask"][0]))
    # the router's white = repaint mask, inverted: black marks the area to edit (Ideogram's polarity)
    assert mask.size == (256, 192) and mask.getpixel((10, 96)) == 0 and mask.getpixel((250, 96)) == 255
    # the answer comes back at the ResolutionV3 shape nearest the image's (4:3 → 1152x864), with a warning
    out = result.images[0].to_pil().convert("RGB")
    assert out.size == (1152, 864) and out.getpixel((1100, 432)) == (10, 200, 10)
    assert out.getpixel((40, 432)) != (10, 200, 10)
    assert any("256x192 adapted to 1152x864" in w for w in result.warnings)
    assert any("negative_prompt ignored" in w for w in result.warnings)
    assert result.cost.actual_usd == Decimal("0.06")


async def test_remix_uploads_the_image_and_sends_strength_as_image_weight(ideo: IdeogramSandbox) -> None:
    init = png(300, 200, (200, 30, 30))
    async with make_router(provider(ideo)) as router:
        result = await router.agenerate("make it blue", init_image=init, strength=0.3, aspect_ratio="3:2")
    request = next(r for r in ideo.requests if r.path == "/v1/ideogram-v3/remix")
    assert request.files["image"] == [init]
    assert request.form["image_weight"] == "70" and request.form["resolution"] == "1248x832"
    assert (result.images[0].width, result.images[0].height) == (1248, 832)
    assert image_weight(0.0) == 100 and image_weight(1.0) == 1


async def test_remix_without_a_size_keeps_the_image_shape(ideo: IdeogramSandbox) -> None:
    async with make_router(provider(ideo)) as router:
        result = await router.agenerate("make it blue", init_image=png(400, 300))
    assert sent(ideo, "/v1/ideogram-v3/remix")["resolution"] == "1152x864"
    assert not any("adapted" in w for w in result.warnings)
    assert (result.images[0].width, result.images[0].height) == (1152, 864)


async def test_eu_residency_never_routes_to_the_global_only_api(ideo: IdeogramSandbox) -> None:
    p = provider(ideo)
    assert p.capabilities("ideogram-v3").regions == {"global"}
    async with make_router(p) as router:
        with pytest.raises(NoRouteError) as info:
            await router.agenerate("a cat", residency={"eu"})
    assert [r.code for r in info.value.rejections] == ["residency"] and ideo.hits() == 0


async def test_requests_it_cannot_serve_are_rejected_at_routing(ideo: IdeogramSandbox) -> None:
    async with make_router(provider(ideo)) as router:
        with pytest.raises(NoRouteError) as info:
            await router.agenerate("x", controls=[{"kind": "canny", "image": png()}])
    assert "does not do control" in str(info.value) and ideo.hits() == 0


async def test_unknown_options_are_warned_about_and_not_sent(ideo: IdeogramSandbox) -> None:
    async with make_router(provider(ideo)) as router:
        result = await router.agenerate("a cat", idempotency_key="k1", provider_options={"ideogram": {"colour": "red"}})
    assert "colour" not in sent(ideo)
    assert any("ideogram.colour" in w for w in result.warnings) and any("idempotency_key" in w for w in result.warnings)


# --- errors ------------------------------------------------------------------------------------------


async def test_429_is_retried_after_the_wait_asked_for(ideo: IdeogramSandbox) -> None:
    ideo.faults.push(Fault.rate_limit(retry_after=3.0))
    sleeps = Sleeps()
    async with make_router(provider(ideo), sleep=sleeps) as router:
        result = await router.agenerate("a cat")
    assert sleeps.waits == [3.0] and [a.error for a in result.attempts] == ["RateLimited", None]
    assert ideo.hits(GEN) == 2 and result.cost.actual_usd == ideo.billed_usd


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_is_retried_then_falls_back(ideo: IdeogramSandbox, ideo2: IdeogramSandbox, status: int) -> None:
    ideo.faults.push(Fault.server_error(status), times=None)
    async with make_router(provider(ideo), provider(ideo2, "ideogram-backup"), max_retries=1) as router:
        result = await router.agenerate("a cat")
    assert [(a.provider, a.error, a.status_code) for a in result.attempts] == [
        ("ideogram", "ProviderUnavailable", status), ("ideogram", "ProviderUnavailable", status),
        ("ideogram-backup", None, None)]
    assert ideo.billed_usd == 0 and result.cost.actual_usd == ideo2.billed_usd


async def test_a_failed_safety_check_is_a_content_policy_error(ideo: IdeogramSandbox, ideo2: IdeogramSandbox) -> None:
    ideo.faults.push(Fault.moderation())
    async with make_router(provider(ideo), provider(ideo2, "ideogram-backup")) as router:
        with pytest.raises(ContentPolicyError) as info:
            await router.agenerate("something refused")
    assert info.value.status_code == 422 and "safety check" in str(info.value) and ideo2.hits() == 0


async def test_insufficient_credits_falls_back_at_once(ideo: IdeogramSandbox, ideo2: IdeogramSandbox) -> None:
    ideo.faults.push(Fault.insufficient_credits())
    sleeps = Sleeps()
    async with make_router(provider(ideo), provider(ideo2, "ideogram-backup"), sleep=sleeps) as router:
        result = await router.agenerate("a cat")
    assert result.attempts[0].error == InsufficientCredits.__name__ and result.provider == "ideogram-backup"
    assert sleeps.waits == []


async def test_a_refused_key_is_an_authentication_error_without_the_key(ideo: IdeogramSandbox) -> None:
    async with make_router(provider(ideo, api_key="wrong-key-0123456789abcdef")) as router:
        with pytest.raises(AuthenticationError) as info:
            await router.agenerate("a cat")
    assert info.value.status_code == 401 and "0123456789" not in str(info.value) and KEY not in repr(info.value)


async def test_invalid_input_falls_back_without_retry(ideo: IdeogramSandbox, ideo2: IdeogramSandbox) -> None:
    async with make_router(provider(ideo), provider(ideo2, "ideogram-backup")) as router:
        result = await router.agenerate("a cat", provider_options={"ideogram": {"style_type": "ANIME"}})
    first = result.attempts[0]
    assert (first.error, first.status_code) == ("InvalidRequestError", 400) and "style_type" in (first.message or "")
    assert result.provider == "ideogram-backup" and ideo.hits(GEN) == 1


async def test_malformed_answers_fall_back(ideo: IdeogramSandbox, ideo2: IdeogramSandbox) -> None:
    ideo.faults.push(Fault.malformed())
    async with make_router(provider(ideo), provider(ideo2, "ideogram-backup")) as router:
        result = await router.agenerate("a cat")
    assert result.attempts[0].error == "MalformedResponse" and result.provider == "ideogram-backup"


async def test_an_unsafe_image_is_dropped_with_a_warning_and_still_billed(ideo: IdeogramSandbox) -> None:
    ideo.faults.push(Fault("unsafe_image"))
    async with make_router(provider(ideo)) as router:
        result = await router.agenerate("a cat", n=2)
    assert len(result.images) == 1 and any("1 of 2 images failed" in w for w in result.warnings)
    assert result.cost.quantity == 2 and result.cost.actual_usd == Decimal("0.12") == ideo.billed_usd


async def test_an_answer_with_only_unsafe_images_is_a_billed_content_policy_error(ideo: IdeogramSandbox) -> None:
    ideo.faults.push(Fault("unsafe_image"))
    ledger = Ledger(":memory:")
    async with make_router(provider(ideo), ledger=ledger) as router:
        with pytest.raises(ContentPolicyError):
            await router.agenerate("a cat")
    assert ledger.spent() == ideo.billed_usd == Decimal("0.06")


# --- paid outputs ------------------------------------------------------------------------------------


async def test_a_failed_download_is_downloaded_again_not_regenerated(ideo: IdeogramSandbox) -> None:
    ideo.faults.push(Fault.server_error(503), times=2, path=MEDIA_PATH)
    async with make_router(provider(ideo)) as router:
        result = await router.agenerate("a cat")
    assert [r.status for r in ideo.requests if r.path == MEDIA_PATH] == [503, 503, 200]
    assert ideo.hits(GEN) == 1 and result.cost.actual_usd == Decimal("0.06") == ideo.billed_usd


async def test_an_image_that_never_downloads_is_charged_and_falls_back(ideo: IdeogramSandbox,
                                                                      ideo2: IdeogramSandbox) -> None:
    ideo.faults.push(Fault.server_error(503), times=None, path=MEDIA_PATH)
    ledger = Ledger(":memory:")
    async with make_router(provider(ideo), provider(ideo2, "ideogram-backup"), ledger=ledger) as router:
        result = await router.agenerate("a cat")
    assert [(a.provider, a.error, a.cost_usd) for a in result.attempts] == [
        ("ideogram", "ProviderUnavailable", Decimal("0.06")), ("ideogram-backup", None, Decimal("0.06"))]
    assert ideo.hits(GEN) == 1 and ledger.spent() == ideo.billed_usd + ideo2.billed_usd == Decimal("0.12")


@pytest.mark.parametrize("kind", ["bomb_image", "truncated_image", "wrong_format_image", "huge_image"])
async def test_a_hostile_image_is_a_charged_malformed_response(ideo: IdeogramSandbox, kind: str) -> None:
    ideo.faults.push(Fault.hostile_image(kind))
    async with make_router(provider(ideo), max_retries=0) as router:
        with pytest.raises(AllProvidersFailed) as info:
            await router.agenerate("a cat")
    assert [(a.error, a.cost_usd) for a in info.value.attempts] == [("MalformedResponse", Decimal("0.06"))]


async def test_a_slow_answer_is_a_provider_timeout(ideo: IdeogramSandbox) -> None:
    ideo.faults.push(Fault.timeout(seconds=3.0))
    async with make_router(provider(ideo), attempt_timeout_s=0.5) as router:
        result = await router.agenerate("a cat")
    assert [a.error for a in result.attempts] == ["ProviderTimeout", None]


def test_a_missing_key_is_a_configuration_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDEOGRAM_API_KEY", raising=False)
    assert IdeogramProvider().configuration_problem() == "not configured: set IDEOGRAM_API_KEY"
    monkeypatch.setenv("IDEOGRAM_API_KEY", "from-env")
    assert IdeogramProvider().configuration_problem() is None


# --- the sandbox against the vendored reference -------------------------------------------------------


def _response_schema(path: str) -> Draft202012Validator:
    spec = yaml.safe_load(SPEC.read_text())
    schema = spec["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    return Draft202012Validator({**schema, "components": spec["components"]})


def test_sandbox_answers_match_the_reference_and_refuse_what_it_refuses(ideo: IdeogramSandbox) -> None:
    headers = {"Api-Key": KEY}
    with httpx.Client(headers=headers) as client:
        def post(path: str, fields: dict[str, str], files: dict[str, bytes] | None = None) -> httpx.Response:
            parts: list[Any] = [(k, (None, v)) for k, v in fields.items()]
            parts += [(k, (f"{k}.png", v, "image/png")) for k, v in (files or {}).items()]
            return client.post(ideo.base_url + path, files=parts)

        for path, files in ((GEN, None), ("/v1/ideogram-v3/remix", {"image": png(64, 64)}),
                            ("/v1/ideogram-v3/inpaint", {"image": png(64, 64), "mask": half_mask(64, 64)})):
            ok = post(path, {"prompt": "x", "num_images": "2"}, files)
            assert ok.status_code == 200, ok.text
            errors = list(_response_schema(path).iter_errors(ok.json()))
            assert errors == [], errors
        for fields, files, needle in (
            ({"prompt": "x", "num_images": "9"}, None, "num_images"),
            ({"prompt": "x", "resolution": "1000x1000"}, None, "resolution"),
            ({"prompt": "x", "resolution": "1024x1024", "aspect_ratio": "1x1"}, None, "conjunction"),
            ({"prompt": "x", "rendering_speed": "FAST"}, None, "rendering_speed"),
            ({"prompt": "x", "seed": "2147483648"}, None, "seed"),
            ({"prompt": "x", "width": "512"}, None, "width"),
            ({"num_images": "1"}, None, "prompt"),
        ):
            bad = post(GEN, fields, files)
            assert bad.status_code == 400 and needle in bad.json()["error"], fields
        assert post("/v1/ideogram-v3/inpaint", {"prompt": "x"}, {"image": png(64, 64),
                                                                   "mask": half_mask(32, 32)}).status_code == 400
        assert post("/v1/ideogram-v3/remix", {"prompt": "x"}).status_code == 400
        assert client.post(ideo.base_url + GEN, data={"prompt": "x"}).status_code == 400  # urlencoded: refused
    assert httpx.post(ideo.base_url + GEN, files=[("prompt", (None, "x"))]).status_code == 401
