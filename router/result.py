"""The normalized result every backend's output is turned into."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from router.errors import RequestValidationError
from router.images import decode

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from policies.decision import RoutingDecision

log = logging.getLogger("imagerouter")
Outcome = Literal["success", "error", "skipped", "cancelled", "cache-hit"]
_EXT = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One output image: its encoded bytes and what is known about it."""

    data: bytes = field(repr=False)
    mime: str
    width: int
    height: int
    seed: int | None = None
    nsfw: bool = False
    provenance: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    """How the image was made (prompt, seed, model, provider, cost, request id, policy); set by the router."""

    def save(self, path: str | os.PathLike[str], *, metadata: bool | None = None) -> Path:
        """Write the image atomically (a temp file renamed into place); return the path.

        A path without a suffix gets the one that matches the image's format. The
        :attr:`provenance` record is written into PNG and JPEG files (see :mod:`router.provenance`)
        unless ``metadata=False``, or ``IMAGEROUTER_PROVENANCE=0`` and ``metadata`` is not True.
        """
        target = Path(path)
        if not target.suffix:
            target = target.with_suffix(_EXT.get(self.mime, ".img"))
        data = self.data
        if self.provenance and (metadata if metadata is not None else _provenance_enabled()):
            from router.provenance import embed

            try:
                data = embed(data, self.provenance)
            except ValueError as exc:
                log.warning("provenance not written to %s: %s", target.name, exc)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def to_pil(self) -> PILImage.Image:
        """Decode into a PIL image."""
        return decode(self.data)


def _provenance_enabled() -> bool:
    from router.provenance import enabled

    return enabled()


@dataclass(frozen=True, slots=True)
class Cost:
    """What a request cost, in USD: estimated before the call, actual after it.

    ``actual_usd`` sums every attempt the providers billed (a failed attempt that was
    billed counts too); ``unit``/``quantity`` are the billing facts of the attempt that
    produced the images (tokens, credits, images, GPU-seconds, megapixel-steps).
    """

    estimated_usd: Decimal
    actual_usd: Decimal
    unit: str
    quantity: Decimal
    price_table_version: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def usd(self) -> Decimal:
        return self.actual_usd


@dataclass(frozen=True, slots=True)
class Attempt:
    """One call to one provider, successful or not."""

    provider: str
    model: str
    outcome: Outcome
    latency_s: float
    cost_usd: Decimal = Decimal(0)
    error: str | None = None  # the error class name
    message: str | None = None
    status_code: int | None = None
    retry: int = 0  # 0 for the first try on this candidate
    scores: list[float] | None = None  # best-of-n / the quality step: the CLIP score of each image it made

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cost_usd"] = str(self.cost_usd)
        return d


@dataclass(frozen=True, slots=True)
class Latency:
    """Where the time went, in seconds."""

    total_s: float
    routing_s: float
    provider_s: float  # the successful attempt's call
    queue_s: float = 0.0  # retries' waits and failed attempts before it


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """The images and everything about how they were made."""

    images: list[GeneratedImage]
    provider: str
    model: str
    cost: Cost
    latency: Latency
    attempts: list[Attempt]
    decision: RoutingDecision
    warnings: list[str]
    request_id: str
    provider_request_id: str | None = None
    quality: dict[str, list[float]] | None = None
    """Scores of the returned images (``{"clip": [...]}``) when the policy's quality step or best-of-n ran."""

    @property
    def image(self) -> GeneratedImage:
        """The first image."""
        return self.images[0]

    def save(self, directory: str | os.PathLike[str], stem: str = "image", *,
             metadata: bool | None = None) -> list[Path]:
        """Save every image into ``directory`` as ``<stem>-<i>.<ext>`` (``metadata``: see ``GeneratedImage.save``)."""
        return [img.save(Path(directory) / f"{stem}-{i}", metadata=metadata) for i, img in enumerate(self.images)]

    def score(self, *, clip: str | os.PathLike[str], prompt: str | None = None, device: str = "cpu") -> list[float]:
        """Each image's CLIP score (0-100: ``100 × max(cos, 0)``) against ``prompt`` (default: the prompt in
        the images' provenance), with the local CLIP model directory ``clip``. Needs the ``quality`` extra;
        nothing is downloaded (see :mod:`router.quality`)."""
        from router.quality import clip_score

        return clip_score(self.images, self._prompt(prompt), clip=clip, device=device)

    async def ascore(self, *, clip: str | os.PathLike[str], prompt: str | None = None,
                     device: str = "cpu") -> list[float]:
        """:meth:`score` off the event loop (the model runs in a worker thread)."""
        from router.quality import aclip_score

        return await aclip_score(self.images, self._prompt(prompt), clip=clip, device=device)

    def _prompt(self, prompt: str | None) -> str:
        if prompt is None:
            prompt = next((str(i.provenance["prompt"]) for i in self.images
                           if i.provenance and i.provenance.get("prompt")), None)
        if prompt is None:
            raise RequestValidationError([("prompt", "these images carry no prompt: pass score(prompt=...)")])
        return prompt

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (image bytes left out)."""
        return {
            "request_id": self.request_id,
            "provider": self.provider,
            "model": self.model,
            "provider_request_id": self.provider_request_id,
            "images": [
                {"mime": i.mime, "width": i.width, "height": i.height, "seed": i.seed, "nsfw": i.nsfw,
                 "bytes": len(i.data)}
                for i in self.images
            ],
            "cost": {
                "estimated_usd": str(self.cost.estimated_usd),
                "actual_usd": str(self.cost.actual_usd),
                "unit": self.cost.unit,
                "quantity": str(self.cost.quantity),
                "price_table_version": self.cost.price_table_version,
                "details": self.cost.details,
            },
            "latency": asdict(self.latency),
            "attempts": [a.to_dict() for a in self.attempts],
            "warnings": list(self.warnings),
            "decision": self.decision.to_dict(),
        }
