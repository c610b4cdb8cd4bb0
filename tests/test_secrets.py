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


def _reachable_strings(root: object) -> list[str]:
    """Every str/bytes reachable from ``root`` through exception chains (``__context__``, ``__cause__``,
    ``args``), attributes (``__dict__`` and slots), and container items — what an error reporter walking
    the object graph could find. Tracebacks and frames are left out: a frame reaches the whole process."""
    seen: set[int] = set()
    found: list[str] = []
    stack: list[object] = [root]
    skip = (type, type(len), type(_reachable_strings), type(pytest))
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, str):
            found.append(obj)
            continue
        if isinstance(obj, (bytes, bytearray)):
            found.append(bytes(obj).decode("latin-1"))
            continue
        if isinstance(obj, (int, float, complex, bool)) or type(obj).__name__ in ("frame", "traceback", "code"):
            continue
        if isinstance(obj, BaseException):
            stack += [obj.__context__, obj.__cause__, *obj.args]
        if isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        elif hasattr(obj, "items") and callable(obj.items):  # header multidicts and the like
            with contextlib.suppress(Exception):
                stack += [v for pair in obj.items() for v in pair]
        with contextlib.suppress(TypeError):
            stack += list(vars(obj).values())
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                with contextlib.suppress(AttributeError):
                    stack.append(getattr(obj, name))
    return found


async def test_no_key_is_reachable_from_a_raised_error_through_its_chain() -> None:
    """An SDK's auth error holds its response, whose request holds the Authorization header: the error the
    router raises must not chain to it (an error reporter walks ``__context__``)."""
    with OpenAISandbox(api_key="sk-sandbox-other") as sb:
        prov = OpenAIProvider(api_key=CANARY, base_url=sb.base_url)
        router = AsyncRouter([prov], ledger=":memory:", max_retries=0)
        with pytest.raises(ImageRouterError) as info:
            await router.agenerate("a cat")
        await router.aclose()
    strings = _reachable_strings(info.value)
    assert any("401" in s or "key" in s.lower() for s in strings)  # the walk did reach the error's own text
    assert not [s for s in strings if CANARY in s]


async def test_no_key_is_reachable_from_a_together_auth_error() -> None:
    from providers.sandbox.together import TogetherSandbox
    from providers.together import TogetherProvider

    with TogetherSandbox(api_key="tg-sandbox-other-0123456789") as sb:
        prov = TogetherProvider(api_key=CANARY, base_url=sb.base_url)
        router = AsyncRouter([prov], ledger=":memory:", max_retries=0)
        with pytest.raises(ImageRouterError) as info:
            await router.agenerate("a cat")
        await router.aclose()
    assert not [s for s in _reachable_strings(info.value) if CANARY in s]
