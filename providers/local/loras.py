"""LoRA adapters for local models: found on disk, checked for their family, cached per model.

A LoRA is a ``.safetensors`` file, or a directory holding one (``pytorch_lora_weights.safetensors``
preferred). Its family is read from the file's metadata and key names before anything is
loaded, so an SDXL LoRA is refused for an SD1.5 model with a message that says so. Loaded
adapters stay on the model (named by file content identity) and are switched per request
with ``set_adapters``; beyond ``max_cached`` the least recently used are removed with
``delete_adapters``.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.errors import InvalidRequestError

_PICKLED = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_SDXL_BLOCKS = re.compile(r"transformer_blocks[._]([1-9]\d*)")


class LoraError(InvalidRequestError):
    """A LoRA that cannot be used with this model: missing, pickled, or for another family."""

    def __init__(self, ref: str, what: str, code: str = "invalid_lora") -> None:
        self.ref = ref
        super().__init__(f"LoRA {ref!r}: {what}", provider="local", code=code)


@dataclass(frozen=True, slots=True)
class LoraFile:
    """A resolved LoRA: its file, the family it was trained for (if known) and its adapter name."""

    ref: str
    path: Path
    family: str | None
    adapter: str


def resolve(ref: str) -> LoraFile:
    """Find the ``.safetensors`` file ``ref`` names and read its family; refuse pickles and missing files."""
    path = Path(ref).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        preferred = [f for f in files if f.name == "pytorch_lora_weights.safetensors"]
        if not files:
            pickled = [f.name for f in path.iterdir() if f.suffix in _PICKLED]
            if pickled:
                raise LoraError(ref, f"only pickled weights ({', '.join(pickled[:3])}); pickles can run code and are "
                                     "never loaded — convert them to .safetensors", code="unsafe_checkpoint")
            raise LoraError(ref, f"no .safetensors file in {path}", code="lora_not_found")
        if len(files) > 1 and not preferred:
            raise LoraError(ref, f"{path} holds {len(files)} .safetensors files; name the one to use")
        path = (preferred or files)[0]
    elif path.suffix in _PICKLED:
        raise LoraError(ref, "pickled weights can run code and are never loaded; convert the file to .safetensors",
                        code="unsafe_checkpoint")
    elif not path.is_file():
        raise LoraError(ref, f"no such file {path}; give a local .safetensors file or a directory holding one",
                        code="lora_not_found")
    elif path.suffix != ".safetensors":
        raise LoraError(ref, f"{path.name} is not a .safetensors file")
    stat = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return LoraFile(ref=ref, path=path, family=family_of(path), adapter=f"lora_{digest}")


def family_of(path: Path) -> str | None:
    """The model family a LoRA file was trained for (sd15, sdxl, flux), from metadata or key names."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            keys = list(fh.keys())
    except Exception as exc:
        raise LoraError(str(path), f"not a readable safetensors file ({exc})") from None
    hint = " ".join(str(metadata.get(k, "")) for k in ("modelspec.architecture", "ss_base_model_version")).lower()
    if "flux" in hint:
        return "flux"
    if "xl" in hint:
        return "sdxl"
    if "v1" in hint or "sd_1" in hint:
        return "sd15"
    if any(k.startswith(("transformer.", "lora_transformer_", "diffusion_model.double_blocks")) for k in keys):
        return "flux"
    unet = [k for k in keys if k.startswith(("unet.", "lora_unet_"))]
    if any(k.startswith(("text_encoder_2.", "lora_te2_")) for k in keys) or any(_SDXL_BLOCKS.search(k) for k in unet):
        return "sdxl"  # SD1.5 has one transformer block per attention; SDXL has 2 or 10
    return "sd15" if unet else None


def check_family(loras: Sequence[tuple[LoraFile, float]], family: str) -> None:
    """Refuse, before loading anything, a LoRA trained for another model family."""
    for lora, _ in loras:
        if lora.family is not None and lora.family != family:
            raise LoraError(lora.ref, f"was trained for {lora.family}, and this model is {family}; use a {family} "
                                      "LoRA", code="lora_family_mismatch")


class AdapterSet:
    """The adapters loaded on one base pipeline, least recently used first. Used only on the device thread."""

    def __init__(self, max_cached: int = 8) -> None:
        self.max_cached = max(1, max_cached)
        self._loaded: OrderedDict[str, LoraFile] = OrderedDict()
        self.loads = 0

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def activate(self, pipe: Any, loras: Sequence[tuple[LoraFile, float]]) -> None:
        """Make exactly ``loras`` active on ``pipe`` with their weights (none: LoRA off)."""
        if not loras:
            if self._loaded:
                pipe.disable_lora()
            return
        wanted = {lora.adapter for lora, _ in loras}
        for lora, _ in loras:
            if lora.adapter in self._loaded:
                self._loaded.move_to_end(lora.adapter)
                continue
            stale = [name for name in self._loaded if name not in wanted]
            while stale and len(self._loaded) >= self.max_cached:
                name = stale.pop(0)
                pipe.delete_adapters(name)
                del self._loaded[name]
            try:
                pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=lora.adapter)
            except (ValueError, RuntimeError, KeyError) as exc:
                self._drop_partial(pipe, lora.adapter)
                raise LoraError(lora.ref, f"does not fit this model ({type(exc).__name__}: {exc})"[:500],
                                code="lora_family_mismatch") from None
            self._loaded[lora.adapter] = lora
            self.loads += 1
        pipe.enable_lora()
        pipe.set_adapters([lora.adapter for lora, _ in loras], [weight for _, weight in loras])

    def _drop_partial(self, pipe: Any, adapter: str) -> None:
        with contextlib.suppress(Exception):  # nothing was attached
            pipe.delete_adapters(adapter)
