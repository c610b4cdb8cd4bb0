"""The unified request: task from inputs, image input forms, and one typed error per bad input."""

from __future__ import annotations

import base64
from decimal import Decimal
from pathlib import Path

import pytest
from PIL import Image

from router import ImageRequest, InvalidRequestError, RequestValidationError
from tests.conftest import half_mask, png


@pytest.mark.parametrize(
    ("kwargs", "task"),
    [
        ({}, "txt2img"),
        ({"init_image": png()}, "img2img"),
        ({"init_image": png(), "mask_image": half_mask()}, "inpaint"),
        ({"controls": [{"kind": "canny", "image": png()}]}, "control"),
        ({"init_image": png(), "controls": [{"kind": "depth", "image": png()}]}, "control"),
        ({"init_image": png(), "upscale": 2}, "upscale"),
    ],
)
def test_task_follows_from_the_inputs(kwargs: dict, task: str) -> None:
    assert ImageRequest(prompt="a cat", **kwargs).task == task


def test_image_inputs_accept_every_documented_form(tmp_path: Path) -> None:
    data = png(32, 16)
    path = tmp_path / "in.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    forms = [data, path, str(path), Image.new("RGB", (32, 16)), b64, f"data:image/png;base64,{b64}"]
    for form in forms:
        img = ImageRequest(prompt="x", init_image=form).init_image
        assert img is not None and (img.width, img.height) == (32, 16) and img.mime == "image/png"
    url = ImageRequest(prompt="x", init_image="https://example.com/a.png").init_image
    assert url is not None and url.url == "https://example.com/a.png" and url.data is None


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"mask_image": half_mask()}, "mask_image", "needs an init_image"),
        ({"init_image": png(), "strength": 1.5}, "strength", "between 0 and 1"),
        ({"init_image": png(), "strength": -0.1}, "strength", "between 0 and 1"),
        ({"n": 0}, "n", "at least 1"),
        ({"width": 1001, "height": 1000}, "width", "multiple of 8"),
        ({"width": 1024}, "height", "together"),
        ({"width": 512, "height": 512, "aspect_ratio": "1:1"}, "aspect_ratio", "not both"),
        ({"aspect_ratio": "wide"}, "aspect_ratio", "16:9"),
        ({"controls": [{"kind": "laser", "image": png()}]}, "controls.0.kind", "unknown control kind"),
        ({"controls": [{"kind": "canny", "image": png(), "start": 0.8, "end": 0.2}]}, "controls.0", "below end"),
        ({"scheduler": "magic"}, "scheduler", "unknown scheduler"),
        ({"init_image": b"not an image"}, "init_image", "PNG, JPEG or WEBP"),
        ({"init_image": "file:///etc/passwd"}, "init_image", "only http(s)"),
        ({"init_image": "/no/such/file.png"}, "init_image", "not found"),
        ({"upscale": 2}, "upscale", "init_image"),
        ({"strength": 0.5}, "strength", "init_image"),
        ({"background": "transparent"}, "background", "provider_options"),
        ({"seed": -1}, "seed", "greater than or equal"),
    ],
)
def test_bad_input_raises_one_typed_error_naming_the_field(kwargs: dict, field: str, hint: str) -> None:
    with pytest.raises(RequestValidationError) as info:
        ImageRequest(prompt="a cat", **kwargs)
    err = info.value
    assert isinstance(err, InvalidRequestError) and isinstance(err, ValueError)
    assert err.field == field, err.problems
    assert hint in str(err)


def test_empty_prompt_is_rejected() -> None:
    with pytest.raises(RequestValidationError, match="prompt: must not be empty"):
        ImageRequest(prompt="   ")


def test_flat_keywords_fill_the_constraints() -> None:
    req = ImageRequest.from_kwargs("a cat", width=512, height=512, max_cost_usd=0.02, residency={"EU", "local"},
                                   tags="team-a")
    assert req.constraints.max_cost_usd == Decimal("0.02")
    assert req.constraints.residency == {"eu", "local"}
    assert req.tags == {"team-a"}


def test_model_validate_raises_the_typed_error_too() -> None:
    with pytest.raises(RequestValidationError):
        ImageRequest.model_validate({"prompt": "x", "n": 0})
