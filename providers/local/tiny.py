"""Tiny random-weight Diffusers models written to disk with safetensors: for tests, the demo and examples.

They have the real architectures (SD1.5, SDXL, Flux, their ControlNets, LoRAs) at a
few thousand parameters, so every local code path runs on a CPU in well under a
second with no download. Their images are noise: they check plumbing, not quality.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_clip_tokenizer(directory: Path) -> None:
    """A character-level CLIP BPE tokenizer (vocab.json, empty merges) written locally."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}), encoding="utf-8")


def flagging_safety_checker() -> tuple[Any, Any]:
    """A tiny SD safety checker that flags every image, and its feature extractor."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config={"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1,
                     "vocab_size": 1000},
        vision_config={"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)  # every cosine score clears the threshold
    return checker, CLIPImageProcessor(crop_size=32, size=32)


def build_sd15(directory: Path, *, safety_checker: bool = False) -> Path:
    """Write a tiny SD1.5-architecture pipeline (random weights, seed 0) to ``directory``.

    ``safety_checker=True`` adds a checker that flags every image (for the NSFW path).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8, norm_num_groups=2)
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4, norm_num_groups=2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
        vocab_size=1000, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    write_clip_tokenizer(directory / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(str(directory / "_tok"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    checker, extractor = flagging_safety_checker() if safety_checker else (None, None)
    pipe: Any = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=checker,
                                   feature_extractor=extractor,
                                   requires_safety_checker=safety_checker)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory


def build_preview_vae(directory: Path, *, latent_channels: int = 4, seed: int = 3) -> Path:
    """Write a tiny TAESD-architecture ``AutoencoderTiny`` (2× up from latents, like the tiny models' VAEs)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae: Any = AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=(8, 8),
                          decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
                          latent_channels=latent_channels)
    vae.save_pretrained(str(directory), safe_serialization=True)
    return directory


def build_sdxl(directory: Path) -> Path:
    """Write a tiny SDXL-architecture pipeline (two text encoders, text_time embedding) to ``directory``."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                            projection_dim=32, vocab_size=1000, hidden_act="gelu", bos_token_id=0,
                            eos_token_id=1, pad_token_id=1)
    text_encoder, text_encoder_2 = CLIPTextModel(config), CLIPTextModelWithProjection(config)
    write_clip_tokenizer(directory / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(str(directory / "_tok"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe: Any = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory


def build_flux(directory: Path) -> Path:
    """Write a tiny Flux-architecture pipeline (CLIP + T5 text encoders, one-block transformer) to ``directory``."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, projection_dim=32,
        vocab_size=1000, hidden_act="gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                             num_heads=4))
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035)
    write_clip_tokenizer(directory / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(str(directory / "_tok"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces += [(f"▁{c}", -3.0) for c in letters] + [(c, -4.0) for c in letters]
    tokenizer_2 = transformers.T5TokenizerFast(vocab=pieces, extra_ids=0)  # type: ignore[attr-defined]
    pipe: Any = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                             transformer=transformer)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory


def build_controlnet(directory: Path, family: str, *, seed: int = 1) -> Path:
    """Write a tiny ControlNet matching the tiny ``family`` model built above (random, non-zero output)."""
    import torch

    torch.manual_seed(seed)
    cn: Any
    if family == "flux":
        from diffusers import FluxControlNetModel

        cn = FluxControlNetModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    else:
        from diffusers import ControlNetModel

        blocks = ("DownBlock2D", "CrossAttnDownBlock2D")
        if family == "sd15":
            cn = ControlNetModel(block_out_channels=(4, 8), layers_per_block=1, in_channels=4,
                                 cross_attention_dim=8, conditioning_embedding_out_channels=(16, 32),
                                 norm_num_groups=2, down_block_types=blocks)
        else:
            cn = ControlNetModel(
                block_out_channels=(2, 4), layers_per_block=2, in_channels=4, attention_head_dim=(2, 4),
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                cross_attention_dim=64, conditioning_embedding_out_channels=(16, 32), norm_num_groups=1,
                down_block_types=blocks)
    with torch.no_grad():  # zero-initialized output convolutions would make every ControlNet a no-op
        for name, param in cn.named_parameters():
            if "zero_conv" in name or "controlnet_" in name:
                param.normal_(0, 0.5)
    cn.save_pretrained(str(directory), safe_serialization=True)
    return directory


def build_lora(model_dir: Path, out_file: Path, *, seed: int = 2, rank: int = 4) -> Path:
    """Write a random LoRA (``.safetensors``) for the tiny pipeline saved in ``model_dir``."""
    import torch
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe: Any = DiffusionPipeline.from_pretrained(str(model_dir), use_safetensors=True, local_files_only=True)
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    torch.manual_seed(seed)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    layers = get_peft_model_state_dict(denoiser)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    key = "transformer_lora_layers" if hasattr(pipe, "transformer") else "unet_lora_layers"
    type(pipe).save_lora_weights(str(out_file.parent), weight_name=out_file.name, **{key: layers})
    return out_file


def build_upscaler(out_file: Path, arch: str = "esrgan", *, scale: int = 4, seed: int = 5) -> Path:
    """Write a tiny random upscaler of a real architecture (``esrgan`` = Real-ESRGAN's RRDBNet, ``compact`` =
    Real-ESRGAN's SRVGGNetCompact, ``swinir``) as ``.safetensors``; spandrel recognizes it from its keys."""
    import torch
    from safetensors.torch import save_file

    from providers.local.upscale import _spandrel

    _spandrel()  # spandrel's import needs the torchvision guard
    torch.manual_seed(seed)
    net: Any
    if arch == "esrgan":
        from spandrel.architectures.ESRGAN import ESRGAN

        net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)
    elif arch == "compact":
        from spandrel.architectures.Compact import Compact

        net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale)
    elif arch == "swinir":
        from spandrel.architectures.SwinIR import SwinIR

        net = SwinIR(img_size=16, patch_size=1, in_chans=3, embed_dim=12, depths=[1], num_heads=[2],
                     window_size=4, mlp_ratio=2.0, upscale=scale, upsampler="pixelshuffle", resi_connection="1conv")
    else:
        raise ValueError(f"unknown upscaler architecture {arch!r}; use esrgan, compact or swinir")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out_file))
    return out_file


def build_embedding(out_file: Path, family: str = "sd15", *, width: int = 8, width_2: int = 32, vectors: int = 1,
                    seed: int = 6) -> Path:
    """Write a random textual-inversion embedding: one tensor (SD1.5) or ``clip_l`` + ``clip_g`` (SDXL)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    if family == "sdxl":
        tensors = {"clip_l": torch.randn(vectors, width, generator=gen),
                   "clip_g": torch.randn(vectors, width_2, generator=gen)}
    else:
        tensors = {"emb_params": torch.randn(vectors, width, generator=gen)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file))
    return out_file


def build_ip_adapter(model_dir: Path, out_dir: Path, *, seed: int = 7, tokens: int = 4) -> Path:
    """Write a random IP-Adapter for the tiny SD pipeline in ``model_dir``: ``ip-adapter.safetensors`` (the
    ``image_proj.*`` / ``ip_adapter.*`` layout) and a tiny CLIP image encoder in ``image_encoder/``."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet: Any = UNet2DConditionModel.from_pretrained(str(model_dir / "unet"), use_safetensors=True)
    cross = int(unet.config.cross_attention_dim)
    channels = list(unet.config.block_out_channels)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, Any] = {}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            if name.startswith("mid_block"):
                hidden = channels[-1]
            elif name.startswith("up_blocks"):
                hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
            else:
                hidden = channels[int(name[len("down_blocks.")])]
            tensors[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=gen) * 0.3
            tensors[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=gen) * 0.3
            key += 2  # diffusers numbers the cross-attention processors 1, 3, 5, …
    embed_dim = cross
    tensors["image_proj.proj.weight"] = torch.randn(cross * tokens, embed_dim, generator=gen) * 0.3
    tensors["image_proj.proj.bias"] = torch.zeros(cross * tokens)
    tensors["image_proj.norm.weight"] = torch.ones(cross)
    tensors["image_proj.norm.bias"] = torch.zeros(cross)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "ip-adapter.safetensors"))
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, image_size=32,
        patch_size=8, projection_dim=embed_dim))
    encoder.save_pretrained(str(out_dir / "image_encoder"), safe_serialization=True)
    return out_dir / "ip-adapter.safetensors"
