"""The server's ``stream: true``: the official openai client's image streaming against it, partial images
from OpenAI (through the sandbox) and from a tiny local model's previews, errors mid-stream, and the
router's own events on request."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from providers.local import LocalProvider
from providers.openai import OpenAIProvider
from providers.sandbox import Fault, OpenAISandbox
from router import AsyncRouter
from router.keys import ServerKeys
from router.server import ServerThread, create_app
from tests.conftest import png


@pytest.fixture
def server(sandbox: OpenAISandbox) -> Iterator[tuple[ServerThread, str]]:
    router = AsyncRouter([OpenAIProvider(api_key=sandbox.api_key, base_url=sandbox.base_url)],
                         ledger=":memory:", max_retries=0)
    keys = ServerKeys()
    key = keys.add("alice")
    with ServerThread(create_app(router, keys=keys, close_router=True)) as srv:
        yield srv, key


def client(srv: ServerThread, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0)


def size_of(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_openai_client_streams_partial_images_and_the_final_one(server: tuple[ServerThread, str],
                                                                sandbox: OpenAISandbox) -> None:
    srv, key = server
    stream = client(srv, key).images.generate(model="gpt-image-2", prompt="a lighthouse", size="1024x1024",
                                              stream=True, partial_images=2)
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]  # type: ignore[union-attr]
    done = events[-1]
    assert size_of(done.b64_json) == (1024, 1024) and done.size == "1024x1024" and done.output_format == "png"
    assert done.usage is not None and done.usage.total_tokens > 0  # type: ignore[union-attr]
    upstream = sandbox.requests[-1].json
    assert upstream is not None and upstream["stream"] is True and upstream["partial_images"] == 2


def test_openai_client_streams_an_edit(server: tuple[ServerThread, str]) -> None:
    srv, key = server
    stream = client(srv, key).images.edit(model="gpt-image-2", prompt="paint it blue",
                                          image=("in.png", png(1024, 1024)), stream=True, partial_images=1)
    assert [e.type for e in stream] == ["image_edit.partial_image", "image_edit.completed"]


def test_a_failure_after_the_stream_began_is_an_error_event_the_client_raises(
        server: tuple[ServerThread, str], sandbox: OpenAISandbox) -> None:
    srv, key = server
    sandbox.faults.push(Fault.server_error(503), times=None)
    with pytest.raises(openai.APIError, match="every provider failed"):
        list(client(srv, key).images.generate(model="gpt-image-2", prompt="a cat", stream=True, partial_images=1))


def test_a_request_refused_before_streaming_is_an_ordinary_error_answer(server: tuple[ServerThread, str]) -> None:
    srv, key = server
    with pytest.raises(openai.BadRequestError) as caught:
        client(srv, key).images.generate(model="gpt-image-2", prompt="a cat", stream=True,
                                         extra_body={"residency": ["jp"]})
    assert caught.value.status_code == 400


def test_stream_events_adds_the_routers_progress_events(server: tuple[ServerThread, str]) -> None:
    srv, key = server
    with httpx.stream("POST", f"{srv.base_url}/images/generations", headers={"authorization": f"Bearer {key}"},
                      json={"prompt": "a cat", "stream": True, "stream_events": True}) as answer:
        text = answer.read().decode()
    assert answer.headers["content-type"].startswith("text/event-stream")
    names = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    assert names == ["pixroute.routed", "pixroute.attempt_started", "image_generation.completed"]
    routed = json.loads(text.splitlines()[1].removeprefix("data: "))
    assert routed["type"] == "routed" and routed["chain"] == ["openai/gpt-image-2"]


def test_a_local_models_previews_stream_as_partial_images(sd15_dir: Path, models_root: Path) -> None:
    from providers.local.tiny import build_preview_vae

    preview = build_preview_vae(models_root / "tiny-taesd-server")
    local = LocalProvider({"tiny": {"path": str(sd15_dir), "family": "sd15", "native": [64, 64], "min_side": 32,
                                    "steps": 4, "preview_vae": str(preview)}}, device="cpu")
    router = AsyncRouter([local], ledger=":memory:")
    with ServerThread(create_app(router, close_router=True)) as srv:
        events = list(openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0).images.generate(
            model="tiny", prompt="a fox", size="64x64", stream=True, partial_images=2))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert all(size_of(e.b64_json) == (64, 64) for e in events)
    assert events[-1].imagerouter["provider"] == "local"  # type: ignore[union-attr]


def test_the_server_warms_its_providers_at_startup() -> None:
    from providers.comfyui import ComfyUIProvider
    from providers.sandbox import ComfyUISandbox

    with ComfyUISandbox() as sb:
        cold = ComfyUIProvider(sb.origin, history_poll_s=0.02)
        with ServerThread(create_app(AsyncRouter([cold], ledger=":memory:"), close_router=True, warm=False)):
            assert sb.requests == []  # nothing read from the server until a request needs it
        comfy = ComfyUIProvider(sb.origin, history_poll_s=0.02)
        with ServerThread(create_app(AsyncRouter([comfy], ledger=":memory:"), close_router=True)):
            read = {r.path for r in sb.requests}  # before any client request: read at startup
        assert "/object_info" in read and comfy._state.info is not None


def test_an_error_answer_says_what_billed_failed_attempts_cost(server: tuple[ServerThread, str],
                                                               sandbox: OpenAISandbox) -> None:
    srv, key = server
    sandbox.faults.push(Fault.hostile_image("truncated_image"), times=None)  # 200, billed, an image that fails
    answer = httpx.post(f"{srv.base_url}/images/generations", headers={"authorization": f"Bearer {key}"},
                        json={"prompt": "a cat"}, timeout=30)
    assert answer.status_code == 502
    assert answer.headers["x-imagerouter-cost-usd"] == str(sandbox.billed_usd) and sandbox.billed_usd > 0
