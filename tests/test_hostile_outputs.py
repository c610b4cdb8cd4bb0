"""Hostile provider outputs: every image a vendor returns passes one typed decode with the caps user images have.

A decompression bomb, a truncated file, a format other than PNG/JPEG/WEBP or a header claiming
50,000 x 50,000 pixels, answered by any of the five vendors' sandboxes over loopback HTTP (their
hostile-image faults), becomes a MalformedResponse: the router falls back to the next candidate,
charges what the vendor billed for the unusable answer, and tells the circuit breaker.
"""

from __future__ import annotations

import io
import random
import threading
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from PIL import Image

import router.images as images
from providers.base import Provider
from providers.bfl import BFLProvider
from providers.openai import OpenAIProvider
from providers.replicate import ReplicateProvider
from providers.sandbox import (
    BFLSandbox,
    Fault,
    OpenAISandbox,
    ReplicateSandbox,
    SandboxServer,
    StabilitySandbox,
    TogetherSandbox,
)
from providers.sandbox._server import HOSTILE_IMAGE_FAULTS, hostile_image
from providers.stability import StabilityProvider
from providers.together import SCHNELL, TogetherProvider
from router import ImageRequest, InvalidRequestError, MalformedResponse
from router.fetch import SafeFetcher
from router.health import CircuitBreaker
from router.images import ImageDecodeError, verify
from router.ledger import Ledger
from tests.conftest import make_router, png
from tests.test_ssrf import no_outside_connections  # noqa: F401  (autouse: nothing leaves loopback)

KINDS = sorted(HOSTILE_IMAGE_FAULTS)
WHY = {  # what the error says, per hostile image
    "bomb_image": "decompressed data too large",  # Pillow's words (capitalized differently across versions)
    "huge_image": "exceeds limit",
    "truncated_image": "truncated",
    "wrong_format_image": "not a PNG, JPEG or WEBP image",
}


# --- the one decode -------------------------------------------------------------------------------------


def _pillow_bytes() -> int:
    """An upper bound of the pixel memory Pillow has allocated so far (blocks × the block size)."""
    return int(Image.core.get_stats()["allocated_blocks"]) * int(Image.core.get_block_size())


@pytest.mark.parametrize("kind", KINDS)
def test_a_hostile_image_is_a_typed_error_in_bounded_memory(kind: str) -> None:
    data = hostile_image(kind)
    pixels_before = _pillow_bytes()
    tracemalloc.start()
    try:
        with pytest.raises(ImageDecodeError) as info:
            verify(data, what="response image")
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    pixel_bytes = _pillow_bytes() - pixels_before
    assert WHY[kind].lower() in info.value.message.lower()
    # RELIABILITY.md: < 100 MB growth. Python allocations (the zTXt bomb stops at Pillow's 1 MB text cap) and
    # Pillow's pixel blocks (none for what the header refuses; the truncated 256x256 is under one block)
    assert python_peak < 8 * 1024 * 1024
    assert pixel_bytes <= Image.core.get_block_size()


def test_a_truncated_image_whose_file_looks_whole_is_found_only_by_decoding_it() -> None:
    data = hostile_image("truncated_image")
    assert images.probe_whole(data) == ("image/png", 256, 256)  # the header and the end are sound ...
    with pytest.raises(ImageDecodeError, match="truncated"):
        verify(data)  # ... the pixel data is not


def test_whole_images_of_every_format_pass_as_they_are() -> None:
    for fmt, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, format=fmt)
        assert verify(buf.getvalue()) == (mime, 40, 30)


def test_mangled_images_only_ever_fail_typed() -> None:
    """A deterministic fuzz: bytes flipped, cut and spliced in PNG, JPEG and WEBP files."""
    rnd = random.Random(12)
    bases = []
    for fmt in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        Image.frombytes("RGB", (48, 32), rnd.randbytes(48 * 32 * 3)).save(buf, format=fmt)
        bases.append(buf.getvalue())
    outcomes = {"ok": 0, "typed": 0}
    for _ in range(600):
        data = bytearray(rnd.choice(bases))
        for _ in range(rnd.randint(1, 6)):
            op, pos = rnd.randrange(3), rnd.randrange(len(data))
            if op == 0:
                data[pos] = rnd.randrange(256)
            elif op == 1:
                del data[pos : pos + rnd.randint(1, 64)]
            else:
                data[pos:pos] = rnd.randbytes(rnd.randint(1, 8))
        try:
            verify(bytes(data))
            outcomes["ok"] += 1
        except ImageDecodeError:
            outcomes["typed"] += 1
    assert outcomes["typed"] > 300 and sum(outcomes.values()) == 600  # anything else would have raised here


def test_a_hostile_image_fault_must_name_a_known_image() -> None:
    assert Fault.hostile_image("bomb_image") == Fault("bomb_image")
    with pytest.raises(ValueError, match="unknown hostile image"):
        Fault.hostile_image("gif_image")


# --- per vendor, through its sandbox over loopback HTTP -----------------------------------------------


@dataclass(frozen=True)
class Vendor:
    """How to serve and call one vendor: its sandbox, an adapter for it, where it generates, what it billed."""

    sandbox: Callable[[], SandboxServer]
    adapter: Callable[[Any, str], Provider]
    generation_path: str
    billed: Callable[[Any], Decimal] | None  # what the sandbox billed; None where the vendor reports no bill


def _fetcher() -> SafeFetcher:
    return SafeFetcher(allow_loopback=True)  # the sandboxes serve their outputs on 127.0.0.1


VENDORS: dict[str, Vendor] = {
    "openai": Vendor(
        lambda: OpenAISandbox(api_key="sk-hostile"),
        lambda sb, name: OpenAIProvider(name=name, api_key=sb.api_key, base_url=sb.base_url),
        "/v1/images/generations",
        lambda sb: sb.billed_usd,
    ),
    "stability": Vendor(
        lambda: StabilitySandbox(api_key="sk-hostile"),
        lambda sb, name: StabilityProvider(
            name=name, api_key=sb.api_key, base_url=sb.base_url, models=("stable-image-core",)
        ),
        "/v2beta/stable-image/generate/core",
        lambda sb: sb.billed_usd,
    ),
    "together": Vendor(
        lambda: TogetherSandbox(api_key="tg-hostile"),
        lambda sb, name: TogetherProvider(
            name=name, api_key=sb.api_key, base_url=sb.base_url, models=(SCHNELL,), fetcher=_fetcher()
        ),
        "/v1/images/generations",
        None,
    ),
    "replicate": Vendor(
        lambda: ReplicateSandbox(api_token="r8_hostile"),
        lambda sb, name: ReplicateProvider(
            name=name,
            api_token=sb.api_token,
            base_url=sb.base_url,
            models=("flux-schnell",),
            fetcher=_fetcher(),
            poll_interval_s=0.01,
            download_backoff_s=0.01,
        ),
        "/v1/models/black-forest-labs/flux-schnell/predictions",
        lambda sb: sb.billed_usd,
    ),
    "bfl": Vendor(
        lambda: BFLSandbox(api_key="bfl-hostile"),
        lambda sb, name: BFLProvider(
            name=name,
            api_key=sb.api_key,
            base_url=sb.base_url,
            models=("flux-pro-1.1",),
            fetcher=_fetcher(),
            poll_interval_s=0.01,
            download_backoff_s=0.01,
        ),
        "/v1/flux-pro-1.1",
        lambda sb: sb.billed_usd,
    ),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vendor", list(VENDORS))
async def test_a_hostile_output_falls_back_charges_the_bill_and_tells_the_breaker(vendor: str, kind: str) -> None:
    v = VENDORS[vendor]
    ledger = Ledger(":memory:")
    with v.sandbox() as primary, v.sandbox() as backup:
        primary.faults.push(Fault.hostile_image(kind))  # made and billed as usual; the image in it is hostile
        breaker = CircuitBreaker(failure_threshold=1)
        async with make_router(
            v.adapter(primary, vendor), v.adapter(backup, f"{vendor}-backup"), ledger=ledger, breaker=breaker
        ) as router:
            result = await router.agenerate("a lighthouse at dusk", width=1024, height=1024)
        first, second = result.attempts
        assert (first.provider, first.outcome, first.error) == (vendor, "error", "MalformedResponse")
        assert WHY[kind].lower() in (first.message or "").lower()
        assert (second.provider, second.outcome) == (f"{vendor}-backup", "success") and len(result.images) == 1
        assert result.images[0].data != hostile_image(kind)
        assert first.cost_usd > 0  # the vendor billed the unusable answer: it is charged, not lost
        if v.billed is not None:
            assert first.cost_usd == v.billed(primary) and second.cost_usd == v.billed(backup)
        else:  # Together reports no bill: the failed call costs what the same call that succeeded did
            assert first.cost_usd == second.cost_usd
        assert ledger.spent() == result.cost.actual_usd == first.cost_usd + second.cost_usd
        assert primary.hits(v.generation_path) == 1  # paid for once: never generated again
        assert breaker.state(vendor) == "open" and breaker.state(f"{vendor}-backup") == "closed"


async def test_a_hostile_output_is_decoded_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    original = images.decode

    def recorded(data: bytes, *, what: str = "image") -> Any:
        threads.append(threading.get_ident())
        return original(data, what=what)

    monkeypatch.setattr(images, "decode", recorded)
    with OpenAISandbox(api_key="sk-hostile") as sb:
        sb.faults.push(Fault.hostile_image("truncated_image"))
        p = OpenAIProvider(api_key=sb.api_key, base_url=sb.base_url)
        try:
            with pytest.raises(MalformedResponse, match="truncated") as info:
                await p.generate(ImageRequest(prompt="a cat", n=2), "gpt-image-2", timeout_s=10)
            ok = await p.generate(ImageRequest(prompt="a cat"), "gpt-image-2", timeout_s=10)
        finally:
            await p.aclose()
    assert info.value.billed is not None and info.value.billed.cost_usd > 0
    assert len(ok.images) == 1 and ok.images[0].width == 1024
    loop_thread = threading.get_ident()
    assert len(threads) == 3 and loop_thread not in threads  # two hostile images and one good one, all in workers


async def test_a_hostile_image_in_one_of_several_outputs_is_dropped_with_the_rest_returned() -> None:
    with ReplicateSandbox(api_token="r8_hostile") as sb:
        sb.next_ids = ["p-mixed"]
        sb.faults.push(Fault.hostile_image("huge_image"), path=ReplicateSandbox.output_path("p-mixed", 1, "png"))
        p = VENDORS["replicate"].adapter(sb, "replicate")
        try:
            response = await p.generate(ImageRequest(prompt="a cat", n=2), "flux-schnell", timeout_s=10)
        finally:
            await p.aclose()
    assert len(response.images) == 1 and response.billing.cost_usd == sb.billed_usd > 0
    assert any("1 of 2 outputs" in w for w in response.warnings)


async def test_user_images_meet_the_same_caps() -> None:
    """A request's image is checked from its header at once (format, bytes, pixels) and decoded where it is
    used: the same caps, so each hostile image is refused, the truncated one when its pixels are read."""
    for kind in ("bomb_image", "huge_image", "wrong_format_image"):
        with pytest.raises(InvalidRequestError, match=f"(?i){WHY[kind]}"):  # RequestValidationError naming init_image
            ImageRequest(prompt="x", init_image=hostile_image(kind))
    request = ImageRequest(prompt="x", init_image=hostile_image("truncated_image"))
    assert request.init_image is not None
    with pytest.raises(ImageDecodeError, match="truncated"):
        await images.aload_image(request.init_image)
    good = ImageRequest(prompt="x", init_image=png(8, 8)).init_image
    assert good is not None and (await images.aload_image(good)).size == (8, 8)
