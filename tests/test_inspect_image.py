"""``pixroute inspect IMAGE``: an image's format, size, provenance record and invisible watermark, read from
the file; typed errors for what is not an image."""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from providers.sandbox.comfyui import ComfyUISandbox
from router.errors import InvalidRequestError
from router.images import ImageDecodeError
from router.inspect_image import add_arguments, inspect, run_args
from router.provenance import embed as embed_provenance
from router.request import ImageRequest
from tests.conftest import make_router, png
from tests.test_comfyui import (
    SD15,
    Ticks,
    _no_comfyui_env,  # noqa: F401  (autouse: no ComfyUI settings from the environment)
    comfy,
)


def photo(prompt: str, **kw: object) -> ImageRequest:
    """A request the sandbox answers with a textured image the mark can be read back from (needs the mark)."""
    pytest.importorskip("imwatermark")
    from tests.test_comfyui_watermark import photo as textured_request

    return textured_request(prompt, **kw)  # type: ignore[arg-type]


@pytest.fixture
def sb() -> Iterator[ComfyUISandbox]:
    with ComfyUISandbox(clock=Ticks()) as server:
        yield server


def parse(*argv: str) -> argparse.Namespace:
    """The arguments as ``pixroute inspect`` parses them (a subcommand whose parser adds ``--json``)."""
    parser = argparse.ArgumentParser(prog="pixroute")
    add_arguments(parser.add_subparsers(dest="command").add_parser("inspect"))
    return parser.parse_args(["inspect", *argv])


async def test_a_routed_comfyui_image_shows_its_provenance_and_watermark(sb: ComfyUISandbox,
                                                                         tmp_path: Path) -> None:
    pytest.importorskip("websockets")
    async with make_router(await comfy(sb)) as router:
        result = await router.agenerate(photo("a lighthouse at dusk", seed=6), model=SD15)
        jpeg_result = await router.agenerate(photo("a lighthouse at dusk", seed=6, output_format="jpeg"), model=SD15)
    saved = result.images[0].save(tmp_path / "out")
    report = inspect(saved)
    assert (report["format"], report["mime"], report["width"], report["height"]) == ("png", "image/png", 512, 512)
    assert report["bytes"] == saved.stat().st_size and report["provenance_error"] is None
    prov = report["provenance"]
    assert (prov["provider"], prov["model"], prov["seed"], prov["prompt"]) == (
        "comfyui", SD15, 6, "a lighthouse at dusk")
    assert report["watermark"]["checked"] and report["watermark"]["found"]
    assert report["watermark"]["payload"] == "imgrtr" and report["watermark"]["agreement"] >= 0.9
    jpeg_report = inspect(jpeg_result.images[0].save(tmp_path / "out-jpeg"))
    assert jpeg_report["format"] == "jpeg" and jpeg_report["provenance"]["model"] == SD15
    assert jpeg_report["watermark"]["found"]


def test_an_image_from_elsewhere_has_no_record_and_no_mark(tmp_path: Path) -> None:
    pytest.importorskip("imwatermark")
    path = tmp_path / "plain.png"
    path.write_bytes(png(320, 256, (40, 90, 200)))
    report = inspect(path)
    assert (report["format"], report["width"], report["height"]) == ("png", 320, 256)
    assert report["provenance"] == {} and report["provenance_error"] is None
    assert report["watermark"]["checked"] and not report["watermark"]["found"]
    small = tmp_path / "small.png"
    small.write_bytes(png(64, 64))
    assert "too small to carry the mark" in inspect(small)["watermark"]["note"]


def test_missing_files_directories_and_non_images_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="no such file") as caught:
        inspect(tmp_path / "missing.png")
    assert caught.value.code == "file_not_found"
    with pytest.raises(InvalidRequestError, match="not a file") as caught:
        inspect(tmp_path)
    assert caught.value.code == "not_a_file"
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageDecodeError, match="not a PNG, JPEG or WEBP image"):
        inspect(tmp_path / "notes.txt")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    (tmp_path / "a.gif").write_bytes(gif.getvalue())
    with pytest.raises(ImageDecodeError):
        inspect(tmp_path / "a.gif")


def test_a_damaged_provenance_record_is_reported_and_the_rest_still_read(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("imagerouter", '{"prompt": "x",')  # a record cut short: not JSON
    path = tmp_path / "damaged.png"
    Image.new("RGB", (300, 300), (10, 20, 30)).save(path, pnginfo=info)
    report = inspect(path)
    assert report["provenance"] is None and "not valid JSON" in report["provenance_error"]
    assert (report["width"], report["height"]) == (300, 300)


def test_without_invisible_watermark_the_mark_is_reported_unchecked(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "imwatermark", None)  # find_spec answers None: not installed
    path = tmp_path / "a.png"
    path.write_bytes(png(300, 300))
    assert inspect(path)["watermark"] == {
        "checked": False, "reason": "invisible-watermark is not installed (pip install 'pixroute[local]')"}
    out = io.StringIO()
    assert run_args(parse(str(path)), stdout=out) == 0
    assert "invisible watermark: not checked (invisible-watermark is not installed" in out.getvalue()


def test_the_command_prints_json_or_lines_with_control_characters_escaped(tmp_path: Path) -> None:
    pytest.importorskip("imwatermark")
    path = tmp_path / "hostile.png"
    path.write_bytes(embed_provenance(png(300, 300), {"prompt": "red \x1b[2Jcleared", "model": "m", "version": 1}))
    out = io.StringIO()
    assert run_args(parse(str(path), "--json"), stdout=out) == 0
    doc = json.loads(out.getvalue())
    assert doc["provenance"]["prompt"] == "red \x1b[2Jcleared" and doc["watermark"]["found"] is False
    out = io.StringIO()
    assert run_args(parse(str(path)), stdout=out) == 0
    text = out.getvalue()
    assert "\x1b" not in text and "prompt: red \\x1b[2Jcleared" in text
    assert text.startswith(f"{path}: PNG 300x300,") and "invisible watermark: not found" in text


def test_an_operators_own_payload_can_be_looked_for(tmp_path: Path) -> None:
    pytest.importorskip("imwatermark")
    from providers.local.watermark import embed

    img = Image.open(io.BytesIO(photo("x").init_image.data or b"")).convert("RGB")  # type: ignore[union-attr]
    path = tmp_path / "acme.png"
    embed(img, b"acme01").save(path)
    out = io.StringIO()
    run_args(parse(str(path), "--watermark-payload", "acme01", "--json"), stdout=out)
    assert json.loads(out.getvalue())["watermark"] | {"agreement": 1} == {
        "checked": True, "found": True, "agreement": 1, "payload": "acme01"}
    assert not inspect(path)["watermark"]["found"]
    with pytest.raises(InvalidRequestError, match="6 bytes"):
        run_args(parse(str(path), "--watermark-payload", "short"), stdout=io.StringIO())
