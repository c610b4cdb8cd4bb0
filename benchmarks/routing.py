"""How long a routing decision takes: the policy engine alone, pure and in-process.

    python benchmarks/routing.py

Prints microseconds per decision for growing candidate lists and prompt kinds.
"""

from __future__ import annotations

import time
from decimal import Decimal

from policies import PRESETS, CandidateInfo, PolicyEngine
from policies.complexity import score_prompt
from providers.base import Capabilities, Estimate, Plan
from router.geometry import SizePlan
from router.request import ImageRequest

PROMPTS = {
    "simple": "a photo of a cat",
    "complex": "three red apples on a wooden table, a sign that says SALE, oil painting, in the style of Van Gogh",
}


def candidates(count: int) -> list[CandidateInfo]:
    out = []
    for i in range(count):
        caps = Capabilities(tasks=frozenset({"txt2img", "img2img"}), quality=0.4 + (i % 6) / 10,
                            regions=frozenset({"global", "eu"} if i % 3 == 0 else {"global"}), max_n=4)
        out.append(CandidateInfo(f"p{i}", f"p{i}", "m", caps, Plan(SizePlan(1024, 1024)),
                                 Estimate(Decimal("0.001") * (i + 1), 2.0 + i), position=i))
    return out


def per_call_us(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6


def main() -> None:
    print(f"{'prompt':<9} {'candidates':>10} {'complexity µs':>14} {'decide µs':>10} {'decide (scored) µs':>19}")
    for name, prompt in PROMPTS.items():
        request = ImageRequest(prompt=prompt, width=1024, height=1024)
        complexity = score_prompt(prompt)
        for count in (1, 6, 24):
            engine = PolicyEngine(PRESETS["balanced"])
            cands = candidates(count)
            t_complexity = per_call_us(lambda p=prompt: score_prompt(p), 2000)
            t_decide = per_call_us(lambda e=engine, c=cands, r=request: e.decide(r, c), 2000)
            t_scored = per_call_us(lambda e=engine, c=cands, r=request, x=complexity: e.decide(r, c, complexity=x),
                                   2000)
            print(f"{name:<9} {count:>10} {t_complexity:>14.1f} {t_decide:>10.1f} {t_scored:>19.1f}")


if __name__ == "__main__":
    main()
