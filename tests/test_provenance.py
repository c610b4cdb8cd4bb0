"""Provenance metadata written into saved images and read back, through routed requests and directly."""

from __future__ import annotations

import io
import json
import struct
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from providers.sandbox import OpenAISandbox
from router import GeneratedImage
from router.provenance import (
    JSON_KEY,
    PARAMETERS_KEY,
    VERSION,
    embed,
    infotext,
    parse_infotext,
    read_provenance,
)
from tests.test_router_openai import make_router, provider

PROMPT = "a lighthouse at dusk, oil painting"
RECORD: dict[str, Any] = {
    "version": VERSION,
    "generator": "imagerouter 0.1.0",
    "prompt": "a red bicycle, watercolor",
    "negative_prompt": "blurry",
    "seed": 1234,
    "steps": 30,
    "guidance_scale": 6.5,
    "scheduler": "euler_a",
    "width": 64,
    "height": 48,
    "task": "txt2img",
    "model": "sdxl",
    "provider": "local",
    "cost_usd": "0",
    "estimated_cost_usd": "0",
    "request_id": "ir_0123",
    "provider_request_id": None,
    "policy": "local-first",
}


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, whole chunk) of every PNG chunk."""
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        out.append((data[pos + 4 : pos + 8], data[pos : pos + 12 + length]))
        pos += 12 + length
    return out


def pixels(data: bytes) -> tuple[str, tuple[int, int], bytes]:
    im = Image.open(io.BytesIO(data))
    return im.mode, im.size, im.tobytes()


def encoded(mode: str, fmt: str = "PNG", **kw: Any) -> bytes:
    """A 64×48 gradient in ``mode``, encoded."""
    base = Image.linear_gradient("L").resize((64, 48)).rotate(30)
    if mode == "I;16":
        im = base.convert("I").point(lambda v: v * 257).convert("I;16")
    elif mode == "P":
        im = base.convert("RGB").quantize(16)
    else:
        im = base.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


async def test_a_routed_png_round_trips_its_provenance(sandbox: OpenAISandbox, tmp_path: Path) -> None:
    async with make_router(provider(sandbox), policy="cheapest") as router:
        result = await router.agenerate(PROMPT, negative_prompt="blurry", width=1024, height=1024, seed=7)
    image = result.images[0]
    path = image.save(tmp_path / "out")
    assert path.suffix == ".png" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temp file left

    meta = read_provenance(path)
    assert meta["prompt"] == PROMPT and meta["negative_prompt"] == "blurry"
    assert meta["model"] == result.model == "gpt-image-2" and meta["provider"] == "openai"
    assert meta["seed"] == image.seed and meta["requested_seed"] == 7  # OpenAI ignores seeds: both are kept apart
    assert meta["request_id"] == result.request_id and meta["policy"] == "cheapest"
    assert Decimal(meta["cost_usd"]) == result.cost.actual_usd and meta["version"] == VERSION
    assert (meta["width"], meta["height"]) == (1024, 1024) and meta["task"] == "txt2img"
    assert meta["provider_request_id"] == result.provider_request_id
    assert meta == json.loads(json.dumps(image.provenance))

    saved = path.read_bytes()
    assert pixels(saved) == pixels(image.data)  # the same pixels, mode and size
    ours = {JSON_KEY.encode(), PARAMETERS_KEY.encode()}
    assert [c for c in chunks(saved) if not (c[0] == b"tEXt" and c[1][8:].split(b"\0")[0] in ours)] == chunks(
        image.data
    )  # every original chunk is there byte for byte, in order
    info = Image.open(path).info  # what any PNG reader (and AUTOMATIC1111) sees
    assert info[PARAMETERS_KEY].startswith(f"{PROMPT}\nNegative prompt: blurry\n")
    assert "Size: 1024x1024, Model: gpt-image-2, Provider: openai, Policy: cheapest" in info[PARAMETERS_KEY]
    assert json.loads(info[JSON_KEY]) == meta


async def test_opting_out_writes_the_bytes_as_they_came(
    sandbox: OpenAISandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_router(provider(sandbox)) as router:
        result = await router.agenerate("a cat", width=1024, height=1024, n=2)
    image = result.images[0]
    plain = image.save(tmp_path / "plain.png", metadata=False)
    assert plain.read_bytes() == image.data and read_provenance(plain) == {}
    assert not {PARAMETERS_KEY, JSON_KEY} & set(Image.open(plain).info)

    monkeypatch.setenv("IMAGEROUTER_PROVENANCE", "0")
    assert image.save(tmp_path / "env.png").read_bytes() == image.data
    assert read_provenance(image.save(tmp_path / "forced.png", metadata=True))["prompt"] == "a cat"

    monkeypatch.delenv("IMAGEROUTER_PROVENANCE")
    paths = result.save(tmp_path / "all")
    assert [read_provenance(p)["request_id"] for p in paths] == [result.request_id] * 2
    assert [p.read_bytes() for p in result.save(tmp_path / "none", metadata=False)] == [i.data for i in result.images]


async def test_no_key_or_secret_reaches_the_metadata(
    sandbox: OpenAISandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = [
        "sk-live-0123456789abcdefghij",
        "r8_secretreplicatetoken0123",
        "sk-proj-optionsecret987654321",
        sandbox.api_key,
    ]
    monkeypatch.setenv("OPENAI_API_KEY", sandbox.api_key)
    monkeypatch.setenv("STABILITY_API_KEY", secrets[0])
    monkeypatch.setenv("REPLICATE_API_TOKEN", secrets[1])
    options = {"openai": {"user": secrets[2], "api_key": secrets[2]}}
    async with make_router(provider(sandbox)) as router:
        result = await router.agenerate(
            f"a cat holding a note that says {secrets[0]}", provider_options=options, width=1024, height=1024
        )
    saved = result.images[0].save(tmp_path / "cat.png").read_bytes()
    meta = read_provenance(saved)
    assert meta["prompt"].startswith("a cat holding a note that says ") and meta["prompt"].endswith("[REDACTED]")
    blob = saved + json.dumps(meta).encode() + json.dumps(result.images[0].provenance).encode()
    for secret in secrets:
        assert secret.encode() not in blob
    assert "provider_options" not in meta


async def test_a_routed_jpeg_carries_exif_and_xmp(sandbox: OpenAISandbox, tmp_path: Path) -> None:
    async with make_router(provider(sandbox)) as router:
        result = await router.agenerate(PROMPT, width=1024, height=1024, output_format="jpeg")
    image = result.images[0]
    assert image.mime == "image/jpeg"
    path = image.save(tmp_path / "out")
    assert path.suffix == ".jpg"
    meta = read_provenance(path)
    assert meta["prompt"] == PROMPT and meta["request_id"] == result.request_id
    im = Image.open(path)
    comment = im.getexif().get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"ASCII\0\0\0" + PROMPT.encode())  # where AUTOMATIC1111 reads JPEG parameters
    assert b"imagerouter:provenance" in im.info["xmp"]
    assert pixels(path.read_bytes()) == pixels(image.data)  # nothing re-encoded


@pytest.mark.parametrize(
    "mode,kw",
    [("RGB", {"quality": 80}), ("RGB", {"lossless": True}), ("RGBA", {"lossless": True}), ("RGBA", {"quality": 70})],
)
def test_webp_carries_the_record_in_xmp_with_the_image_data_untouched(
    tmp_path: Path, mode: str, kw: dict[str, Any]
) -> None:
    data = encoded(mode, "WEBP", **kw)
    image = GeneratedImage(data=data, mime="image/webp", width=64, height=48, provenance=RECORD)
    path = image.save(tmp_path / "x")
    assert read_provenance(path) == json.loads(json.dumps(RECORD, default=str))
    assert b"imagerouter:provenance" in Image.open(path).info["xmp"]
    assert pixels(path.read_bytes()) == pixels(data)  # the VP8/VP8L data is copied, not re-encoded
    again = GeneratedImage(data=path.read_bytes(), mime="image/webp", width=64, height=48, provenance=RECORD)
    assert again.save(tmp_path / "y").read_bytes() == path.read_bytes()  # one XMP chunk, replaced
    assert image.save(tmp_path / "z", metadata=False).read_bytes() == data


@pytest.mark.parametrize(
    "mode,kw", [("RGB", {}), ("RGBA", {}), ("L", {}), ("I;16", {}), ("1", {}), ("P", {"transparency": 0}), ("LA", {})]
)
def test_png_modes_and_bit_depths_are_kept(mode: str, kw: dict[str, Any]) -> None:
    data = encoded(mode, **kw)
    out = embed(data, RECORD)
    assert pixels(out) == pixels(data)
    assert chunks(out)[0] == chunks(data)[0]  # IHDR: the same bit depth and colour type
    assert Image.open(io.BytesIO(out)).info.get("transparency") == Image.open(io.BytesIO(data)).info.get("transparency")
    assert read_provenance(out) == RECORD
    assert embed(out, RECORD) == out  # writing again replaces our chunks instead of adding more


def test_unicode_text_goes_into_itxt_chunks() -> None:
    record = RECORD | {"prompt": "夕暮れの灯台, 油絵", "negative_prompt": "flou"}
    out = embed(encoded("RGB"), record)
    types = [t for t, _ in chunks(out)]
    assert types.count(b"iTXt") == 1 and types.count(b"tEXt") == 1  # infotext in iTXt; JSON stays ASCII
    assert read_provenance(out)["prompt"] == "夕暮れの灯台, 油絵"
    assert Image.open(io.BytesIO(out)).info[PARAMETERS_KEY].startswith("夕暮れの灯台, 油絵\n")


def test_infotext_follows_automatic1111() -> None:
    assert infotext(RECORD) == (
        "a red bicycle, watercolor\n"
        "Negative prompt: blurry\n"
        "Steps: 30, Sampler: Euler a, CFG scale: 6.5, Seed: 1234, Size: 64x48, Model: sdxl, Provider: local, "
        "Policy: local-first, Cost: $0, Request id: ir_0123, Version: imagerouter 0.1.0"
    )
    assert (
        infotext(RECORD | {"negative_prompt": None, "model": "a, b: c"}).split("\n")[1].find('Model: "a, b: c"') > 0
    )  # values with commas or colons are quoted


def test_a_file_with_only_a_parameters_chunk_is_parsed() -> None:
    buf = io.BytesIO()
    info = PngInfo()  # as AUTOMATIC1111 itself writes it
    info.add_text(
        "parameters",
        "a cat,\nmultiline\nNegative prompt: dog\nSteps: 20, Sampler: DPM++ 2M Karras, "
        'CFG scale: 7, Seed: 42, Size: 512x768, Model hash: abc, Model: "sd, 1.5"',
    )
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    meta = read_provenance(buf.getvalue())
    assert meta["prompt"] == "a cat,\nmultiline" and meta["negative_prompt"] == "dog"
    assert (meta["steps"], meta["seed"], meta["guidance_scale"]) == (20, 42, 7.0)
    assert (meta["width"], meta["height"], meta["model"]) == (512, 768, "sd, 1.5")
    assert meta["sampler"] == "DPM++ 2M Karras" and meta["parameters"]["Model hash"] == "abc"
    assert parse_infotext(infotext(RECORD))["seed"] == 1234


def test_a_damaged_png_is_saved_as_it_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = encoded("RGB")[:40]
    image = GeneratedImage(data=data, mime="image/png", width=64, height=48, provenance=RECORD)
    assert image.save(tmp_path / "x.png").read_bytes() == data
    assert "provenance not written" in caplog.text


def test_images_without_provenance_and_equality() -> None:
    data = encoded("RGB")
    bare = GeneratedImage(data=data, mime="image/png", width=64, height=48)
    assert bare.provenance is None and bare == GeneratedImage(
        data=data, mime="image/png", width=64, height=48, provenance=RECORD
    )
    assert "provenance" not in repr(bare)
