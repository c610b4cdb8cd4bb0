"""The unified request: one shape for every backend, validated before anything is sent."""

from __future__ import annotations

import asyncio
import re
from decimal import Decimal
from typing import Annotated, Any, Literal, Self

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from router.errors import RequestValidationError
from router.images import ImageDecodeError, ImageInput

Task = Literal["txt2img", "img2img", "inpaint", "control", "upscale"]
TASKS: tuple[Task, ...] = ("txt2img", "img2img", "inpaint", "control", "upscale")
QualityFloor = Literal["low", "medium", "high"]
QUALITY_FLOORS: dict[str, float] = {"low": 0.3, "medium": 0.6, "high": 0.85}

CONTROL_KINDS = frozenset(
    {"canny", "depth", "pose", "scribble", "lineart", "lineart_anime", "softedge",
     "seg", "normal", "tile", "mlsd", "shuffle"}
)
SCHEDULERS = frozenset({"dpmpp_2m_karras", "euler", "euler_a", "unipc", "ddim", "lcm"})
_RATIO = re.compile(r"^\s*(\d{1,3})\s*:\s*(\d{1,3})\s*$")


def _image(value: Any) -> ImageInput | None:
    if value is None:
        return None
    try:
        return ImageInput.coerce(value, what="")
    except ImageDecodeError as exc:
        raise ValueError(exc.message.removeprefix(": ")) from None


Image = Annotated[ImageInput, BeforeValidator(_image)]


def _image_values(kw: dict[str, Any]) -> list[Any]:
    """The image values among request keywords (``init_image``, ``mask_image``, each control's ``image``)."""
    values = [kw.get("init_image"), kw.get("mask_image")]
    ip = kw.get("ip_adapter")
    if ip is not None:
        values.append(ip.get("image") if isinstance(ip, dict) else getattr(ip, "image", None))
    controls = kw.get("controls")
    if isinstance(controls, list | tuple):
        values += [c.get("image") if isinstance(c, dict) else getattr(c, "image", None) for c in controls]
    return values


def _cheap_image(value: Any) -> bool:
    """Whether validating ``value`` as an image costs microseconds (a header read at most)."""
    if value is None or isinstance(value, ImageInput | bytes):
        return True
    return isinstance(value, str) and value[:8].lower().startswith(("http://", "https://"))


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            raise _typed(exc) from None

    @classmethod
    def model_validate(cls, obj: Any, **kw: Any) -> Self:
        try:
            return super().model_validate(obj, **kw)
        except pydantic.ValidationError as exc:
            raise _typed(exc) from None


def _typed(exc: pydantic.ValidationError) -> RequestValidationError:
    problems: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(p) for p in err["loc"])
        inner = err.get("ctx", {}).get("error")
        if isinstance(inner, RequestValidationError):
            problems.extend((".".join(p for p in (field, f.removeprefix("request")) if p) or "request", m)
                            for f, m in inner.problems)
            continue
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; vendor-specific settings go in provider_options={'<provider>': {...}}"
        problems.append((field or "request", msg))
    return RequestValidationError(problems)


class ControlInput(_Model):
    """A ControlNet condition: its kind, the image, and how strongly and when it applies."""

    kind: str
    image: Image
    scale: float = Field(1.0, ge=0.0, le=2.0)
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(1.0, ge=0.0, le=1.0)
    preprocess: bool = True

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        kind = v.strip().lower()
        if kind not in CONTROL_KINDS:
            raise ValueError(f"unknown control kind {v!r}; use one of {', '.join(sorted(CONTROL_KINDS))}")
        return kind

    @model_validator(mode="after")
    def _window(self) -> Self:
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be below end ({self.end})")
        return self


class EmbeddingRef(_Model):
    """A textual-inversion embedding: a local .safetensors file and the prompt word that stands for it."""

    ref: str = Field(min_length=1)
    token: str = Field(min_length=1, pattern=r"^\S+$")


class IPAdapterInput(_Model):
    """An IP-Adapter: its .safetensors weights, the reference image, and how strongly it steers."""

    ref: str = Field(min_length=1)
    image: Image
    scale: float = Field(1.0, ge=0.0, le=2.0)


class LoraRef(_Model):
    """A LoRA adapter: a path, a hub id or a provider's URL, and its weight."""

    ref: str = Field(min_length=1)
    weight: float = Field(1.0, ge=-4.0, le=4.0)

    @property
    def is_file(self) -> bool:
        """Whether ``ref`` names a file on this machine (only a backend running here can load it), not a
        hub id or a URL a hosted vendor fetches."""
        ref = self.ref
        return "://" not in ref and (ref.startswith(("/", "~", "./", "../", "\\")) or ref.endswith(".safetensors")
                                     or (len(ref) > 2 and ref[1] == ":" and ref[2] in "/\\"))


class Constraints(_Model):
    """Hard limits the router must respect when it picks a backend."""

    max_cost_usd: Decimal | None = Field(None, ge=0)
    max_latency_s: float | None = Field(None, gt=0)
    residency: frozenset[str] | None = None
    allow_providers: frozenset[str] | None = None
    deny_providers: frozenset[str] = frozenset()
    quality_floor: QualityFloor | None = None
    strict: bool = False
    """Reject a backend that would ignore a requested parameter, instead of adapting with a warning."""

    @field_validator("residency", "allow_providers", "deny_providers", mode="before")
    @classmethod
    def _as_set(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = {v}
        if v is not None:
            v = frozenset(s.strip().lower() for s in v)
            if not v:
                raise ValueError("an empty set allows nothing; leave it out to allow everything")
        return v


class Selection(_Model):
    """Best-of-n: make ``n`` candidates and return the best by CLIP score against the prompt.

    ``across`` > 1 fans the candidates out over the top of the chain (that many backends, each making its
    share); ``clip`` is a local CLIP model directory (default: the policy's ``quality.clip``). Every
    candidate is charged; the others' scores are in the attempts."""

    n: int = Field(ge=2, le=16)
    by: Literal["clip"] = "clip"
    clip: str | None = None
    across: int = Field(1, ge=1, le=4)


class ImageRequest(_Model):
    """One image-generation request, the same for every backend.

    The task follows from the inputs: ``init_image`` → img2img, plus ``mask_image`` →
    inpaint, ``controls`` → control, ``upscale`` → upscale; otherwise txt2img.
    Masks are white = repaint; a mask with transparent pixels is read as alpha 0 = repaint.
    """

    prompt: str = Field(max_length=100_000)
    negative_prompt: str | None = None
    width: int | None = Field(None, ge=64, le=8192)
    height: int | None = Field(None, ge=64, le=8192)
    aspect_ratio: str | None = None
    size_mode: Literal["adapt", "exact"] = "adapt"
    n: int = Field(1, ge=1, le=16)
    steps: int | None = Field(None, ge=1, le=500)
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    scheduler: str | None = None
    output_format: Literal["png", "jpeg", "webp"] = "png"
    init_image: Image | None = None
    strength: float | None = None
    mask_image: Image | None = None
    controls: tuple[ControlInput, ...] = ()
    loras: tuple[LoraRef, ...] = ()
    embeddings: tuple[EmbeddingRef, ...] = ()
    """Textual-inversion embeddings (local backend): each file's ``token`` stands for it in the prompt."""
    ip_adapter: IPAdapterInput | None = None
    """An IP-Adapter steering the image toward a reference image (local backend)."""
    upscale: float | None = Field(None, gt=1.0, le=8.0)
    select: Selection | None = None
    """Best-of-n (see :class:`Selection`), e.g. ``select={"n": 3, "by": "clip", "clip": "/models/clip"}``."""
    partial_images: int = Field(0, ge=0, le=3)
    """Previews to send as :class:`~router.progress.PartialImage` events while the image is made (0–3): OpenAI
    streams them; the local backend decodes its latents with a configured preview autoencoder. A preview
    is a progress event, never part of the result; backends that cannot make them ignore it."""
    model: str | None = None
    provider: str | None = None
    constraints: Constraints = Constraints()
    tags: frozenset[str] = frozenset()
    idempotency_key: str | None = Field(None, min_length=1, max_length=255)
    deadline_s: float | None = Field(None, gt=0)
    provider_options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("n", mode="before")
    @classmethod
    def _n(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"n must be at least 1 (got {v})")
        return v

    @field_validator("strength", mode="before")
    @classmethod
    def _strength(cls, v: Any) -> Any:
        if v is not None and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"strength must be between 0 and 1 (got {v}); 0 keeps the init image, 1 ignores it")
        return v

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"must be a multiple of 8 (got {v}); try {round(v / 8) * 8}")
        return v

    @field_validator("aspect_ratio")
    @classmethod
    def _ratio(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = _RATIO.match(v)
        if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
            raise ValueError(f"aspect_ratio must look like '16:9' (got {v!r})")
        a, b = int(m.group(1)), int(m.group(2))
        if not 1 / 4 <= a / b <= 4:
            raise ValueError(f"aspect_ratio {v} is outside 1:4 to 4:1")
        return f"{a}:{b}"

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str | None) -> str | None:
        if v is not None and v.lower() not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {v!r}; use one of {', '.join(sorted(SCHEDULERS))}")
        return v.lower() if v else v

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, v: Any) -> Any:
        return frozenset({v} if isinstance(v, str) else v)

    @field_validator("provider", mode="before")
    @classmethod
    def _provider(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _combinations(self) -> Self:
        problems: list[tuple[str, str]] = []
        if not self.prompt.strip() and self.upscale is None:
            problems.append(("prompt", "must not be empty"))
        if (self.width is None) != (self.height is None):
            problems.append(("width" if self.width is None else "height", "give width and height together"))
        if self.aspect_ratio is not None and self.width is not None:
            problems.append(("aspect_ratio", "give either width/height or aspect_ratio, not both"))
        if self.mask_image is not None and self.init_image is None:
            problems.append(("mask_image", "a mask needs an init_image to paint into; add init_image"))
        if self.strength is not None and self.init_image is None:
            problems.append(("strength", "strength applies to an init_image; add init_image or drop strength"))
        if self.upscale is not None and self.init_image is None:
            problems.append(("upscale", "upscaling needs the image to upscale in init_image"))
        if self.upscale is not None and (self.mask_image is not None or self.controls):
            problems.append(("upscale", "an upscale takes no mask or controls"))
        for name in self.provider_options:
            if not isinstance(self.provider_options[name], dict):
                problems.append((f"provider_options.{name}", "must be a dict of that provider's settings"))
        if problems:
            raise RequestValidationError(problems)
        return self

    @property
    def task(self) -> Task:
        """What the inputs ask for."""
        if self.upscale is not None:
            return "upscale"
        if self.controls:
            return "control"
        if self.mask_image is not None:
            return "inpaint"
        if self.init_image is not None:
            return "img2img"
        return "txt2img"

    @classmethod
    def from_kwargs(cls, prompt: str | ImageRequest, **kw: Any) -> ImageRequest:
        """Build a request from a prompt and keywords; constraint fields may be given flat.

        ``ImageRequest.from_kwargs("a cat", width=512, height=512, max_cost_usd=0.02)``
        """
        if isinstance(prompt, ImageRequest):
            if kw:
                return prompt.model_copy_validated(**kw)
            return prompt
        flat = {k: kw.pop(k) for k in list(kw) if k in Constraints.model_fields}
        if flat:
            base = kw.pop("constraints", None)
            merged = (base.model_dump() if isinstance(base, Constraints) else dict(base or {})) | flat
            kw["constraints"] = Constraints(**merged)
        return cls(prompt=prompt, **kw)

    @classmethod
    async def afrom_kwargs(cls, prompt: str | ImageRequest, **kw: Any) -> ImageRequest:
        """:meth:`from_kwargs` for async code: inline when validating costs microseconds, else in a
        worker thread, so the event loop never waits on a file read, a base64 decode or a PIL encode.

        Inline: no image, or images given as bytes (only their headers are read), URLs or ImageInputs.
        In a thread: an image given as a path, base64, a data URL or a PIL image.
        """
        if all(_cheap_image(v) for v in _image_values(kw)):
            return cls.from_kwargs(prompt, **kw)
        return await asyncio.to_thread(cls.from_kwargs, prompt, **kw)

    def model_copy_validated(self, **changes: Any) -> ImageRequest:
        """A copy with ``changes`` applied, validated again."""
        data = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self)(**(data | changes))
