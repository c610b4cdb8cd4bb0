"""Replicate end to end over real loopback HTTP through the official client: router, provider, sandbox."""

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
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from providers.replicate import ReplicateProvider
from providers.sandbox import Fault
from providers.sandbox.replicate import SDXL_VERSION, ReplicateSandbox
from router import (
    AuthenticationError,
    ContentPolicyError,
    ImageRequest,
    InsufficientCredits,
    InvalidRequestError,
)
from router.errors import MalformedResponse, ProviderTimeout, ProviderUnavailable, RateLimited
from router.fetch import SafeFetcher
from router.ledger import Ledger
from tests.conftest import make_router, png

TOKEN = "r8_sandbox_token_primary"
SCHNELL = "/v1/models/black-forest-labs/flux-schnell/predictions"
SPECS = Path(__file__).resolve().parent / "specs"


@pytest.fixture
def rep() -> Iterator[ReplicateSandbox]:
    with ReplicateSandbox(api_token=TOKEN) as sb:
        yield sb


def provider(sb: ReplicateSandbox, **kw: Any) -> ReplicateProvider:
    kw.setdefault("api_token", TOKEN)
    return ReplicateProvider(base_url=sb.base_url, fetcher=SafeFetcher(allow_loopback=True), poll_interval_s=0.01,
                             **kw)



async def direct(sb: ReplicateSandbox, model: str = "flux-schnell", timeout_s: float = 5.0, **kw: Any) -> Any:
    p = provider(sb)
    try:
        return await p.generate(ImageRequest(prompt=kw.pop("prompt", "a cat"), **kw), model, timeout_s=timeout_s)
    finally:
        await p.aclose()


# --- txt2img ------------------------------------------------------------------------------


async def test_txt2img_waits_downloads_echoes_the_seed_and_bills_per_output(rep: ReplicateSandbox) -> None:
    ledger = Ledger(":memory:")
    async with make_router(provider(rep), ledger=ledger) as router:
        result = await router.agenerate("a lighthouse", model="flux-schnell", aspect_ratio="16:9", seed=41,
                                        steps=4, output_format="jpeg",
                                        provider_options={"replicate": {"go_fast": True}})
    sent = rep.requests[0]
    assert sent.path == SCHNELL and sent.headers["prefer"].startswith("wait=")
    assert sent.headers["authorization"] == "[REDACTED]"
    assert sent.json == {"input": {"prompt": "a lighthouse", "aspect_ratio": "16:9", "output_format": "jpg",
                                   "go_fast": True, "num_outputs": 1, "seed": 41, "num_inference_steps": 4}}
    image = result.images[0]
    assert (image.width, image.height, image.mime, image.seed) == (1344, 768, "image/jpeg", 41)
    assert rep.requests[-1].path.startswith("/delivery/")
    assert result.provider_request_id == next(iter(rep.predictions))
    assert result.cost.actual_usd == Decimal("0.003") == ledger.spent()


async def test_n_goes_in_num_outputs_and_is_billed_per_output(rep: ReplicateSandbox) -> None:
    async with make_router(provider(rep)) as router:
        result = await router.agenerate("a cat", model="flux-schnell", n=3, output_format="png")
    assert rep.hits(SCHNELL) == 1 and rep.requests[0].json["input"]["num_outputs"] == 3  # type: ignore[index]
    assert len(result.images) == 3 and result.images[0].data != result.images[1].data
    assert result.cost.actual_usd == 3 * Decimal("0.003") and result.cost.quantity == 3


async def test_flux_1_1_pro_fans_out_and_costs_four_cents_each(rep: ReplicateSandbox) -> None:
    async with make_router(provider(rep)) as router:
        result = await router.agenerate("a cat", model="flux-1.1-pro", n=2, seed=5)
    path = "/v1/models/black-forest-labs/flux-1.1-pro/predictions"
    assert rep.hits(path) == 2
    assert sorted(r.json["input"]["seed"] for r in rep.requests if r.path == path) == [5, 6]  # type: ignore[index]
    assert [i.seed for i in result.images] == [5, 6]
    assert result.cost.actual_usd == Decimal("0.08")


async def test_size_snaps_to_the_nearest_aspect_ratio_with_a_warning(rep: ReplicateSandbox) -> None:
    async with make_router(provider(rep)) as router:
        result = await router.agenerate("a cat", model="flux-schnell", width=1000, height=560, steps=9)
    assert rep.requests[0].json["input"]["aspect_ratio"] == "16:9"  # type: ignore[index]
    assert rep.requests[0].json["input"]["num_inference_steps"] == 4  # type: ignore[index]
    assert (result.images[0].width, result.images[0].height) == (1344, 768)
    assert any("1000x560 adapted to 1344x768" in w for w in result.warnings)
    assert any("steps 9 adapted to 4" in w for w in result.warnings)


async def test_when_the_wait_runs_out_the_provider_polls_until_succeeded(rep: ReplicateSandbox) -> None:
    rep.wait_completes, rep.pending_polls = False, 2
    result = await direct(rep)
    pid = result.provider_request_id
    assert rep.requests[0].status == 202
    assert rep.hits(f"/v1/predictions/{pid}") == 3 and len(result.images) == 1


async def test_deadline_cancels_the_prediction(rep: ReplicateSandbox) -> None:
    rep.faults.push(Fault("slow"))
    with pytest.raises(ProviderTimeout):
        await direct(rep, timeout_s=0.3)
    pid = next(iter(rep.predictions))
    assert rep.hits(f"/v1/predictions/{pid}/cancel") == 1 and rep.prediction(pid).status == "canceled"


async def test_expired_output_is_provider_unavailable(rep: ReplicateSandbox) -> None:
    rep.faults.push(Fault("expired_output"))
    with pytest.raises(ProviderUnavailable, match="expired"):
        await direct(rep)


# --- img2img and the catalog --------------------------------------------------------------


async def test_flux_dev_img2img_sends_image_and_prompt_strength(rep: ReplicateSandbox) -> None:
    init = png(256, 256, (10, 200, 10))
    async with make_router(provider(rep)) as router:
        result = await router.agenerate("paint it", init_image=init, strength=0.6, guidance_scale=3.5, seed=2)
    assert result.model == "flux-dev"
    inp = rep.requests[0].json["input"]  # type: ignore[index]
    assert inp["image"] == "data:image/png;base64," + base64.b64encode(init).decode()
    assert (inp["prompt_strength"], inp["guidance"]) == (0.6, 3.5)
    assert result.cost.actual_usd == Decimal("0.025")


async def test_lora_request_goes_to_the_lora_model_with_weights_and_scale(rep: ReplicateSandbox) -> None:
    async with make_router(provider(rep)) as router:
        result = await router.agenerate("a portrait", loras=[{"ref": "owner/style-lora",
                                                              "weight": 0.7}], seed=3)
    assert result.model == "flux-dev-lora"
    inp = rep.requests[0].json["input"]  # type: ignore[index]
    assert (inp["lora_weights"], inp["lora_scale"]) == ("owner/style-lora", 0.7)
    assert result.cost.actual_usd == Decimal("0.032")
    rejected = {r.model: r.reason for r in result.decision.rejections}
    assert "takes no LoRA" in rejected["flux-schnell"]


async def test_inpaint_sends_a_white_repaint_mask_and_keeps_the_rest(rep: ReplicateSandbox) -> None:
    from PIL import Image

    init = png(256, 128, (10, 200, 10))
    alpha_mask = Image.new("RGBA", (256, 128), (0, 0, 0, 255))
    alpha_mask.paste((0, 0, 0, 0), (0, 0, 128, 128))  # OpenAI-style: transparent = repaint (left half)
    buf = io.BytesIO()
    alpha_mask.save(buf, format="PNG")
    async with make_router(provider(rep)) as router:
        result = await router.agenerate("a red door", init_image=init, mask_image=buf.getvalue(), steps=20)
    assert result.model == "flux-fill-pro" and result.cost.actual_usd == Decimal("0.05")
    inp = rep.requests[0].json["input"]  # type: ignore[index]
    sent = Image.open(io.BytesIO(base64.b64decode(inp["mask"].split(",", 1)[1]))).convert("L")
    assert sent.getpixel((10, 64)) == 255 and sent.getpixel((250, 64)) == 0  # converted to white = repaint
    assert inp["steps"] == 20 and "aspect_ratio" not in inp
    out = result.images[0].to_pil().convert("RGB")
    assert out.size == (256, 128) and out.getpixel((250, 64)) == (10, 200, 10)


async def test_control_request_goes_to_the_controlnet_model_for_its_kind(rep: ReplicateSandbox) -> None:
    edges = png(192, 128, (255, 255, 255))
    async with make_router(provider(rep)) as router:
        result = await router.agenerate("a house", controls=[{"kind": "depth", "image": edges, "scale": 0.5}])
        no_pose = router.route(ImageRequest(prompt="x", controls=[{"kind": "pose", "image": edges}])).explain()
    assert result.model == "flux-depth-pro" and result.images[0].width == 192
    inp = rep.requests[0].json["input"]  # type: ignore[index]
    assert inp["control_image"].startswith("data:image/png;base64,")
    assert any("control scale/start/end ignored" in w for w in result.warnings)
    assert "no ControlNet for pose" in no_pose and "does not do control" in no_pose


async def test_unsupported_requests_are_rejected_at_routing(rep: ReplicateSandbox) -> None:
    async with make_router(provider(rep, models=("flux-schnell",))) as router:
        explained = router.route(ImageRequest(prompt="x", init_image=png(64, 64))).explain()
        too_many = router.route(ImageRequest(prompt="x", n=5)).explain()
    assert "img2img" in explained and "flux-schnell" in explained
    assert "at most 4" in too_many and rep.hits() == 0


def test_estimate_comes_from_the_price_table(rep: ReplicateSandbox) -> None:
    est = provider(rep).estimate(ImageRequest(prompt="x", n=2), "flux-dev")
    assert est.cost_usd == Decimal("0.050") and est.unit == "outputs"


# --- errors -------------------------------------------------------------------------------


async def test_429_with_retry_after_is_rate_limited_and_not_retried(rep: ReplicateSandbox) -> None:
    rep.faults.push(Fault.rate_limit(retry_after=7))
    with pytest.raises(RateLimited) as info:
        await direct(rep)
    assert info.value.retry_after == 7 and rep.hits(SCHNELL) == 1


async def test_5xx_is_provider_unavailable_and_not_retried(rep: ReplicateSandbox) -> None:
    rep.faults.push(Fault.server_error(503))
    with pytest.raises(ProviderUnavailable):
        await direct(rep)
    assert rep.hits(SCHNELL) == 1


@pytest.mark.parametrize(("fault", "cls"), [
    (Fault.insufficient_credits(), InsufficientCredits),
    (Fault.auth(), AuthenticationError),
    (Fault.invalid_request("seed", "Must be between 0 and 4294967295"), InvalidRequestError),
    (Fault.moderation(), ContentPolicyError),
    (Fault("model_error"), ProviderUnavailable),
    (Fault.malformed(), MalformedResponse),
])
async def test_errors_map_to_router_classes(rep: ReplicateSandbox, fault: Fault, cls: type[Exception]) -> None:
    rep.faults.push(fault)
    with pytest.raises(cls) as info:
        await direct(rep)
    assert TOKEN not in str(info.value) and info.value.__cause__ is None


async def test_failed_with_invalid_input_text_is_invalid_request(rep: ReplicateSandbox) -> None:
    rep.faults.push(Fault("model_error", message="invalid input: image could not be read"))
    with pytest.raises(InvalidRequestError):
        await direct(rep)


async def test_wrong_token_is_authentication_error() -> None:
    with ReplicateSandbox(api_token="other") as sb, pytest.raises(AuthenticationError):
        await direct(sb)


async def test_network_timeout_is_provider_timeout(rep: ReplicateSandbox) -> None:
    rep.faults.push(Fault.timeout(seconds=3.0))
    with pytest.raises(ProviderTimeout):
        await direct(rep, timeout_s=0.5)


async def test_router_falls_back_on_moderation_free_errors(rep: ReplicateSandbox) -> None:
    rep.faults.push(Fault.server_error(500))
    async with make_router(provider(rep)) as router:
        result = await router.agenerate("a cat", model="flux-schnell")
    assert len(result.images) == 1 and rep.hits(SCHNELL) == 2


# --- the sandbox against the published spec -----------------------------------------------

Validator = Callable[[str], Draft202012Validator]


@pytest.fixture(scope="module")
def schema() -> Validator:
    path = SPECS / "replicate.openapi.json"
    spec = _nullable(json.loads(path.read_text(encoding="utf-8")))
    registry: Registry[Any] = Registry().with_resource(
        "urn:replicate", Resource.from_contents(spec, default_specification=DRAFT202012))

    @functools.cache
    def validator(pointer: str) -> Draft202012Validator:
        return Draft202012Validator({"$ref": f"urn:replicate#/{pointer}"}, registry=registry)

    return validator


def _nullable(node: Any) -> Any:
    """Honour 3.0's ``nullable``; read ``oneOf`` as ``anyOf``: the spec's ``version`` is
    ``oneOf[enum ["hidden"], string]``, which "hidden" matches twice."""
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items()}
    if out.pop("nullable", False) is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "oneOf" in out:
        out["anyOf"] = out.pop("oneOf")
    return out


def valid(validator: Draft202012Validator, instance: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]
    assert not errors, errors


PREDICTION = "components/schemas/schemas_prediction_response"
REQUEST = "components/schemas/schemas_prediction_request"


@pytest.mark.parametrize("wait", [True, False])
def test_prediction_objects_validate_against_the_spec(rep: ReplicateSandbox, schema: Validator, wait: bool) -> None:
    rep.wait_completes = wait
    with httpx.Client(base_url=rep.base_url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        created = http.post(SCHNELL, json={"input": {"prompt": "a cat"}}, headers={"Prefer": "wait=5"})
        assert created.status_code == (201 if wait else 202)
        valid(schema(PREDICTION), created.json())
        polled = http.get(f"/v1/predictions/{created.json()['id']}")
        valid(schema(PREDICTION), polled.json())
        canceled = http.post(f"/v1/predictions/{created.json()['id']}/cancel")
        valid(schema(PREDICTION), canceled.json())


async def test_requests_the_provider_sends_validate_against_the_spec(rep: ReplicateSandbox,
                                                                     schema: Validator) -> None:
    await direct(rep, seed=3, n=2)
    valid(schema(REQUEST), rep.requests[0].json)


@pytest.mark.parametrize(("body", "status"), [
    ({"input": {"prompt": "x", "colour": "red"}}, 422),
    ({"input": {"prompt": "x", "num_outputs": 5}}, 422),
    ({"input": {"prompt": "x", "aspect_ratio": "7:5"}}, 422),
    ({"input": {"prompt": "x"}, "extra": 1}, 422),
    ({"prompt": "x"}, 422),
])
def test_invalid_requests_are_rejected_with_problem_details(rep: ReplicateSandbox, schema: Validator,
                                                            body: dict[str, Any], status: int) -> None:
    with httpx.Client(base_url=rep.base_url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        answer = http.post(SCHNELL, json=body)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert set(problem) == {"type", "title", "status", "detail"} and problem["status"] == status
    if "extra" in body or "prompt" in body:
        assert list(schema(REQUEST).iter_errors(body))  # the spec rejects it too


async def test_a_5xx_on_a_poll_is_not_retried_by_the_client(rep: ReplicateSandbox) -> None:
    # The client's RetryTransport would send each poll up to 10 times: the provider's own bounded
    # re-polls (3) are all that reach the sandbox, then the prediction is cancelled, not left to run.
    rep.wait_completes, rep.next_ids = False, ["q1"]
    rep.faults.push(Fault.server_error(503), path="/v1/predictions/q1", times=None)
    with pytest.raises(ProviderUnavailable):
        await direct(rep)
    assert sum(1 for r in rep.requests if r.method == "GET") == 3
    assert rep.hits("/v1/predictions/q1/cancel") == 1 and rep.prediction("q1").status == "canceled"
    assert rep.hits(SCHNELL) == 1


async def test_one_failed_poll_is_polled_again_not_a_second_prediction(rep: ReplicateSandbox) -> None:
    rep.wait_completes, rep.next_ids = False, ["q1"]
    rep.faults.push(Fault.server_error(503), path="/v1/predictions/q1")
    result = await direct(rep)
    assert result.provider_request_id == "q1" and len(result.images) == 1
    assert rep.hits(SCHNELL) == 1 and rep.hits("/v1/predictions/q1/cancel") == 0


async def test_422_falls_back_to_the_next_candidate(rep: ReplicateSandbox) -> None:
    rep.faults.push(Fault.invalid_request("seed", "Must be between 0 and 4294967295"))
    with ReplicateSandbox(api_token=TOKEN) as other:
        async with make_router(provider(rep), provider(other, name="replicate-b")) as router:
            result = await router.agenerate("a cat", model="flux-schnell")
    assert result.provider == "replicate-b"
    assert [(a.provider, a.error) for a in result.attempts] == [("replicate", "InvalidRequestError"),
                                                                ("replicate-b", None)]
    assert rep.hits(SCHNELL) == 1 and other.hits(SCHNELL) == 1


# --- version-pinned models ----------------------------------------------------------------


async def test_pinned_version_posts_version_and_bills_predict_time_at_the_hardware_rate(
        rep: ReplicateSandbox) -> None:
    rep.predict_time = 2.5
    ledger = Ledger(":memory:")
    async with make_router(provider(rep), ledger=ledger) as router:
        result = await router.agenerate("a fox", model="sdxl", width=768, height=512, n=2, seed=4,
                                        negative_prompt="blurry", guidance_scale=7.5, steps=30)
    sent = rep.requests[0]
    assert sent.path == "/v1/predictions" and sent.json is not None
    assert sent.json["version"] == SDXL_VERSION
    assert sent.json["input"] == {"prompt": "a fox", "width": 768, "height": 512, "negative_prompt": "blurry",
                                  "num_outputs": 2, "seed": 4, "num_inference_steps": 30, "guidance_scale": 7.5}
    assert [(i.width, i.height) for i in result.images] == [(768, 512), (768, 512)]
    # 2.5 s × $0.001525/s (hardware-gpu-h100 row)
    assert result.cost.unit == "seconds" and result.cost.quantity == Decimal("2.5")
    assert result.cost.actual_usd == Decimal("0.0038125") == ledger.spent()


def test_pinned_version_estimate_uses_the_hardware_rate(rep: ReplicateSandbox) -> None:
    est = provider(rep).estimate(ImageRequest(prompt="x"), "sdxl")
    assert est.cost_usd == Decimal("6.0") * Decimal("0.001525") and est.unit == "seconds"


def test_unknown_version_is_rejected(rep: ReplicateSandbox) -> None:
    with httpx.Client(base_url=rep.base_url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        answer = http.post("/v1/predictions", json={"version": "0" * 64, "input": {"prompt": "x"}})
    assert answer.status_code == 422 and answer.json()["title"] == "Invalid version or not permitted"


async def test_pinned_prediction_validates_against_the_spec(rep: ReplicateSandbox, schema: Validator) -> None:
    await direct(rep, model="sdxl")
    valid(schema("components/schemas/schemas_version_prediction_request"), rep.requests[0].json)
    with httpx.Client(base_url=rep.base_url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        polled = http.get(f"/v1/predictions/{next(iter(rep.predictions))}")
    valid(schema(PREDICTION), polled.json())
    assert polled.json()["version"] == SDXL_VERSION
