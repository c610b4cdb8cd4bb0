"""The local backend as a Ray Serve pool: a real local Ray instance on the CPU, tiny models, real HTTP on loopback."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("ray.serve")

import httpx
import numpy as np
from PIL import Image

from providers.local import LocalProvider
from providers.ray_pool import RayPoolProvider, build_app, deployment_options, serve_gpu
from router import AsyncRouter, ImageRequest
from router.errors import (
    AuthenticationError,
    CatalogError,
    ConfigurationError,
    InvalidRequestError,
    ProviderUnavailable,
)
from tests.test_local import entry, noise_png

RATE = Decimal("3.6")  # USD per GPU-hour: a GPU-second costs $0.001
TOKEN = "pool-test-token"
PROMPTS = ("a red cube", "a blue ball", "a green tree", "a cat on a mat", "a lighthouse", "a dog", "the sky",
           "a small house")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pool_url(sd15_dir: Path) -> Iterator[str]:
    """One pool for the module: a local Ray instance (2 CPUs, loopback only) serving the tiny SD 1.5 model."""
    import ray
    from ray import serve

    usage = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # Ray would otherwise report usage to its server
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        # A long batch wait: the 8 concurrent requests of the must-show reach the replica within it.
        serve.run(build_app({"tiny": entry(sd15_dir)}, max_batch_size=8, batch_wait_timeout_s=1.0, token=TOKEN),
                  name="pixroute-test", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        if usage is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = usage


@pytest.fixture
async def pool(pool_url: str) -> Any:
    p = RayPoolProvider(pool_url, usd_per_gpu_hour=RATE, token=TOKEN)
    yield p
    await p.aclose()


@pytest.fixture
async def local(sd15_dir: Path) -> Any:
    """The in-process local backend, computing as the pool's replica does: CPU float sums depend on the thread
    count, and Ray runs a one-CPU replica's torch on one thread (OMP_NUM_THREADS=1)."""
    import torch

    threads = torch.get_num_threads()
    p = LocalProvider({"tiny": entry(sd15_dir)}, device="cpu")
    await p.worker.submit(lambda cache, cancel: torch.set_num_threads(1))
    yield p
    await p.aclose()
    torch.set_num_threads(threads)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


async def test_the_pool_lists_its_models_with_the_local_backends_capabilities(pool: RayPoolProvider,
                                                                             local: LocalProvider) -> None:
    await pool.refresh()
    assert list(pool.models()) == ["tiny"]
    assert pool.capabilities("tiny") == local.capabilities("tiny")
    assert pool.provider_option_names() == local.provider_option_names()
    assert pool.configuration_problem() is None


async def test_eight_concurrent_compatible_requests_run_in_fewer_batches(pool: RayPoolProvider,
                                                                        local: LocalProvider) -> None:
    requests = [ImageRequest(prompt=p, width=64, height=64, seed=100 + i, negative_prompt="blurry")
                for i, p in enumerate(PROMPTS)]
    await pool.refresh()
    answers = await asyncio.gather(*(pool.generate(r, "tiny", timeout_s=120) for r in requests))
    batches = {a.billing.details["batch"]["id"]: a.billing.details["batch"]["requests"] for a in answers}
    assert len(batches) < len(requests)
    assert sum(batches.values()) == len(requests)
    assert max(batches.values()) > 1
    async with httpx.AsyncClient(base_url=pool.url or "", headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        logged = Counter((await client.get("/v1/models")).json()["batch_sizes"])  # the sizes the pool logged
    assert Counter(batches.values()) <= logged
    for request, answer in zip(requests, answers, strict=True):
        alone = await local.generate(request, "tiny", timeout_s=120)
        [got], [want] = answer.images, alone.images
        assert (got.seed, got.width, got.height, got.mime) == (want.seed, 64, 64, "image/png")
        # Batched kernels sum in another order than a call of one: at most one grey level apart, as the local
        # backend's own n > 1 calls are (tests/test_local.py).
        assert np.abs(pixels(got.data) - pixels(want.data)).max() <= 1
        assert answer.billing.unit == "gpu_seconds"
        assert answer.billing.cost_usd == answer.billing.quantity * RATE / 3600 > 0


async def test_incompatible_requests_never_share_a_pipeline_call(pool: RayPoolProvider,
                                                                 local: LocalProvider) -> None:
    requests = [ImageRequest(prompt=p, width=64, height=64, seed=7 + i, steps=2 + i % 2)
                for i, p in enumerate(PROMPTS[:4])]
    await pool.refresh()
    answers = await asyncio.gather(*(pool.generate(r, "tiny", timeout_s=120) for r in requests))
    steps_of: dict[int, set[int | None]] = {}
    for request, answer in zip(requests, answers, strict=True):
        steps_of.setdefault(answer.billing.details["batch"]["id"], set()).add(request.steps)
        alone = await local.generate(request, "tiny", timeout_s=120)
        assert np.abs(pixels(answer.images[0].data) - pixels(alone.images[0].data)).max() <= 1
    assert all(len(steps) == 1 for steps in steps_of.values())


async def test_a_request_that_cannot_batch_runs_alone_byte_equal_to_the_local_backend(
        pool: RayPoolProvider, local: LocalProvider) -> None:
    request = ImageRequest(prompt="a red cube", init_image=noise_png(), strength=0.7, seed=3, width=64, height=64)
    await pool.refresh()
    got = await pool.generate(request, "tiny", timeout_s=120)
    want = await local.generate(request, "tiny", timeout_s=120)
    assert got.billing.details["batch"]["requests"] == 1
    assert [i.data for i in got.images] == [i.data for i in want.images]


async def test_a_lone_compatible_request_is_byte_equal_to_the_local_backend(pool: RayPoolProvider,
                                                                           local: LocalProvider) -> None:
    request = ImageRequest(prompt="a lighthouse", width=64, height=64, n=2, seed=11)
    await pool.refresh()
    got = await pool.generate(request, "tiny", timeout_s=120)
    want = await local.generate(request, "tiny", timeout_s=120)
    assert got.billing.details["batch"] == {"id": got.billing.details["batch"]["id"], "requests": 1, "images": 2}
    assert [(i.data, i.seed) for i in got.images] == [(i.data, i.seed) for i in want.images]


async def test_the_router_reaches_the_pool_and_settles_its_gpu_seconds(pool_url: str) -> None:
    provider = RayPoolProvider(pool_url, usd_per_gpu_hour=RATE, token=TOKEN)
    await provider.refresh()  # routing reads the pool's models from the last refresh, never waits on it
    async with AsyncRouter([provider], ledger=":memory:") as r:
        res = await r.agenerate("a blue ball", width=64, height=64, seed=1)
    assert (res.provider, res.model, res.images[0].seed) == ("ray", "tiny", 1)
    assert res.cost.usd > 0


async def test_the_pools_refusal_comes_back_as_an_invalid_request_with_its_code(pool: RayPoolProvider) -> None:
    request = ImageRequest(prompt="x", width=64, height=64, seed=1, provider_options={"ray": {"watermark": False}})
    await pool.refresh()
    with pytest.raises(InvalidRequestError, match="watermark") as caught:
        await pool.generate(request, "tiny", timeout_s=30)
    assert (caught.value.code, caught.value.status_code, caught.value.provider) == ("watermark_required", 400, "ray")


async def test_the_pool_refuses_a_client_without_its_token(pool_url: str) -> None:
    p = RayPoolProvider(pool_url, token="wrong")
    try:
        with pytest.raises(AuthenticationError):
            await p.refresh()
    finally:
        await p.aclose()


def test_serve_gpu_refuses_an_open_host_without_a_token_and_a_bad_catalog_before_starting_ray(
        tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="without a token"):
        serve_gpu(tmp_path / "models.yaml", host="0.0.0.0")
    with pytest.raises(CatalogError, match="cannot read it"):
        serve_gpu(tmp_path / "missing.yaml", host="127.0.0.1")


async def test_a_pool_that_is_down_is_unavailable() -> None:
    p = RayPoolProvider(f"http://127.0.0.1:{_free_port()}")
    try:
        with pytest.raises(ProviderUnavailable):
            await p.refresh()
        assert "not reached" in (p.configuration_problem() or "")
    finally:
        await p.aclose()


def test_importing_the_module_does_not_import_ray() -> None:
    code = "import router, providers.ray_pool, sys; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_one_replica_per_gpu_autoscaled_on_queue_length() -> None:
    gpu = deployment_options(4, max_batch_size=8)
    assert gpu["ray_actor_options"] == {"num_gpus": 1}
    assert (gpu["autoscaling_config"]["min_replicas"], gpu["autoscaling_config"]["max_replicas"]) == (1, 4)
    assert gpu["autoscaling_config"]["target_ongoing_requests"] == 8 <= gpu["max_ongoing_requests"]
    cpu = deployment_options(0)
    assert cpu["ray_actor_options"] == {"num_cpus": 1}
    assert cpu["autoscaling_config"]["max_replicas"] == 1
