"""Which floating-point type a local model runs in, decided per model and device.

On CUDA, SD1.5 and SDXL run in float16. FLUX (and any family in :data:`FP16_UNSAFE`) overflows in
float16 — NaN latents, black images — so it runs in bfloat16, the dtype it was trained in, or in
float32 on a GPU without bfloat16. Everything runs in float32 on the CPU. A catalog ``dtype:``
overrides the choice for one model; a provider-wide ``dtype`` is the default for the rest, except
that it never puts an fp16-unsafe family in float16.
"""

from __future__ import annotations

import logging
from typing import Any

from providers.local.catalog import FP16_UNSAFE, ModelEntry

log = logging.getLogger("imagerouter")


def choose_dtype(family: str, device: str, *, requested: str = "auto", default: str | None = None,
                 bf16_supported: bool = True) -> str:
    """The dtype name (``float16``, ``bfloat16`` or ``float32``) for a model of ``family`` on ``device``.

    ``requested`` is the catalog's ``dtype`` (``auto`` unless set); ``default`` the provider-wide one.
    """
    if requested != "auto":
        return requested
    unsafe = family in FP16_UNSAFE
    half_safe = "bfloat16" if bf16_supported else "float32"
    if default is not None:
        return half_safe if unsafe and default == "float16" else default
    if not device.startswith("cuda"):
        return "float32"
    return half_safe if unsafe else "float16"


def dtype_name(dtype: Any) -> str | None:
    """``torch.float16`` → ``"float16"``; a name passes through; ``None`` stays ``None``."""
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def torch_dtype(entry: ModelEntry, device: str, default: Any = None) -> Any:
    """The torch dtype ``entry`` loads in on ``device`` (see :func:`choose_dtype`)."""
    import torch

    bf16 = True
    if device.startswith("cuda") and entry.family in FP16_UNSAFE and torch.cuda.is_available():
        bf16 = bool(torch.cuda.is_bf16_supported())
    name = choose_dtype(entry.family, device, requested=entry.dtype, default=dtype_name(default),
                        bf16_supported=bf16)
    if name == "float16" and entry.family in FP16_UNSAFE and device.startswith("cuda"):
        log.warning("local model %s: %s in float16 is known to give NaN / black images; use dtype: bfloat16",
                    entry.name, entry.family)
    if not bf16 and name == "float32":
        log.info("local model %s: this GPU has no bfloat16; running %s in float32", entry.name, entry.family)
    return getattr(torch, name)
