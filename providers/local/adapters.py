"""Textual-inversion embeddings and IP-Adapters for local models: safetensors only, checked for their family.

An embedding is a ``.safetensors`` file bound to a prompt token (``{ref, token}``): SD1.5 files hold
one tensor, SDXL files two (``clip_l``, ``clip_g``). An IP-Adapter is a ``.safetensors`` file with
``image_proj.*`` and ``ip_adapter.*`` tensors; its CLIP image encoder is the catalog's
``image_encoder`` directory, or an ``image_encoder/`` folder beside the file. Both are read with
safetensors (never ``torch.load``) and refused, before the model loads, when made for another family.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.errors import InvalidRequestError

_PICKLED = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# The text/cross-attention widths of the real models: how a file's family is known before loading.
_EMBED_WIDTH = {768: "sd15"}
_IP_CROSS_DIM = {768: "sd15", 2048: "sdxl"}


class AdapterError(InvalidRequestError):
    """An embedding or IP-Adapter that cannot be used with this model."""

    def __init__(self, kind: str, ref: str, what: str, code: str = "invalid_adapter") -> None:
        self.ref = ref
        super().__init__(f"{kind} {ref!r}: {what}", provider="local", code=code)


def safetensors_file(kind: str, ref: str, preferred: str | None = None) -> Path:
    """The one ``.safetensors`` file ``ref`` names (a file, or a directory holding it); pickles refused."""
    path = Path(ref).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if preferred is not None and (path / preferred).is_file():
            return path / preferred
        if not files:
            pickled = [f.name for f in path.iterdir() if f.suffix in _PICKLED]
            if pickled:
                raise AdapterError(kind, ref, f"only pickled weights ({', '.join(pickled[:3])}); pickles can run "
                                              "code and are never loaded — convert them to .safetensors",
                                   code="unsafe_checkpoint")
            raise AdapterError(kind, ref, f"no .safetensors file in {path}", code="adapter_not_found")
        if len(files) > 1:
            raise AdapterError(kind, ref, f"{path} holds {len(files)} .safetensors files; name the one to use")
        return files[0]
    if path.suffix in _PICKLED:
        raise AdapterError(kind, ref, "pickled weights can run code and are never loaded; convert the file to "
                                      ".safetensors", code="unsafe_checkpoint")
    if not path.is_file():
        raise AdapterError(kind, ref, f"no such file {path}; give a local .safetensors file",
                           code="adapter_not_found")
    if path.suffix != ".safetensors":
        raise AdapterError(kind, ref, f"{path.name} is not a .safetensors file")
    return path


def _identity(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def _shapes(kind: str, path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            names = list(fh.keys())
            return {k: tuple(fh.get_slice(k).get_shape()) for k in names}, dict(fh.metadata() or {})
    except Exception as exc:
        raise AdapterError(kind, str(path), f"not a readable safetensors file ({exc})"[:400]) from None


def _hinted(metadata: dict[str, str]) -> str | None:
    hint = " ".join(str(metadata.get(k, "")) for k in ("modelspec.architecture", "ss_base_model_version")).lower()
    if "flux" in hint:
        return "flux"
    if "xl" in hint:
        return "sdxl"
    if "v1" in hint or "sd_1" in hint:
        return "sd15"
    return None


# --- textual inversion --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EmbeddingFile:
    """A resolved embedding: its file, prompt token, family (if known) and identity."""

    ref: str
    token: str
    path: Path
    family: str | None
    identity: str


def resolve_embedding(ref: str, token: str) -> EmbeddingFile:
    if not token.strip() or any(c.isspace() for c in token):
        raise AdapterError("embedding", ref, f"token must be one word without spaces (e.g. <my-style>), got "
                                             f"{token!r}")
    path = safetensors_file("embedding", ref)
    shapes, metadata = _shapes("embedding", path)
    family = _hinted(metadata)
    if family is None:
        if "clip_g" in shapes or "clip_l" in shapes:
            family = "sdxl"
        elif len(shapes) == 1 or "emb_params" in shapes:
            width = next(iter(shapes.values()))[-1] if len(shapes) == 1 else shapes["emb_params"][-1]
            family = _EMBED_WIDTH.get(width)
    return EmbeddingFile(ref, token, path, family, _identity(path))


def check_embeddings(embeddings: Sequence[EmbeddingFile], family: str) -> None:
    """Refuse, before loading anything, embeddings for another family (and any on FLUX)."""
    if embeddings and family == "flux":
        raise AdapterError("embedding", embeddings[0].ref, "textual inversion is not offered for flux models; use "
                                                           "an sd15 or sdxl model", code="adapter_family_mismatch")
    tokens = [e.token for e in embeddings]
    if len(set(tokens)) != len(tokens):
        raise AdapterError("embedding", embeddings[0].ref, f"each embedding needs its own token, got {tokens}")
    for e in embeddings:
        if e.family is not None and e.family != family:
            raise AdapterError("embedding", e.ref, f"was trained for {e.family}, and this model is {family}; use a "
                                                   f"{family} embedding", code="adapter_family_mismatch")


class EmbeddingSet:
    """The tokens loaded into one base pipeline's tokenizer(s) and text encoder(s). Device thread only."""

    def __init__(self) -> None:
        self._tokens: dict[str, str] = {}
        """token → identity of the file loaded under it."""
        self.loads = 0

    def loaded(self) -> dict[str, str]:
        return dict(self._tokens)

    def activate(self, pipe: Any, embeddings: Sequence[EmbeddingFile], family: str) -> None:
        """Make exactly these tokens mean their embeddings: a token bound to the same file stays, a rebound one
        reloads, and tokens this request does not name are removed, so one request's words never reach another's."""
        from safetensors.torch import load_file

        wanted = {e.token for e in embeddings}
        for token in [t for t in self._tokens if t not in wanted]:
            self._unload(pipe, token, family)
        for e in embeddings:
            if self._tokens.get(e.token) == e.identity:
                continue
            if e.token in self._tokens:
                self._unload(pipe, e.token, family)
            state = load_file(str(e.path))
            try:
                if family == "sdxl":
                    if "clip_l" not in state or "clip_g" not in state:
                        raise ValueError("an SDXL embedding holds clip_l and clip_g tensors")
                    pipe.load_textual_inversion(state["clip_l"], token=e.token, text_encoder=pipe.text_encoder,
                                                tokenizer=pipe.tokenizer)
                    pipe.load_textual_inversion(state["clip_g"], token=e.token, text_encoder=pipe.text_encoder_2,
                                                tokenizer=pipe.tokenizer_2)
                else:
                    pipe.load_textual_inversion(state, token=e.token)
            except (ValueError, RuntimeError, KeyError) as exc:
                self._tokens.pop(e.token, None)
                raise AdapterError("embedding", e.ref, f"does not fit this model ({type(exc).__name__}: {exc})"[:500],
                                   code="adapter_family_mismatch") from None
            self._tokens[e.token] = e.identity
            self.loads += 1

    def _unload(self, pipe: Any, token: str, family: str) -> None:
        pipe.unload_textual_inversion(tokens=token)
        if family == "sdxl":
            pipe.unload_textual_inversion(tokens=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        del self._tokens[token]


# --- IP-Adapter -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IPAdapterFile:
    """A resolved IP-Adapter: its weights, its image encoder directory, family (if known) and identity."""

    ref: str
    path: Path
    image_encoder: Path | None
    family: str | None
    identity: str


def resolve_ip_adapter(ref: str, image_encoder: str | None = None) -> IPAdapterFile:
    path = safetensors_file("IP-Adapter", ref)
    shapes, metadata = _shapes("IP-Adapter", path)
    if not any(k.startswith("image_proj.") for k in shapes) or not any(k.startswith("ip_adapter.") for k in shapes):
        raise AdapterError("IP-Adapter", ref, "has no image_proj.* / ip_adapter.* tensors; it is not an IP-Adapter")
    family = _hinted(metadata)
    if family is None:
        k_ip = [shape for key, shape in shapes.items() if key.endswith("to_k_ip.weight")]
        family = _IP_CROSS_DIM.get(k_ip[0][-1]) if k_ip else None
    encoder = Path(image_encoder).expanduser() if image_encoder else path.parent / "image_encoder"
    found = encoder if encoder.is_dir() else None
    return IPAdapterFile(ref, path, found, family, _identity(path))


def check_ip_adapter(ip: IPAdapterFile | None, family: str) -> None:
    if ip is None:
        return
    if family == "flux":
        raise AdapterError("IP-Adapter", ip.ref, "IP-Adapters are offered here for sd15 and sdxl models",
                           code="adapter_family_mismatch")
    if ip.family is not None and ip.family != family:
        raise AdapterError("IP-Adapter", ip.ref, f"was trained for {ip.family}, and this model is {family}; use a "
                                                 f"{family} IP-Adapter", code="adapter_family_mismatch")
    if ip.image_encoder is None:
        raise AdapterError("IP-Adapter", ip.ref, "no CLIP image encoder: put it in an image_encoder/ folder beside "
                                                 "the file or set image_encoder: in the model's catalog entry",
                           code="adapter_not_found")
    from providers.local.catalog import ModelEntry
    from providers.local.pipelines import check_component  # safetensors, not pickles

    check_component(ModelEntry(name=ip.ref, path=ip.ref), "IP-Adapter image encoder", str(ip.image_encoder))


class IPAdapterSlot:
    """The IP-Adapter on one base pipeline (at most one at a time). Device thread only."""

    def __init__(self) -> None:
        self.current: str | None = None
        self.loads = 0

    def activate(self, pipe: Any, ip: IPAdapterFile | None, scale: float, dtype: Any) -> None:
        if ip is None:
            if self.current is not None:
                pipe.unload_ip_adapter()
                self.current = None
            return
        if self.current != ip.identity:
            if self.current is not None:
                pipe.unload_ip_adapter()
                self.current = None
            from transformers import CLIPVisionModelWithProjection

            assert ip.image_encoder is not None
            encoder = CLIPVisionModelWithProjection.from_pretrained(str(ip.image_encoder), use_safetensors=True,
                                                                    local_files_only=True, dtype=dtype)
            pipe.register_modules(image_encoder=encoder.to(pipe.device))
            try:
                pipe.load_ip_adapter(str(ip.path.parent), subfolder="", weight_name=ip.path.name,
                                     image_encoder_folder=None)
            except (ValueError, RuntimeError, KeyError, OSError) as exc:
                pipe.register_modules(image_encoder=None)
                raise AdapterError("IP-Adapter", ip.ref, f"does not fit this model ({type(exc).__name__}: {exc})"
                                   [:500], code="adapter_family_mismatch") from None
            self.current = ip.identity
            self.loads += 1
        pipe.set_ip_adapter_scale(scale)
