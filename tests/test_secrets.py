"""A canary key never shows in messages, reprs, causes or logs, whatever goes wrong."""

from __future__ import annotations

import contextlib
import logging
import pickle
import traceback

import pytest

from providers.openai import OpenAIProvider
from providers.sandbox import Fault, OpenAISandbox
from router import AsyncRouter, ImageRouterError
from router.errors import redact

CANARY = "sk-canary-7f3a9c2e5b1d4f60"


def _everything_about(exc: BaseException) -> str:
    parts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        parts += [str(cause), repr(cause)]
        cause = cause.__cause__ or cause.__context__
    for attempt in getattr(exc, "attempts", []):
        parts.append(repr(attempt))
    with contextlib.suppress(Exception):  # not every error pickles; what matters is what it prints
        parts.append(repr(pickle.loads(pickle.dumps(exc))))
    return "\n".join(parts)


@pytest.mark.parametrize("fault", ["auth", "timeout", "connect", "server"])
async def test_canary_key_never_leaks(fault: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with OpenAISandbox(api_key="sk-sandbox-other") as sb:
        base_url = sb.base_url
        key = CANARY if fault == "auth" else sb.api_key
        if fault == "timeout":
            sb.faults.push(Fault.timeout(seconds=2.0), times=None)
        if fault == "server":
            sb.faults.push(Fault.server_error(500), times=None)
        if fault == "connect":
            sb.stop()
        prov = OpenAIProvider(api_key=key if fault != "connect" else CANARY, base_url=base_url)
        router = AsyncRouter([prov], ledger=":memory:", max_retries=0, attempt_timeout_s=0.3)
        with pytest.raises(ImageRouterError) as info:
            await router.agenerate("a cat")
        await router.aclose()
    assert CANARY not in _everything_about(info.value)
    assert CANARY not in caplog.text
    assert CANARY not in repr(prov) and CANARY not in repr(prov.__dict__)


def test_redact_masks_key_shapes() -> None:
    text = f"Incorrect API key {CANARY}; Authorization: Bearer abcdefghijklmnop; x-key=zzzzzzzzzz"
    out = redact(text)
    assert CANARY not in out and "abcdefghijklmnop" not in out and "zzzzzzzzzz" not in out
