"""The provider contract: what every backend declares, estimates and returns.

A provider is thin. It maps the unified request onto its API, says what it had to
adapt (a warning per parameter), reports its billing facts, and raises the SDK's
error classes. It never retries: the router owns retries, fallback and deadlines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from router.errors import InvalidRequestError
from router.geometry import SizePlan, SizeRules, plan_size
from router.prices import PriceRow, PriceTable, default_prices
from router.request import ImageRequest, Task
from router.result import GeneratedImage


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What one model of one provider can do. Routing filters on these before any call."""

    tasks: frozenset[Task]
    sizes: SizeRules = field(default_factory=SizeRules)
    control_kinds: frozenset[str] = frozenset()
    max_controls: int = 0
    max_loras: int = 0
    embeddings: bool = False  # textual-inversion embeddings
    ip_adapter: bool = False
    max_n: int = 1
    negative_prompt: bool = False
    seed: bool = False
    steps: bool = False
    guidance: bool = False
    strength: bool = False
    scheduler: bool = False
    regions: frozenset[str] = frozenset({"global"})
    quality: float = 0.5  # 0..1, the model's quality tier for routing
    output_formats: frozenset[str] = frozenset({"png"})

    @property
    def mask(self) -> bool:
        return "inpaint" in self.tasks

    @property
    def lora(self) -> bool:
        return self.max_loras > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": sorted(self.tasks),
            "control_kinds": sorted(self.control_kinds),
            "max_loras": self.max_loras,
            "embeddings": self.embeddings,
            "ip_adapter": self.ip_adapter,
            "max_n": self.max_n,
            "mask": self.mask,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "regions": sorted(self.regions),
            "quality": self.quality,
            "sizes": {"multiple": self.sizes.multiple, "max_side": self.sizes.max_side,
                      "fixed": [f"{w}x{h}" for w, h in self.sizes.fixed]},
        }


@dataclass(frozen=True, slots=True)
class Plan:
    """How a provider would serve a request: the shape, and every parameter it adapts."""

    size: SizePlan
    warnings: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        """True when nothing the request asked for would be ignored or changed."""
        return not self.warnings


@dataclass(frozen=True, slots=True)
class Estimate:
    """Cost and latency expected before the call.

    ``max_cost_usd`` is the most the call can be billed where the vendor's pricing bounds it
    (token-billed models: from size, quality and n); the router reserves it against budgets.
    None: the bill is the estimate (a flat per-image price).
    """

    cost_usd: Decimal
    latency_s: float
    unit: str = ""
    quantity: Decimal = Decimal(0)
    max_cost_usd: Decimal | None = None

    @property
    def worst_usd(self) -> Decimal:
        """What to reserve: the bound where there is one, else the estimate."""
        return self.cost_usd if self.max_cost_usd is None else max(self.cost_usd, self.max_cost_usd)


@dataclass(frozen=True, slots=True)
class Billing:
    """What the provider says it charged: the actual cost and the facts behind it."""

    cost_usd: Decimal
    unit: str
    quantity: Decimal
    price_table_version: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProviderResponse:
    """A provider's normalized answer."""

    images: list[GeneratedImage]
    model: str
    billing: Billing
    provider_request_id: str | None = None
    warnings: tuple[str, ...] = ()


class Provider(ABC):
    """One backend. Subclasses set ``kind`` and implement the abstract methods.

    ``name`` is the instance's name in routing (defaults to ``kind``), so two
    accounts of one vendor can be configured side by side.
    """

    kind: str = ""
    retry_timeouts: bool = True
    """Whether a call that ran out of time is worth retrying on this backend. False for backends whose time
    is compute on machines you own (local, ComfyUI, a GPU pool): the same work would time out again, so
    the router falls back instead (a policy's ``retry_own_timeouts`` overrides)."""

    async def warm(self) -> list[str]:
        """Get ready before requests arrive (load or compile models, read a server's model list); returns the
        models made ready. The server calls it at startup. Default: nothing to do."""
        return []

    def __init__(self, *, name: str | None = None, prices: PriceTable | None = None) -> None:
        self.name = name or self.kind
        self.prices = prices or default_prices()
        """The price table estimates and bills are computed from (the router may replace it)."""

    @abstractmethod
    def models(self) -> Sequence[str]:
        """The models this provider offers, best default first."""

    @abstractmethod
    def capabilities(self, model: str) -> Capabilities:
        """What ``model`` can do."""

    @abstractmethod
    def estimate(self, request: ImageRequest, model: str) -> Estimate:
        """Expected cost and latency (no I/O)."""

    @abstractmethod
    async def generate(self, request: ImageRequest, model: str, *, timeout_s: float) -> ProviderResponse:
        """Call the backend once; raise the SDK's error classes on failure."""

    def price_row(self, model: str) -> PriceRow:
        """This provider's price-table row for ``model``; a missing row is a clear error, not a zero cost."""
        row = self.prices.get(self.kind, model)
        if row is None:
            raise InvalidRequestError(f"no price for {self.kind}/{model} in the price table", provider=self.name)
        return row

    def supports_model(self, model: str) -> bool:
        """Whether a request may pin ``model`` on this provider."""
        return model in self.models()

    def configuration_problem(self) -> str | None:
        """Why this provider cannot be called now (a missing key, say), or None."""
        return None

    def plan(self, request: ImageRequest, model: str) -> Plan:
        """The size and the adaptations this model would make for ``request`` (no I/O).

        The default covers the parameters every backend shares; providers extend it.
        """
        caps = self.capabilities(model)
        size = plan_size(request.width, request.height, request.aspect_ratio, caps.sizes)
        warnings: list[str] = [size.warning] if size.warning else []
        checks = (
            (request.negative_prompt, caps.negative_prompt, "negative_prompt"),
            (request.seed is not None, caps.seed, "seed"),
            (request.steps is not None, caps.steps, "steps"),
            (request.guidance_scale is not None, caps.guidance, "guidance_scale"),
            (request.strength is not None, caps.strength, "strength"),
            (request.scheduler is not None, caps.scheduler, "scheduler"),
        )
        warnings += [f"{field} ignored: {self.name}/{model} does not take it" for asked, ok, field in checks
                     if asked and not ok]
        if request.output_format not in caps.output_formats:
            warnings.append(f"output_format {request.output_format} not offered; returning png")
        known = self.provider_option_names()
        for option in request.provider_options.get(self.name, {}):
            if option not in known:
                warnings.append(f"provider_options.{self.name}.{option} is not an option {self.name} knows; ignored")
        return Plan(size, tuple(warnings))

    def provider_option_names(self) -> frozenset[str]:
        """The vendor-specific settings this provider reads from ``provider_options``."""
        return frozenset()

    async def aclose(self) -> None:
        """Release connections."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
