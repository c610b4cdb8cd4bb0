"""The Code / Canvas / Call ladder: use the highest rung that still gives the control a request needs.

- **Call**: a hosted API (OpenAI, Stability, Replicate, Together, BFL, ...) — you rent the result;
- **Canvas**: a ComfyUI server — you own the weights and wire a graph;
- **Code**: the local Diffusers backend — you own the weights and assemble the parts.

Under ``order: ladder`` the accepted candidates are ranked by rung (Call, then Canvas, then Code), then by
score within a rung. A request steps down a rung only when a requirement forces it: the screening that
runs before ranking already removed every candidate that cannot serve the request (a workflow only a
ComfyUI server has, adapters the hosted APIs lack, residency ``local``), so the first rung left is the
highest that gives the control needed, and :func:`step_down_note` names what removed the rungs above.
With ``ladder_gpu_usd_per_day`` set, volume can put Code first: when the requests of the last day, priced
at the cheapest Call candidate, cost more than a day of the owned GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

Rung = Literal["call", "canvas", "code"]
RUNGS: tuple[Rung, ...] = ("call", "canvas", "code")
_BY_KIND: dict[str, Rung] = {"local": "code", "comfyui": "canvas"}


def rung_of(kind: str) -> Rung:
    """The rung of a provider kind: ``local`` is Code, ``comfyui`` Canvas, every hosted API Call."""
    return _BY_KIND.get(kind, "call")


def code_first(requests_last_day: int | None, call_usd: float | None, gpu_usd_per_day: float | None) -> bool:
    """Whether volume makes the owned GPU cheaper than renting: a day's requests at the cheapest Call
    price cost more than a day of the GPU."""
    if requests_last_day is None or call_usd is None or not gpu_usd_per_day:
        return False
    return requests_last_day * call_usd > gpu_usd_per_day


def step_down_note(head_kind: str, rejected: Iterable[tuple[str, str, str, str]], *, volume: str | None = None
                   ) -> str | None:
    """Why the chain's head is below Call: the reasons the candidates on the rungs above it were rejected
    (``(kind, provider/model, code, reason)`` rows), the most common first; None when the head is on Call."""
    rung = rung_of(head_kind)
    if volume is not None and rung == "code":
        return f"stepped down to Code: {volume}"
    if rung == "call":
        return None
    above = RUNGS[: RUNGS.index(rung)]
    counts: dict[str, int] = {}
    example: dict[str, str] = {}
    for kind, name, code, reason in rejected:
        if rung_of(kind) in above and code != "not-configured":
            key = f"{code}: {reason}"
            counts[key] = counts.get(key, 0) + 1
            example.setdefault(key, name)
    names = " / ".join(r.capitalize() for r in above)
    if not counts:
        return f"stepped down to {rung.capitalize()}: no {names} backend is configured for this request"
    top: Sequence[str] = sorted(counts, key=lambda k: -counts[k])[:3]
    said = "; ".join(f"{k} ({example[k]}{f' and {counts[k] - 1} more' if counts[k] > 1 else ''})" for k in top)
    return f"stepped down to {rung.capitalize()}: no {names} backend can serve it — {said}"
