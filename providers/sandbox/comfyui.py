"""A loopback ComfyUI server: its HTTP + websocket API as ComfyUI's own source defines it.

Read from Comfy-Org/ComfyUI (commit a125cd8, Oct 2025) and written here in our own words; each rule
names the file and function it follows. Routes (each also under ``/api``, as ``PromptServer.add_routes``
registers them twice):

- ``GET /ws?clientId=…`` — a websocket (RFC 6455, served here with the standard library). On connect the
  server sends ``status`` ``{status: {exec_info: {queue_remaining}}, sid}``; a first client message
  ``{"type": "feature_flags"}`` is answered with the server's flags (server.py ``websocket_handler``).
  Every message is JSON ``{"type", "data"}`` (server.py ``send_json``).
- ``POST /prompt`` ``{prompt, client_id?, prompt_id?, number?, front?, extra_data?}`` → 200 ``{prompt_id,
  number, node_errors}`` or 400 ``{error, node_errors}`` after validation against the node definitions it
  serves (server.py ``post_prompt``; execution.py ``validate_prompt`` / ``validate_inputs``).
- ``GET /prompt`` (queue info), ``GET /queue``, ``POST /queue`` ``{clear?, delete?: [ids]}``,
  ``POST /interrupt`` ``{prompt_id?}`` (targeted when given), ``GET /history[/{id}]``, ``POST /history``.
- ``GET /object_info[/{class}]``, ``GET /system_stats``, ``GET /features``, ``GET /embeddings``,
  ``GET /models[/{folder}]``.
- ``POST /upload/image`` (multipart ``image``, ``overwrite``, ``type``, ``subfolder``) and ``GET /view``.

A queued prompt runs on one worker thread, in order (main.py ``prompt_worker``): ``execution_start``,
``execution_cached``, then per node ``executing`` (+ ``progress`` per sampler step, ``executed`` for output
nodes), and ``execution_success`` — or ``execution_error`` / ``execution_interrupted`` — then the history
entry and a final ``executing`` with ``node: null``. Outputs are cached between prompts by input signature,
as the classic cache does: an identical node runs once.

Images are real PNGs of the requested size: a flat colour and a disc from a hash of (checkpoint, LoRAs,
prompts, controls, sampler settings, seed + batch index); an init image shows through by ``denoise``,
and a noise mask keeps everything outside it.

Faults (``sb.faults``): the shared ``timeout`` and ``disconnect``; ``server_error`` (aiohttp's plain 500),
``malformed`` (200 with a broken body) and ``invalid_request`` (a 400 in ``/prompt``'s shape) on any route;
:func:`execution_error` and :func:`out_of_memory` (push them with ``path="/prompt"``: the prompt is
accepted, then the named node raises while it runs); and the hostile images (push them with
``path="/view"``: that download answers the hostile bytes). :meth:`ComfyUISandbox.hold` stops samplers at
their first step until :meth:`release` or an interrupt; :meth:`drop_websockets` closes every socket.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import heapq
import io
import json
import os
import posixpath
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from PIL import Image, ImageOps

from providers.sandbox._server import (
    HOSTILE_IMAGE_FAULTS,
    Fault,
    Request,
    Response,
    SandboxError,
    SandboxServer,
    _Handler,
    hostile_image,
    synthetic_image,
)

MAX_RESOLUTION = 16384  # nodes.py MAX_RESOLUTION
# comfy/samplers.py KSAMPLER_NAMES + ["ddim", "uni_pc", "uni_pc_bh2"] (a subset: those a router maps to) and
# SCHEDULER_HANDLERS' keys.
SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "lcm", "ddim",
            "uni_pc", "uni_pc_bh2")
SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal")
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")  # execution.py
# comfy_api/feature_flags.py SERVER_FEATURE_FLAGS (comfy/cli_args.py: max_upload_size 100 MB)
SERVER_FEATURES = {"supports_preview_metadata": True, "max_upload_size": 100 * 1024 * 1024}
COMFYUI_VERSION = "0.3.65"
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_AIOHTTP_500 = b"500 Internal Server Error\n\nServer got itself in trouble"  # aiohttp's answer to a handler crash


def execution_error(message: str = "sandbox node failure", node_type: str | None = None) -> Fault:
    """A fault for ``POST /prompt``: the prompt is accepted, then its ``node_type`` node (the first sampler when
    None) raises ``RuntimeError(message)`` while it runs, and the server sends ``execution_error``."""
    return Fault("execution_error", message=message, param=node_type, code="RuntimeError")


def out_of_memory(node_type: str | None = None) -> Fault:
    """Like :func:`execution_error`, with the exception and the tips ComfyUI gives an out-of-memory error
    (execution.py ``execute``: ``OOM_EXCEPTION``)."""
    return Fault("execution_error", message="Allocation on device \nThis error means you ran out of memory on "
                 "your GPU.\n\nTIPS: If the workflow worked before you might have accidentally set the batch_size "
                 "to a large number.", param=node_type, code="torch.OutOfMemoryError")


class Interrupted(Exception):
    """comfy.model_management.InterruptProcessingException."""


class NodeFailure(Exception):
    """A node raised while running; ``exception_type`` is the full type name ComfyUI reports."""

    def __init__(self, message: str, exception_type: str = "RuntimeError") -> None:
        super().__init__(message)
        self.exception_type = exception_type


class HttpError(SandboxError):
    """A plain aiohttp answer: a status and a short text (``web.Response(status=…)``)."""

    def __init__(self, status: int, text: str = "") -> None:
        super().__init__(text)
        self.status, self.text = status, text

    def response(self) -> Response:
        body = self.text.encode() if self.text else f"{self.status}: {_PHRASES.get(self.status, '')}".encode()
        return Response(self.status, body, {"content-type": "text/plain; charset=utf-8"})


_PHRASES = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed"}


# --- node definitions: nodes.py's classes as data ----------------------------------------------------------


@dataclass
class Ctx:
    """What a running node can reach: the sandbox, its ids, and the prompt (hidden inputs)."""

    sb: ComfyUISandbox
    node_id: str
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]


@dataclass(frozen=True)
class NodeDef:
    """One node class: ``inputs(sb)`` is its INPUT_TYPES(), ``run`` its FUNCTION."""

    name: str
    inputs: Callable[[ComfyUISandbox], dict[str, dict[str, Any]]]
    output: tuple[str, ...]
    run: Callable[..., Any]
    category: str
    display_name: str = ""
    description: str = ""
    output_name: tuple[str, ...] | None = None
    output_node: bool = False
    validate: tuple[str, ...] = ()
    """The arguments of its VALIDATE_INPUTS (those inputs skip the min/max/list checks)."""
    is_changed: Callable[..., str] | None = None


def _req(**inputs: tuple[Any, ...]) -> Callable[[ComfyUISandbox], dict[str, dict[str, Any]]]:
    return lambda sb: {"required": dict(inputs)}


def _combo(folder: str) -> Callable[[ComfyUISandbox], list[str]]:
    return lambda sb: sorted(sb.folders[folder])


@dataclass
class Latent:
    """A LATENT: its pixel size, batch, the pixels it was encoded from, a noise mask, and how it was sampled."""

    width: int
    height: int
    batch: int
    images: list[Image.Image] | None = None
    noise_mask: Image.Image | None = None
    sampled: dict[str, Any] | None = None


@dataclass(frozen=True)
class Model:
    """MODEL / CLIP / VAE: the checkpoint and the LoRAs patched in."""

    ckpt: str
    loras: tuple[tuple[str, float], ...] = ()


def _checkpoint(ctx: Ctx, ckpt_name: str) -> tuple[Any, ...]:
    model = Model(ckpt_name)
    return model, model, model


def _lora(ctx: Ctx, model: Model, clip: Model, lora_name: str, strength_model: float,
          strength_clip: float) -> tuple[Any, ...]:
    if strength_model == 0 and strength_clip == 0:  # nodes.py LoraLoader.load_lora
        return model, clip
    return (Model(model.ckpt, (*model.loras, (lora_name, strength_model))),
            Model(clip.ckpt, (*clip.loras, (lora_name, strength_clip))))


def _encode_text(ctx: Ctx, text: str, clip: Model) -> tuple[Any, ...]:
    return ({"text": text, "clip": clip, "controls": ()},)


def _empty_latent(ctx: Ctx, width: int, height: int, batch_size: int = 1) -> tuple[Any, ...]:
    # nodes.py EmptyLatentImage.generate: a latent of height // 8 × width // 8, so the image is floored to 8
    return (Latent(width // 8 * 8, height // 8 * 8, batch_size),)


def _repeat(ctx: Ctx, samples: Latent, amount: int) -> tuple[Any, ...]:
    return (Latent(samples.width, samples.height, samples.batch * amount,
                   None if samples.images is None else samples.images * amount, samples.noise_mask, samples.sampled),)


def _vae_encode(ctx: Ctx, pixels: list[Image.Image], vae: Model) -> tuple[Any, ...]:
    # comfy/sd.py VAE.encode crops the pixels to a multiple of the downscale ratio (8)
    w, h = pixels[0].width // 8 * 8, pixels[0].height // 8 * 8
    return (Latent(w, h, len(pixels), [p.crop((0, 0, w, h)) for p in pixels]),)


def _vae_encode_inpaint(ctx: Ctx, pixels: list[Image.Image], vae: Model, mask: list[Image.Image],
                        grow_mask_by: int = 6) -> tuple[Any, ...]:
    (latent,) = _vae_encode(ctx, pixels, vae)
    latent.noise_mask = mask[0].resize((latent.width, latent.height))
    return (latent,)


def _noise_mask(ctx: Ctx, samples: Latent, mask: list[Image.Image]) -> tuple[Any, ...]:
    return (Latent(samples.width, samples.height, samples.batch, samples.images,
                   mask[0].resize((samples.width, samples.height)), samples.sampled),)


def _ksampler(ctx: Ctx, model: Model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
              positive: dict[str, Any], negative: dict[str, Any], latent_image: Latent,
              denoise: float = 1.0) -> tuple[Any, ...]:
    for step in range(1, steps + 1):  # comfy.utils.ProgressBar → main.py hijack_progress: one message a step
        ctx.sb._sampling_step(ctx, step, steps)
    sampled = {"ckpt": model.ckpt, "loras": model.loras, "positive": positive["text"], "negative": negative["text"],
               "controls": positive["controls"], "seed": seed, "steps": steps, "cfg": cfg, "sampler": sampler_name,
               "scheduler": scheduler, "denoise": denoise}
    return (Latent(latent_image.width, latent_image.height, latent_image.batch, latent_image.images,
                   latent_image.noise_mask, sampled),)


def _vae_decode(ctx: Ctx, samples: Latent, vae: Model) -> tuple[Any, ...]:
    size = (samples.width, samples.height)
    out = []
    for i in range(samples.batch):
        base = samples.images[i % len(samples.images)] if samples.images else None
        s = samples.sampled
        if s is None:
            out.append(base or Image.new("RGB", size, (128, 128, 128)))
            continue
        key = json.dumps({k: v for k, v in s.items() if k not in ("seed", "denoise")}, sort_keys=True, default=str)
        art = synthetic_image(key, s["seed"] + i, size)
        if base is not None:
            art = Image.blend(base.convert("RGB"), art, max(0.0, min(1.0, float(s["denoise"]))))
            if samples.noise_mask is not None:  # sampling happens only inside the mask
                art = Image.composite(art, base.convert("RGB"), samples.noise_mask.convert("L"))
        out.append(art)
    return (out,)


def _controlnet(ctx: Ctx, control_net_name: str) -> tuple[Any, ...]:
    return ({"name": control_net_name},)


def _apply_controlnet(ctx: Ctx, positive: dict[str, Any], negative: dict[str, Any], control_net: dict[str, Any],
                      image: list[Image.Image], strength: float, start_percent: float, end_percent: float,
                      vae: Model | None = None) -> tuple[Any, ...]:
    if strength == 0:  # nodes.py ControlNetApplyAdvanced.apply_controlnet
        return positive, negative
    digest = hashlib.sha256(image[0].tobytes()).hexdigest()[:12]
    control = (control_net["name"], round(strength, 3), round(start_percent, 3), round(end_percent, 3), digest)
    return ({**positive, "controls": (*positive["controls"], control)},
            {**negative, "controls": (*negative["controls"], control)})


def _load_image(ctx: Ctx, image: str) -> tuple[Any, ...]:
    with Image.open(io.BytesIO(ctx.sb._input_file(image))) as img:
        img.load()
        rgb = img.convert("RGB")
        # nodes.py LoadImage.load_image: the mask is 1 - alpha where there is alpha, else a 64×64 zero mask
        mask = ImageOps.invert(img.getchannel("A")) if "A" in img.getbands() else Image.new("L", (64, 64), 0)
    return [rgb], [mask]


def _load_mask(ctx: Ctx, image: str, channel: str) -> tuple[Any, ...]:
    with Image.open(io.BytesIO(ctx.sb._input_file(image))) as img:
        rgba = img.convert("RGBA")
    band = channel[0].upper()  # nodes.py LoadImageMask.load_image: the channel's value; alpha inverted
    mask = rgba.getchannel(band)
    return ([ImageOps.invert(mask) if band == "A" else mask],)


def _file_hash(ctx: Ctx, image: str, channel: str = "") -> str:
    return hashlib.sha256(ctx.sb._input_file(image)).hexdigest()  # nodes.py LoadImage.IS_CHANGED


def _scale(ctx: Ctx, image: list[Image.Image], upscale_method: str, width: int, height: int,
           crop: str) -> tuple[Any, ...]:
    if width == 0 and height == 0:
        return (image,)
    w0, h0 = image[0].size
    width = width or max(1, round(w0 * height / h0))
    height = height or max(1, round(h0 * width / w0))
    return ([i.resize((width, height)) for i in image],)


def _canny(ctx: Ctx, image: list[Image.Image], low_threshold: float, high_threshold: float) -> tuple[Any, ...]:
    from PIL import ImageFilter

    return ([i.convert("L").filter(ImageFilter.FIND_EDGES).convert("RGB") for i in image],)


def _save(ctx: Ctx, images: list[Image.Image], filename_prefix: str = "ComfyUI", *, kind: str = "output",
          **hidden: Any) -> dict[str, Any]:
    results = []
    for batch_number, image in enumerate(images):
        subfolder, name, counter = ctx.sb._next_output_name(filename_prefix, kind)
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        file = f"{name.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"  # nodes.py SaveImage
        ctx.sb._store_output(kind, subfolder, file, buf.getvalue())
        results.append({"filename": file, "subfolder": subfolder, "type": kind})
    return {"ui": {"images": results}}


def _preview(ctx: Ctx, images: list[Image.Image], **hidden: Any) -> dict[str, Any]:
    suffix = hashlib.sha256(ctx.prompt_id.encode()).hexdigest()[:5]
    return _save(ctx, images, f"ComfyUI_temp_{suffix}", kind="temp")


_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
_INT = "INT"
_FLOAT = "FLOAT"

NODES: tuple[NodeDef, ...] = (
    NodeDef("CheckpointLoaderSimple", lambda sb: {"required": {"ckpt_name": (sorted(sb.folders["checkpoints"]), {
        "tooltip": "The name of the checkpoint (model) to load."})}}, ("MODEL", "CLIP", "VAE"), _checkpoint,
        "loaders", "Load Checkpoint"),
    NodeDef("LoraLoader", lambda sb: {"required": {
        "model": ("MODEL",), "clip": ("CLIP",), "lora_name": (sorted(sb.folders["loras"]),),
        "strength_model": (_FLOAT, {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
        "strength_clip": (_FLOAT, {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})}},
        ("MODEL", "CLIP"), _lora, "loaders", "Load LoRA"),
    NodeDef("CLIPTextEncode", _req(text=("STRING", {"multiline": True, "dynamicPrompts": True}), clip=("CLIP",)),
            ("CONDITIONING",), _encode_text, "conditioning", "CLIP Text Encode (Prompt)"),
    NodeDef("EmptyLatentImage", _req(
        width=(_INT, {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
        height=(_INT, {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
        batch_size=(_INT, {"default": 1, "min": 1, "max": 4096})), ("LATENT",), _empty_latent, "latent",
        "Empty Latent Image"),
    NodeDef("RepeatLatentBatch", _req(samples=("LATENT",), amount=(_INT, {"default": 1, "min": 1, "max": 64})),
            ("LATENT",), _repeat, "latent/batch", "Repeat Latent Batch"),
    NodeDef("VAEEncode", _req(pixels=("IMAGE",), vae=("VAE",)), ("LATENT",), _vae_encode, "latent", "VAE Encode"),
    NodeDef("VAEEncodeForInpaint", _req(pixels=("IMAGE",), vae=("VAE",), mask=("MASK",), grow_mask_by=(
        _INT, {"default": 6, "min": 0, "max": 64, "step": 1})), ("LATENT",), _vae_encode_inpaint, "latent/inpaint",
        "VAE Encode (for Inpainting)"),
    NodeDef("SetLatentNoiseMask", _req(samples=("LATENT",), mask=("MASK",)), ("LATENT",), _noise_mask,
            "latent/inpaint", "Set Latent Noise Mask"),
    NodeDef("KSampler", lambda sb: {"required": {
        "model": ("MODEL",),
        "seed": (_INT, {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
        "steps": (_INT, {"default": 20, "min": 1, "max": 10000}),
        "cfg": (_FLOAT, {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        "sampler_name": (list(SAMPLERS),), "scheduler": (list(SCHEDULERS),),
        "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "latent_image": ("LATENT",),
        "denoise": (_FLOAT, {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}},
        ("LATENT",), _ksampler, "sampling", "KSampler"),
    NodeDef("VAEDecode", _req(samples=("LATENT",), vae=("VAE",)), ("IMAGE",), _vae_decode, "latent", "VAE Decode"),
    NodeDef("ControlNetLoader", lambda sb: {"required": {"control_net_name": (sorted(sb.folders["controlnet"]),)}},
            ("CONTROL_NET",), _controlnet, "loaders", "Load ControlNet Model"),
    NodeDef("ControlNetApplyAdvanced", lambda sb: {"required": {
        "positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "control_net": ("CONTROL_NET",),
        "image": ("IMAGE",), "strength": (_FLOAT, {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        "start_percent": (_FLOAT, {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        "end_percent": (_FLOAT, {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})},
        "optional": {"vae": ("VAE",)}}, ("CONDITIONING", "CONDITIONING"), _apply_controlnet,
        "conditioning/controlnet", "Apply ControlNet", output_name=("positive", "negative")),
    NodeDef("LoadImage", lambda sb: {"required": {"image": (sorted(sb._input_names()), {"image_upload": True})}},
            ("IMAGE", "MASK"), _load_image, "image", "Load Image", validate=("image",), is_changed=_file_hash),
    NodeDef("LoadImageMask", lambda sb: {"required": {
        "image": (sorted(sb._input_names()), {"image_upload": True}),
        "channel": (["alpha", "red", "green", "blue"],)}}, ("MASK",), _load_mask, "mask", "Load Image (as Mask)",
        validate=("image",), is_changed=_file_hash),
    NodeDef("ImageScale", _req(image=("IMAGE",), upscale_method=(["nearest-exact", "bilinear", "area", "bicubic",
                                                                   "lanczos"],),
                               width=(_INT, {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
                               height=(_INT, {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
                               crop=(["disabled", "center"],)), ("IMAGE",), _scale, "image/upscaling",
            "Upscale Image"),
    NodeDef("Canny", _req(image=("IMAGE",),
                          low_threshold=(_FLOAT, {"default": 0.4, "min": 0.01, "max": 0.99, "step": 0.01}),
                          high_threshold=(_FLOAT, {"default": 0.8, "min": 0.01, "max": 0.99, "step": 0.01})),
            ("IMAGE",), _canny, "image/preprocessors", "Canny"),
    NodeDef("SaveImage", lambda sb: {"required": {"images": ("IMAGE",), "filename_prefix": (
        "STRING", {"default": "ComfyUI"})}, "hidden": dict(_HIDDEN)}, (), _save, "image", "Save Image",
        "Saves the input images to your ComfyUI output directory.", output_node=True),
    NodeDef("PreviewImage", lambda sb: {"required": {"images": ("IMAGE",)}, "hidden": dict(_HIDDEN)}, (), _preview,
            "image", "Preview Image", output_node=True),
)


def node_info(sb: ComfyUISandbox, d: NodeDef) -> dict[str, Any]:
    """A node's ``/object_info`` entry (server.py ``node_info``)."""
    inputs = d.inputs(sb)
    info: dict[str, Any] = {
        "input": inputs,
        "input_order": {key: list(value) for key, value in inputs.items()},
        "output": list(d.output),
        "output_is_list": [False] * len(d.output),
        "output_name": list(d.output_name or d.output),
        "name": d.name,
        "display_name": d.display_name or d.name,
        "description": d.description,
        "python_module": "nodes" if d.name != "Canny" else "comfy_extras.nodes_canny",
        "category": d.category,
        "output_node": d.output_node,
    }
    return json.loads(json.dumps(info))  # tuples as lists, as aiohttp's json_response writes them


# --- validation: execution.py validate_prompt / validate_inputs --------------------------------------------


def _types_match(received: Any, wanted: Any) -> bool:
    """comfy_execution/validation.py ``validate_node_input`` (non-strict): equal, or overlapping
    comma-separated unions; ``*`` matches anything (node_typing.IO.ANY's ``__ne__``)."""
    if received == wanted or "*" in (received, wanted):
        return True
    if not isinstance(received, str) or not isinstance(wanted, str):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in wanted.split(",")})


_CONVERT: dict[str, Callable[[Any], Any]] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


def _error(kind: str, message: str, details: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def validate_inputs(sb: ComfyUISandbox, prompt: dict[str, Any], node_id: str,
                    validated: dict[str, tuple[bool, list[dict[str, Any]], str]]) -> tuple[bool, list[Any], str]:
    """One node's inputs checked against its definition, linked nodes first (execution.py ``validate_inputs``)."""
    if node_id in validated:
        return validated[node_id]
    node = prompt[node_id]
    inputs = node.get("inputs", {})
    d = sb.nodes[node["class_type"]]
    spec = d.inputs(sb)
    errors: list[dict[str, Any]] = []
    valid = True
    for name, category in [(n, "required") for n in spec.get("required", {})] + [
            (n, "optional") for n in spec.get("optional", {})]:
        info = spec[category][name]
        input_type, extra = info[0], (info[1] if len(info) > 1 else {})
        if name not in inputs:
            if category == "required":
                errors.append(_error("required_input_missing", "Required input is missing", name, input_name=name))
            continue
        val = inputs[name]
        config = [input_type, extra]
        if isinstance(val, list):
            if len(val) != 2:
                errors.append(_error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, "
                                     "slot_index]", name, input_name=name, input_config=config, received_value=val))
                continue
            linked = prompt[val[0]]  # a missing node raises here, as in ComfyUI (caught by validate_prompt)
            outputs = sb.nodes[linked["class_type"]].output
            received = outputs[val[1]]
            if not _types_match(received, input_type):
                errors.append(_error("return_type_mismatch", "Return type mismatch between linked nodes",
                                     f"{name}, received_type({received}) mismatch input_type({input_type})",
                                     input_name=name, input_config=config, received_type=received, linked_node=val))
                continue
            try:
                if validate_inputs(sb, prompt, val[0], validated)[0] is False:
                    valid = False
            except Exception as exc:
                valid = False
                validated[val[0]] = (False, [_error(
                    "exception_during_inner_validation", "Exception when validating inner node", str(exc),
                    input_name=name, input_config=config, exception_message=str(exc),
                    exception_type=_type_name(exc), traceback=[], linked_node=val)], val[0])
            continue
        try:
            if isinstance(val, dict) and "__value__" in val:
                val = val["__value__"]
            converted = _CONVERT.get(input_type) if isinstance(input_type, str) else None
            if converted is not None:
                val = converted(val)
            inputs[name] = val
        except Exception as exc:
            errors.append(_error("invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                                 f"{name}, {val}, {exc}", input_name=name, input_config=config, received_value=val,
                                 exception_message=str(exc)))
            continue
        if name in d.validate:
            continue
        if "min" in extra and val < extra["min"]:
            errors.append(_error("value_smaller_than_min", f"Value {val} smaller than min of {extra['min']}", name,
                                 input_name=name, input_config=config, received_value=val))
            continue
        if "max" in extra and val > extra["max"]:
            errors.append(_error("value_bigger_than_max", f"Value {val} bigger than max of {extra['max']}", name,
                                 input_name=name, input_config=config, received_value=val))
            continue
        if isinstance(input_type, list) and val not in input_type:
            long = len(input_type) > 20  # "Don't send back gigantic lists"
            listed = f"(list of length {len(input_type)})" if long else str(input_type)
            errors.append(_error("value_not_in_list", "Value not in list", f"{name}: '{val}' not in {listed}",
                                 input_name=name, input_config=None if long else config, received_value=val))
    for name in d.validate:  # VALIDATE_INPUTS: LoadImage's "Invalid image file: …"
        if name in inputs and not isinstance(inputs[name], list) and not sb._has_input_file(str(inputs[name])):
            errors.append(_error("custom_validation_failed", "Custom validation failed for node",
                                 f"{name} - Invalid image file: {inputs[name]}", input_name=name))
    result = (not errors and valid, errors, node_id)
    validated[node_id] = result
    return result


def validate_prompt(
    sb: ComfyUISandbox, prompt: Any, partial: Sequence[str] | None = None
) -> tuple[bool, dict[str, Any] | None, list[str], dict[str, Any]]:
    """(valid, error, outputs to execute, node_errors) — execution.py ``validate_prompt``."""
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return False, _error("invalid_prompt", "Cannot execute because a node is missing the class_type "
                                 "property.", f"Node ID '#{node_id}'"), [], {}
        d = sb.nodes.get(node["class_type"])
        if d is None:
            return False, _error("invalid_prompt", f"Cannot execute because node {node['class_type']} does not "
                                 "exist.", f"Node ID '#{node_id}'"), [], {}
        if d.output_node and (partial is None or node_id in partial):
            outputs.append(node_id)
    if not outputs:
        return False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}
    good: list[str] = []
    failed: list[tuple[str, list[dict[str, Any]]]] = []
    node_errors: dict[str, Any] = {}
    validated: dict[str, tuple[bool, list[Any], str]] = {}
    for o in outputs:
        try:
            ok, reasons, _ = validate_inputs(sb, prompt, o, validated)
        except Exception as exc:
            ok, reasons = False, [_error("exception_during_validation", "Exception when validating node", str(exc),
                                         exception_type=_type_name(exc), traceback=[])]
            validated[o] = (False, reasons, o)
        if ok:
            good.append(o)
            continue
        failed.append((o, reasons))
        for node_id, (node_ok, node_reasons, _) in validated.items():
            if node_ok is not True and node_reasons:  # upstream failures only, not the outputs that depend on them
                entry = node_errors.setdefault(node_id, {"errors": node_reasons, "dependent_outputs": [],
                                                         "class_type": prompt[node_id]["class_type"]})
                entry["dependent_outputs"].append(o)
    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, reasons in failed for e in reasons)
        return False, _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details), [], \
            node_errors
    return True, None, good, node_errors


def _type_name(exc: BaseException) -> str:
    kind = type(exc)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


# --- the websocket, server side (RFC 6455) --------------------------------------------------------------------


class _WebSocket:
    """One client's socket: text frames out from any thread, frames in on the connection's thread."""

    def __init__(self, conn: socket.socket, rfile: Any) -> None:
        self.conn, self.rfile = conn, rfile
        self.lock = threading.Lock()
        self.open = True

    def send_json(self, event: str, data: Any) -> None:
        self._send(0x1, json.dumps({"type": event, "data": data}).encode())

    def send_bytes(self, data: bytes) -> None:
        self._send(0x2, data)

    def _send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode]) + (bytes([n]) if n < 126 else struct.pack(">BH", 126, n) if n < 1 << 16
                                         else struct.pack(">BQ", 127, n))
        with self.lock:
            if not self.open:
                return
            try:
                self.conn.sendall(head + payload)
            except OSError:  # server.py send_socket_catch_exception: a failed send is logged, never raised
                self.open = False

    def receive(self) -> tuple[int, bytes] | None:
        """The next data message (opcode, payload); pings answered; None once the client closed or left."""
        message, first = b"", 0
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return None
            fin, opcode, masked, n = head[0] & 0x80, head[0] & 0x0F, head[1] & 0x80, head[1] & 0x7F
            if n == 126:
                n = struct.unpack(">H", self.rfile.read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self.rfile.read(8))[0]
            key = self.rfile.read(4) if masked else b"\0\0\0\0"
            data = bytes(b ^ key[i % 4] for i, b in enumerate(self.rfile.read(n)))
            if opcode == 0x8:  # close: echo it and stop
                self._send(0x8, data[:2])
                return None
            if opcode == 0x9:
                self._send(0xA, data)
                continue
            if opcode == 0xA:
                continue
            first = first or opcode
            message += data
            if fin:
                return first, message

    def close(self) -> None:
        self._send(0x8, struct.pack(">H", 1000))
        with self.lock:
            self.open = False
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)


class _ComfyHandler(_Handler):
    """The shared handler, plus the websocket upgrade on ``/ws`` (server.py ``websocket_handler``)."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/ws", "/api/ws") and "websocket" in self.headers.get("upgrade", "").lower():
            sandbox = self.server.sandbox
            assert isinstance(sandbox, ComfyUISandbox)
            sandbox._serve_websocket(self)
            self.close_connection = True
            return
        self._serve()


# --- the server ---------------------------------------------------------------------------------------------


@dataclass(order=True)
class _Item:
    """A queue entry: (number, prompt_id, prompt, extra_data, outputs_to_execute), ordered by number."""

    number: float
    prompt_id: str = field(compare=False)
    prompt: dict[str, Any] = field(compare=False)
    extra_data: dict[str, Any] = field(compare=False)
    outputs: list[str] = field(compare=False)

    def as_list(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


class ComfyUISandbox(SandboxServer):
    """ComfyUI's server API on loopback: ``with ComfyUISandbox() as sb: … sb.origin``.

    ``checkpoints``, ``loras``, ``controlnets`` are the model files it serves (``sb.folders`` may be changed
    while it runs: ``/object_info`` reads them live, as ComfyUI rescans its folders). ``step_delay_s`` is how
    long each sampler step takes; ``clock`` gives the epoch seconds its message timestamps are made from.
    ``messages`` records every websocket message sent: ``(client id or None for a broadcast, type, data)``.
    """

    base_path = ""
    fault_kinds = frozenset({"server_error", "malformed", "invalid_request", "execution_error"}) | HOSTILE_IMAGE_FAULTS
    node_defs: ClassVar[tuple[NodeDef, ...]] = NODES

    def __init__(
        self,
        *,
        checkpoints: Iterable[str] = ("sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors"),
        loras: Iterable[str] = ("detail_xl.safetensors", "style_xl.safetensors", "film_sd15.safetensors"),
        controlnets: Iterable[str] = ("controlnet-canny-sdxl-1.0.safetensors", "controlnet-depth-sdxl-1.0.safetensors",
                                      "control_v11p_sd15_openpose.pth"),
        step_delay_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.folders: dict[str, list[str]] = {"checkpoints": list(checkpoints), "loras": list(loras),
                                              "controlnet": list(controlnets), "embeddings": [], "vae": []}
        self.nodes: dict[str, NodeDef] = {d.name: d for d in self.node_defs}
        self.step_delay_s = step_delay_s
        self.clock = clock
        self.messages: list[tuple[str | None, str, Any]] = []
        self.inputs: dict[str, bytes] = {}  # the input folder: "subfolder/name" → bytes
        self.files: dict[tuple[str, str, str], bytes] = {}  # (type, subfolder, filename) → bytes
        self.history: dict[str, dict[str, Any]] = {}
        self.executed_nodes: list[tuple[str, str]] = []  # (prompt_id, node id) of every node that ran
        self._number = 0
        self._queue: list[_Item] = []
        self._running: dict[int, _Item] = {}
        self._task_counter = 0
        self._cv = threading.Condition()
        self._files_lock = threading.Lock()
        self._sockets: dict[str, _WebSocket] = {}
        self._sockets_lock = threading.Lock()
        self._interrupt = threading.Event()
        self._gate = threading.Event()
        self._gate.set()
        self._cache: dict[str, tuple[str, list[Any], dict[str, Any] | None]] = {}  # node id → (signature, out, ui)
        self._failures: dict[str, Fault] = {}
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self._worker: threading.Thread | None = None

    # --- lifecycle

    def start(self) -> Self:
        if self.running:
            return self
        super().start()
        assert self._httpd is not None
        self._httpd.RequestHandlerClass = _ComfyHandler  # before anyone knows the port
        self._worker = threading.Thread(target=self._prompt_worker, name="ComfyUISandbox-worker", daemon=True)
        self._worker.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping.set()
            self._cv.notify_all()
        self._interrupt.set()
        self._gate.set()
        self.drop_websockets()
        super().stop()
        if self._worker is not None:
            self._worker.join(timeout=2.0)
            self._worker = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    # --- switches for tests

    def hold(self) -> None:
        """Make samplers wait at their first step until :meth:`release` (or an interrupt)."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def drop_websockets(self) -> None:
        """Close every client's websocket (the server's side of a dropped connection)."""
        with self._sockets_lock:
            sockets = list(self._sockets.values())
        for ws in sockets:
            ws.close()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until nothing is queued or running; whether it got there within ``timeout`` seconds."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._running, timeout=timeout)

    def upload_bytes(self, name: str, data: bytes) -> None:
        """Put a file in the input folder, as a user copying it there would."""
        with self._files_lock:
            self.inputs[name] = data

    def messages_for_type(self, event: str) -> list[Any]:
        """The data of every ``event`` message sent so far."""
        return [d for _, t, d in list(self.messages) if t == event]

    def messages_for(self, prompt_id: str) -> list[tuple[str, Any]]:
        """The (type, data) messages about ``prompt_id``, in order."""
        return [(t, d) for _, t, d in list(self.messages) if isinstance(d, dict) and d.get("prompt_id") == prompt_id]

    # --- hooks

    def render_internal_error(self, request: Request, exc: BaseException) -> Response:
        return Response(500, _AIOHTTP_500, {"content-type": "text/plain; charset=utf-8"})

    def render_fault(self, fault: Fault, request: Request) -> Response:
        if fault.kind == "server_error":
            return Response(fault.status or 500, _AIOHTTP_500, {"content-type": "text/plain; charset=utf-8"})
        if fault.kind == "malformed":
            return Response(200, fault.body if fault.body is not None else b'{"prompt_id": "', 
                            {"content-type": "application/json; charset=utf-8"})
        if fault.kind == "invalid_request":
            error = _error("invalid_prompt", fault.message or "Invalid prompt", fault.param or "")
            return Response.json(fault.status or 400, {"error": error, "node_errors": {}})
        if fault.kind == "execution_error":
            return self.handle(request, failure=fault)
        if fault.kind in HOSTILE_IMAGE_FAULTS:
            if _route(request.path) == "/view":
                self.handle(request)  # the usual checks (400/403/404) first
                return Response(200, hostile_image(fault.kind), {"content-type": "image/png"})
            return self.handle(request)
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    def handle(self, request: Request, failure: Fault | None = None) -> Response:
        path, method = _route(request.path), request.method
        if path == "/prompt" and method == "POST":
            return self._post_prompt(request, failure)
        routes: dict[tuple[str, str], Callable[[Request], Response]] = {
            ("GET", "/prompt"): lambda r: Response.json(200, self._queue_info()),
            ("GET", "/queue"): self._get_queue,
            ("POST", "/queue"): self._post_queue,
            ("POST", "/interrupt"): self._post_interrupt,
            ("GET", "/history"): self._get_history,
            ("POST", "/history"): self._post_history,
            ("GET", "/object_info"): lambda r: Response.json(200, {d.name: node_info(self, d)
                                                                    for d in self.nodes.values()}),
            ("GET", "/system_stats"): self._system_stats,
            ("GET", "/features"): lambda r: Response.json(200, SERVER_FEATURES),
            ("GET", "/embeddings"): lambda r: Response.json(200, [os.path.splitext(e)[0]
                                                                  for e in self.folders["embeddings"]]),
            ("GET", "/models"): lambda r: Response.json(200, list(self.folders)),
            ("POST", "/upload/image"): self._upload_image,
            ("GET", "/view"): self._view,
            ("POST", "/free"): lambda r: Response(200),
        }
        route = routes.get((method, path))
        if route is not None:
            return route(request)
        if method == "GET" and path.startswith("/history/"):
            pid = path.removeprefix("/history/")
            with self._cv:
                found = {pid: json.loads(json.dumps(self.history[pid]))} if pid in self.history else {}
            return Response.json(200, found)
        if method == "GET" and path.startswith("/object_info/"):
            name = path.removeprefix("/object_info/")
            return Response.json(200, {name: node_info(self, self.nodes[name])} if name in self.nodes else {})
        if method == "GET" and path.startswith("/models/"):
            folder = path.removeprefix("/models/")
            if folder not in self.folders:
                raise HttpError(404, "")
            return Response.json(200, sorted(self.folders[folder]))
        if any(p == path for _, p in routes):
            raise HttpError(405)
        raise HttpError(404)

    # --- /prompt and the queue

    def _json_body(self, request: Request) -> Any:
        """The body as aiohttp's ``request.json()`` reads it: JSON whatever the content type; anything else
        (an empty body included) raises, and the handler's crash is a plain 500."""
        try:
            return json.loads(request.body)
        except ValueError:
            raise NodeFailure("bad JSON") from None

    def _post_prompt(self, request: Request, failure: Fault | None) -> Response:
        try:
            body = self._json_body(request)
        except NodeFailure:
            return self.render_internal_error(request, ValueError())
        if not isinstance(body, dict):
            return self.render_internal_error(request, TypeError())
        with self._cv:
            number: float
            if "number" in body:
                number = float(body["number"])
            else:
                number = self._number  # an int: the answer's "number" is 3, not 3.0
                if body.get("front"):
                    number = -number
                self._number += 1
        if "prompt" not in body:
            error = _error("no_prompt", "No prompt provided", "No prompt provided")
            return Response.json(400, {"error": error, "node_errors": {}})
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id", uuid.uuid4()))
        if not isinstance(prompt, dict):
            return self.render_internal_error(request, TypeError())
        ok, problem, outputs, node_errors = validate_prompt(self, prompt, body.get("partial_execution_targets"))
        if not ok:
            return Response.json(400, {"error": problem, "node_errors": node_errors})
        extra = dict(body.get("extra_data") or {})
        if "client_id" in body:
            extra["client_id"] = body["client_id"]
        if failure is not None:
            self._failures[prompt_id] = failure
        with self._cv:
            heapq.heappush(self._queue, _Item(number, prompt_id, prompt, extra, outputs))
            self._cv.notify_all()
        self._queue_updated()
        return Response.json(200, {"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    def _queue_info(self) -> dict[str, Any]:
        with self._cv:
            return {"exec_info": {"queue_remaining": len(self._queue) + len(self._running)}}

    def _queue_updated(self) -> None:
        self._send("status", {"status": self._queue_info()}, None)

    def _get_queue(self, request: Request) -> Response:
        with self._cv:
            running = [i.as_list() for i in self._running.values()]
            pending = [i.as_list() for i in self._queue]
        return Response.json(200, {"queue_running": running, "queue_pending": pending})

    def _post_queue(self, request: Request) -> Response:
        body = self._json_body(request)
        if not isinstance(body, dict):
            raise NodeFailure("not an object")
        with self._cv:
            if body.get("clear"):
                self._queue.clear()
            for pid in body.get("delete", ()):
                for i, item in enumerate(self._queue):  # execution.py PromptQueue.delete_queue_item
                    if item.prompt_id == pid:
                        self._queue.pop(i)
                        heapq.heapify(self._queue)
                        break
            self._cv.notify_all()
        self._queue_updated()
        return Response(200)

    def _post_interrupt(self, request: Request) -> Response:
        try:
            body = self._json_body(request)
        except NodeFailure:
            body = {}  # server.py post_interrupt: a body that is not JSON means a global interrupt
        pid = body.get("prompt_id") if isinstance(body, dict) else None
        with self._cv:
            running = {i.prompt_id for i in self._running.values()}
        if not pid or pid in running:  # targeted: only when that prompt is the one running
            self._interrupt.set()
        return Response(200)

    def _get_history(self, request: Request) -> Response:
        max_items = int(request.query["max_items"]) if "max_items" in request.query else None
        offset = int(request.query.get("offset", -1))
        with self._cv:
            keys = list(self.history)
            if offset < 0 and max_items is not None:
                offset = len(keys) - max_items
            out: dict[str, Any] = {}
            for i, k in enumerate(keys):  # execution.py PromptQueue.get_history
                if i >= offset:
                    out[k] = self.history[k]
                    if max_items is not None and len(out) >= max_items:
                        break
            return Response.json(200, json.loads(json.dumps(out)))

    def _post_history(self, request: Request) -> Response:
        body = self._json_body(request)
        if not isinstance(body, dict):
            raise NodeFailure("not an object")
        with self._cv:
            if body.get("clear"):
                self.history.clear()
            for pid in body.get("delete", ()):
                self.history.pop(pid, None)
        return Response(200)

    def _system_stats(self, request: Request) -> Response:
        return Response.json(200, {
            "system": {"os": "posix", "ram_total": 64 << 30, "ram_free": 32 << 30, "comfyui_version": COMFYUI_VERSION,
                       "python_version": "3.11", "pytorch_version": "sandbox", "embedded_python": False,
                       "argv": ["main.py"]},
            "devices": [{"name": "sandbox", "type": "cpu", "index": None, "vram_total": 0, "vram_free": 0,
                         "torch_vram_total": 0, "torch_vram_free": 0}],
        })

    # --- files: server.py image_upload and view_image

    def _input_names(self) -> list[str]:
        with self._files_lock:
            return [n for n in self.inputs if "/" not in n]  # nodes.py LoadImage lists the folder's own files

    def _has_input_file(self, name: str) -> bool:
        name = name.removesuffix(" [input]")  # folder_paths.annotated_filepath
        with self._files_lock:
            return name in self.inputs

    def _input_file(self, name: str) -> bytes:
        name = name.removesuffix(" [input]")
        with self._files_lock:
            data = self.inputs.get(name)
        if data is None:
            raise NodeFailure(f"[Errno 2] No such file or directory: '{name}'", "FileNotFoundError")
        return data

    def _upload_image(self, request: Request) -> Response:
        """server.py ``image_upload``: into the input (or temp/output) folder; a name taken by other bytes gets
        `` (1)``, `` (2)``… unless ``overwrite``; the same bytes are not saved twice."""
        form = request.form
        images = request.uploads_named("image")
        kind = form.get("type") or "input"
        if not images or not images[0].filename:
            raise HttpError(400, "")
        if kind not in ("input", "temp", "output"):
            return self.render_internal_error(request, KeyError(kind))
        image, subfolder = images[0], form.get("subfolder", "")
        folder = posixpath.normpath(subfolder) if subfolder else ""
        path = posixpath.normpath(posixpath.join(folder, image.filename or ""))
        if path == ".." or path.startswith(("../", "/")):  # os.path.commonpath: nothing outside the folder
            raise HttpError(400, "")
        folder, name = posixpath.split(path)
        stem, ext = posixpath.splitext(name)

        def key(n: str) -> tuple[str, str, str]:
            return (kind, folder, n)

        with self._files_lock:
            store: dict[Any, bytes] = self.inputs if kind == "input" else self.files
            slot: Any = posixpath.join(folder, name) if kind == "input" else key(name)
            if form.get("overwrite") not in ("true", "1"):
                i = 1
                while slot in store and store[slot] != image.data:  # the same bytes: kept as they are (#3465)
                    name = f"{stem} ({i}){ext}"
                    slot = posixpath.join(folder, name) if kind == "input" else key(name)
                    i += 1
            store[slot] = image.data
        return Response.json(200, {"name": name, "subfolder": subfolder, "type": kind})

    def _view(self, request: Request) -> Response:
        q = request.query
        if "filename" not in q:
            raise HttpError(404)
        filename = q["filename"]
        kind = q.get("type", "output")
        for suffix, annotated in ((" [output]", "output"), (" [input]", "input"), (" [temp]", "temp")):
            if filename.endswith(suffix):
                filename, kind = filename[: -len(suffix)], annotated
        if not filename:
            raise HttpError(400, "")
        if filename[0] == "/" or ".." in filename:  # "validation for security: prevent accessing arbitrary path"
            raise HttpError(400, "")
        if kind not in ("output", "input", "temp"):
            raise HttpError(400, "")
        subfolder = q.get("subfolder", "")
        if subfolder and (posixpath.normpath(subfolder).startswith("..") or subfolder.startswith("/")):
            raise HttpError(403, "")
        name = posixpath.basename(filename)
        sub = posixpath.normpath(subfolder) if subfolder else ""
        with self._files_lock:
            if kind == "input":
                data = self.inputs.get(posixpath.join(sub, name) if sub else name)
            else:
                data = self.files.get((kind, sub, name))
        if data is None:
            raise HttpError(404)
        headers = {"content-disposition": f'filename="{name}"'}
        if "preview" in q:  # re-encoded as webp or jpeg at a quality (server.py view_image)
            info = q["preview"].split(";")
            fmt = info[0] if info[0] in ("webp", "jpeg") and "a" not in q.get("channel", "") else "webp"
            quality = int(info[-1]) if info[-1].isdigit() else 90
            with Image.open(io.BytesIO(data)) as img:
                out = img.convert("RGB") if fmt == "jpeg" or q.get("channel") == "rgb" else img.copy()
            buf = io.BytesIO()
            out.save(buf, format=fmt.upper(), quality=quality)
            return Response(200, buf.getvalue(), {"content-type": f"image/{fmt}", **headers})
        return Response(200, data, {"content-type": "image/png" if name.endswith(".png") else
                                    "application/octet-stream", **headers})

    def _next_output_name(self, prefix: str, kind: str) -> tuple[str, str, int]:
        """(subfolder, file prefix, counter) — folder_paths.get_save_image_path: the next free counter."""
        norm = posixpath.normpath(prefix)
        subfolder, name = posixpath.dirname(norm), posixpath.basename(norm)
        if subfolder.startswith(".."):
            raise NodeFailure("**** ERROR: Saving image outside the output folder is not allowed.", "Exception")
        with self._files_lock:
            counters = [int(f[len(name) + 1:].split("_")[0]) for (t, s, f) in self.files
                        if t == kind and s == subfolder and f.startswith(name + "_")
                        and f[len(name) + 1:].split("_")[0].isdigit()]
        return subfolder, name, max(counters, default=0) + 1

    def _store_output(self, kind: str, subfolder: str, filename: str, data: bytes) -> None:
        with self._files_lock:
            self.files[(kind, subfolder, filename)] = data

    # --- the websocket

    def _serve_websocket(self, handler: _ComfyHandler) -> None:
        fault = self.faults.take("/ws")
        if fault is not None and fault.kind == "disconnect":
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            return
        key = handler.headers.get("sec-websocket-key", "")
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        handler.connection.settimeout(None)
        ws = _WebSocket(handler.connection, handler.rfile)
        query = dict(p.split("=", 1) for p in handler.path.partition("?")[2].split("&") if "=" in p)
        sid = query.get("clientId") or uuid.uuid4().hex
        # Registered before the handshake is answered: ComfyUI registers it in the same step as ws.prepare(),
        # with no await between, so no message for this client can be sent to nobody.
        with self._sockets_lock:
            old = self._sockets.pop(sid, None)  # "Reusing existing session, remove old"
            self._sockets[sid] = ws
        if old is not None:
            old.open = False
        with ws.lock:
            handler.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade"
                                 f"\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").encode())
        try:
            self._send("status", {"status": self._queue_info(), "sid": sid}, sid)
            if self.client_id == sid and self.last_node_id is not None:
                self._send("executing", {"node": self.last_node_id}, sid)
            first = True
            while not self._stopping.is_set():
                message = ws.receive()
                if message is None:
                    break
                if message[0] == 0x1:
                    with contextlib.suppress(ValueError, AttributeError):
                        data = json.loads(message[1])
                        if first and data.get("type") == "feature_flags":
                            self._send("feature_flags", SERVER_FEATURES, sid)
                first = False
        except OSError:
            pass
        finally:
            with self._sockets_lock:
                if self._sockets.get(sid) is ws:
                    del self._sockets[sid]

    def _send(self, event: str, data: Any, sid: str | None) -> None:
        """server.py ``send_json``: to one client, or to every one when ``sid`` is None."""
        self.messages.append((sid, event, data))
        with self._sockets_lock:
            targets = list(self._sockets.values()) if sid is None else [self._sockets[sid]] if sid in self._sockets \
                else []
        for ws in targets:
            ws.send_json(event, data)

    # --- execution: main.py prompt_worker, execution.py PromptExecutor

    def _prompt_worker(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping.is_set():
                    self._cv.wait()
                if self._stopping.is_set():
                    return
                item = heapq.heappop(self._queue)
                number = self._task_counter
                self._running[number] = item
                self._task_counter += 1
            self._queue_updated()
            messages, success, outputs, meta = self._execute(item)
            with self._cv:
                del self._running[number]
                extra = {k: v for k, v in item.extra_data.items() if k not in SENSITIVE_EXTRA_DATA_KEYS}
                self.history[item.prompt_id] = {
                    "prompt": [item.number, item.prompt_id, item.prompt, extra, item.outputs],
                    "outputs": outputs,
                    "status": {"status_str": "success" if success else "error", "completed": success,
                               "messages": [[e, d] for e, d in messages]},
                    "meta": meta,
                }
                self._cv.notify_all()
            self._queue_updated()
            if self.client_id is not None:
                self._send("executing", {"node": None, "prompt_id": item.prompt_id}, self.client_id)

    def _message(self, log: list[tuple[str, Any]], event: str, data: dict[str, Any], broadcast: bool) -> None:
        """execution.py ``PromptExecutor.add_message``: stamped, kept for the history, sent to the client."""
        data = {**data, "timestamp": int(self.clock() * 1000)}
        log.append((event, data))
        if self.client_id is not None or broadcast:
            self._send(event, data, self.client_id)

    def _execute(self, item: _Item) -> tuple[list[tuple[str, Any]], bool, dict[str, Any], dict[str, Any]]:
        self._interrupt.clear()  # nodes.interrupt_processing(False)
        self.client_id = item.extra_data.get("client_id")
        log: list[tuple[str, Any]] = []
        pid = item.prompt_id
        self._message(log, "execution_start", {"prompt_id": pid}, broadcast=False)
        prompt = item.prompt
        signatures: dict[str, str] = {}
        ctx_base: dict[str, Any] = {"prompt_id": pid, "prompt": prompt, "extra_data": item.extra_data}
        for node_id in prompt:
            with contextlib.suppress(Exception):  # a node whose signature cannot be made is never cached
                self._signature(prompt, node_id, signatures, ctx_base)
        self._cache = {k: v for k, v in self._cache.items() if k in prompt}  # cache.clean_unused
        cached = [n for n in prompt if n in signatures and self._cache.get(n, ("",))[0] == signatures[n]]
        self._message(log, "execution_cached", {"nodes": cached, "prompt_id": pid}, broadcast=False)
        results: dict[str, list[Any]] = {n: self._cache[n][1] for n in cached}
        ui: dict[str, dict[str, Any]] = {n: u for n in cached if (u := self._cache[n][2])}
        executed: list[str] = []
        failure = self._failures.pop(pid, None)
        order = self._order(prompt, item.outputs)
        success = True
        for node_id in order:
            d = self.nodes[prompt[node_id]["class_type"]]
            if node_id in results:
                if node_id in ui and self.client_id is not None:  # a cached output node reports its output again
                    self._send("executed", {"node": node_id, "display_node": node_id, "output": ui[node_id],
                                            "prompt_id": pid}, self.client_id)
                continue
            try:
                if self._interrupt.is_set():
                    raise Interrupted
                if self.client_id is not None:
                    self.last_node_id = node_id
                    self._send("executing", {"node": node_id, "display_node": node_id, "prompt_id": pid},
                               self.client_id)
                self._progress_state(pid, node_id, "running", 0, 1)
                if failure is not None and (failure.param or "KSampler") == d.name:
                    raise NodeFailure(failure.message or "sandbox node failure", failure.code or "RuntimeError")
                args = self._arguments(prompt, node_id, d, results, ctx_base)
                out = d.run(Ctx(self, node_id, **ctx_base), **args)
                if isinstance(out, dict):
                    results[node_id], node_ui = list(out.get("result", ())), out.get("ui")
                else:
                    results[node_id], node_ui = list(out), None
                if node_ui:
                    ui[node_id] = node_ui
                    if self.client_id is not None:
                        self._send("executed", {"node": node_id, "display_node": node_id, "output": node_ui,
                                                "prompt_id": pid}, self.client_id)
                self._progress_state(pid, node_id, "finished", 1, 1)
                executed.append(node_id)
                self.executed_nodes.append((pid, node_id))
                if node_id in signatures:
                    self._cache[node_id] = (signatures[node_id], results[node_id], node_ui)
            except Interrupted:
                success = False
                self._message(log, "execution_interrupted", {"prompt_id": pid, "node_id": node_id,
                                                             "node_type": d.name, "executed": executed},
                              broadcast=True)
                break
            except Exception as exc:
                success = False
                kind = exc.exception_type if isinstance(exc, NodeFailure) else _type_name(exc)
                self._message(log, "execution_error", {
                    "prompt_id": pid, "node_id": node_id, "node_type": d.name, "executed": executed,
                    "exception_message": f"{exc}\n", "exception_type": kind, "traceback": [],
                    "current_inputs": {}, "current_outputs": list(results),
                }, broadcast=False)
                break
        if success:
            self._message(log, "execution_success", {"prompt_id": pid}, broadcast=False)
        self.last_node_id = None
        meta = {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in ui}
        return log, success, ui, meta

    def _progress_state(self, pid: str, node_id: str, state: str, value: float, top: float) -> None:
        if self.client_id is None:
            return
        node = {"value": value, "max": top, "state": state, "node_id": node_id, "prompt_id": pid,
                "display_node_id": node_id, "parent_node_id": None, "real_node_id": node_id}
        self._send("progress_state", {"prompt_id": pid, "nodes": {node_id: node}}, self.client_id)

    def _sampling_step(self, ctx: Ctx, step: int, steps: int) -> None:
        """One sampler step: wait while held, stop on an interrupt, report progress (main.py hijack_progress)."""
        while not self._gate.is_set():
            if self._interrupt.is_set():
                raise Interrupted
            self._gate.wait(0.01)
        if self.step_delay_s:
            self._interrupt.wait(self.step_delay_s)
        if self._interrupt.is_set():  # comfy.model_management.throw_exception_if_processing_interrupted
            raise Interrupted
        self._send("progress", {"value": step, "max": steps, "prompt_id": ctx.prompt_id, "node": ctx.node_id},
                   self.client_id)

    def _order(self, prompt: dict[str, Any], outputs: Sequence[str]) -> list[str]:
        """Every node the outputs need, each after its inputs."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(node_id: str) -> None:
            if node_id in seen:
                return
            seen.add(node_id)
            for value in prompt[node_id].get("inputs", {}).values():
                if isinstance(value, list) and len(value) == 2 and value[0] in prompt:
                    visit(value[0])
            order.append(node_id)

        for o in outputs:
            visit(o)
        return order

    def _arguments(self, prompt: dict[str, Any], node_id: str, d: NodeDef, results: Mapping[str, list[Any]],
                   ctx: Mapping[str, Any]) -> dict[str, Any]:
        spec = d.inputs(self)
        known = set(spec.get("required", {})) | set(spec.get("optional", {}))
        args: dict[str, Any] = {}
        for name, value in prompt[node_id].get("inputs", {}).items():
            if name not in known:
                continue  # execution.py get_input_data passes only declared inputs
            args[name] = results[value[0]][value[1]] if isinstance(value, list) else value
        for name, kind in spec.get("hidden", {}).items():
            args[name] = ctx["prompt"] if kind == "PROMPT" else ctx["extra_data"].get("extra_pnginfo")
        return args

    def _signature(self, prompt: dict[str, Any], node_id: str, done: dict[str, str], ctx: Mapping[str, Any]) -> str:
        """A node's input signature (comfy_execution/caching.py CacheKeySetInputSignature): its class, its constant
        inputs, its inputs' signatures, and IS_CHANGED where the node has one."""
        if node_id in done:
            return done[node_id]
        node = prompt[node_id]
        d = self.nodes[node["class_type"]]
        parts: dict[str, Any] = {"class_type": d.name}
        for name, value in sorted(node.get("inputs", {}).items()):
            if isinstance(value, list) and len(value) == 2 and value[0] in prompt:
                parts[name] = [self._signature(prompt, value[0], done, ctx), value[1]]
            else:
                parts[name] = value
        if d.is_changed is not None:
            args = {k: v for k, v in node.get("inputs", {}).items() if not isinstance(v, list)}
            parts["is_changed"] = d.is_changed(Ctx(self, node_id, **ctx), **args)
        if d.output_node:
            parts["node_id"] = node_id
        done[node_id] = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
        return done[node_id]


def _route(path: str) -> str:
    """The route without the ``/api`` prefix every route is also served under (server.py ``add_routes``)."""
    return path[4:] if path.startswith("/api/") else path
