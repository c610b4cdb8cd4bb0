"""ComfyUI checkpoints are scored by their family's skill profile, as local models are; a ComfyUI server at
$0 a GPU-hour wins the ``cheapest`` order for a plain prompt, but quality floors and skill fit still keep a
low-quality checkpoint off a prompt it cannot draw under the policies that weigh them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from providers.comfyui import FAMILIES, ComfyUIProvider, family
from providers.sandbox.comfyui import ComfyUISandbox
from router import AsyncRouter
from router.config import providers_from_env
from router.profiles import default_profiles, profile_for
from tests.test_comfyui import (
    SD15,
    XL,
    Ticks,
    _no_comfyui_env,  # noqa: F401  (autouse: no ComfyUI settings from the environment)
)

pytest.importorskip("websockets")

SIGN = "a sign that says OPEN, three red apples on a table"  # needs text rendering
PLAIN = "a cat"
FLUX, SD35 = "flux1-dev.safetensors", "sd3.5_large.safetensors"
DREAMSHAPER, MYSTERY = "dreamshaper_8.safetensors", "mystery_mix.safetensors"


@pytest.fixture
def sb() -> Iterator[ComfyUISandbox]:
    with ComfyUISandbox(clock=Ticks()) as server:
        server.folders["checkpoints"][:] = [XL, SD15, FLUX, SD35, DREAMSHAPER, MYSTERY]
        yield server


@pytest.fixture
async def free_sd15(sb: ComfyUISandbox) -> AsyncIterator[ComfyUIProvider]:
    """A ComfyUI server at $0 a GPU-hour with only an SD 1.5 checkpoint."""
    sb.folders["checkpoints"][:] = [SD15]
    provider = ComfyUIProvider(sb.origin, name="comfy", usd_per_gpu_hour=0)
    await provider.refresh()
    yield provider
    await provider.aclose()


def fleet(comfy: ComfyUIProvider) -> list:
    """Every hosted API at its list prices (ranked as if configured: route() is a dry run), and ``comfy``."""
    return [p for p in providers_from_env({}) if p.kind != "comfyui"] + [comfy]


def test_every_family_has_a_profile_whose_overall_is_the_familys_routing_tier() -> None:
    table = default_profiles()
    p = ComfyUIProvider("http://127.0.0.1:9")
    for name, fam in ((SD15, "sd15"), (XL, "sdxl"), (SD35, "sd3"), (FLUX, "flux")):
        assert family(name) == fam
        profile = profile_for(p, name, table)
        assert profile is table.entries[f"comfyui/{fam}"], name
        assert profile.overall == p.capabilities(name).quality  # floors mean the same with or without it
    assert {k for k in table.entries if k.startswith("comfyui/")} == {f"comfyui/{f}" for f in FAMILIES}
    assert table.entries["comfyui/sd15"].model == table.entries["local/sd15"].model == "sd1.5"
    assert profile_for(p, MYSTERY, table) is None  # no family known: scored by its routing quality


async def test_declared_families_name_checkpoints_whose_files_do_not_say(sb: ComfyUISandbox) -> None:
    p = ComfyUIProvider(sb.origin, families={DREAMSHAPER: "sd15", MYSTERY: "sdxl", "workflow:portrait": "flux"})
    await p.refresh()
    table = default_profiles()
    assert family(DREAMSHAPER) is None and p.model_family(DREAMSHAPER) == "sd15"
    assert profile_for(p, DREAMSHAPER, table) is table.entries["comfyui/sd15"]
    assert profile_for(p, MYSTERY, table) is table.entries["comfyui/sdxl"]
    assert profile_for(p, "workflow:portrait", table) is table.entries["comfyui/flux"]
    assert p.capabilities(DREAMSHAPER).sizes.native == (512, 512)  # the family sets the native size too
    assert p.capabilities(MYSTERY).sizes.native == (1024, 1024) and p.capabilities(MYSTERY).quality == 0.65
    assert DREAMSHAPER in p.catalog and p.catalog.get(DREAMSHAPER).family == "sd15"
    assert "unknown.safetensors" not in p.catalog
    with pytest.raises(KeyError):
        p.catalog.get("unknown.safetensors")
    with pytest.raises(ValueError, match="unknown families"):
        ComfyUIProvider(sb.origin, families={DREAMSHAPER: "sd2"})
    await p.aclose()


async def test_cheapest_sends_a_plain_prompt_to_the_free_sd15_server(free_sd15: ComfyUIProvider) -> None:
    decision = AsyncRouter(fleet(free_sd15), policy="cheapest", ledger=":memory:").route(PLAIN)
    head = decision.chain[0]
    assert (head.provider, head.model) == ("comfy", SD15) and head.estimate.cost_usd == 0
    assert head.fit_note == "meets every skill the prompt needs"


async def test_a_quality_policy_keeps_the_free_sd15_checkpoint_off_a_text_prompt(
        free_sd15: ComfyUIProvider) -> None:
    decision = AsyncRouter(fleet(free_sd15), policy="quality", ledger=":memory:").route(SIGN)
    head = decision.chain[0]
    assert head.provider != "comfy"
    head_profile = default_profiles().get(head.provider, head.model)
    assert head_profile is not None and head_profile.skills["text"] >= 0.85
    comfy = next(c for c in decision.ranked if c.provider == "comfy")
    assert comfy.fit_note.startswith("decided by text rendering: needs 0.85, model has 0.01")
    assert comfy.score < head.score and comfy.terms["fit"] < head.terms["fit"]
    assert "comfy" not in {c.provider for c in decision.chain}


@pytest.mark.parametrize(("prompt", "comfy_heads"), [(PLAIN, True), (SIGN, False)])
async def test_balanced_weighs_the_free_server_against_what_the_prompt_needs(
        free_sd15: ComfyUIProvider, prompt: str, comfy_heads: bool) -> None:
    decision = AsyncRouter(fleet(free_sd15), policy="balanced", ledger=":memory:").route(prompt)
    assert (decision.chain[0].provider == "comfy") is comfy_heads


async def test_a_quality_floor_rejects_the_free_sd15_checkpoint_even_under_cheapest(
        free_sd15: ComfyUIProvider) -> None:
    router = AsyncRouter(fleet(free_sd15), policy="cheapest", ledger=":memory:")
    decision = router.route(PLAIN, constraints={"quality_floor": "medium"})
    assert decision.chain[0].provider != "comfy"
    (rejection,) = [r for r in decision.rejections if r.provider == "comfy"]
    assert rejection.code == "quality-floor" and "0.45 is below the floor 0.60" in rejection.reason


async def test_without_a_family_a_checkpoint_is_scored_by_its_quality_alone(sb: ComfyUISandbox) -> None:
    sb.folders["checkpoints"][:] = [MYSTERY]
    p = ComfyUIProvider(sb.origin, name="comfy", usd_per_gpu_hour=0, quality={MYSTERY: 0.9})
    await p.refresh()
    decision = AsyncRouter(fleet(p), policy="quality", ledger=":memory:").route(SIGN)
    comfy = next(c for c in decision.ranked if c.provider == "comfy")
    assert comfy.fit_note == "" and comfy.terms["quality"] == pytest.approx(0.9)
    await p.aclose()
