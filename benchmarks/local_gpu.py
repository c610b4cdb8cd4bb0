"""LocalProvider against plain Diffusers on full-size SD1.5 / SDXL architectures (random weights).

No downloads: the architectures are built from configs written here, with random
weights (the arithmetic per step is that of the trained models), saved with
safetensors and loaded back through LocalProvider's real loading path. fp16 on CUDA.

Method (docs/PERF.md): one warm-up call each, ``torch.cuda.synchronize()`` around
every timed call, the median of ``--runs`` runs; the paths are interleaved. Beside the
times: FLOPs per UNet step (counted on the meta device) and the floor, the FLOPs of
all steps and the VAE decode over the device's measured matmul rate.

    python benchmarks/local_gpu.py                  # sd15 and sdxl on CUDA
    python benchmarks/local_gpu.py --smoke          # tiny configs on CPU: checks the script
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a lighthouse at dusk, oil painting"


def write_tokenizer(directory: Path) -> None:
    """A character-level CLIP tokenizer (the prompt's length is what matters for timing)."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


def clip_config(size: str) -> dict[str, Any]:
    if size == "tiny":
        return {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                "projection_dim": 32, "vocab_size": 1000}
    if size == "L":
        return {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                "projection_dim": 768, "vocab_size": 49408, "hidden_act": "quick_gelu"}
    return {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
            "projection_dim": 1280, "vocab_size": 49408, "hidden_act": "gelu"}


def unet_config(family: str, tiny: bool) -> dict[str, Any]:
    if family == "sd15":
        if tiny:
            return {"block_out_channels": (4, 8), "layers_per_block": 1, "sample_size": 32, "norm_num_groups": 2,
                    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 32}
        return {"sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
                "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                "cross_attention_dim": 768, "attention_head_dim": 8}
    if tiny:
        return {"block_out_channels": (2, 4), "layers_per_block": 2, "attention_head_dim": (2, 4),
                "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                "transformer_layers_per_block": (1, 2), "projection_class_embeddings_input_dim": 80,
                "cross_attention_dim": 64, "norm_num_groups": 1, "sample_size": 32,
                "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}
    return {"sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
            "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}


def vae_config(tiny: bool) -> dict[str, Any]:
    if tiny:
        return {"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 4}
    return {"block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4, "layers_per_block": 2}


def build(family: str, directory: Path, *, tiny: bool, device: str, dtype: Any) -> Path:
    """Write a random-weight pipeline of ``family`` to ``directory`` (safetensors)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    write_tokenizer(directory / "_tok")
    tok = CLIPTokenizer.from_pretrained(str(directory / "_tok"))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    with torch.device(device):
        unet: Any = UNet2DConditionModel(**unet_config(family, tiny)).to(dtype)  # type: ignore[attr-defined]
        vae: Any = AutoencoderKL(**vae_config(tiny)).to(dtype)  # type: ignore[attr-defined]
        if family == "sd15":
            te = CLIPTextModel(CLIPTextConfig(**clip_config("tiny" if tiny else "L"))).to(dtype)
            pipe: Any = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                                safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False)
        else:
            te = CLIPTextModel(CLIPTextConfig(**clip_config("tiny" if tiny else "L"))).to(dtype)
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_config("tiny" if tiny else "G"))).to(dtype)
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                             tokenizer_2=tok, unet=unet, scheduler=sched)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    del pipe, unet, vae
    if device == "cuda":
        torch.cuda.empty_cache()
    return directory


def count_flops(family: str, size: int, batch: int, *, tiny: bool) -> tuple[float, float]:
    """FLOPs of one UNet step (CFG: a batch of 2 × ``batch``) and of one VAE decode of ``batch`` latents.

    Counted on the meta device with ``torch.utils.flop_counter``: shapes only, no memory, no time.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = unet_config(family, tiny)
    lat = size // (2 ** (len(vae_config(tiny)["block_out_channels"]) - 1))
    with torch.device("meta"):
        unet: Any = UNet2DConditionModel(**config)
        vae: Any = AutoencoderKL(**vae_config(tiny))
        b = 2 * batch
        added = None
        if config.get("addition_embed_type") == "text_time":
            text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            added = {"text_embeds": torch.empty(b, text_dim), "time_ids": torch.empty(b, 6)}
        with FlopCounterMode(display=False) as step:
            unet(torch.empty(b, 4, lat, lat), torch.tensor(10.0),
                 encoder_hidden_states=torch.empty(b, 77, config["cross_attention_dim"]), added_cond_kwargs=added)
        with FlopCounterMode(display=False) as decode:
            vae.decode(torch.empty(batch, 4, lat, lat))
    return float(step.get_total_flops()), float(decode.get_total_flops())


def matmul_rate(device: str, dtype: Any) -> float:
    """The device's measured dense matmul rate in FLOP/s (the floor's denominator)."""
    import torch

    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    runs = [timed(lambda: a @ b, device) for _ in range(10)]
    return 2 * n**3 / statistics.median(runs)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench(family: str, args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    import torch
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    from providers.local import LocalProvider
    from router.request import ImageRequest

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.float16
    size = 64 if args.smoke else (512 if family == "sd15" else 1024)
    steps = args.steps
    path = build(family, root / family, tiny=args.smoke, device=device, dtype=dtype)
    provider = LocalProvider({family: {"path": str(path), "family": family, "native": [size, size],
                                       "min_side": 64, "steps": steps}}, device=device, dtype=dtype)
    plain = DiffusionPipeline.from_pretrained(str(path), use_safetensors=True, dtype=dtype,
                                              local_files_only=True).to(device)
    plain.set_progress_bar_config(disable=True)
    rate = matmul_rate(device, dtype)
    rows: list[dict[str, Any]] = []
    loop = asyncio.new_event_loop()
    for batch in args.batches:
        req = ImageRequest(prompt=PROMPT, width=size, height=size, n=batch, steps=steps, seed=1,
                           scheduler="dpmpp_2m_karras")

        def via_provider(req: ImageRequest = req) -> None:
            loop.run_until_complete(provider.generate(req, family, timeout_s=600))

        def via_diffusers(batch: int = batch, png: bool = False) -> None:
            plain.scheduler = DPMSolverMultistepScheduler.from_config(plain.scheduler.config, use_karras_sigmas=True)
            gens = [torch.Generator("cpu").manual_seed(1 + i) for i in range(batch)]
            out = plain(PROMPT, width=size, height=size, num_inference_steps=steps, num_images_per_prompt=batch,
                        generator=gens)
            if png:  # what an app must do before it can send or store the images (Pillow's default level)
                for img in out.images:
                    img.save(io.BytesIO(), format="PNG")

        paths = {"local": via_provider, "diffusers": via_diffusers,
                 "diff+png": lambda batch=batch: via_diffusers(batch, png=True)}
        times: dict[str, list[float]] = {name: [] for name in paths}
        peaks: dict[str, int] = {}
        for fn in paths.values():
            fn()  # warm-up
        step_flops, decode_flops = count_flops(family, size, batch, tiny=args.smoke)
        floor = (steps * step_flops + decode_flops) / rate / batch
        for _ in range(args.runs):
            for name, fn in paths.items():
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times[name].append(timed(fn, device))
                if device == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
        for name in paths:
            med = statistics.median(times[name])
            rows.append({"model": family, "size": size, "batch": batch, "path": name, "s_per_image": med / batch,
                         "it_s": steps / med, "peak_gib": peaks.get(name, 0) / 2**30, "runs": args.runs,
                         "tflop_step": step_flops / 1e12, "floor_s": floor, "x_floor": med / batch / floor,
                         "rate_tflops": rate / 1e12})
    loop.run_until_complete(provider.aclose())
    loop.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--smoke", action="store_true", help="tiny configs on CPU, to check the script")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.runs = min(args.steps, 3), min(args.runs, 2)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.models:
            rows += bench(family, args, Path(tmp))
    header = (f"{'model':6} {'size':>5} {'batch':>5} {'path':10} {'s/image':>9} {'it/s':>8} {'peak GiB':>9} "
              f"{'TFLOP/step':>10} {'floor s/img':>11} {'x floor':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:6} {r['size']:>5} {r['batch']:>5} {r['path']:10} {r['s_per_image']:>9.4f} "
              f"{r['it_s']:>8.2f} {r['peak_gib']:>9.2f} {r['tflop_step']:>10.3f} {r['floor_s']:>11.4f} "
              f"{r['x_floor']:>8.1f}")
    runs = rows[0]["runs"] if rows else 0
    rate = rows[0]["rate_tflops"] if rows else 0
    print(f"(median of {runs} runs after one warm-up, paths interleaved; it/s = steps / seconds per call; "
          f"TFLOP/step = one UNet step with CFG for the whole batch; floor = (steps × step + VAE decode FLOPs) ÷ "
          f"the measured matmul rate {rate:.1f} TFLOP/s, per image; local includes PNG encoding at level 1, "
          "diff+png encodes at Pillow's default level 6)")


if __name__ == "__main__":
    main()
