"""Stability's control endpoints stand in for ControlNet kinds: every stand-in that only approximates
the kind says so in the plan's warnings (and so in the result and under ``strict``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from providers.sandbox.stability import StabilitySandbox
from providers.stability import StabilityProvider
from router import AsyncRouter, ImageRequest, NoRouteError
from router.fetch import SafeFetcher
from tests.conftest import Sleeps, png

CONTROL = "stable-image-control"
NATIVE = {"scribble": "sketch", "lineart": "sketch"}
"""The kinds Stability's endpoints mean: a hand-drawn scribble and a line drawing are sketches."""
APPROXIMATE = {"lineart_anime": "sketch", "softedge": "sketch", "canny": "structure", "depth": "structure",
               "mlsd": "structure", "seg": "structure", "normal": "structure"}


@pytest.fixture
def sb() -> Iterator[StabilitySandbox]:
    with StabilitySandbox(api_key="sk-stab-primary") as server:
        yield server


def _provider(server: StabilitySandbox | None = None) -> StabilityProvider:
    if server is None:
        return StabilityProvider(api_key="sk-test", models=(CONTROL,))
    return StabilityProvider(api_key=server.api_key, base_url=server.base_url, models=(CONTROL,),
                             fetcher=SafeFetcher(allow_loopback=True), poll_interval_s=0.01)


def _request(kind: str, **kw: object) -> ImageRequest:
    return ImageRequest(prompt="a castle", controls=[{"kind": kind, "image": png(512, 768), **kw}])


def test_the_table_covers_every_kind_the_control_model_takes() -> None:
    assert _provider().capabilities(CONTROL).control_kinds == set(NATIVE) | set(APPROXIMATE)


@pytest.mark.parametrize(("kind", "endpoint"), sorted(APPROXIMATE.items()))
def test_an_approximate_mapping_is_a_warning_naming_the_kind_and_the_endpoint(kind: str, endpoint: str) -> None:
    warnings = [w for w in _provider().plan(_request(kind), CONTROL).warnings if "approximated" in w]
    assert len(warnings) == 1, warnings
    assert f"control {kind} approximated by Stability's {endpoint} control" in warnings[0]
    assert f"not a {kind} ControlNet" in warnings[0]


@pytest.mark.parametrize("kind", sorted(NATIVE))
def test_a_sketch_kind_on_the_sketch_endpoint_plans_no_warning(kind: str) -> None:
    assert _provider().plan(_request(kind), CONTROL).warnings == ()


def test_canny_on_structure_says_structure_reads_a_reference_image_not_edges() -> None:
    (warning,) = _provider().plan(_request("canny"), CONTROL).warnings
    assert "structure control" in warning and "reference" in warning and "canny" in warning


async def test_the_warning_reaches_the_result_and_the_call_goes_to_structure(sb: StabilitySandbox) -> None:
    async with AsyncRouter([_provider(sb)], ledger=":memory:", sleep=Sleeps()) as router:
        result = await router.agenerate(_request("canny"))
    assert sb.requests[-1].path == "/v2beta/stable-image/control/structure"
    assert any("control canny approximated by Stability's structure control" in w for w in result.warnings)


async def test_strict_refuses_an_approximated_control(sb: StabilitySandbox) -> None:
    request = ImageRequest.from_kwargs("a castle", controls=[{"kind": "depth", "image": png(512, 768)}], strict=True)
    async with AsyncRouter([_provider(sb)], ledger=":memory:", sleep=Sleeps()) as router:
        with pytest.raises(NoRouteError, match="approximated"):
            await router.agenerate(request)
    assert not sb.requests
