"""Together bills a generation once it answers 200: outputs that cannot be had are paid for all the same.

Together reports no usage (PROVIDERS.md: price = megapixels × $/MP × steps / default steps), so the
bill is computed from what was sent, for every image the answer holds. An output given as a URL
(``response_format: "url"``, which the sandbox serves at ``/outputs/<token>``) is downloaded,
again after a failure while the call's time allows, and never re-generated.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from providers.sandbox import Fault, TogetherSandbox
from providers.together import SCHNELL, TogetherProvider
from router import ImageRequest, MalformedResponse, ProviderUnavailable
from router.fetch import SafeFetcher
from router.ledger import Ledger
from tests.conftest import make_router

KEY = "tg-sandbox-test-0123456789"
GEN = "/v1/images/generations"
ONE = Decimal("0.0027")  # FLUX.1-schnell, one 1024² image at its 4 default steps


@pytest.fixture
def tg() -> Iterator[TogetherSandbox]:
    with TogetherSandbox(api_key=KEY) as sb:
        yield sb


@pytest.fixture
def backup() -> Iterator[TogetherSandbox]:
    with TogetherSandbox(api_key=KEY) as sb:
        yield sb


def provider(sb: TogetherSandbox, name: str = "together", **kw: Any) -> TogetherProvider:
    kw.setdefault("download_backoff_s", 0.01)
    return TogetherProvider(name=name, api_key=KEY, base_url=sb.base_url, fetcher=SafeFetcher(allow_loopback=True),
                            **kw)



def url_answer(sb: TogetherSandbox, n: int = 1) -> dict[str, Any]:
    """A real answer of URL outputs (1024², png), made ahead; the request log is cleared after it."""
    with httpx.Client(base_url=sb.base_url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        body: dict[str, Any] = http.post(GEN, json={"model": SCHNELL, "prompt": "a cat", "n": n, "width": 1024,
                                                     "height": 1024, "output_format": "png",
                                                     "response_format": "url"}).json()
    sb.clear_requests()
    return body


def serve(sb: TogetherSandbox, body: dict[str, Any] | bytes) -> None:
    """Answer the next generation with ``body`` (a 200), as if Together had returned it."""
    sb.faults.push(Fault.malformed(body if isinstance(body, bytes) else json.dumps(body).encode()), path=GEN)


def output_path(url: str) -> str:
    return httpx.URL(url).path


async def test_a_failed_download_is_made_again_and_the_generation_billed_once(tg: TogetherSandbox) -> None:
    body = url_answer(tg)
    path = output_path(body["data"][0]["url"])
    serve(tg, body)
    tg.faults.push(Fault.server_error(503), times=2, path=path)
    ledger = Ledger(":memory:")
    async with make_router(provider(tg), ledger=ledger) as router:
        result = await router.agenerate("a cat", model=SCHNELL, width=1024, height=1024)
    assert [a.outcome for a in result.attempts] == ["success"] and result.warnings == []
    assert (result.images[0].width, result.images[0].height, result.images[0].mime) == (1024, 1024, "image/png")
    assert tg.hits(GEN) == 1 and tg.hits(path) == 3  # one generation, three downloads
    assert result.cost.actual_usd == ONE == ledger.spent()


async def test_an_output_that_cannot_be_downloaded_is_charged_and_the_router_falls_back(
    tg: TogetherSandbox, backup: TogetherSandbox
) -> None:
    body = url_answer(tg)
    path = output_path(body["data"][0]["url"])
    serve(tg, body)
    tg.expire_outputs()  # every download answers 403
    ledger = Ledger(":memory:")
    async with make_router(provider(tg), provider(backup, "together-backup"), ledger=ledger) as router:
        result = await router.agenerate("a cat", model=SCHNELL, width=1024, height=1024)
    first, second = result.attempts
    assert (first.provider, first.error, first.cost_usd) == ("together", "ProviderUnavailable", ONE)
    assert (second.provider, second.outcome, second.cost_usd) == ("together-backup", "success", ONE)
    assert tg.hits(GEN) == 1 and tg.hits(path) == 3  # downloaded three times, never re-generated
    assert result.cost.actual_usd == 2 * ONE == ledger.spent()


async def test_the_images_that_could_be_had_are_returned_and_every_image_billed(tg: TogetherSandbox) -> None:
    body = url_answer(tg, n=2)
    body["data"][1]["url"] = f"{tg.origin}/outputs/no-such-output.png"  # answers 403
    serve(tg, body)
    async with make_router(provider(tg)) as router:
        result = await router.agenerate("a cat", model=SCHNELL, width=1024, height=1024, n=2)
    assert len(result.images) == 1 and result.cost.actual_usd == 2 * ONE
    assert any("1 of 2 images returned" in w and "ProviderUnavailable" in w for w in result.warnings)


async def test_downloads_stop_within_the_calls_time_and_the_bill_still_reaches_the_router(
    tg: TogetherSandbox, backup: TogetherSandbox
) -> None:
    body = url_answer(tg)
    path = output_path(body["data"][0]["url"])
    serve(tg, body)
    tg.faults.push(Fault.server_error(503), times=None, path=path)
    slow = provider(tg, download_backoff_s=60.0)  # the next try would come after the call's time
    async with make_router(slow, provider(backup, "together-backup"), attempt_timeout_s=5.0) as router:
        result = await router.agenerate("a cat", model=SCHNELL, width=1024, height=1024)
    assert tg.hits(path) == 1
    assert [(a.error, a.cost_usd) for a in result.attempts] == [("ProviderUnavailable", ONE), (None, ONE)]


async def test_a_hung_download_ends_before_the_router_gives_up_on_the_call(
    tg: TogetherSandbox, backup: TogetherSandbox
) -> None:
    body = url_answer(tg)
    serve(tg, body)
    tg.faults.push(Fault.timeout(seconds=30.0), path=output_path(body["data"][0]["url"]))
    ledger = Ledger(":memory:")
    async with make_router(provider(tg), provider(backup, "together-backup"), ledger=ledger,
                           attempt_timeout_s=1.0) as router:
        result = await router.agenerate("a cat", model=SCHNELL, width=1024, height=1024)
    # the adapter's own time ran out first (a router timeout would have lost the bill)
    assert [(a.error, a.cost_usd) for a in result.attempts] == [("ProviderTimeout", ONE), (None, ONE)]
    assert ledger.spent() == 2 * ONE and tg.hits(GEN) == 1


@pytest.mark.parametrize(("body", "billed"), [
    (b'{"id": "x", "object": "list", "data": [{"index": 0, "', 2 * ONE),  # unreadable: the images asked for
    (json.dumps({"id": "x", "object": "list", "data": [{"index": 0, "type": "b64_json", "b64_json": "@@"},
                                                        {"index": 1, "type": "b64_json", "b64_json": "@@"}]}).encode(),
     2 * ONE),
    (json.dumps({"id": "x", "object": "list", "data": [
        {"index": 0, "type": "b64_json", "b64_json": base64.b64encode(b"not an image").decode()}]}).encode(), ONE),
    (b'{"id": "x", "model": "m", "object": "list", "data": []}', Decimal(0)),  # no image made, none billed
])
async def test_a_200_without_a_readable_image_carries_the_bill_of_what_was_made(tg: TogetherSandbox, body: bytes,
                                                                                billed: Decimal) -> None:
    serve(tg, body)
    p = provider(tg)
    try:
        with pytest.raises(MalformedResponse) as info:
            await p.generate(ImageRequest(prompt="a cat", width=1024, height=1024, n=2), SCHNELL, timeout_s=5.0)
    finally:
        await p.aclose()
    assert (info.value.billed.cost_usd if info.value.billed else Decimal(0)) == billed


async def test_an_unsafe_output_url_is_not_fetched_and_the_generation_is_charged(tg: TogetherSandbox) -> None:
    body = url_answer(tg)
    body["data"][0]["url"] = "http://169.254.169.254/latest/meta-data/x.png"  # cloud metadata: refused
    serve(tg, body)
    p = TogetherProvider(api_key=KEY, base_url=tg.base_url, fetcher=SafeFetcher())
    try:
        with pytest.raises(MalformedResponse) as info:
            await p.generate(ImageRequest(prompt="a cat", width=1024, height=1024), SCHNELL, timeout_s=5.0)
    finally:
        await p.aclose()
    assert "not downloadable" in str(info.value) and info.value.billed is not None
    assert info.value.billed.cost_usd == ONE


async def test_an_output_host_that_refuses_connections_is_tried_again_then_charged(tg: TogetherSandbox) -> None:
    import socket

    with socket.socket() as closed:  # a loopback port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    serve(tg, {"id": "x", "object": "list", "data": [{"index": 0, "type": "url",
                                                       "url": f"http://127.0.0.1:{port}/out.png"}]})
    p = provider(tg, download_attempts=2)
    try:
        with pytest.raises(ProviderUnavailable) as info:
            await p.generate(ImageRequest(prompt="a cat", width=1024, height=1024), SCHNELL, timeout_s=5.0)
    finally:
        await p.aclose()
    assert "ConnectError" in str(info.value) and info.value.billed is not None and info.value.billed.cost_usd == ONE
