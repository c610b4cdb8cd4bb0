"""Google (Imagen on Vertex AI, Gemini image models) end to end: the google-genai SDK over real loopback HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest
from google.oauth2.credentials import Credentials

from providers.bfl import BFLProvider
from providers.google import GoogleProvider, residency_of
from providers.sandbox import Fault
from providers.sandbox.bfl import BFLSandbox
from providers.sandbox.google import GoogleSandbox
from router import (
    AllProvidersFailed,
    AuthenticationError,
    ContentPolicyError,
    InsufficientCredits,
    NoRouteError,
    RateLimited,
)
from router.fetch import SafeFetcher
from router.ledger import Ledger
from tests.conftest import half_mask, make_router, png

KEY, TOKEN = "google-sandbox-key", "ya29.sandbox-token"
IMAGEN = "imagen-4.0-generate-001"
GEMINI = "gemini-2.5-flash-image"
pytestmark = pytest.mark.filterwarnings("ignore:The (generate_images|edit_image) method is deprecated")


@pytest.fixture
def sb() -> Iterator[GoogleSandbox]:
    with GoogleSandbox(api_key=KEY, access_token=TOKEN) as server:
        yield server


def vertex(sb: GoogleSandbox, *locations: str, name: str = "vertex", **kw: object) -> GoogleProvider:
    return GoogleProvider(name=name, project="proj-1", locations=locations or ("europe-west4",), base_url=sb.base_url,
                          credentials=Credentials(token=TOKEN), **kw)  # type: ignore[arg-type]


def gemini_api(sb: GoogleSandbox, key: str = KEY) -> GoogleProvider:
    return GoogleProvider(name="gemini", api_key=key, base_url=sb.base_url)


# --- capabilities, end to end --------------------------------------------------------------


async def test_imagen_txt2img_on_vertex_sends_ratio_and_operator_settings_and_bills_per_image(
    sb: GoogleSandbox,
) -> None:
    ledger = Ledger(":memory:")
    provider = vertex(sb, person_generation="dont_allow", safety_filter_level="block_only_high")
    async with make_router(provider, ledger=ledger) as router:
        result = await router.agenerate("a lighthouse", model=IMAGEN, n=3, aspect_ratio="9:16", output_format="jpeg",
                                        provider_options={"vertex": {"person_generation": "allow_all"}})
    sent = sb.requests[0]
    assert sent.path == f"/v1beta1/projects/proj-1/locations/europe-west4/publishers/google/models/{IMAGEN}:predict"
    assert sent.headers["authorization"] == "[REDACTED]"
    params = (sent.json or {})["parameters"]
    assert params["sampleCount"] == 3 and params["aspectRatio"] == "9:16"
    assert params["personGeneration"].lower() == "dont_allow"
    assert params["safetySetting"].lower() == "block_only_high"
    assert params["outputOptions"] == {"mimeType": "image/jpeg"}
    assert any("person_generation ignored" in w for w in result.warnings)  # a request cannot override the operator
    assert [(i.width, i.height, i.mime) for i in result.images] == [(768, 1408, "image/jpeg")] * 3
    assert result.cost.actual_usd == Decimal("0.12") == sb.billed_usd == ledger.spent()
    assert result.cost.details["watermark"] == "SynthID" and result.cost.details["location"] == "europe-west4"


async def test_imagen_images_note_synthid_in_their_provenance(sb: GoogleSandbox) -> None:
    from router.request import ImageRequest

    provider = vertex(sb)
    response = await provider.generate(ImageRequest(prompt="a cat"), IMAGEN, timeout_s=30)
    await provider.aclose()
    assert response.images[0].provenance == {"watermark": "SynthID"}


async def test_imagen_takes_a_seed_only_with_the_watermark_off(sb: GoogleSandbox) -> None:
    async with make_router(vertex(sb)) as router:
        marked = await router.agenerate("a cat", model=IMAGEN, seed=5)
    assert "seed" not in (sb.requests[-1].json or {})["parameters"]
    assert any("seed ignored" in w for w in marked.warnings)
    async with make_router(vertex(sb, add_watermark=False)) as router:
        plain = await router.agenerate("a cat", model=IMAGEN, seed=5)
    params = (sb.requests[-1].json or {})["parameters"]
    assert params["seed"] == 5 and params["addWatermark"] is False
    assert plain.images[0].seed == 5 and plain.cost.details["watermark"] is None


async def test_imagen_inpaint_sends_raw_image_and_white_is_edit_mask(sb: GoogleSandbox) -> None:
    async with make_router(vertex(sb, "us-central1")) as router:
        result = await router.agenerate("a red door", model="imagen-3.0-capability-001", init_image=png(160, 96),
                                        mask_image=half_mask(160, 96), negative_prompt="blur")
    instance = (sb.requests[0].json or {})["instances"][0]
    kinds = [r["referenceType"] for r in instance["referenceImages"]]
    assert kinds == ["REFERENCE_TYPE_RAW", "REFERENCE_TYPE_MASK"]
    assert instance["referenceImages"][1]["maskImageConfig"]["maskMode"] == "MASK_MODE_USER_PROVIDED"
    assert (sb.requests[0].json or {})["parameters"]["editMode"] == "EDIT_MODE_INPAINT_INSERTION"
    assert (result.images[0].width, result.images[0].height) == (160, 96)
    assert result.cost.actual_usd == Decimal("0.02") == sb.billed_usd


async def test_gemini_api_key_mode_makes_an_image_and_bills_usage_tokens(sb: GoogleSandbox) -> None:
    async with make_router(gemini_api(sb)) as router:
        result = await router.agenerate("a cat reading a newspaper", model=GEMINI, aspect_ratio="16:9")
    sent = sb.requests[0]
    assert sent.path == f"/v1/models/{GEMINI}:generateContent" and sent.headers["x-goog-api-key"] == "[REDACTED]"
    config = (sent.json or {})["generationConfig"]
    assert config["imageConfig"] == {"aspectRatio": "16:9"} and "IMAGE" in config["responseModalities"]
    assert (result.images[0].width, result.images[0].height) == (1344, 768)
    details = result.cost.details
    assert details["image_output_tokens"] == 1290 and details["location"] == "global"
    expected = (details["input_tokens"] * Decimal("0.30") + 1290 * Decimal("30")
                + details["text_output_tokens"] * Decimal("2.50")) / 1_000_000
    assert result.cost.actual_usd == expected == sb.billed_usd


async def test_gemini_takes_a_reference_image_and_fans_out_n(sb: GoogleSandbox) -> None:
    async with make_router(vertex(sb)) as router:
        result = await router.agenerate("make it winter", model=GEMINI, init_image=png(300, 200), n=2)
    assert sb.hits() == 2 and len(result.images) == 2
    parts = (sb.requests[0].json or {})["contents"][0]["parts"]
    inline = parts[1]["inlineData"]  # proto3 JSON: the SDK writes mime_type, which the API takes as mimeType
    assert parts[0] == {"text": "make it winter"} and inline.get("mimeType", inline.get("mime_type")) == "image/png"
    assert (result.images[0].width, result.images[0].height) == (1248, 832)  # the init image's 3:2
    assert result.cost.actual_usd == sb.billed_usd and result.cost.unit == "tokens"


def test_api_key_mode_offers_only_gemini_image_models() -> None:
    provider = GoogleProvider(api_key="k")
    assert list(provider.models()) == [GEMINI]
    assert provider.capabilities(GEMINI).regions == frozenset({"global"})
    with pytest.raises(ValueError, match="unknown Google models"):
        GoogleProvider(api_key="k", models=(IMAGEN,))


# --- residency -----------------------------------------------------------------------------


def test_locations_map_to_residency_codes() -> None:
    assert [residency_of(x) for x in ("europe-west4", "europe-west1", "eu", "us-central1", "us", "global",
                                       "asia-northeast1", "europe-west2")] == \
        ["eu", "eu", "eu", "us", "us", "global", "jp", "uk"]


async def test_eu_residency_routes_to_vertex_eu_location_never_a_global_endpoint(sb: GoogleSandbox) -> None:
    global_only = [gemini_api(sb), vertex(sb, "global", name="vertex-global")]
    eu = vertex(sb, "us-central1", "europe-west4", name="vertex-multi")
    async with make_router(*global_only, eu) as router:
        result = await router.agenerate("a cat", model=GEMINI, residency={"eu"})
    assert result.provider == "vertex-multi" and sb.served_locations == ["europe-west4"]
    assert all(r.path.startswith("/v1beta1/projects/proj-1/locations/europe-west4/") for r in sb.requests)


async def test_eu_residency_with_only_global_google_endpoints_has_no_route(sb: GoogleSandbox) -> None:
    async with make_router(gemini_api(sb), vertex(sb, "global", name="vertex-global")) as router:
        with pytest.raises(NoRouteError):
            await router.agenerate("a cat", model=GEMINI, residency={"eu"})
    assert sb.hits() == 0


async def test_eu_residency_widens_beyond_bfl_to_vertex_eu() -> None:
    with GoogleSandbox(api_key=KEY, access_token=TOKEN) as gsb, BFLSandbox(api_key="bfl-key") as bsb:
        bfl = BFLProvider(api_key="bfl-key", base_url=bsb.base_url, fetcher=SafeFetcher(allow_loopback=True),
                          poll_interval_s=0.01)  # base_url: its only region is "global"
        async with make_router(bfl, vertex(gsb, "europe-west4")) as router:
            result = await router.agenerate("a cat", residency={"eu"})
        assert result.provider == "vertex" and bsb.hits() == 0


# --- errors --------------------------------------------------------------------------------


async def test_imagen_all_filtered_is_a_content_policy_error_unbilled(sb: GoogleSandbox) -> None:
    provider = vertex(sb)
    sb.faults.push(Fault.moderation())
    async with make_router(provider) as router:
        with pytest.raises((ContentPolicyError, AllProvidersFailed)) as info:
            await router.agenerate("a cat", model=IMAGEN)
    assert isinstance(info.value, ContentPolicyError) or "ContentPolicyError" in str(info.value)
    assert sb.billed_usd == 0


async def test_imagen_partly_filtered_returns_the_rest_with_a_warning(sb: GoogleSandbox) -> None:
    sb.filter_next = 1
    async with make_router(vertex(sb)) as router:
        result = await router.agenerate("a cat", model=IMAGEN, n=3)
    assert len(result.images) == 2 and any("1 of 3 images filtered" in w for w in result.warnings)
    assert result.cost.actual_usd == Decimal("0.08") == sb.billed_usd


async def test_gemini_blocked_prompt_is_a_content_policy_error_carrying_its_input_bill(sb: GoogleSandbox) -> None:
    from router.request import ImageRequest

    provider = gemini_api(sb)
    sb.faults.push(Fault.moderation())
    with pytest.raises(ContentPolicyError) as info:
        await provider.generate(ImageRequest(prompt="something refused"), GEMINI, timeout_s=30)
    await provider.aclose()
    assert info.value.billed is not None and info.value.billed.cost_usd == sb.billed_usd > 0


@pytest.mark.parametrize(("fault", "kind"), [
    (Fault.rate_limit(retry_after=2.0), RateLimited),
    (Fault.insufficient_credits(), InsufficientCredits),
])
async def test_vendor_errors_map_to_router_errors(sb: GoogleSandbox, fault: Fault, kind: type[Exception]) -> None:
    from router.request import ImageRequest

    provider = vertex(sb)
    sb.faults.push(fault)
    with pytest.raises(kind) as info:
        await provider.generate(ImageRequest(prompt="a cat"), IMAGEN, timeout_s=30)
    await provider.aclose()
    assert sb.hits() == 1  # the SDK's own retries are off
    if isinstance(info.value, RateLimited):
        assert info.value.retry_after == 2.0


async def test_a_refused_api_key_is_an_authentication_error_without_the_key(sb: GoogleSandbox) -> None:
    from router.request import ImageRequest

    provider = gemini_api(sb, key="canary-wrong-key-123")
    with pytest.raises(AuthenticationError) as info:
        await provider.generate(ImageRequest(prompt="a cat"), GEMINI, timeout_s=30)
    await provider.aclose()
    assert "canary-wrong-key-123" not in repr(info.value) and "canary" not in str(info.value)


async def test_503_is_retried_by_the_router_only(sb: GoogleSandbox) -> None:
    sb.faults.push(Fault.server_error(503))
    async with make_router(vertex(sb)) as router:
        result = await router.agenerate("a cat", model=IMAGEN)
    assert len(result.attempts) == 2 and sb.hits() == 2 and len(result.images) == 1


async def test_hostile_output_fails_the_call_and_the_bill_is_kept(sb: GoogleSandbox) -> None:
    sb.faults.push(Fault.hostile_image("bomb_image"))
    ledger = Ledger(":memory:")
    async with make_router(vertex(sb), ledger=ledger) as router:
        with pytest.raises(AllProvidersFailed):
            await router.agenerate("a cat", model=IMAGEN)
    assert ledger.spent() == Decimal("0.04") == sb.billed_usd


def test_import_router_does_not_import_the_sdk() -> None:
    import subprocess
    import sys

    code = "import sys, router; assert 'google.genai' not in sys.modules and 'openai' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
