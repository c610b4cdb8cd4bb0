"""The Code / Canvas / Call ladder: the highest rung that still gives the control a request needs."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import pytest

from policies import PRESETS, Policy, load_policy
from policies.ladder import rung_of
from providers.base import Billing, Capabilities, Estimate, Provider, ProviderResponse
from router import ImageRequest
from router.result import GeneratedImage
from tests.conftest import make_router, png

D = Decimal


class Rung(Provider):
    """A backend of ``kind`` with one model, ``loras`` LoRA slots, serving ``regions``."""

    def __init__(self, name: str, kind: str, *, cost: str, loras: int = 0, regions: frozenset[str] | None = None,
                 quality: float = 0.8) -> None:
        super().__init__(name=name)
        self.kind = kind
        self._cost, self._loras, self._quality = D(cost), loras, quality
        self._regions = regions or frozenset({"us"})

    def models(self) -> Sequence[str]:
        return ["m"]

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(tasks=frozenset({"txt2img"}), max_loras=self._loras, regions=self._regions,
                            quality=self._quality)

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        return Estimate(self._cost, 5.0)

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        image = GeneratedImage(png(), "image/png", 64, 64)
        return ProviderResponse([image], model, Billing(self._cost, "image", D(1)))


def fleet() -> list[Provider]:
    return [
        Rung("local", "local", cost="0.001", loras=4, regions=frozenset({"local"})),  # Code
        Rung("comfy", "comfyui", cost="0.002", loras=4, regions=frozenset({"local"})),  # Canvas
        Rung("openai", "openai", cost="0.04"),  # Call, no LoRA
        Rung("replicate", "replicate", cost="0.03", loras=1),  # Call, one LoRA
    ]


LADDER = PRESETS["ladder"]
TWO_LORAS = [{"ref": "owner/a", "weight": 0.8}, {"ref": "owner/b", "weight": 0.5}]


def test_rungs_of_provider_kinds() -> None:
    assert [rung_of(k) for k in ("openai", "bfl", "comfyui", "local")] == ["call", "call", "canvas", "code"]


@pytest.mark.parametrize(("name", "kwargs", "head", "note"), [
    ("a plain request stays on Call", {}, "replicate", None),
    ("two LoRAs step down to Canvas", {"loras": TWO_LORAS}, "comfy",
     "stepped down to Canvas: no Call backend can serve it — capability: takes no LoRA (openai/m); "
     "capability: takes at most 1 LoRAs (replicate/m)"),
    ("residency local never goes to Call", {"residency": {"local"}}, "comfy",
     "stepped down to Canvas: no Call backend can serve it — residency: serves regions us; the request allows "
     "only local (openai/m and 1 more)"),
])
def test_the_ladder_climbs_as_high_as_the_request_allows(name: str, kwargs: dict[str, object], head: str,
                                                          note: str | None) -> None:
    router = make_router(*fleet(), policy=LADDER)
    decision = router.route("a red fox in the snow", **kwargs)
    assert decision.chain[0].provider == head, name
    assert decision.ladder_note == note
    if note is not None:
        assert note in decision.explain() and decision.to_dict()["ladder_note"] == note
    if kwargs.get("residency"):
        assert {c.provider for c in decision.ranked} == {"comfy", "local"}  # never a Call backend
    assert [rung_of(router.providers[c.provider].kind) for c in decision.ranked] == sorted(
        (rung_of(router.providers[c.provider].kind) for c in decision.ranked),
        key=("call", "canvas", "code").index)  # rungs in order, whatever the scores


async def test_volume_puts_the_owned_gpu_first_and_says_why() -> None:
    policy = Policy(name="ladder-gpu", order="ladder", ladder_gpu_usd_per_day=0.05)
    router = make_router(*fleet(), policy=policy)
    assert router.route("a red fox").chain[0].provider == "replicate"  # no volume yet: Call
    for _ in range(3):
        await router.agenerate("a red fox")  # three requests at $0.03
    router._volume = (-1e9, 0)  # the volume is read again (it is cached for a minute)
    decision = router.route("a red fox")
    assert decision.chain[0].provider == "local"
    assert decision.ladder_note == ("stepped down to Code: 3 requests in the last day at $0.0300 (the cheapest hosted "
                                    "candidate) cost more than the GPU's $0.05 a day")
    await router.aclose()


def test_the_ladder_preset_reads_from_a_policy_file(tmp_path: Path) -> None:
    f = tmp_path / "policy.yaml"
    f.write_text("extends: ladder\nladder_gpu_usd_per_day: 48\n")
    policy = load_policy(f)
    assert policy.order == "ladder" and policy.ladder_gpu_usd_per_day == 48
