"""Replicate: big inputs go through the Files API, and the sandbox's create route takes the spec's forms of
``version``. Over real loopback HTTP, checked against the published spec."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from PIL import Image
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from providers.replicate import INLINE_MAX_BYTES, ReplicateProvider
from providers.sandbox import Fault
from providers.sandbox.replicate import SDXL_VERSION, ReplicateSandbox
from router import AsyncRouter
from router.fetch import SafeFetcher
from tests.conftest import Sleeps, png
from tests.test_replicate import SPECS, _nullable

TOKEN = "r8_sandbox_token_files"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def rep() -> Iterator[ReplicateSandbox]:
    with ReplicateSandbox(api_token=TOKEN) as sb:
        yield sb


@pytest.fixture(scope="module")
def spec_registry() -> Registry[Any]:
    spec = _nullable(json.loads((SPECS / "replicate.openapi.json").read_text(encoding="utf-8")))
    return Registry().with_resource("urn:replicate", Resource.from_contents(spec, default_specification=DRAFT202012))


def assert_valid(registry: Registry[Any], pointer: str, instance: Any) -> None:
    validator = Draft202012Validator({"$ref": f"urn:replicate#/components/schemas/{pointer}"}, registry=registry)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]
    assert not errors, errors


def noise_png(width: int, height: int) -> bytes:
    """A PNG that does not compress: random pixels."""
    img = Image.frombytes("RGB", (width, height), random.Random(7).randbytes(width * height * 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_router(sb: ReplicateSandbox) -> AsyncRouter:
    p = ReplicateProvider(api_token=TOKEN, base_url=sb.base_url, fetcher=SafeFetcher(allow_loopback=True),
                          poll_interval_s=0.01)
    return AsyncRouter([p], ledger=":memory:", sleep=Sleeps())


# --- inputs over the inline limit go through the Files API ---------------------------------------


async def test_a_big_input_image_is_uploaded_and_passed_by_its_file_url(rep: ReplicateSandbox) -> None:
    big = noise_png(320, 320)
    assert len(big) > INLINE_MAX_BYTES
    async with make_router(rep) as router:
        result = await router.agenerate("paint it", model="flux-dev", init_image=big, strength=0.5, seed=1)
    uploads = [r for r in rep.requests if r.method == "POST" and r.path == "/v1/files"]
    assert len(uploads) == 1 and uploads[0].files["content"] == [big]
    assert uploads[0].headers["content-type"].startswith("multipart/form-data")
    (stored,) = rep.files.values()
    assert stored.data == big and stored.content_type == "image/png"
    prediction = next(r for r in rep.requests if r.path.endswith("/flux-dev/predictions"))
    assert prediction.json is not None
    assert prediction.json["input"]["image"] == f"{rep.origin}/v1/files/{stored.id}"
    assert len(result.images) == 1 and (result.images[0].width, result.images[0].height) == (1024, 1024)


async def test_a_small_input_image_stays_a_data_url(rep: ReplicateSandbox) -> None:
    async with make_router(rep) as router:
        await router.agenerate("paint it", model="flux-dev", init_image=png(64, 64), strength=0.5)
    assert rep.hits("/v1/files") == 0
    prediction = next(r for r in rep.requests if r.path.endswith("/flux-dev/predictions"))
    assert prediction.json is not None and prediction.json["input"]["image"].startswith("data:image/png;base64,")


def test_the_files_api_follows_the_spec(rep: ReplicateSandbox, spec_registry: Registry[Any]) -> None:
    with httpx.Client(base_url=rep.base_url, headers=AUTH) as http:
        created = http.post("/v1/files", files={"content": ("cat.png", png(8, 8), "image/png")},
                            data={"metadata": json.dumps({"ref": 7})})
        assert created.status_code == 201
        assert_valid(spec_registry, "schemas_file_response", created.json())
        body = created.json()
        assert (body["content_type"], body["size"], body["metadata"]) == ("image/png", len(png(8, 8)), {"ref": 7})
        got = http.get(f"/v1/files/{body['id']}")
        assert got.status_code == 200 and got.json() == body
        assert body["urls"]["get"] == f"{rep.origin}/v1/files/{body['id']}"
        listed = http.get("/v1/files").json()
        assert [f["id"] for f in listed["results"]] == [body["id"]]
        assert http.delete(f"/v1/files/{body['id']}").status_code == 204
        gone = http.get(f"/v1/files/{body['id']}")
        assert gone.status_code == 404 and gone.headers["content-type"] == "application/problem+json"
        missing = http.post("/v1/files", files={"other": ("x.bin", b"x", "application/octet-stream")})
        assert missing.status_code == 422


def test_a_prediction_reads_an_uploaded_file_by_its_url_and_refuses_an_unknown_one(rep: ReplicateSandbox) -> None:
    edges = png(192, 128, (255, 255, 255))
    path = "/v1/models/black-forest-labs/flux-canny-pro/predictions"
    with httpx.Client(base_url=rep.base_url, headers=AUTH) as http:
        url = http.post("/v1/files", files={"content": ("e.png", edges, "image/png")}).json()["urls"]["get"]
        made = http.post(path, json={"input": {"prompt": "a house", "control_image": url}},
                         headers={"Prefer": "wait=5"})
        unknown = http.post(path, json={"input": {"prompt": "a house", "control_image": url + "x"}})
    assert made.status_code == 201 and made.json()["status"] == "succeeded"
    out = made.json()["output"][0]
    with httpx.Client() as plain:
        image = Image.open(io.BytesIO(plain.get(out).content))
    assert image.size == (192, 128)  # the model read the uploaded file's shape
    assert unknown.status_code == 422 and "control_image" in unknown.json()["detail"]


# --- POST /v1/predictions: the forms of ``version`` ------------------------------------------


@pytest.mark.parametrize(("version", "model", "echoed"), [
    (SDXL_VERSION, "stability-ai/sdxl", SDXL_VERSION),
    (f"stability-ai/sdxl:{SDXL_VERSION}", "stability-ai/sdxl", SDXL_VERSION),
    ("black-forest-labs/flux-schnell", "black-forest-labs/flux-schnell", "hidden"),
])
def test_the_spec_forms_of_version_are_accepted(rep: ReplicateSandbox, spec_registry: Registry[Any],
                                                version: str, model: str, echoed: str) -> None:
    body = {"version": version, "input": {"prompt": "a fox"}}
    assert_valid(spec_registry, "schemas_version_prediction_request", body)
    with httpx.Client(base_url=rep.base_url, headers=AUTH) as http:
        answer = http.post("/v1/predictions", json=body, headers={"Prefer": "wait=5"})
    assert answer.status_code == 201
    assert_valid(spec_registry, "schemas_prediction_response", answer.json())
    assert (answer.json()["model"], answer.json()["version"], answer.json()["status"]) == (model, echoed,
                                                                                           "succeeded")


@pytest.mark.parametrize("version", [
    "stability-ai/sdxl",  # not an official model: the spec asks for its version
    f"someone/else:{SDXL_VERSION}",  # a version of another model
    "0" * 64,
    "black-forest-labs/flux-schnell:" + "0" * 64,
])
def test_unknown_or_mismatched_versions_are_refused(rep: ReplicateSandbox, version: str) -> None:
    with httpx.Client(base_url=rep.base_url, headers=AUTH) as http:
        answer = http.post("/v1/predictions", json={"version": version, "input": {"prompt": "x"}})
    assert answer.status_code == 422 and answer.json()["title"] == "Invalid version or not permitted"


@pytest.mark.parametrize("version", [123, ["stability-ai/sdxl"], {"id": SDXL_VERSION}, True, None])
def test_a_version_that_is_not_a_string_gets_the_validation_answer(rep: ReplicateSandbox,
                                                                   spec_registry: Registry[Any],
                                                                   version: Any) -> None:
    body = {"version": version, "input": {"prompt": "x"}}
    with httpx.Client(base_url=rep.base_url, headers=AUTH) as http:
        answer = http.post("/v1/predictions", json=body)
    assert answer.status_code == 422 and answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert set(problem) == {"type", "title", "status", "detail"} and "version" in problem["detail"]
    validator = Draft202012Validator({"$ref": "urn:replicate#/components/schemas/schemas_version_prediction_request"},
                                     registry=spec_registry)
    assert list(validator.iter_errors(body))  # the spec refuses it too


@pytest.mark.parametrize("outcome", ["aborted", "canceled"])
def test_aborted_and_canceled_predictions_follow_the_spec(rep: ReplicateSandbox, spec_registry: Registry[Any],
                                                          outcome: str) -> None:
    rep.faults.push(Fault(outcome))
    with httpx.Client(base_url=rep.base_url, headers=AUTH) as http:
        answer = http.post("/v1/predictions", json={"version": SDXL_VERSION, "input": {"prompt": "x"}},
                           headers={"Prefer": "wait=5"})
    view = answer.json()
    assert_valid(spec_registry, "schemas_prediction_response", view)
    assert view["status"] == outcome and view["output"] is None
    assert ("started_at" in view) is (outcome == "canceled")
    assert ("predict_time" in view["metrics"]) is (outcome == "canceled")
