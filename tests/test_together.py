"""Together AI end to end: the router, the official ``together`` SDK and the loopback sandbox over real HTTP."""

from __future__ import annotations

import base64
import functools
import io
import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from jsonschema import Draft202012Validator
from PIL import Image
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from providers.sandbox import Fault
from providers.sandbox.together import TogetherSandbox
from providers.together import DEV, DEV_LORA, KONTEXT_DEV, KONTEXT_PRO, SCHNELL, TogetherProvider
from router import (
    AuthenticationError,
    ContentPolicyError,
    ImageRequest,
    InsufficientCredits,
    InvalidRequestError,
    NoRouteError,
)
from router.errors import MalformedResponse, ProviderTimeout, ProviderUnavailable, RateLimited
from router.fetch import SafeFetcher
from tests.conftest import Sleeps, make_router, png

KEY = "tg-sandbox-test-0123456789"
GEN = "/v1/images/generations"
SPECS = Path(__file__).resolve().parent / "specs"


@pytest.fixture
def tg() -> Iterator[TogetherSandbox]:
    with TogetherSandbox(api_key=KEY) as sb:
        yield sb


def provider(sb: TogetherSandbox, name: str = "together", key: str = KEY) -> TogetherProvider:
    return TogetherProvider(name=name, api_key=key, base_url=sb.base_url, fetcher=SafeFetcher(allow_loopback=True),
                            download_backoff_s=0.01)



def sent(sb: TogetherSandbox) -> dict[str, Any]:
    body = sb.requests[-1].json
    assert body is not None
    return body


async def call(sb: TogetherSandbox, model: str = SCHNELL, **kw: Any) -> Any:
    p = provider(sb)
    try:
        return await p.generate(ImageRequest(prompt=kw.pop("prompt", "a cat"), **kw), model, timeout_s=5.0)
    finally:
        await p.aclose()


# --- txt2img, cost -------------------------------------------------------------------------


async def test_txt2img_end_to_end_with_settled_cost(tg: TogetherSandbox) -> None:
    async with make_router(provider(tg)) as router:
        result = await router.agenerate("a lighthouse at dusk", model=SCHNELL, width=1024, height=768, n=2, seed=42,
                                        negative_prompt="blurry")
    body = sent(tg)
    assert body == {"model": SCHNELL, "prompt": "a lighthouse at dusk", "width": 1024, "height": 768, "n": 2,
                    "steps": 4, "seed": 42, "negative_prompt": "blurry", "response_format": "base64",
                    "output_format": "png"}
    assert [(i.width, i.height, i.mime, i.seed) for i in result.images] == [(1024, 768, "image/png", 42)] * 2
    assert result.images[0].data != result.images[1].data
    assert tg.hits(GEN) == 1 and tg.seeds == [42, 42]  # n sent as one call, the seed is the image's
    # 2 images × 0.75 MP (per 1024²) × $0.0027 × 4/4 steps
    assert result.cost.actual_usd == Decimal("0.00405") == 2 * Decimal("0.75") * Decimal("0.0027")
    assert result.cost.unit == "megapixel_steps" and result.cost.quantity == Decimal("1.5")
    assert result.cost.estimated_usd == result.cost.actual_usd
    assert result.provider_request_id == tg.requests[-1].request_id
    assert result.warnings == () or not any("ignored" in w for w in result.warnings)


async def test_cost_scales_with_the_steps_actually_sent(tg: TogetherSandbox) -> None:
    async with make_router(provider(tg)) as router:
        dev = await router.agenerate("a cat", model=DEV, width=1024, height=1024, steps=14, guidance_scale=5.0)
        fast = await router.agenerate("a cat", model=SCHNELL, width=512, height=512, steps=20)
    assert sent(tg)["steps"] == 12 and tg.requests[0].json["steps"] == 14  # type: ignore[index]
    assert tg.requests[0].json["guidance_scale"] == 5.0  # type: ignore[index]
    assert dev.cost.actual_usd == Decimal("0.0154") * 14 / 28 == Decimal("0.0077")
    # schnell caps steps at 12: 0.25 MP × $0.0027 × 12/4, from what was sent, with a warning
    assert fast.cost.actual_usd == Decimal("0.25") * Decimal("0.0027") * 3 == Decimal("0.002025")
    assert any("steps 20 adapted to 12" in w for w in fast.warnings)


async def test_sizes_snap_to_multiples_of_16_with_a_warning(tg: TogetherSandbox) -> None:
    async with make_router(provider(tg)) as router:
        result = await router.agenerate("a cat", model=SCHNELL, width=1000, height=1000)
    body = sent(tg)
    assert body["width"] % 16 == 0 and body["height"] % 16 == 0 and (body["width"], body["height"]) != (1000, 1000)
    assert (result.images[0].width, result.images[0].height) == (body["width"], body["height"])
    assert any("size 1000x1000 adapted" in w for w in result.warnings)


async def test_guidance_on_schnell_is_warned_and_not_sent(tg: TogetherSandbox) -> None:
    async with make_router(provider(tg)) as router:
        result = await router.agenerate("a cat", model=SCHNELL, guidance_scale=7.0, output_format="webp")
    assert "guidance_scale" not in sent(tg) and sent(tg)["output_format"] == "png"
    assert any("guidance_scale ignored" in w for w in result.warnings)
    assert any("output_format webp" in w for w in result.warnings)


async def test_one_seed_gives_one_image(tg: TogetherSandbox) -> None:
    a = await call(tg, seed=7)
    b = await call(tg, seed=7)
    c = await call(tg, seed=8)
    assert a.images[0].data == b.images[0].data != c.images[0].data
    assert a.images[0].seed == 7


async def test_jpeg_output_is_decoded_as_jpeg(tg: TogetherSandbox) -> None:
    result = await call(tg, output_format="jpeg", width=512, height=512)
    assert result.images[0].mime == "image/jpeg" and sent(tg)["output_format"] == "jpeg"


# --- LoRA, img2img, what routing rejects -----------------------------------------------------


async def test_loras_route_to_the_lora_model_and_are_sent_as_image_loras(tg: TogetherSandbox) -> None:
    loras = [{"ref": "owner/style-lora", "weight": 0.8}, {"ref": "owner/other-lora", "weight": 1.0}]
    async with make_router(provider(tg)) as router:
        result = await router.agenerate("a cat", loras=loras, width=1024, height=1024)
    assert result.model == DEV_LORA and sent(tg)["model"] == DEV_LORA
    assert sent(tg)["image_loras"] == [{"path": "owner/style-lora", "scale": 0.8},
                                       {"path": "owner/other-lora", "scale": 1.0}]
    assert result.cost.actual_usd == Decimal("0.035")
    assert provider(tg).capabilities(DEV_LORA).max_loras == 2 and provider(tg).capabilities(DEV).max_loras == 0


async def test_three_loras_are_rejected_at_routing(tg: TogetherSandbox) -> None:
    loras = [{"ref": f"lora-{i}"} for i in range(3)]
    async with make_router(provider(tg)) as router:
        explained = router.route(ImageRequest(prompt="a cat", loras=loras)).explain()
        with pytest.raises(NoRouteError):
            await router.agenerate("a cat", loras=loras)
    assert "takes at most 2 LoRAs" in explained and tg.hits() == 0


async def test_img2img_on_kontext_sends_the_init_image_as_a_data_url(tg: TogetherSandbox) -> None:
    init = png(512, 512, (10, 200, 10))
    async with make_router(provider(tg)) as router:
        result = await router.agenerate("make it night", init_image=init, width=512, height=512, seed=3)
    assert result.model in (KONTEXT_DEV, KONTEXT_PRO)
    url = sent(tg)["image_url"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == init
    out = result.images[0].to_pil().convert("RGB")
    plain = (await call(tg, model=result.model, prompt="make it night", width=512, height=512, seed=3))
    assert out.getpixel((5, 5)) != plain.images[0].to_pil().convert("RGB").getpixel((5, 5))  # the init was used


async def public_dns(host: str, port: int) -> list[str]:
    return ["93.184.215.14"]  # a global address; the transport below answers for it: nothing is connected to


async def test_img2img_with_a_url_sends_the_image_downloaded_through_the_fetcher(tg: TogetherSandbox) -> None:
    init = png(64, 64, (10, 200, 10))
    web = SafeFetcher(resolver=public_dns, transport=httpx.MockTransport(lambda r: httpx.Response(200, content=init)))
    p = TogetherProvider(api_key=KEY, base_url=tg.base_url, fetcher=web)
    try:
        await p.generate(ImageRequest(prompt="a cat", init_image="https://images.example.invalid/cat.png"),
                         KONTEXT_PRO, timeout_s=5.0)
    finally:
        await p.aclose()
    url = sent(tg)["image_url"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == init
    assert "steps" not in sent(tg)


async def test_inpaint_and_img2img_on_txt2img_models_are_rejected_with_reasons(tg: TogetherSandbox) -> None:
    init = png(256, 256)
    async with make_router(provider(tg)) as router:
        inpaint = router.route(ImageRequest(prompt="x", init_image=init, mask_image=png(256, 256))).explain()
        with pytest.raises(NoRouteError):
            await router.agenerate(ImageRequest(prompt="x", init_image=init, mask_image=png(256, 256)))
        pinned = router.route(ImageRequest(prompt="x", init_image=init, model=SCHNELL)).explain()
    assert "does not do inpaint" in inpaint and "does not do img2img" in pinned and tg.hits() == 0


async def test_n_over_four_is_rejected_at_routing(tg: TogetherSandbox) -> None:
    async with make_router(provider(tg)) as router:
        explained = router.route(ImageRequest(prompt="x", n=5)).explain()
    assert "at most 4 images" in explained


# --- errors ----------------------------------------------------------------------------------


async def test_429_retry_after_is_rate_limited_and_retried_after_that_wait(tg: TogetherSandbox) -> None:
    tg.faults.push(Fault.rate_limit(retry_after=2.0))
    with pytest.raises(RateLimited) as info:
        await call(tg)
    assert info.value.retry_after == 2.0 and info.value.status_code == 429
    tg.faults.push(Fault.rate_limit(retry_after=3.0))
    sleeps = Sleeps()
    async with make_router(provider(tg), sleep=sleeps) as router:
        result = await router.agenerate("a cat", model=SCHNELL)
    assert sleeps.waits == [3.0] and [a.error for a in result.attempts] == ["RateLimited", None]


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_is_provider_unavailable(tg: TogetherSandbox, status: int) -> None:
    tg.faults.push(Fault.server_error(status))
    with pytest.raises(ProviderUnavailable) as info:
        await call(tg)
    assert info.value.status_code == status


@pytest.mark.parametrize(
    ("fault", "error", "status"),
    [
        (Fault.moderation(), ContentPolicyError, 422),
        (Fault.insufficient_credits(), InsufficientCredits, 402),
        (Fault.auth(), AuthenticationError, 401),
        (Fault("auth", status=403), AuthenticationError, 403),
        (Fault.invalid_request(param="width"), InvalidRequestError, 400),
        (Fault("invalid_request", status=404, message="Unable to access model"), InvalidRequestError, 404),
    ],
)
async def test_vendor_errors_map_to_router_errors(tg: TogetherSandbox, fault: Fault, error: type[Exception],
                                                  status: int) -> None:
    tg.faults.push(fault)
    with pytest.raises(error) as info:
        await call(tg)
    assert getattr(info.value, "status_code", None) == status and type(info.value) is error


async def test_a_refused_key_is_an_authentication_error_without_the_key(tg: TogetherSandbox) -> None:
    wrong = TogetherProvider(api_key="tg-wrong-key-9876543210", base_url=tg.base_url)
    async with make_router(wrong) as router:
        with pytest.raises(AuthenticationError) as info:
            await router.agenerate("a cat", model=SCHNELL)
    assert "tg-wrong-key-9876543210" not in str(info.value) and info.value.__cause__ is None


async def test_the_sandbox_refusing_a_request_is_invalid_request(tg: TogetherSandbox) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await call(tg, model=SCHNELL, provider_options={"together": {"reference_images": [1]}})
    assert info.value.status_code == 400 and tg.requests[-1].status == 400


@pytest.mark.parametrize("body", [
    None,  # truncated JSON
    b'{"id": "x", "model": "m", "object": "list", "data": [{"index": 0, "type": "b64_json", "b64_json": "@@"}]}',
    b'{"id": "x", "model": "m", "object": "list", "data": []}',
])
async def test_malformed_bodies_are_malformed_response(tg: TogetherSandbox, body: bytes | None) -> None:
    tg.faults.push(Fault.malformed(body))
    with pytest.raises(MalformedResponse):
        await call(tg)


async def test_timeout_is_provider_timeout(tg: TogetherSandbox) -> None:
    tg.faults.push(Fault.timeout(seconds=3.0))
    p = provider(tg)
    with pytest.raises(ProviderTimeout):
        await p.generate(ImageRequest(prompt="a cat"), SCHNELL, timeout_s=0.3)
    await p.aclose()
    assert tg.hits(GEN) == 1  # no retry inside the provider


async def test_url_outputs_are_downloaded_through_the_fetcher_and_expiry_is_unavailable(tg: TogetherSandbox) -> None:
    with httpx.Client(base_url=tg.base_url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        body = http.post(GEN, json={"model": SCHNELL, "prompt": "a cat", "width": 256, "height": 256,
                                    "output_format": "jpeg"}).json()
    # the provider asks for base64; an answer of URL items still goes through the safe fetcher
    tg.faults.push(Fault.malformed(json.dumps(body).encode()), path=GEN)
    result = await call(tg, width=256, height=256, output_format="jpeg")
    image = result.images[0]
    assert image.mime == "image/jpeg" and (image.width, image.height) == (256, 256)
    tg.expire_outputs()
    tg.faults.push(Fault.malformed(json.dumps(body).encode()), path=GEN)
    with pytest.raises(ProviderUnavailable) as info:
        await call(tg, width=256, height=256, output_format="jpeg")
    assert "HTTP 403" in str(info.value) and info.value.billed is not None  # the generation was paid for


@pytest.mark.parametrize(("fault", "status"), [
    (Fault.invalid_request(param="width"), 400),
    (Fault("invalid_request", status=404, message="Unable to access model"), 404),
    (Fault("invalid_request", status=422, message="Input validation error"), 422),
])
async def test_a_4xx_answer_falls_back_to_the_next_candidate(tg: TogetherSandbox, fault: Fault, status: int) -> None:
    tg.faults.push(fault)
    with TogetherSandbox(api_key=KEY) as backup:
        async with make_router(provider(tg), provider(backup, "together-backup")) as router:
            result = await router.agenerate("a cat", model=SCHNELL, width=1024, height=1024)
        assert backup.hits(GEN) == 1
    assert result.provider == "together-backup"
    assert [(a.provider, a.error, a.status_code, a.cost_usd) for a in result.attempts] == [
        ("together", "InvalidRequestError", status, 0), ("together-backup", None, None, Decimal("0.0027"))]
    assert tg.hits(GEN) == 1


@pytest.mark.parametrize("status", [408, 409])
async def test_408_and_409_are_retried(tg: TogetherSandbox, status: int) -> None:
    # RFC 9110 §15.5.9 / §15.5.10: transient answers, retried like 429 and 5xx
    tg.faults.push(Fault("invalid_request", status=status, message="try again"))
    with pytest.raises(RateLimited):
        await call(tg)
    tg.faults.push(Fault("invalid_request", status=status, message="try again"))
    async with make_router(provider(tg), rng=lambda: 1.0) as router:
        result = await router.agenerate("a cat", model=SCHNELL)
    assert [(a.error, a.status_code, a.retry) for a in result.attempts] == [("RateLimited", status, 0),
                                                                           (None, None, 1)]


def test_estimate_comes_from_the_price_table(tg: TogetherSandbox) -> None:
    p = provider(tg)
    est = p.estimate(ImageRequest(prompt="x", width=1024, height=1024), DEV)
    assert est.cost_usd == Decimal("0.0154") and est.unit == "megapixel_steps"
    assert p.estimate(ImageRequest(prompt="x", width=1024, height=512, n=2), KONTEXT_PRO).cost_usd == Decimal("0.04")


async def test_img2img_without_a_size_takes_the_init_image_shape(tg: TogetherSandbox) -> None:
    result = await call(tg, model=KONTEXT_DEV, init_image=png(768, 512))
    assert (sent(tg)["width"], sent(tg)["height"]) == (768, 512) == (result.images[0].width, result.images[0].height)


async def test_provider_options_reach_the_api_and_unknown_ones_are_warned(tg: TogetherSandbox) -> None:
    async with make_router(provider(tg)) as router:
        result = await router.agenerate("a cat", model=SCHNELL,
                                        provider_options={"together": {"disable_safety_checker": True, "bogus": 1}})
    assert sent(tg)["disable_safety_checker"] is True and "bogus" not in sent(tg)
    assert any("provider_options.together.bogus" in w for w in result.warnings)


def test_importing_the_router_does_not_import_the_sdk() -> None:
    import subprocess
    import sys

    code = "import sys, router, providers.together; assert 'together' not in sys.modules, 'together imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_configuration_problem_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    assert TogetherProvider().configuration_problem() == "not configured: set TOGETHER_API_KEY"
    monkeypatch.setenv("TOGETHER_API_KEY", "tg-env")
    assert TogetherProvider().configuration_problem() is None


# --- the sandbox against the published spec --------------------------------------------------


Validator = Callable[[str], Draft202012Validator]
REQUEST_SCHEMA = "paths/~1images~1generations/post/requestBody/content/application~1json/schema"


@pytest.fixture(scope="module")
def schema() -> Validator:
    """A validator for a JSON pointer into the Together spec, ``$ref``s resolved."""
    path = SPECS / "together.openapi.yaml"
    with path.open("rb") as f:
        spec = _nullable(yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    registry: Registry[Any] = Registry().with_resource(
        "urn:together", Resource.from_contents(spec, default_specification=DRAFT202012))

    @functools.cache
    def validator(pointer: str) -> Draft202012Validator:
        return Draft202012Validator({"$ref": f"urn:together#/{pointer}"}, registry=registry)

    return validator


def _nullable(node: Any) -> Any:
    """The spec says ``openapi: 3.1.0`` but keeps 3.0's ``nullable: true``: honour it as ``type: [T, "null"]``."""
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items()}
    if out.pop("nullable", False) is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def valid(validator: Draft202012Validator, instance: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]
    assert not errors, errors


@pytest.fixture
def http(tg: TogetherSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tg.base_url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


@pytest.mark.parametrize("fmt", ["base64", "url"])
def test_success_responses_validate_against_the_spec(http: httpx.Client, schema: Validator, fmt: str) -> None:
    r = http.post(GEN, json={"model": SCHNELL, "prompt": "a cat", "n": 2, "width": 256, "height": 256,
                             "response_format": fmt})
    assert r.status_code == 200 and r.headers["x-request-id"]
    valid(schema("components/schemas/ImageResponse"), r.json())
    item = r.json()["data"][0]
    data = base64.b64decode(item["b64_json"]) if fmt == "base64" else httpx.get(item["url"]).content
    assert Image.open(io.BytesIO(data)).size == (256, 256)


async def test_requests_the_provider_sends_validate_against_the_spec(tg: TogetherSandbox, schema: Validator) -> None:
    await call(tg, seed=1, n=2, negative_prompt="x", steps=2)
    await call(tg, model=DEV_LORA, loras=[{"ref": "a/b"}], guidance_scale=3.0)
    await call(tg, model=KONTEXT_DEV, init_image=png(64, 64))
    for record in tg.requests:
        assert record.status == 200
        valid(schema(REQUEST_SCHEMA), record.json)


@pytest.mark.parametrize("fault", [Fault.rate_limit(1.0), Fault.server_error(503), Fault.moderation(),
                                   Fault.insufficient_credits(), Fault.auth(), Fault.invalid_request("n")])
def test_error_responses_validate_against_the_spec(tg: TogetherSandbox, http: httpx.Client, schema: Validator,
                                                   fault: Fault) -> None:
    tg.faults.push(fault)
    r = http.post(GEN, json={"model": SCHNELL, "prompt": "a cat"})
    assert r.status_code == fault.status or r.status_code in (402, 422)
    valid(schema("components/schemas/ErrorData"), r.json())


@pytest.mark.parametrize(("body", "param"), [
    ({"model": SCHNELL, "prompt": "x", "n": "2"}, "n"),
    ({"model": SCHNELL, "prompt": "x", "response_format": "b64_json"}, "response_format"),
    ({"model": SCHNELL, "prompt": "x", "output_format": "webp"}, "output_format"),
    ({"model": SCHNELL, "prompt": "x", "image_loras": [{"path": "a"}]}, "image_loras"),
    ({"model": SCHNELL}, "prompt"),
    ({"prompt": "x"}, "model"),
])
def test_requests_the_spec_marks_invalid_are_rejected(http: httpx.Client, schema: Validator, body: dict[str, Any],
                                                      param: str) -> None:
    assert not schema(REQUEST_SCHEMA).is_valid(body)
    r = http.post(GEN, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    valid(schema("components/schemas/ErrorData"), r.json())


@pytest.mark.parametrize(("body", "status"), [
    ({"model": SCHNELL, "prompt": "x", "size": "1024x1024"}, 400),  # the spec allows unknown fields; the API not
    ({"model": SCHNELL, "prompt": "x", "steps": 13}, 400),
    ({"model": SCHNELL, "prompt": "x", "width": 1000}, 400),
    ({"model": SCHNELL, "prompt": "x", "n": 5}, 400),
    ({"model": SCHNELL, "prompt": "x", "image_url": "https://a.invalid/x.png"}, 400),
    ({"model": DEV_LORA, "prompt": "x", "image_loras": [{"path": "a", "scale": 1}] * 3}, 400),
    ({"model": "black-forest-labs/FLUX.9-nope", "prompt": "x"}, 404),
])
def test_vendor_limits_beyond_the_spec_are_enforced(http: httpx.Client, body: dict[str, Any], status: int) -> None:
    r = http.post(GEN, json=body)
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_missing_key_is_refused(tg: TogetherSandbox) -> None:
    r = httpx.post(tg.base_url + GEN, json={"model": SCHNELL, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert tg.requests[-1].headers.get("authorization") is None
