"""Live check of the ComfyUI provider against a real ComfyUI server (opt-in; not part of CI).

    python scripts/check_comfyui.py http://127.0.0.1:8188 [--checkpoint NAME] [--workflows DIR]
                                    [--steps 4] [--size 512] [--timeout 600] [--out report.json]

Runs every capability the provider offers on that server, each as the router would call it, and checks what
comes back: txt2img (n=2, seed, negative prompt, sampler), jpeg output, progress events, img2img, inpaint
(the kept half unchanged), LoRAs (two, weighted, where the server has them), each ControlNet kind it has
(canny preprocessed by the server's Canny node, the others given the map), every saved workflow in
``--workflows`` (with an init image and mask where it binds them), a graph the server must refuse
(``node_errors`` → InvalidRequestError) and a deadline that interrupts a long run (ProviderTimeout, and the
server's history says ``execution_interrupted``). Prints one line per check and writes a JSON report; exits 1
when a check failed. Needs ``pip install 'pixroute[comfyui]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from providers.comfyui import ComfyUIProvider, family
from router.errors import InvalidRequestError, ProviderTimeout
from router.progress import ProgressEvent, reporting_to
from router.request import ImageRequest


@dataclass
class Check:
    name: str
    ok: bool = False
    seconds: float = 0.0
    detail: str = ""
    skipped: bool = False
    facts: dict[str, Any] = field(default_factory=dict)


def png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def half_mask(size: tuple[int, int]) -> bytes:
    img = Image.new("L", size, 0)
    img.paste(255, (0, 0, size[0] // 2, size[1]))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Runner:
    def __init__(self, provider: ComfyUIProvider, args: argparse.Namespace) -> None:
        self.p, self.args = provider, args
        self.checks: list[Check] = []
        self.size = (args.size, args.size)

    async def run(self, name: str, body: Callable[[Check], Awaitable[None]]) -> Check:
        check = Check(name)
        start = time.perf_counter()
        try:
            await body(check)
            check.ok = not check.skipped
        except Exception as exc:  # a failed check is reported, the others still run
            check.detail = f"{type(exc).__name__}: {exc}"
            if self.args.verbose:
                traceback.print_exc()
        check.seconds = round(time.perf_counter() - start, 2)
        self.checks.append(check)
        state = "SKIP" if check.skipped else "ok" if check.ok else "FAIL"
        print(f"{state:4} {name:32} {check.seconds:7.2f}s  {check.detail}", flush=True)
        return check

    def request(self, **kw: Any) -> ImageRequest:
        kw.setdefault("prompt", "a lighthouse on a cliff at dusk, oil painting")
        kw.setdefault("steps", self.args.steps)
        kw.setdefault("seed", 1234)
        if "init_image" not in kw:
            kw.setdefault("width", self.size[0])
            kw.setdefault("height", self.size[1])
        return ImageRequest(**kw)

    async def generate(self, request: ImageRequest, model: str, timeout: float | None = None) -> Any:
        return await self.p.generate(request, model, timeout_s=timeout or self.args.timeout)


async def main(args: argparse.Namespace) -> int:
    provider = ComfyUIProvider(args.url, workflows_dir=args.workflows, usd_per_gpu_hour=args.rate)
    r = Runner(provider, args)
    info = await provider.refresh()
    print(f"ComfyUI at {args.url}: {len(info.nodes)} nodes, {len(info.checkpoints)} checkpoints, "
          f"{len(info.loras)} LoRAs, {len(info.controlnets)} ControlNets")
    if not info.checkpoints and not provider.workflows():
        print("the server has no checkpoint and no workflow was given: nothing to check")
        return 1
    model = args.checkpoint or (info.checkpoints[0] if info.checkpoints else "")
    caps = provider.capabilities(model) if model else None
    first: dict[str, bytes] = {}

    async def txt2img(c: Check) -> None:
        events: list[ProgressEvent] = []
        with reporting_to(events.append):
            res = await r.generate(r.request(n=2, negative_prompt="blurry, low quality", scheduler="euler_a"), model)
        sizes = {(i.width, i.height) for i in res.images}
        assert len(res.images) == 2 and sizes == {r.size}, f"got {len(res.images)} images of {sizes}"
        assert res.images[0].data != res.images[1].data, "the two images of the batch are identical"
        assert events and events[-1].step == events[-1].total == args.steps, f"progress events: {len(events)}"
        first["image"] = res.images[0].data
        c.facts = {"gpu_seconds": str(res.billing.quantity), "usd": str(res.billing.cost_usd),
                   "timing": res.billing.details.get("timing"), "progress_events": len(events)}
        c.detail = f"{res.billing.quantity} GPU-s ({c.facts['timing']} timing), {len(events)} progress events"

    async def jpeg(c: Check) -> None:
        res = await r.generate(r.request(output_format="jpeg"), model)
        assert res.images[0].mime == "image/jpeg", res.images[0].mime

    async def img2img(c: Check) -> None:
        init = first.get("image") or png(r.size, (40, 90, 160))
        res = await r.generate(r.request(init_image=init, strength=0.6), model)
        assert (res.images[0].width, res.images[0].height) == r.size

    async def inpaint(c: Check) -> None:
        init = png(r.size, (200, 30, 30))
        res = await r.generate(r.request(init_image=init, mask_image=half_mask(r.size), strength=1.0), model)
        with Image.open(io.BytesIO(res.images[0].data)) as img:
            kept = img.convert("RGB").getpixel((r.size[0] * 7 // 8, r.size[1] // 2))
        c.detail = f"kept half pixel {kept} (init (200, 30, 30); a VAE round trip shifts it slightly)"

    async def loras(c: Check) -> None:
        if not info.loras:
            c.skipped, c.detail = True, "the server has no LoRA"
            return
        fam = family(model)
        fitting = [n for n in info.loras if fam is None or family(n) in (None, fam)][:2] or list(info.loras[:2])
        refs = [{"ref": n, "weight": w} for n, w in zip(fitting, (0.7, -0.3), strict=False)]
        res = await r.generate(r.request(loras=refs), model)
        c.detail = f"{', '.join(fitting)}: {len(res.images)} image(s)"

    async def control(kind: str, c: Check) -> None:
        image = first.get("image") or png(r.size, (128, 128, 128))
        res = await r.generate(r.request(controls=[{"kind": kind, "image": image, "scale": 0.8,
                                                    "preprocess": kind == "canny"}]), model)
        c.detail = f"{len(res.images)} image(s)"

    async def refused(c: Check) -> None:
        client = provider._client()
        response = await client.post("/prompt", json={"prompt": {"1": {"class_type": "CheckpointLoaderSimple",
                                                                        "inputs": {"ckpt_name": "no-such.ckpt"}},
                                                                  "2": {"class_type": "SaveImage", "inputs": {}}}})
        body = response.json()
        assert response.status_code == 400 and isinstance(body.get("node_errors"), dict), body
        c.facts = {"error": body.get("error"), "node_errors": body.get("node_errors")}
        try:
            await r.generate(r.request(), "no-such.safetensors")
        except InvalidRequestError as exc:
            c.detail = f"400 {body['error'].get('type')}; provider: {exc.message[:80]}"
        else:
            raise AssertionError("an unknown checkpoint was served")

    async def deadline(c: Check) -> None:
        try:
            await r.generate(r.request(steps=max(200, args.steps * 50), width=r.size[0] * 2, height=r.size[1] * 2),
                             model, timeout=args.interrupt_after)
        except ProviderTimeout as exc:
            prompt_id = exc.request_id or ""
        else:
            c.skipped, c.detail = True, "the run finished before the deadline; raise --interrupt-after's steps"
            return
        client = provider._client()
        for _ in range(60):
            entry = (await client.get(f"/history/{prompt_id}")).json().get(prompt_id)
            if entry:
                kinds = [m[0] for m in entry["status"]["messages"]]
                assert "execution_interrupted" in kinds, kinds
                c.detail = f"interrupted; history ends {kinds[-1]}"
                return
            await asyncio.sleep(1)
        raise AssertionError("the interrupted prompt never reached the history")

    async def workflow(name: str, c: Check) -> None:
        wf = provider.workflow(name)
        assert wf is not None
        kw: dict[str, Any] = {}
        if "image" in wf.inputs:
            kw["init_image"] = first.get("image") or png(r.size, (40, 90, 160))
            if "mask" in wf.inputs:
                kw["mask_image"] = half_mask(r.size)
        if "control_image" in wf.inputs:
            kw["controls"] = [{"kind": sorted(wf.control_kinds)[0], "image": first.get("image")
                               or png(r.size, (128, 128, 128)), "preprocess": False}]
        if "width" not in wf.inputs:
            kw.update(width=None, height=None)
        res = await r.generate(r.request(**{k: v for k, v in kw.items() if v is not None}), name)
        c.detail = f"{len(res.images)} image(s), {res.images[0].width}x{res.images[0].height}"

    if model and caps is not None:
        await r.run("txt2img (n=2, progress)", txt2img)
        await r.run("jpeg output", jpeg)
        if "img2img" in caps.tasks:
            await r.run("img2img", img2img)
        if "inpaint" in caps.tasks:
            await r.run("inpaint", inpaint)
        await r.run("two weighted LoRAs", loras)
        for kind in sorted(caps.control_kinds):
            await r.run(f"controlnet {kind}", functools.partial(control, kind))
        await r.run("node_errors refused", refused)
        await r.run("deadline interrupts", deadline)
    for name in provider.workflows():
        await r.run(name, functools.partial(workflow, name))
    for name, why in provider.broken_workflows().items():
        r.checks.append(Check(f"workflow:{name}", detail=f"not loaded: {why}"))
        print(f"FAIL workflow:{name} not loaded: {why}")
    await provider.aclose()
    report = {"url": args.url, "checkpoint": model, "server": {"checkpoints": list(info.checkpoints),
                                                               "loras": list(info.loras),
                                                               "controlnets": list(info.controlnets)},
              "checks": [asdict(c) for c in r.checks]}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(f"report written to {args.out}")
    failed = [c for c in r.checks if not c.ok and not c.skipped]
    print(f"{len(r.checks) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the ComfyUI server, e.g. http://127.0.0.1:8188")
    ap.add_argument("--checkpoint", help="the checkpoint to use (default: the server's first)")
    ap.add_argument("--workflows", help="a folder of saved API-format workflows to run")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=512, help="the side of the square images made")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for each call")
    ap.add_argument("--interrupt-after", type=float, default=5.0, help="the deadline of the interrupt check")
    ap.add_argument("--rate", type=float, default=0.0, help="USD per GPU-hour, for the reported costs")
    ap.add_argument("--out", help="write the JSON report here")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
