"""Best-of-n by CLIP score and the policy's quality step, through the router, the OpenAI adapter and its
sandbox over real HTTP, with a tiny random-weight CLIP built from config."""

from __future__ import annotations

import json
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from policies.policy import PRESETS
from providers.openai import OpenAIProvider
from providers.sandbox import Fault, OpenAISandbox
from router import RequestValidationError
from router.ledger import Ledger
from router.quality import clip_score
from tests.conftest import make_router
from tests.quality_models import build_tiny_clip

PROMPT = "a red apple on a wooden table"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def openai(sb: OpenAISandbox, name: str = "openai") -> OpenAIProvider:
    return OpenAIProvider(name=name, api_key=sb.api_key, base_url=sb.base_url)


async def test_best_of_n_returns_the_highest_scoring_image_and_charges_every_candidate(
        sandbox: OpenAISandbox, clip_dir: Path) -> None:
    async with make_router(openai(sandbox)) as router:
        result = await router.agenerate(PROMPT, select={"n": 3, "by": "clip", "clip": str(clip_dir)})
    assert sandbox.requests[-1].json["n"] == 3  # type: ignore[index]
    (served,) = [a for a in result.attempts if a.outcome == "success"]
    assert served.scores is not None and len(served.scores) == 3
    assert len(result.images) == 1 and result.quality == {"clip": [max(served.scores)]}
    # the returned image is the one that scored highest, scored again from scratch
    assert clip_score(result.images, PROMPT, clip=clip_dir)[0] == pytest.approx(max(served.scores), abs=1e-3)
    assert result.cost.actual_usd == sandbox.billed_usd > 0  # the vendor billed three images: all charged
    assert router.ledger.spent() == sandbox.billed_usd


async def test_best_of_n_keeps_the_requests_n_best_in_order(sandbox: OpenAISandbox, clip_dir: Path) -> None:
    async with make_router(openai(sandbox)) as router:
        result = await router.agenerate(PROMPT, n=2, select={"n": 4, "clip": str(clip_dir)})
    (served,) = [a for a in result.attempts if a.outcome == "success"]
    assert served.scores is not None and result.quality is not None
    assert result.quality["clip"] == sorted(served.scores, reverse=True)[:2] and len(result.images) == 2


async def test_best_of_n_across_two_backends_calls_both_and_charges_both(
        sandbox: OpenAISandbox, sandbox2: OpenAISandbox, clip_dir: Path) -> None:
    async with make_router(openai(sandbox, "first"), openai(sandbox2, "second")) as router:
        result = await router.agenerate(PROMPT, select={"n": 4, "clip": str(clip_dir), "across": 2})
    assert [r.json["n"] for r in sandbox.requests] == [2] and [r.json["n"] for r in sandbox2.requests] == [2]
    served = [a for a in result.attempts if a.outcome == "success"]
    assert sorted(a.provider for a in served) == ["first", "second"]
    assert all(a.scores is not None and len(a.scores) == 2 for a in served)
    everything = [s for a in served for s in (a.scores or [])]
    assert result.quality == {"clip": [max(everything)]}
    assert result.cost.actual_usd == sandbox.billed_usd + sandbox2.billed_usd
    assert router.ledger.spent() == result.cost.actual_usd


async def test_one_failing_backend_of_a_fan_out_leaves_the_others_candidates(
        sandbox: OpenAISandbox, sandbox2: OpenAISandbox, clip_dir: Path) -> None:
    sandbox2.faults.push(Fault.invalid_request(message="nope"), times=None)
    async with make_router(openai(sandbox, "first"), openai(sandbox2, "second"), max_retries=0) as router:
        result = await router.agenerate(PROMPT, select={"n": 2, "clip": str(clip_dir), "across": 2},
                                        constraints={"allow_providers": {"first", "second"}})
    assert result.provider == "first" and any("best-of-2 failed" in w for w in result.warnings)
    assert result.cost.actual_usd == sandbox.billed_usd


async def test_best_of_n_without_a_clip_model_is_refused_before_any_call(sandbox: OpenAISandbox,
                                                                         tmp_path: Path) -> None:
    async with make_router(openai(sandbox)) as router:
        with pytest.raises(RequestValidationError, match=r"select\.clip"):
            await router.agenerate(PROMPT, select={"n": 3})
        with pytest.raises(Exception, match="clip"):
            await router.agenerate(PROMPT, select={"n": 3, "clip": str(tmp_path / "missing")})
    assert sandbox.requests == [] and sandbox.billed_usd == 0


async def test_the_policys_quality_step_scores_the_result_the_attempt_and_the_ledger_row(
        sandbox: OpenAISandbox, clip_dir: Path, tmp_path: Path) -> None:
    policy = PRESETS["balanced"].model_copy(update={"quality": {"clip": str(clip_dir)}})
    policy = type(policy).model_validate(policy.model_dump())
    path = tmp_path / "ledger.sqlite3"
    async with make_router(openai(sandbox), ledger=Ledger(path)) as router:
        result = await router.agenerate(PROMPT, n=2, policy=policy)
    assert result.quality is not None and len(result.quality["clip"]) == 2
    assert result.quality["clip"] == [round(s, 4) for s in clip_score(result.images, PROMPT, clip=clip_dir)]
    assert result.attempts[-1].scores == result.quality["clip"]
    with sqlite3.connect(path) as db:
        (details,) = db.execute("SELECT details FROM charges WHERE state = 'settled'").fetchone()
    assert json.loads(details)["clip_score"] == result.quality["clip"]
    assert result.cost.actual_usd == sandbox.billed_usd > Decimal(0)
