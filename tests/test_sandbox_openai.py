"""The OpenAI Images sandbox itself, over real loopback HTTP: the contract the adapter is tested against."""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from jsonschema import Draft202012Validator
from PIL import Image
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from providers.sandbox import Fault, OpenAISandbox

KEY = "sk-sandbox-test-0123456789"
SPECS = Path(__file__).resolve().parent / "specs"
GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"


# --- helpers and fixtures ------------------------------------------------------------


def png(size: tuple[int, int] = (64, 64), color: tuple[int, ...] = (200, 30, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def alpha_mask(size: tuple[int, int]) -> bytes:
    """RGBA PNG: alpha 0 (repaint) on the left half, 255 (keep) on the right."""
    img = Image.new("RGBA", size, (0, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def assert_error(resp: httpx.Response, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["x-request-id"].startswith("req_")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code
    return error


@pytest.fixture
def sb() -> Iterator[OpenAISandbox]:
    with OpenAISandbox(api_key=KEY) as sandbox:
        yield sandbox


@pytest.fixture
def http(sb: OpenAISandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sb.base_url + "/", headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as client:
        yield client


@pytest.fixture
def sdk(sb: OpenAISandbox) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(api_key=sb.api_key, base_url=sb.base_url, max_retries=0)
    yield client
    client.close()


Schemas = Callable[[str], Draft202012Validator]


@pytest.fixture(scope="session")
def schema() -> Schemas:
    """A validator for ``#/components/schemas/<name>`` of the OpenAI spec, ``$ref``s resolved into it."""
    path = SPECS / "openai.openapi.yaml"
    with path.open("rb") as f:
        spec = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    registry: Registry[Any] = Registry().with_resource(
        "urn:openai", Resource.from_contents(spec, default_specification=DRAFT202012))

    @functools.cache
    def validator(name: str) -> Draft202012Validator:
        return Draft202012Validator({"$ref": f"urn:openai#/components/schemas/{name}"}, registry=registry)

    return validator


def valid(validator: Draft202012Validator, instance: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]
    assert not errors, errors


# --- generations ------------------------------------------------------------------------


def test_generation_through_the_sdk_returns_pngs_of_the_requested_size(sb: OpenAISandbox, sdk: openai.OpenAI) -> None:
    raw = sdk.images.with_raw_response.generate(model="gpt-image-2", prompt="a lighthouse", size="1536x1024", n=2)
    body = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_") and int(raw.headers["openai-processing-ms"]) >= 1
    assert body.data is not None and len(body.data) == 2
    for item in body.data:
        assert item.b64_json is not None
        img = decode(item.b64_json)
        assert (img.format, img.size) == ("PNG", (1536, 1024))
    assert (body.size, body.quality, body.output_format, body.background) == ("1536x1024", "medium", "png", "opaque")
    assert sb.requests[-1].json == {"model": "gpt-image-2", "prompt": "a lighthouse", "size": "1536x1024", "n": 2}


def test_usage_counts_text_and_output_tokens(http: httpx.Client) -> None:
    prompt = "é" * 5  # 10 bytes → ceil(10 / 4) = 3 text tokens
    req = {"prompt": prompt, "size": "1024x1536", "quality": "high", "n": 3}
    body = http.post("images/generations", json=req).json()
    out = 3 * round(4160 * 1024 * 1536 / 1024**2)
    assert body["usage"] == {"input_tokens": 3, "input_tokens_details": {"image_tokens": 0, "text_tokens": 3},
                             "output_tokens": out, "total_tokens": 3 + out}
    low = http.post("images/generations", json={"prompt": "abcd", "quality": "low"}).json()
    assert low["usage"]["output_tokens"] == 272 and low["usage"]["input_tokens"] == 1 and low["quality"] == "low"


def test_usage_override_is_returned_verbatim(sb: OpenAISandbox, http: httpx.Client) -> None:
    sb.usage_override = {"input_tokens": 1, "input_tokens_details": {"image_tokens": 0, "text_tokens": 1},
                         "output_tokens": 9, "total_tokens": 10}
    assert http.post("images/generations", json={"prompt": "x"}).json()["usage"] == sb.usage_override


def test_images_are_deterministic_per_prompt_and_index(http: httpx.Client) -> None:
    def images(prompt: str) -> list[str]:
        return [d["b64_json"] for d in http.post("images/generations", json={"prompt": prompt, "n": 2}).json()["data"]]

    first, again, other = images("a red fox"), images("a red fox"), images("a blue fox")
    assert first == again and first[0] != first[1] and set(first).isdisjoint(other)


@pytest.mark.parametrize(("fmt", "background", "pil_format", "mode"), [
    ("webp", "transparent", "WEBP", "RGBA"),
    ("png", "transparent", "PNG", "RGBA"),
    ("jpeg", "opaque", "JPEG", "RGB"),
])
def test_output_format_and_background_are_honoured(http: httpx.Client, fmt: str, background: str, pil_format: str,
                                                   mode: str) -> None:
    req = {"prompt": "a kite", "output_format": fmt, "background": background, "output_compression": 100}
    body = http.post("images/generations", json=req).json()
    img = decode(body["data"][0]["b64_json"])
    assert (img.format, img.mode, img.size) == (pil_format, mode, (1024, 1024))
    assert body["output_format"] == fmt and body["background"] == background
    if background == "transparent":
        assert img.getchannel("A").getpixel((0, 0)) == 0  # the corner is background, the disc is opaque


@pytest.mark.parametrize(("size", "expected"), [
    ("auto", (1024, 1024)),
    ("1536x864", (1536, 864)),
    ("1024x640", (1024, 640)),  # exactly the minimum pixel count
    ("2160x3840", (2160, 3840)),  # the largest portrait frame
])
def test_sizes_within_the_rules_are_served(http: httpx.Client, size: str, expected: tuple[int, int]) -> None:
    body = http.post("images/generations", json={"prompt": "x", "size": size, "quality": "low"}).json()
    assert decode(body["data"][0]["b64_json"]).size == expected
    assert body["size"] == "{}x{}".format(*expected)


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"prompt": "x", "size": "1000x1000"}, "size", "invalid_value"),  # not multiples of 16
    ({"prompt": "x", "size": "2048x640"}, "size", "invalid_value"),  # ratio above 3:1
    ({"prompt": "x", "size": "3856x1296"}, "size", "invalid_value"),  # an edge over 3840
    ({"prompt": "x", "size": "3840x2176"}, "size", "invalid_value"),  # over 3840*2160 pixels
    ({"prompt": "x", "size": "1008x640"}, "size", "invalid_value"),  # under the model's pixel minimum
    ({"prompt": "x", "size": "512x512"}, "size", "invalid_value"),
    ({"prompt": "x", "size": "big"}, "size", "invalid_value"),
    ({"prompt": "x", "seed": 7}, "seed", "unknown_parameter"),
    ({"prompt": "x", "negative_prompt": "blur"}, "negative_prompt", "unknown_parameter"),
    ({"prompt": "x", "response_format": "b64_json"}, "response_format", "unsupported_parameter"),
    ({"prompt": "x", "style": "vivid"}, "style", "unsupported_parameter"),
    ({"prompt": "x", "quality": "standard"}, "quality", "invalid_value"),  # dall-e's, not gpt-image's
    ({"prompt": "x", "quality": "hd"}, "quality", "invalid_value"),
    ({"prompt": "x", "output_format": "jpeg", "background": "transparent"}, "background", "invalid_value"),
    ({"prompt": "x", "output_compression": 50}, "output_compression", "invalid_value"),  # png is lossless
    ({"prompt": "   "}, "prompt", "empty_string"),
    ({"prompt": "x" * 32_001}, "prompt", "string_above_max_length"),
])
def test_requests_the_api_refuses_are_rejected(http: httpx.Client, body: dict, param: str, code: str) -> None:
    assert_error(http.post("images/generations", json=body), 400, param=param, code=code)


@pytest.mark.parametrize("model", ["gpt-image-1", "dall-e-2", "dall-e-3", "no-such-model"])
def test_retired_and_unknown_models_are_not_found(http: httpx.Client, model: str) -> None:
    assert_error(http.post("images/generations", json={"prompt": "x", "model": model}), 404, code="model_not_found")


def test_dated_and_later_gpt_image_2_models_are_served(http: httpx.Client) -> None:
    for model in ("gpt-image-2-2026-04-21", "gpt-image-2.5-preview"):
        assert http.post("images/generations", json={"prompt": "x", "model": model}).status_code == 200


def test_a_body_that_is_not_a_json_object_is_rejected(http: httpx.Client) -> None:
    headers = {"content-type": "application/json"}
    assert_error(http.post("images/generations", content=b'{"prompt": ', headers=headers), 400)
    assert_error(http.post("images/generations", content=b'["x"]', headers=headers), 400)
    assert_error(http.post("images/generations", data={"prompt": "x"}), 400)


def test_a_chunked_request_body_is_read(http: httpx.Client) -> None:
    resp = http.post("images/generations", content=iter([b'{"prompt":', b' "chunked"}']),
                     headers={"content-type": "application/json"})
    assert resp.status_code == 200 and resp.json()["data"]


# --- edits ------------------------------------------------------------------------------------


def test_edit_with_a_mask_keeps_alpha_255_and_repaints_alpha_0(sb: OpenAISandbox, sdk: openai.OpenAI) -> None:
    green = png((1024, 1024), (10, 200, 10))
    body = sdk.images.edit(image=[("a.png", green, "image/png"), ("b.png", png((512, 512)), "image/png")],
                           mask=("mask.png", alpha_mask((1024, 1024)), "image/png"), prompt="paint a red door")
    assert body.data is not None and body.data[0].b64_json is not None
    out = decode(body.data[0].b64_json).convert("RGB")
    assert out.size == (1024, 1024)
    assert out.getpixel((1000, 500)) == (10, 200, 10)  # alpha 255: the input, untouched
    assert all(out.getpixel((x, y)) != (10, 200, 10) for x, y in [(5, 5), (5, 1018), (300, 500)])  # alpha 0: painted
    sent = sb.requests[-1]
    assert sent.path == EDITS and len(sent.files["image[]"]) == 2 and sent.files["mask"][0].startswith(b"\x89PNG")
    assert sent.form == {"prompt": "paint a red door"}


def test_edit_usage_counts_input_image_tiles(http: httpx.Client) -> None:
    files = [("image", ("a.png", png((4096, 1024)), "image/png")), ("image", ("b.png", png((512, 512)), "image/png"))]
    body = http.post("images/edits", data={"prompt": "abcdefgh", "quality": "low"}, files=files).json()
    # 4096x1024 → fits 2048 → 2048x512 → 4x1 tiles; 512x512 → 1 tile
    image_tokens = (65 + 129 * 4) + (65 + 129 * 1)
    assert body["usage"]["input_tokens_details"] == {"image_tokens": image_tokens, "text_tokens": 2}
    assert body["usage"]["input_tokens"] == image_tokens + 2 and body["usage"]["output_tokens"] == 272


def test_edit_scales_the_input_to_the_output_size(http: httpx.Client) -> None:
    files = {"image": ("a.webp", _encoded((300, 200), "WEBP"), "image/webp")}
    body = http.post("images/edits", data={"prompt": "x", "size": "1536x1024", "output_format": "jpeg",
                                           "output_compression": "80", "n": "2"}, files=files).json()
    assert [decode(d["b64_json"]).size for d in body["data"]] == [(1536, 1024)] * 2
    auto = http.post("images/edits", data={"prompt": "x"}, files=files).json()
    assert decode(auto["data"][0]["b64_json"]).size == (1024, 1024) and auto["size"] == "1024x1024"


def _encoded(size: tuple[int, int], fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (90, 90, 160)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mask", [
    png((64, 64), (0, 0, 0)),  # no alpha channel
    alpha_mask((32, 64)),  # not the first image's size
    _encoded((64, 64), "JPEG"),  # not a PNG
    b"not an image",
], ids=["no-alpha", "wrong-size", "jpeg", "garbage"])
def test_edit_rejects_a_bad_mask(http: httpx.Client, mask: bytes) -> None:
    files = {"image": ("a.png", png((64, 64)), "image/png"), "mask": ("m.png", mask, "image/png")}
    error = assert_error(http.post("images/edits", data={"prompt": "x"}, files=files), 400, param="mask",
                         code="invalid_image_format" if mask[:4] != b"\x89PNG" else "invalid_value")
    assert "mask" in error["message"]


@pytest.mark.parametrize("image", [_encoded((64, 64), "GIF", "P"), _encoded((64, 64), "BMP"), b"\x89PNG broken"],
                         ids=["gif", "bmp", "truncated"])
def test_edit_rejects_images_that_are_not_png_jpeg_or_webp(http: httpx.Client, image: bytes) -> None:
    files = {"image": ("a.png", image, "image/png")}
    assert_error(http.post("images/edits", data={"prompt": "x"}, files=files), 400, param="image",
                 code="invalid_image_format")


def test_edit_field_errors(http: httpx.Client) -> None:
    image = {"image": ("a.png", png(), "image/png")}
    assert_error(http.post("images/edits", data={"prompt": "x"}, files={"mask": ("m.png", alpha_mask((64, 64)),
                                                                                   "image/png")}),
                 400, param="image", code="missing_required_parameter")
    assert_error(http.post("images/edits", data={"prompt": "x", "n": "two"}, files=image), 400, param="n",
                 code="invalid_type")
    assert_error(http.post("images/edits", data={"prompt": "x", "moderation": "low"}, files=image), 400,
                 param="moderation", code="unknown_parameter")  # generations only
    assert_error(http.post("images/edits", data={"prompt": "x", "input_fidelity": "max"}, files=image), 400,
                 param="input_fidelity", code="invalid_value")
    assert_error(http.post("images/edits", json={"prompt": "x", "images": []}), 400, param="images", code="empty_array")
    ok = http.post("images/edits", data={"prompt": "x", "input_fidelity": "high"}, files=image)
    assert ok.status_code == 200


# --- faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "status", "type_", "code", "headers"), [
    (Fault.rate_limit(retry_after=2.0), 429, "requests", "rate_limit_exceeded",
     {"retry-after": "2", "retry-after-ms": "2000"}),
    (Fault.rate_limit(retry_after=0.25), 429, "requests", "rate_limit_exceeded",
     {"retry-after": "0.25", "retry-after-ms": "250"}),
    (Fault.server_error(503), 503, "server_error", None, {}),
    (Fault.server_error(), 500, "server_error", None, {}),
    (Fault.moderation(), 400, "image_generation_user_error", "moderation_blocked", {}),
    (Fault.insufficient_quota(), 429, "insufficient_quota", "insufficient_quota", {}),
    (Fault.insufficient_credits(), 429, "insufficient_quota", "insufficient_quota", {}),
    (Fault.invalid_request(param="size"), 400, "invalid_request_error", "invalid_value", {}),
    (Fault.auth(), 401, "invalid_request_error", "invalid_api_key", {}),
])
def test_each_fault_is_served_in_openais_shape_once(sb: OpenAISandbox, http: httpx.Client, fault: Fault, status: int,
                                                   type_: str, code: str | None, headers: dict[str, str]) -> None:
    sb.faults.push(fault)
    resp = http.post("images/generations", json={"prompt": "x"})
    error = assert_error(resp, status, param=fault.param, code=code)
    assert error["type"] == type_
    assert {k: resp.headers.get(k) for k in headers} == headers
    if not headers:
        assert "retry-after" not in resp.headers
    assert KEY not in resp.text
    assert http.post("images/generations", json={"prompt": "x"}).status_code == 200
    assert [(r.status, r.fault) for r in sb.requests] == [(status, fault), (200, None)]


def test_malformed_fault_answers_200_with_a_body_that_is_not_json(sb: OpenAISandbox, http: httpx.Client) -> None:
    sb.faults.push(Fault.malformed())
    sb.faults.push(Fault.malformed(body=b'{"created": 1, "data": "nope"}'))
    first = http.post("images/generations", json={"prompt": "x"})
    assert first.status_code == 200 and first.headers["x-request-id"].startswith("req_")
    with pytest.raises(ValueError):
        first.json()
    assert http.post("images/generations", json={"prompt": "x"}).json() == {"created": 1, "data": "nope"}


def test_times_repeats_a_fault_and_none_repeats_it_until_cleared(sb: OpenAISandbox, http: httpx.Client) -> None:
    sb.faults.push(Fault.server_error(503), times=3)
    assert [http.post("images/generations", json={"prompt": "x"}).status_code for _ in range(4)] == [503] * 3 + [200]
    sb.faults.push(Fault.server_error(502), times=None)
    assert [http.get("models").status_code for _ in range(5)] == [502] * 5
    assert len(sb.faults) == 1
    sb.faults.clear()
    assert http.get("models").status_code == 200 and len(sb.faults) == 0


def test_a_path_filter_leaves_other_routes_alone(sb: OpenAISandbox, http: httpx.Client) -> None:
    sb.faults.push(Fault.server_error(500), path=EDITS)
    assert http.post("images/generations", json={"prompt": "x"}).status_code == 200
    files = {"image": ("a.png", png(), "image/png")}
    assert http.post("images/edits", data={"prompt": "x"}, files=files).status_code == 500
    assert http.post("images/edits", data={"prompt": "x"}, files=files).status_code == 200
    assert (sb.hits(GENERATIONS), sb.hits(EDITS), sb.hits()) == (1, 2, 3)


def test_a_timeout_fault_outlasts_the_client_timeout(sb: OpenAISandbox, sdk: openai.OpenAI) -> None:
    sb.faults.push(Fault.timeout(seconds=5.0))
    started = time.perf_counter()
    with pytest.raises(openai.APITimeoutError):
        sdk.images.generate(prompt="x", timeout=0.3)
    assert time.perf_counter() - started < 2.0
    assert sdk.images.generate(prompt="x").data  # the next request is answered at once
    assert sb.hits(GENERATIONS) == 2 and sb.requests[0].fault == Fault.timeout(seconds=5.0)


def test_a_disconnect_fault_drops_the_connection(sb: OpenAISandbox, http: httpx.Client) -> None:
    sb.faults.push(Fault.disconnect())
    with pytest.raises(httpx.RemoteProtocolError):
        http.post("images/generations", json={"prompt": "x"})
    assert http.post("images/generations", json={"prompt": "x"}).status_code == 200
    assert sb.requests[0].status is None


def test_fault_plans_refuse_nonsense() -> None:
    sb = OpenAISandbox()
    with pytest.raises(ValueError, match="times"):
        sb.faults.push(Fault.server_error(), times=0)
    with pytest.raises(ValueError, match="does not serve"):
        sb.faults.push(Fault("warp_drive"))
    with pytest.raises(ValueError, match="5xx"):
        Fault.server_error(404)


# --- auth, routes, the log ------------------------------------------------------------------


def test_a_wrong_key_is_refused_without_echoing_it(sb: OpenAISandbox) -> None:
    wrong = "sk-wrong-key-0123456789"
    with httpx.Client(base_url=sb.base_url + "/") as client:
        resp = client.post("images/generations", json={"prompt": "x"}, headers={"Authorization": f"Bearer {wrong}"})
        error = assert_error(resp, 401, code="invalid_api_key")
        assert wrong not in resp.text and wrong[8:] not in resp.text and "sk-wr***" in error["message"]
        assert_error(client.post("images/generations", json={"prompt": "x"}), 401)  # no key at all
    bad = openai.OpenAI(api_key=wrong, base_url=sb.base_url, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.images.generate(prompt="x")
    bad.close()
    assert wrong not in str(info.value) and sb.hits() == 3


def test_faults_wait_for_an_authenticated_request(sb: OpenAISandbox, http: httpx.Client) -> None:
    sb.faults.push(Fault.server_error())
    with httpx.Client(base_url=sb.base_url + "/") as anonymous:
        assert anonymous.get("models").status_code == 401
    assert http.get("models").status_code == 500


def test_unknown_routes_are_404_in_the_error_shape(http: httpx.Client) -> None:
    assert_error(http.post("images/variations", json={}), 404)
    assert_error(http.get("images/generations"), 404)
    assert_error(http.get("models/dall-e-3"), 404, code="model_not_found")


def test_models_list_includes_gpt_image_2(sdk: openai.OpenAI) -> None:
    assert "gpt-image-2" in [m.id for m in sdk.models.list()]
    assert sdk.models.retrieve("gpt-image-2").id == "gpt-image-2"


def test_the_log_records_bodies_and_redacts_credentials(sb: OpenAISandbox, http: httpx.Client) -> None:
    http.post("images/generations?trace=1", json={"prompt": "x", "n": 1}, headers={"Idempotency-Key": "abc"})
    files = {"image": ("a.png", png(), "image/png")}
    http.post("images/edits", data={"prompt": "y", "n": "1"}, files=files)
    gen, edit = sb.requests
    assert (gen.method, gen.path, gen.query, gen.json, gen.status) == ("POST", GENERATIONS, {"trace": "1"},
                                                                       {"prompt": "x", "n": 1}, 200)
    assert gen.headers["authorization"] == "[REDACTED]" and gen.headers["idempotency-key"] == "abc"
    assert KEY not in repr(sb.requests)
    assert (edit.json, edit.form, edit.files) == (None, {"prompt": "y", "n": "1"}, {"image": [png()]})
    assert gen.request_id != edit.request_id and gen.received_at <= edit.received_at
    sb.clear_requests()
    assert sb.hits() == 0


def test_lifecycle(sb: OpenAISandbox) -> None:
    idle = OpenAISandbox()
    with pytest.raises(RuntimeError, match="not running"):
        _ = idle.base_url
    idle.stop()  # stopping a stopped sandbox is harmless
    url = sb.base_url
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    sb.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/models")
    sb.start()
    assert httpx.get(sb.base_url + "/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# --- load -------------------------------------------------------------------------------------


async def test_200_concurrent_requests_over_keep_alive_all_succeed(sb: OpenAISandbox) -> None:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=sb.base_url + "/", limits=limits, timeout=30,
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        responses = await asyncio.gather(
            *(client.post("images/generations", json={"prompt": "load", "quality": "low"}) for _ in range(200)))
        assert [r.status_code for r in responses] == [200] * 200
        assert all(r.json()["data"][0]["b64_json"] for r in responses)
        opened = sb.connections
        for _ in range(20):
            assert (await client.get("models")).status_code == 200
        assert sb.connections == opened <= 200  # later requests reuse the open connections
    assert sb.hits() == 220
    sb.stop()
    assert not [t for t in threading.enumerate() if "process_request" in t.name]  # every connection let go


# --- conformance with the published spec ----------------------------------------------------


def test_success_responses_validate_against_the_spec(http: httpx.Client, schema: Schemas) -> None:
    for size in ("1024x1024", "1536x1024", "1024x1536"):
        for quality in ("low", "high", "auto"):
            body = http.post("images/generations", json={"prompt": "x", "size": size, "quality": quality}).json()
            valid(schema("ImagesResponse"), body)
    files = {"image": ("a.png", png(), "image/png"), "mask": ("m.png", alpha_mask((64, 64)), "image/png")}
    valid(schema("ImagesResponse"), http.post("images/edits", data={"prompt": "x"}, files=files).json())
    valid(schema("ListModelsResponse"), http.get("models").json())
    valid(schema("Model"), http.get("models/gpt-image-2").json())


def test_custom_sizes_echo_wxh_and_otherwise_follow_the_spec(http: httpx.Client, schema: Schemas) -> None:
    body = http.post("images/generations", json={"prompt": "x", "size": "1536x864", "quality": "low"}).json()
    assert body.pop("size") == "1536x864"  # the spec's enum lists only the three standard sizes
    valid(schema("ImagesResponse"), body)


def test_error_responses_validate_against_the_spec(sb: OpenAISandbox, http: httpx.Client,
                                                   schema: Schemas) -> None:
    for fault in (Fault.rate_limit(1.0), Fault.insufficient_quota(), Fault.server_error(503), Fault.moderation(),
                  Fault.invalid_request(param="n"), Fault.auth()):
        sb.faults.push(fault)
        valid(schema("ErrorResponse"), http.post("images/generations", json={"prompt": "x"}).json())
    valid(schema("ErrorResponse"), http.post("images/generations", json={"prompt": "x", "size": "1x1"}).json())
    valid(schema("ErrorResponse"), http.post("images/generations", json={"prompt": "x", "model": "dall-e-3"}).json())
    valid(schema("ErrorResponse"), http.get("nowhere").json())
    valid(schema("ErrorResponse"), httpx.get(sb.base_url + "/models").json())


@pytest.mark.parametrize("body", [
    {},
    {"prompt": 42},
    {"prompt": "x", "n": 0},
    {"prompt": "x", "n": 11},
    {"prompt": "x", "n": "2"},
    {"prompt": "x", "n": 1.5},
    {"prompt": "x", "quality": "ultra"},
    {"prompt": "x", "output_format": "gif"},
    {"prompt": "x", "background": "clear"},
    {"prompt": "x", "moderation": "high"},
    {"prompt": "x", "output_compression": "high"},
    {"prompt": "x", "partial_images": 4},
    {"prompt": "x", "stream": "yes"},
    {"prompt": "x", "size": 1024},
    {"prompt": "x", "model": 2},
], ids=lambda b: ",".join(f"{k}={v!r}"[:24] for k, v in b.items()) or "empty")
def test_requests_the_spec_marks_invalid_are_rejected(http: httpx.Client, schema: Schemas,
                                                      body: dict) -> None:
    assert not schema("CreateImageRequest").is_valid(body)
    resp = http.post("images/generations", json=body)
    assert resp.status_code == 400
    valid(schema("ErrorResponse"), resp.json())
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert resp.json()["error"]["param"] == (list(body)[-1] if body else "prompt")


def test_requests_the_spec_accepts_are_served(http: httpx.Client, schema: Schemas) -> None:
    body = {"prompt": "x", "model": "gpt-image-2", "n": 2, "size": "1024x1536", "quality": "low",
            "background": "auto", "output_format": "webp", "output_compression": 70, "moderation": "low",
            "user": "u-1", "stream": False, "partial_images": None}
    valid(schema("CreateImageRequest"), body)
    resp = http.post("images/generations", json=body)
    assert resp.status_code == 200
    assert [decode(d["b64_json"]).format for d in resp.json()["data"]] == ["WEBP", "WEBP"]


def test_stream_answers_server_sent_events_with_partial_images_and_the_billed_usage(
        sb: OpenAISandbox, http: httpx.Client, schema: Schemas) -> None:
    resp = http.post("/images/generations", json={"prompt": "a cat", "stream": True, "partial_images": 2})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in resp.text.split("\n\n") if b]
    events = [(b.split("\n")[0].removeprefix("event: "), json.loads(b.split("\n")[1].removeprefix("data: ")))
              for b in blocks]
    assert [name for name, _ in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [data["partial_image_index"] for _, data in events[:2]] == [0, 1]
    for _, data in events[:2]:
        valid(schema("ImageGenPartialImageEvent"), data)
    done = events[-1][1]
    valid(schema("ImageGenCompletedEvent"), done)
    assert {"b64_json", "created_at", "size", "quality", "background", "output_format", "usage"} <= set(done)
    usage = done["usage"]
    cost = (Decimal(usage["input_tokens_details"]["text_tokens"]) * 5 + Decimal(usage["output_tokens"]) * 30) / 10**6
    assert sb.billed_usd == cost
