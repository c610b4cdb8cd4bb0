"""The ComfyUI provider end to end: the router, the provider and the loopback ComfyUI sandbox over real HTTP and
websocket — each built-in graph kind, saved workflows with bound inputs, the failures and where they fall back."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from providers.base import Billing, Capabilities, Estimate, Provider, ProviderResponse
from providers.comfyui import ENV_URL, WORKFLOW_PREFIX, ComfyUIProvider, ExecutionFailed, Workflow, family
from providers.registry import create_provider
from providers.sandbox import Fault
from providers.sandbox.comfyui import ComfyUISandbox, execution_error, out_of_memory
from router.errors import (
    Disposition,
    InvalidRequestError,
    MalformedResponse,
    ProviderTimeout,
    ProviderUnavailable,
)
from router.progress import ProgressEvent, Status
from router.request import ImageRequest
from router.result import GeneratedImage
from tests.conftest import half_mask, make_router, png

pytest.importorskip("websockets")

DATA = Path(__file__).resolve().parent / "data" / "comfyui"
XL = "sd_xl_base_1.0.safetensors"
SD15 = "v1-5-pruned-emaonly.safetensors"
RATE = 36  # USD per GPU-hour: 0.01 USD per GPU-second


class Ticks:
    """The sandbox's clock: a quarter second later at every reading, so server timings are exact."""

    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        self.t += 0.25
        return self.t


@pytest.fixture(autouse=True)
def _no_comfyui_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (ENV_URL, "IMAGEROUTER_COMFYUI_WORKFLOWS", "IMAGEROUTER_COMFYUI_REGIONS",
                "IMAGEROUTER_COMFYUI_USD_PER_GPU_HOUR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def sb() -> Iterator[ComfyUISandbox]:
    with ComfyUISandbox(clock=Ticks()) as server:
        yield server


@pytest.fixture
def sb2() -> Iterator[ComfyUISandbox]:
    with ComfyUISandbox(clock=Ticks()) as server:
        yield server


@pytest.fixture
def workflows(tmp_path: Path) -> Path:
    folder = tmp_path / "workflows"
    shutil.copytree(DATA, folder)
    return folder


async def comfy(sb: ComfyUISandbox, name: str = "comfyui", **kw: Any) -> ComfyUIProvider:
    kw.setdefault("usd_per_gpu_hour", RATE)
    provider = ComfyUIProvider(sb.origin, name=name, history_poll_s=0.02, **kw)
    await provider.refresh()
    return provider


async def started(sb: ComfyUISandbox) -> None:
    """Wait (10 s at most) until the sandbox has started running a prompt."""
    for _ in range(1000):
        if sb.messages_for_type("execution_start"):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no prompt started")


def sent_graph(sb: ComfyUISandbox, prompt_id: str) -> dict[str, Any]:
    graph: dict[str, Any] = sb.history[prompt_id]["prompt"][2]
    return graph


def nodes_of(graph: dict[str, Any], class_type: str) -> list[dict[str, Any]]:
    return [n["inputs"] for n in graph.values() if n["class_type"] == class_type]


def pixel(image: GeneratedImage, xy: tuple[int, int]) -> tuple[int, ...]:
    with Image.open(io.BytesIO(image.data)) as img:
        value = img.convert("RGB").getpixel(xy)
    assert isinstance(value, tuple)
    return value


class Stub(Provider):
    """A backend that serves every plain request with a 64x64 image, so routing has another choice."""

    kind = "stub"

    def models(self) -> Sequence[str]:
        return ["stub-model"]

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(tasks=frozenset({"txt2img"}), quality=0.99, regions=frozenset({"local", "global"}))

    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        return Estimate(Decimal(0), 0.1)

    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        image = GeneratedImage(png(64, 64), "image/png", 64, 64)
        return ProviderResponse([image], model, Billing(Decimal(0), "images", Decimal(1)))


# --- what the server has -----------------------------------------------------------------------------------------


async def test_capabilities_come_from_the_servers_node_and_model_lists(sb: ComfyUISandbox) -> None:
    p = await comfy(sb, regions="local,eu")
    assert list(p.models()) == [XL, SD15]
    xl, sd15 = p.capabilities(XL), p.capabilities(SD15)
    assert xl.tasks == {"txt2img", "img2img", "inpaint", "control"}
    assert xl.control_kinds == {"canny", "depth"} and sd15.control_kinds == {"pose"}  # each family's ControlNets
    assert xl.max_loras == 3 and xl.max_n == 8 and xl.regions == {"local", "eu"}
    assert xl.sizes.native == (1024, 1024) and sd15.sizes.native == (512, 512)
    sb.folders["checkpoints"].append("flux1-dev.safetensors")
    sb.folders["controlnet"].clear()
    del sb.nodes["LoraLoader"]
    await p.refresh()
    assert "flux1-dev.safetensors" in p.models()
    assert p.capabilities("flux1-dev.safetensors").quality == 0.85
    assert "control" not in p.capabilities(XL).tasks and p.capabilities(XL).max_loras == 0
    await p.aclose()


async def test_the_server_list_refreshes_in_the_background_without_blocking_routing(sb: ComfyUISandbox) -> None:
    p = ComfyUIProvider(sb.origin, models=[XL], refresh_ttl_s=0.0)
    assert list(p.models()) == [XL]  # declared until the server's list arrives; the read runs in the background
    assert p.info is None
    await asyncio.wait_for(p.refresh(), 5)
    assert list(p.models()) == [XL, SD15]
    await p.aclose()


# --- built-in graphs ---------------------------------------------------------------------------------------------


async def test_txt2img_graph_end_to_end_with_gpu_seconds_billed(sb: ComfyUISandbox) -> None:
    async with make_router(await comfy(sb)) as router:
        result = await router.agenerate("a lighthouse at dusk", model=XL, width=768, height=512, n=2, seed=42,
                                        steps=6, guidance_scale=5.5, negative_prompt="blurry", scheduler="euler_a")
    assert [(i.width, i.height, i.mime, i.seed) for i in result.images] == [(768, 512, "image/png", 42)] * 2
    assert result.images[0].data != result.images[1].data  # batch index 0 and 1
    graph = sent_graph(sb, result.provider_request_id or "")
    assert nodes_of(graph, "EmptyLatentImage") == [{"width": 768, "height": 512, "batch_size": 2}]
    (ks,) = nodes_of(graph, "KSampler")
    assert (ks["seed"], ks["steps"], ks["cfg"], ks["sampler_name"], ks["scheduler"], ks["denoise"]) == (
        42, 6, 5.5, "euler_ancestral", "normal", 1.0)
    assert sorted(t["text"] for t in nodes_of(graph, "CLIPTextEncode")) == ["a lighthouse at dusk", "blurry"]
    # execution_start → execution_success: two quarter-second ticks of the server's clock
    assert result.cost.quantity == Decimal("0.5") and result.cost.unit == "gpu_seconds"
    assert result.cost.actual_usd == Decimal("0.5") * RATE / 3600
    assert result.cost.details["timing"] == "server"


async def test_progress_events_flow_from_the_websocket(sb: ComfyUISandbox) -> None:
    events: list[Any] = []
    async with make_router(await comfy(sb)) as router:
        await router.agenerate("a fox", model=SD15, steps=5, seed=1, on_progress=events.append)
    steps = [e for e in events if isinstance(e, ProgressEvent)]
    assert [(e.provider, e.model, e.step, e.total) for e in steps] == [("comfyui", SD15, s, 5) for s in range(1, 6)]
    statuses = [(e.status, e.vendor_status) for e in events if isinstance(e, Status)]
    assert statuses == [("queued", "queued"), ("running", "execution_start"), ("succeeded", "execution_success")]


async def test_img2img_uploads_the_init_image_and_denoises_by_strength(sb: ComfyUISandbox) -> None:
    p = await comfy(sb)
    response = await p.generate(ImageRequest(prompt="make it blue", init_image=png(96, 64), strength=0.4, seed=3,
                                             n=2), XL, timeout_s=10)
    graph = sent_graph(sb, response.provider_request_id or "")
    (load,) = nodes_of(graph, "LoadImage")
    assert load["image"] in sb.inputs  # uploaded through /upload/image, then named on LoadImage
    assert nodes_of(graph, "KSampler")[0]["denoise"] == 0.4
    assert nodes_of(graph, "RepeatLatentBatch")[0]["amount"] == 2
    assert [(i.width, i.height) for i in response.images] == [(96, 64)] * 2  # the init image's size
    await p.aclose()


async def test_inpaint_repaints_only_inside_the_mask(sb: ComfyUISandbox) -> None:
    p = await comfy(sb)
    response = await p.generate(ImageRequest(prompt="a window", init_image=png(64, 64), mask_image=half_mask(),
                                             seed=9), SD15, timeout_s=10)
    graph = sent_graph(sb, response.provider_request_id or "")
    assert nodes_of(graph, "LoadImageMask")[0]["channel"] == "red"  # white = repaint, read from a colour channel
    assert len(nodes_of(graph, "SetLatentNoiseMask")) == 1
    (image,) = response.images
    assert pixel(image, (60, 32)) == (200, 30, 30)  # the kept half is the init image
    assert pixel(image, (4, 32)) != (200, 30, 30)
    await p.aclose()


async def test_several_controlnets_chain_and_canny_is_preprocessed_by_the_server(sb: ComfyUISandbox) -> None:
    p = await comfy(sb)
    request = ImageRequest(prompt="a house", seed=1, controls=[
        {"kind": "canny", "image": png(64, 64), "scale": 0.7, "start": 0.1, "end": 0.9},
        {"kind": "depth", "image": png(64, 64, (9, 9, 9)), "preprocess": False}])
    response = await p.generate(request, XL, timeout_s=10)
    graph = sent_graph(sb, response.provider_request_id or "")
    assert [n["control_net_name"] for n in nodes_of(graph, "ControlNetLoader")] == [
        "controlnet-canny-sdxl-1.0.safetensors", "controlnet-depth-sdxl-1.0.safetensors"]
    first, second = nodes_of(graph, "ControlNetApplyAdvanced")
    assert (first["strength"], first["start_percent"], first["end_percent"]) == (0.7, 0.1, 0.9)
    assert second["positive"][0] != first["positive"][0]  # chained: the second takes the first's conditioning
    assert len(nodes_of(graph, "Canny")) == 1  # only the canny control is preprocessed
    await p.aclose()


async def test_a_control_that_needs_a_detector_the_core_nodes_lack_is_refused(sb: ComfyUISandbox) -> None:
    p = await comfy(sb)
    request = ImageRequest(prompt="a house", controls=[{"kind": "depth", "image": png(64, 64)}])
    with pytest.raises(InvalidRequestError) as caught:
        await p.generate(request, XL, timeout_s=10)
    assert caught.value.code == "detector_not_configured" and caught.value.disposition is Disposition.FALLBACK
    assert sb.hits("/prompt") == 0
    await p.aclose()


async def test_several_weighted_loras_chain_by_file_name_or_stem(sb: ComfyUISandbox) -> None:
    p = await comfy(sb)
    request = ImageRequest(prompt="a knight", seed=2, loras=[{"ref": "detail_xl", "weight": 0.6},
                                                             {"ref": "style_xl.safetensors", "weight": -0.3}])
    response = await p.generate(request, XL, timeout_s=10)
    graph = sent_graph(sb, response.provider_request_id or "")
    loras = nodes_of(graph, "LoraLoader")
    assert [(n["lora_name"], n["strength_model"], n["strength_clip"]) for n in loras] == [
        ("detail_xl.safetensors", 0.6, 0.6), ("style_xl.safetensors", -0.3, -0.3)]
    assert loras[1]["model"][0] != loras[0]["model"][0]
    with pytest.raises(InvalidRequestError, match="not on the ComfyUI server"):
        await p.generate(ImageRequest(prompt="x", loras=[{"ref": "missing"}]), XL, timeout_s=10)
    await p.aclose()


async def test_jpeg_output_is_reencoded_by_the_servers_view(sb: ComfyUISandbox) -> None:
    p = await comfy(sb, watermark=False)  # a marked output is encoded here instead (test_comfyui_watermark.py)
    response = await p.generate(ImageRequest(prompt="a cat", output_format="jpeg", seed=1), SD15, timeout_s=10)
    assert [i.mime for i in response.images] == ["image/jpeg"]
    view = [r for r in sb.requests if r.path == "/view"][-1]
    assert view.query["preview"] == "jpeg;95" and view.query["type"] == "output"
    await p.aclose()


async def test_an_identical_request_is_served_from_the_servers_cache(sb: ComfyUISandbox) -> None:
    p = await comfy(sb)
    request = ImageRequest(prompt="a cat", seed=11, steps=3)
    first = await p.generate(request, SD15, timeout_s=10)
    second = await p.generate(request, SD15, timeout_s=10)
    assert second.images[0].data == first.images[0].data
    assert second.billing.details["cached_nodes"] == len(sent_graph(sb, second.provider_request_id or ""))
    assert [t for t, _ in sb.messages_for(second.provider_request_id or "") if t == "progress"] == []
    await p.aclose()


# --- saved workflows ---------------------------------------------------------------------------------------------


async def test_a_saved_workflow_runs_with_its_bound_inputs_and_params(sb: ComfyUISandbox, workflows: Path) -> None:
    p = await comfy(sb, workflows_dir=workflows)
    assert set(p.workflows()) == {"workflow:portrait", "workflow:retouch"}
    caps = p.capabilities("workflow:portrait")
    assert caps.tasks == {"txt2img"} and caps.negative_prompt and caps.seed and caps.quality == 0.8
    options = {"comfyui": {"params": {"style_strength": 0.3}}}
    request = ImageRequest(prompt="an astronaut", negative_prompt="text", seed=77, steps=9, guidance_scale=4.0,
                           width=640, height=896, n=2, provider_options=options)
    async with make_router(p) as router:
        result = await router.agenerate(request, model="workflow:portrait")
    graph = sent_graph(sb, result.provider_request_id or "")
    assert graph["6"]["inputs"]["text"] == "an astronaut" and graph["7"]["inputs"]["text"] == "text"
    assert {k: graph["3"]["inputs"][k] for k in ("seed", "steps", "cfg")} == {"seed": 77, "steps": 9, "cfg": 4.0}
    assert graph["5"]["inputs"] == {"width": 640, "height": 896, "batch_size": 2}
    assert graph["10"]["inputs"]["strength_model"] == graph["10"]["inputs"]["strength_clip"] == 0.3
    assert "imagerouter" not in graph
    # only the declared output: the preview node's images are not returned
    assert [(i.width, i.height) for i in result.images] == [(640, 896)] * 2
    assert result.provider == "comfyui" and result.model == "workflow:portrait"


async def test_a_workflow_takes_image_and_mask_through_uploads_bound_in_a_sidecar(sb: ComfyUISandbox,
                                                                                  workflows: Path) -> None:
    p = await comfy(sb, workflows_dir=workflows)
    assert p.capabilities("workflow:retouch").tasks == {"img2img", "inpaint"}
    request = ImageRequest(prompt="a red door", init_image=png(64, 48), mask_image=half_mask(64, 48), strength=0.5,
                           seed=5)
    response = await p.generate(request, "workflow:retouch", timeout_s=10)
    graph = sent_graph(sb, response.provider_request_id or "")
    assert graph["2"]["inputs"]["image"] in sb.inputs and graph["3"]["inputs"]["image"] in sb.inputs
    with Image.open(io.BytesIO(sb.inputs[graph["3"]["inputs"]["image"]])) as mask:
        # the node reads the alpha channel (1 - alpha): the repaint half is sent transparent
        assert mask.mode == "RGBA" and mask.getchannel("A").getpixel((4, 4)) == 0
    assert graph["8"]["inputs"]["denoise"] == 0.5
    (image,) = response.images
    assert (image.width, image.height) == (64, 48) and pixel(image, (60, 20)) == (200, 30, 30)
    await p.aclose()


async def test_a_workflow_without_a_seed_binding_still_varies_and_unbound_fields_are_warned() -> None:
    wf = Workflow.load(DATA / "retouch.json")
    assert wf.inputs["seed"][0].node == "8" and wf.params == {}
    p = ComfyUIProvider("http://127.0.0.1:9", workflows_dir=DATA)
    plan = p.plan(ImageRequest(prompt="x", init_image=png(), steps=30, negative_prompt="y"), "workflow:retouch")
    assert any(w.startswith("steps ignored") for w in plan.warnings)
    assert any(w.startswith("negative_prompt ignored") for w in plan.warnings)


def test_broken_workflows_are_reported_not_routed(tmp_path: Path) -> None:
    shutil.copy(DATA / "ui_export.json", tmp_path / "ui_export.json")
    graph = json.loads((DATA / "portrait.json").read_text())
    graph["imagerouter"]["inputs"]["prompt"] = "99.text"
    (tmp_path / "dangling.json").write_text(json.dumps(graph))
    p = ComfyUIProvider("http://127.0.0.1:9", workflows_dir=tmp_path)
    broken = p.broken_workflows()
    assert "Export (API)" in broken["ui_export"] and "no node '99'" in broken["dangling"]
    assert p.workflows() == () and not p.supports_model("workflow:dangling")


async def test_a_request_naming_a_workflow_is_routed_to_the_comfyui_server(sb: ComfyUISandbox,
                                                                           workflows: Path) -> None:
    p = await comfy(sb, workflows_dir=workflows)
    async with make_router(Stub(), p) as router:
        plain = router.route("a cat")
        assert plain.chosen is not None and plain.chosen.provider == "stub"  # a workflow is never picked unasked
        named = router.route("a cat", model="workflow:portrait")
        assert [(c.provider, c.model) for c in named.chain] == [("comfyui", "workflow:portrait")]
        result = await router.agenerate("a cat", model="workflow:portrait", seed=1)
    assert result.provider == "comfyui" and result.model == "workflow:portrait"
    assert f"{WORKFLOW_PREFIX}portrait" in p.workflows()


# --- failures ----------------------------------------------------------------------------------------------------


async def test_node_errors_are_an_invalid_request_and_the_router_falls_back(sb: ComfyUISandbox,
                                                                            sb2: ComfyUISandbox) -> None:
    first, second = await comfy(sb, "comfy-a"), await comfy(sb2, "comfy-b")
    sb.folders["checkpoints"].remove(XL)  # gone from the server since its list was read
    with pytest.raises(InvalidRequestError) as caught:
        await first.generate(ImageRequest(prompt="a cat"), XL, timeout_s=10)
    assert caught.value.code == "prompt_outputs_failed_validation" and caught.value.status_code == 400
    assert "CheckpointLoaderSimple" in caught.value.message and "Value not in list" in caught.value.message
    async with make_router(first, second) as router:
        result = await router.agenerate("a cat", model=XL, seed=1)
    assert result.provider == "comfy-b"
    assert [(a.provider, a.error) for a in result.attempts if a.outcome == "error"] == [
        ("comfy-a", "InvalidRequestError")]


async def test_an_execution_error_falls_back_to_the_next_server(sb: ComfyUISandbox, sb2: ComfyUISandbox) -> None:
    sb.faults.push(execution_error("CUDA kernel failed", node_type="VAEDecode"), path="/prompt")
    first, second = await comfy(sb, "comfy-a"), await comfy(sb2, "comfy-b")
    async with make_router(first, second) as router:
        result = await router.agenerate("a cat", model=SD15, seed=1)
    failed = [a for a in result.attempts if a.outcome == "error"]
    assert result.provider == "comfy-b"
    assert [(a.provider, a.error, a.retry) for a in failed] == [("comfy-a", "ExecutionFailed", 0)]  # not retried
    assert "VAEDecode" in (failed[0].message or "") and "CUDA kernel failed" in (failed[0].message or "")
    assert failed[0].cost_usd == Decimal("0.5") * RATE / 3600  # the GPU time the failed run used is billed


async def test_execution_error_carries_the_node_and_its_disposition(sb: ComfyUISandbox) -> None:
    sb.faults.push(execution_error("bad tensor"), path="/prompt")
    p = await comfy(sb)
    with pytest.raises(ExecutionFailed) as caught:
        await p.generate(ImageRequest(prompt="a cat"), SD15, timeout_s=10)
    assert caught.value.node_type == "KSampler" and caught.value.exception_type == "RuntimeError"
    assert caught.value.disposition is Disposition.FALLBACK and caught.value.billed is not None
    await p.aclose()


async def test_out_of_memory_is_a_provider_unavailable(sb: ComfyUISandbox) -> None:
    sb.faults.push(out_of_memory(), path="/prompt")
    p = await comfy(sb)
    with pytest.raises(ProviderUnavailable) as caught:
        await p.generate(ImageRequest(prompt="a cat"), SD15, timeout_s=10)
    assert caught.value.code == "out_of_memory" and not isinstance(caught.value, ExecutionFailed)
    await p.aclose()


async def test_the_deadline_interrupts_the_running_prompt(sb: ComfyUISandbox) -> None:
    sb.hold()
    p = await comfy(sb)
    with pytest.raises(ProviderTimeout) as caught:
        await p.generate(ImageRequest(prompt="a slow cat"), SD15, timeout_s=1.0)
    prompt_id = caught.value.request_id or ""
    interrupts = [r for r in sb.requests if r.path == "/interrupt"]
    assert [r.json for r in interrupts] == [{"prompt_id": prompt_id}]  # targeted: only this prompt
    assert sb.wait_idle()
    status = sb.history[prompt_id]["status"]
    assert status["status_str"] == "error" and status["messages"][-1][0] == "execution_interrupted"
    assert caught.value.billed is not None and caught.value.billed.unit == "gpu_seconds"
    await p.aclose()


async def test_a_queued_prompt_past_its_deadline_is_deleted_from_the_queue(sb: ComfyUISandbox) -> None:
    sb.hold()
    p = await comfy(sb)
    blocker = asyncio.create_task(p.generate(ImageRequest(prompt="first"), SD15, timeout_s=30))
    await started(sb)
    with pytest.raises(ProviderTimeout) as caught:
        await p.generate(ImageRequest(prompt="second"), SD15, timeout_s=1.0)
    deletes = [r.json for r in sb.requests if r.path == "/queue" and r.method == "POST"]
    assert deletes == [{"delete": [caught.value.request_id]}]
    assert caught.value.request_id not in sb.history
    sb.release()
    assert (await blocker).images
    await p.aclose()


async def test_the_router_falls_back_when_a_server_times_out(sb: ComfyUISandbox, sb2: ComfyUISandbox) -> None:
    sb.hold()
    first, second = await comfy(sb, "comfy-a"), await comfy(sb2, "comfy-b")
    async with make_router(first, second, attempt_timeout_s=1.0, max_retries=0) as router:
        result = await router.agenerate("a cat", model=SD15, seed=1)
    assert result.provider == "comfy-b"
    assert [(a.provider, a.error) for a in result.attempts if a.outcome == "error"] == [("comfy-a", "ProviderTimeout")]
    assert sb.hits("/interrupt") == 1


async def test_cancelling_a_call_interrupts_its_prompt(sb: ComfyUISandbox) -> None:
    sb.hold()
    p = await comfy(sb)
    task = asyncio.create_task(p.generate(ImageRequest(prompt="a cat"), SD15, timeout_s=30))
    await started(sb)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p.aclose()  # waits for the clean-up it started
    assert sb.hits("/interrupt") == 1 and sb.wait_idle()


async def test_a_server_that_is_down_is_unavailable_and_the_router_falls_back(sb: ComfyUISandbox,
                                                                               sb2: ComfyUISandbox) -> None:
    first, second = await comfy(sb, "comfy-a"), await comfy(sb2, "comfy-b")
    sb.stop()
    with pytest.raises(ProviderUnavailable, match="could not"):
        await first.generate(ImageRequest(prompt="a cat"), SD15, timeout_s=5)
    async with make_router(first, second) as router:
        result = await router.agenerate("a cat", model=SD15, seed=1)
    assert result.provider == "comfy-b"
    assert {a.error for a in result.attempts if a.provider == "comfy-a"} == {"ProviderUnavailable"}


async def test_a_dropped_websocket_is_followed_through_the_history(sb: ComfyUISandbox) -> None:
    sb.hold()
    p = await comfy(sb)
    task = asyncio.create_task(p.generate(ImageRequest(prompt="a cat", seed=4), SD15, timeout_s=20))
    await started(sb)
    sb.drop_websockets()
    sb.release()
    response = await task
    assert len(response.images) == 1 and response.billing.details["timing"] == "server"
    assert sb.hits(f"/history/{response.provider_request_id}") >= 1
    await p.aclose()


async def test_a_hostile_output_image_is_a_malformed_response(sb: ComfyUISandbox) -> None:
    sb.faults.push(Fault.hostile_image("bomb_image"), path="/view")
    p = await comfy(sb)
    with pytest.raises(MalformedResponse) as caught:
        await p.generate(ImageRequest(prompt="a cat"), SD15, timeout_s=10)
    assert caught.value.billed is not None  # the GPU time was spent all the same
    await p.aclose()


async def test_an_object_info_failure_is_unavailable(sb: ComfyUISandbox) -> None:
    sb.faults.push(Fault.server_error(), path="/object_info")
    p = ComfyUIProvider(sb.origin)
    with pytest.raises(ProviderUnavailable):
        await p.refresh()
    assert "HTTP 500" in (p.configuration_problem() or "")
    await p.aclose()


# --- configuration -----------------------------------------------------------------------------------------------


def test_without_a_url_it_is_listed_as_not_configured_saying_what_to_set() -> None:
    p = create_provider("comfyui")
    assert isinstance(p, ComfyUIProvider) and p.models() == ()
    assert ENV_URL in (p.configuration_problem() or "")
    from router import AsyncRouter

    decision = AsyncRouter([p], ledger=":memory:").route("a cat")
    assert [(r.provider, r.code) for r in decision.rejections] == [("comfyui", "not-configured")]


def test_it_is_configured_from_the_environment(monkeypatch: pytest.MonkeyPatch, sb: ComfyUISandbox) -> None:
    monkeypatch.setenv(ENV_URL, sb.origin + "/")
    monkeypatch.setenv("IMAGEROUTER_COMFYUI_WORKFLOWS", str(DATA))
    monkeypatch.setenv("IMAGEROUTER_COMFYUI_REGIONS", "eu, local")
    monkeypatch.setenv("IMAGEROUTER_COMFYUI_USD_PER_GPU_HOUR", "1.25")
    p = create_provider("comfyui")
    assert isinstance(p, ComfyUIProvider)
    assert p.url == sb.origin and p.regions == {"eu", "local"} and p.usd_per_gpu_hour == Decimal("1.25")
    assert p.configuration_problem() is None  # outside an event loop, the server's list is read at once
    assert list(p.models()) == [XL, SD15] and "workflow:portrait" in p.workflows()


def test_an_unreachable_server_is_named_in_the_configuration_problem() -> None:
    p = ComfyUIProvider("http://127.0.0.1:9")
    assert p.models() == ()
    assert "not reached" in (p.configuration_problem() or "")


def test_model_families_are_read_from_file_names() -> None:
    assert [family(n) for n in (XL, SD15, "flux1-schnell-fp8.safetensors", "control_v11p_sd15_canny.pth",
                                "dreamshaper_8.safetensors")] == ["sdxl", "sd15", "flux", "sd15", None]
