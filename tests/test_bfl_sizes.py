"""BFL's per-model size rules, end to end: adapt snaps with a warning, exact rejects at routing with
the rule, and the sandbox refuses what the vendor's schema refuses, in the vendor's 422 shape.

The sandbox's answers and the provider's request bodies are validated against the slices of
BFL's published OpenAPI document vendored in ``tests/specs/bfl.openapi.json`` (its source is in
its ``info.x-source``; the rules with their sources are in ``tests/specs/bfl_rules.md``).
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from PIL import Image
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from providers.bfl import BFLProvider
from providers.sandbox import Fault
from providers.sandbox.bfl import SAMPLE_PATH, BFLSandbox
from router import AsyncRouter, NoRouteError
from router.fetch import SafeFetcher
from tests.conftest import Sleeps, half_mask, png

KEY = "bfl-sandbox-sizes-key"
SPEC = Path(__file__).resolve().parent / "specs" / "bfl.openapi.json"


@pytest.fixture
def bfl() -> Iterator[BFLSandbox]:
    with BFLSandbox(api_key=KEY) as sb:
        yield sb


def provider(sb: BFLSandbox, models: tuple[str, ...] | None = None) -> BFLProvider:
    kw: dict[str, Any] = {} if models is None else {"models": models}
    return BFLProvider(api_key=KEY, base_url=sb.base_url, poll_interval_s=0.01, download_backoff_s=0.01,
                       fetcher=SafeFetcher(allow_loopback=True), **kw)


def make_router(*providers: BFLProvider) -> AsyncRouter:
    return AsyncRouter(list(providers), ledger=":memory:", sleep=Sleeps())


# --- adapt: the nearest size the model's rule allows, with a warning naming the rule ------------


@pytest.mark.parametrize(("model", "asked", "made", "rule"), [
    # FluxPro11Inputs: multiples of 32, 256..1440
    ("flux-pro-1.1", (1920, 1080), (1440, 800), "multiples of 32, 256-1440 px"),
    ("flux-pro-1.1", (1000, 1000), (992, 992), "multiples of 32"),
    ("flux-pro-1.1", (640, 2048), (448, 1440), "256-1440 px"),
    # FLUX.2 [pro]: multiples of 16, at most 4 MP
    ("flux-2-pro", (1000, 1000), (1008, 1008), "multiples of 16"),
    ("flux-2-pro", (4096, 4096), (2048, 2048), "at most 4 MP"),
])
async def test_adapt_snaps_to_the_models_rule_and_the_sandbox_accepts_it(
        bfl: BFLSandbox, model: str, asked: tuple[int, int], made: tuple[int, int], rule: str) -> None:
    async with make_router(provider(bfl, (model,))) as router:
        result = await router.agenerate("a harbour", width=asked[0], height=asked[1])
    sent = bfl.requests[0]
    assert sent.status == 200 and sent.json is not None and (sent.json["width"], sent.json["height"]) == made
    assert (result.images[0].width, result.images[0].height) == made
    warning = f"size {asked[0]}x{asked[1]} adapted to {made[0]}x{made[1]}: {model} takes"
    assert any(warning in w and rule in w for w in result.warnings), result.warnings


async def test_a_size_the_rule_allows_is_sent_as_it_is_without_a_warning(bfl: BFLSandbox) -> None:
    async with make_router(provider(bfl, ("flux-pro-1.1",))) as router:
        result = await router.agenerate("a harbour", width=1440, height=800, size_mode="exact")
    assert (bfl.requests[0].json or {})["width"] == 1440 and not any("adapted" in w for w in result.warnings)


async def test_an_aspect_ratio_beyond_a_side_limit_keeps_its_shape(bfl: BFLSandbox) -> None:
    async with make_router(provider(bfl, ("flux-pro-1.1",))) as router:
        result = await router.agenerate("a panorama", aspect_ratio="4:1")
    img = result.images[0]
    assert img.width <= 1440 and img.width % 32 == 0 and img.height % 32 == 0 and img.width / img.height > 3.5


# --- exact: rejected at routing, with the model's rule ---------------------------------------


async def test_exact_rejects_every_model_that_cannot_make_the_size_naming_its_rule(bfl: BFLSandbox) -> None:
    async with make_router(provider(bfl)) as router:
        with pytest.raises(NoRouteError) as info:
            await router.agenerate("a harbour", width=1000, height=1000, size_mode="exact")
    reasons = {r.model: r.reason for r in info.value.rejections if r.code == "size"}
    assert "multiples of 32, 256-1440 px" in reasons["flux-pro-1.1"]
    assert "multiples of 16" in reasons["flux-2-pro"]
    assert "aspect_ratio between 9:21 and 21:9 at about 1 MP" in reasons["flux-kontext-pro"]
    assert "about 4 MP" in reasons["flux-pro-1.1-ultra"]
    assert all("cannot make the exact size asked" in r for r in reasons.values())
    assert bfl.hits() == 0


async def test_exact_routes_to_the_model_whose_rule_allows_the_size(bfl: BFLSandbox) -> None:
    # 1920x1088: multiples of 16 under 4 MP (FLUX.2), over 1440 (FLUX 1.1 [pro])
    async with make_router(provider(bfl, ("flux-pro-1.1", "flux-2-pro"))) as router:
        decision = router.route("a harbour", width=1920, height=1088, size_mode="exact")
        result = await router.agenerate("a harbour", width=1920, height=1088, size_mode="exact")
    assert [c.model for c in decision.chain] == ["flux-2-pro"]
    assert [(r.model, r.code) for r in decision.rejections] == [("flux-pro-1.1", "size")]
    assert result.model == "flux-2-pro" and (result.images[0].width, result.images[0].height) == (1920, 1088)


async def test_exact_rejects_fill_when_the_size_is_not_the_init_images(bfl: BFLSandbox) -> None:
    async with make_router(provider(bfl, ("flux-pro-1.0-fill",))) as router:
        with pytest.raises(NoRouteError) as info:
            await router.agenerate("a door", init_image=png(256, 256), mask_image=half_mask(256, 256), width=512,
                                   height=512, size_mode="exact")
    [rejection] = info.value.rejections
    assert rejection.code == "size" and "the init image's own size" in rejection.reason and bfl.hits() == 0


# --- the sandbox refuses what BFL refuses, in BFL's shape -------------------------------------

Validator = Callable[[str], Draft202012Validator]


@pytest.fixture(scope="module")
def schema() -> Validator:
    spec = json.loads(SPEC.read_text(encoding="utf-8"))
    registry: Registry[Any] = Registry().with_resource(
        "urn:bfl", Resource.from_contents(spec, default_specification=DRAFT202012))

    @functools.cache
    def validator(name: str) -> Draft202012Validator:
        return Draft202012Validator({"$ref": f"urn:bfl#/components/schemas/{name}"}, registry=registry)

    return validator


def valid(validator: Draft202012Validator, instance: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]
    assert not errors, errors


@pytest.mark.parametrize(("model", "body", "loc", "kind"), [
    ("flux-pro-1.1", {"prompt": "x", "width": 1000, "height": 1024}, "width", "multiple_of"),
    ("flux-pro-1.1", {"prompt": "x", "width": 1024, "height": 1472}, "height", "less_than_equal"),
    ("flux-pro-1.1", {"prompt": "x", "width": 224, "height": 1024}, "width", "greater_than_equal"),
    ("flux-2-pro", {"prompt": "x", "width": 1000, "height": 1024}, "width", "multiple_of"),
    ("flux-2-pro", {"prompt": "x", "width": 1024, "height": 48}, "height", "greater_than_equal"),
    ("flux-2-pro", {"prompt": "x", "safety_tolerance": 6}, "safety_tolerance", "less_than_equal"),
    ("flux-pro-1.1-ultra", {"prompt": "x", "aspect_ratio": "3:1"}, "aspect_ratio", "value_error"),
    ("flux-kontext-pro", {"prompt": "x", "aspect_ratio": "1:3"}, "aspect_ratio", "value_error"),
    ("flux-kontext-pro", {"prompt": "x", "width": 1024}, "width", "extra_forbidden"),
])
def test_the_sandbox_answers_422_in_bfls_validation_shape(bfl: BFLSandbox, schema: Validator, model: str,
                                                          body: dict[str, Any], loc: str, kind: str) -> None:
    r = httpx.post(f"{bfl.base_url}/v1/{model}", json=body, headers={"x-key": KEY})
    assert r.status_code == 422
    valid(schema("HTTPValidationError"), r.json())
    [error] = r.json()["detail"]
    assert (error["loc"], error["type"]) == (["body", loc], kind) and error["msg"]
    assert bfl.submitted() == 0


def test_flux_2_resizes_over_4_mp_and_reports_the_megapixels_it_bills(bfl: BFLSandbox, schema: Validator) -> None:
    with httpx.Client(headers={"x-key": KEY}) as client:
        r = client.post(f"{bfl.base_url}/v1/flux-2-pro", json={"prompt": "x", "width": 4096, "height": 2048})
        valid(schema("AsyncResponse"), r.json())
        # over 4 MP: "automatically resized" (help.bfl.ai), here to 2896x1440 (4.0 MP) and billed as 4 MP
        assert r.json()["output_mp"] == 3.98 and r.json()["cost"] == 7.5
        client.get(r.json()["polling_url"])
        sample = client.get(r.json()["polling_url"]).json()["result"]["sample"]
        image = httpx.get(sample)
    assert Image.open(io.BytesIO(image.content)).size == (2896, 1440)


def test_sandbox_answers_validate_against_bfls_spec(bfl: BFLSandbox, schema: Validator) -> None:
    bfl.faults.push(Fault("task_error"))
    bfl.faults.push(Fault.moderation("Request Moderated"))
    with httpx.Client(base_url=bfl.base_url, headers={"x-key": KEY}) as client:
        ids = []
        for _ in range(3):
            submitted = client.post("/v1/flux-pro-1.1", json={"prompt": "x", "width": 1024, "height": 768})
            valid(schema("AsyncResponse"), submitted.json())
            ids.append(submitted.json()["id"])
        statuses = []
        for task_id in ids:
            for _ in range(2):
                polled = client.get("/v1/get_result", params={"id": task_id}).json()
                valid(schema("ResultResponse"), polled)
                statuses.append(polled["status"])
        lost = client.get("/v1/get_result", params={"id": "nope"}).json()
        valid(schema("ResultResponse"), lost)
    assert statuses == ["Pending", "Error", "Pending", "Request Moderated", "Pending", "Ready"]
    assert bfl.billed_usd == Decimal("0.04")  # only the Ready task


@pytest.mark.parametrize(("model", "schema_name", "kw"), [
    ("flux-pro-1.1", "FluxPro11Inputs", {"width": 1920, "height": 1080, "seed": 5}),
    ("flux-pro-1.1-ultra", "FluxUltraInput", {"aspect_ratio": "16:9", "provider_options": {"bfl": {"raw": True}}}),
    ("flux-kontext-pro", "FluxKontextProInputs", {"init_image": png(300, 200)}),
    ("flux-pro-1.0-fill", "FluxProFillInputs", {"init_image": png(128, 128), "mask_image": half_mask(128, 128),
                                                "steps": 20, "guidance_scale": 30.0}),
])
async def test_the_bodies_the_provider_sends_validate_against_bfls_spec(
        bfl: BFLSandbox, schema: Validator, model: str, schema_name: str, kw: dict[str, Any]) -> None:
    async with make_router(provider(bfl, (model,))) as router:
        await router.agenerate("a harbour", **kw)
    sent = bfl.requests[0]
    assert sent.path == f"/v1/{model}" and sent.status == 200 and sent.json is not None
    valid(schema(schema_name), sent.json)
    assert bfl.requests[-1].path == SAMPLE_PATH
