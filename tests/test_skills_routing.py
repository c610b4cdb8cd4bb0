"""Per-skill profiles drive routing: a prompt that needs text goes to a model that renders text, the reason
names the skill, and a policy file's profile override changes the ranking."""

from __future__ import annotations

from policies.policy import Policy
from router import AsyncRouter
from router.config import providers_from_env
from router.profiles import default_profiles

SIGN = "a sign that says OPEN, three red apples on a table"


def router(policy: Policy | None = None) -> AsyncRouter:
    return AsyncRouter(providers_from_env({}), policy=policy, ledger=":memory:")


def test_a_prompt_with_text_is_headed_by_a_model_that_renders_text() -> None:
    decision = router().route(SIGN)
    head = decision.chain[0]
    profile = default_profiles().get(head.provider, head.model)
    assert profile is not None and profile.skills["text"] >= 0.85
    weak = [c for c in decision.ranked if "decided by text rendering" in c.fit_note]
    assert weak, "models short of the text skill say so"
    assert all(c.terms["fit"] < head.terms["fit"] for c in weak)
    assert "fit: decided by text rendering" in decision.explain()


def test_a_policy_override_of_a_skill_changes_the_ranking() -> None:
    head = router().route(SIGN).chain[0]
    demoted = Policy(name="no-text", profiles={f"{head.provider}/{head.model}": {"skills": {"text": 0.0}}})
    decision = router(demoted).route(SIGN)
    assert (decision.chain[0].provider, decision.chain[0].model) != (head.provider, head.model)
    moved = next(c for c in decision.ranked if (c.provider, c.model) == (head.provider, head.model))
    assert "decided by text rendering" in moved.fit_note
