"""OpenTelemetry spans and structured, redacted logs of routed requests (against the loopback OpenAI sandbox)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from providers.openai import OpenAIProvider
from providers.sandbox import Fault, OpenAISandbox
from router import AllProvidersFailed, AuthenticationError, ImageRequest
from router.logs import JsonFormatter, RedactingFilter
from router.telemetry import Tracing
from tests.test_router_openai import make_router, provider

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a lighthouse at dusk, oil painting"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tp(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    yield tp
    tp.shutdown()


def split(spans: tuple[ReadableSpan, ...]) -> tuple[ReadableSpan, list[ReadableSpan]]:
    requests = [s for s in spans if s.kind is SpanKind.INTERNAL]
    assert len(requests) == 1, [s.name for s in spans]
    attempts = sorted((s for s in spans if s.kind is SpanKind.CLIENT),
                      key=lambda s: attrs(s)["imagerouter.attempt"])
    return requests[0], attempts


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def everything(span: ReadableSpan) -> str:
    """Every string a span carries: name, attributes, events, status."""
    parts: list[Any] = [span.name, span.status.description, dict(span.attributes or {})]
    parts += [(e.name, dict(e.attributes or {})) for e in span.events]
    return json.dumps(parts, default=str)


async def test_fallback_gives_one_request_span_with_an_attempt_span_per_call(
    sandbox: OpenAISandbox, sandbox2: OpenAISandbox, tp: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    sandbox.faults.push(Fault.server_error(503), times=None)
    router = make_router(provider(sandbox), provider(sandbox2, "openai-backup"), max_retries=1, tracer_provider=tp)
    async with router:
        result = await router.agenerate(PROMPT, width=1024, height=1024, seed=7, n=2)
    request, attempts = split(exporter.get_finished_spans())

    assert request.name == "generate_content" and request.status.status_code is StatusCode.OK
    ra = attrs(request)
    assert ra["gen_ai.operation.name"] == "generate_content" and ra["gen_ai.output.type"] == "image"
    assert ra["gen_ai.provider.name"] == "openai" and ra["imagerouter.provider"] == "openai-backup"
    assert ra["gen_ai.response.model"] == result.model == "gpt-image-2"
    assert ra["gen_ai.request.seed"] == 7 and ra["gen_ai.request.choice.count"] == 2
    assert ra["imagerouter.request_id"] == result.request_id and ra["imagerouter.task"] == "txt2img"
    assert ra["imagerouter.policy"] == "balanced" and ra["imagerouter.outcome"] == "success"
    assert ra["imagerouter.attempts"] == 3 and ra["imagerouter.rank"] == 1 and ra["imagerouter.candidates"] == 2
    assert list(ra["imagerouter.errors"]) == ["ProviderUnavailable", "ProviderUnavailable"]
    assert list(ra["imagerouter.fallback.reasons"]) == ["openai/gpt-image-2: ProviderUnavailable"]
    assert ra["imagerouter.cost.actual_usd"] == pytest.approx(float(result.cost.actual_usd))
    assert ra["imagerouter.cost.estimated_usd"] == pytest.approx(float(result.cost.estimated_usd))

    assert len(attempts) == 3
    for span in attempts:
        assert span.parent is not None and span.parent.span_id == request.context.span_id
        assert span.context.trace_id == request.context.trace_id
        assert span.name == "generate_content gpt-image-2"
        a = attrs(span)
        assert a["gen_ai.provider.name"] == "openai" and a["gen_ai.request.model"] == "gpt-image-2"
        assert a["imagerouter.request_id"] == result.request_id
    table = [(attrs(a)["imagerouter.provider"], attrs(a)["imagerouter.rank"], attrs(a)["imagerouter.retry"],
              attrs(a)["imagerouter.outcome"], a.status.status_code) for a in attempts]
    assert table == [("openai", 0, 0, "error", StatusCode.ERROR), ("openai", 0, 1, "error", StatusCode.ERROR),
                     ("openai-backup", 1, 0, "success", StatusCode.OK)]
    failed, ok = attempts[0], attempts[2]
    assert attrs(failed)["error.type"] == "ProviderUnavailable"
    assert attrs(failed)["imagerouter.error.disposition"] == "retry"
    assert attrs(failed)["imagerouter.error.status_code"] == 503
    assert [dict(e.attributes or {})["exception.type"] for e in failed.events] == ["ProviderUnavailable"]
    assert attrs(ok)["gen_ai.response.id"] == result.provider_request_id
    assert attrs(ok)["imagerouter.cost.actual_usd"] > 0
    assert attrs(ok)["imagerouter.images"] == 2


async def test_a_failed_request_span_is_an_error_with_the_trail(
    sandbox: OpenAISandbox, sandbox2: OpenAISandbox, tp: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    sandbox.faults.push(Fault.server_error(500), times=None)
    sandbox2.faults.push(Fault.server_error(502), times=None)
    async with make_router(provider(sandbox), provider(sandbox2, "openai-backup"), max_retries=0,
                           tracer_provider=tp) as router:
        with pytest.raises(AllProvidersFailed):
            await router.agenerate("a cat")
    request, attempts = split(exporter.get_finished_spans())
    assert request.status.status_code is StatusCode.ERROR
    assert attrs(request)["error.type"] == "AllProvidersFailed"
    assert attrs(request)["imagerouter.outcome"] == "error"
    assert attrs(request)["imagerouter.attempts"] == 2
    assert [a.status.status_code for a in attempts] == [StatusCode.ERROR] * 2


async def test_no_secret_reaches_a_span(sandbox: OpenAISandbox, tp: TracerProvider,
                                        exporter: InMemorySpanExporter) -> None:
    wrong = OpenAIProvider(api_key="sk-wrong-key-0123456789", base_url=sandbox.base_url)
    async with make_router(wrong, tracer_provider=tp) as router:
        with pytest.raises(AuthenticationError):
            await router.agenerate("a cat", provider_options={"openai": {"user": "sk-proj-abcdefghijklmnop"}})
    spans = exporter.get_finished_spans()
    assert len(spans) == 2 and all(s.status.status_code is StatusCode.ERROR for s in spans)
    text = "".join(everything(s) for s in spans)
    assert "AuthenticationError" in text
    assert "sk-wrong-key-0123456789" not in text and "sk-proj-abcdefghijklmnop" not in text


async def test_prompts_are_recorded_only_when_switched_on(
    sandbox: OpenAISandbox, tp: TracerProvider, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_router(provider(sandbox), tracer_provider=tp) as router:
        await router.agenerate(PROMPT, negative_prompt="blurry, low quality")
    assert all(PROMPT not in everything(s) and "blurry" not in everything(s) for s in exporter.get_finished_spans())

    exporter.clear()
    async with make_router(provider(sandbox), tracer_provider=tp, record_prompts=True) as router:
        await router.agenerate(PROMPT, negative_prompt="blurry, low quality")
    request, attempts = split(exporter.get_finished_spans())
    assert attrs(request)["imagerouter.prompt"] == PROMPT
    assert attrs(request)["imagerouter.negative_prompt"] == "blurry, low quality"
    assert all(PROMPT not in everything(a) for a in attempts)  # once per request is enough

    exporter.clear()
    monkeypatch.setenv("IMAGEROUTER_OTEL_RECORD_PROMPTS", "1")
    async with make_router(provider(sandbox), tracer_provider=tp) as router:
        await router.agenerate(PROMPT)
    request, _ = split(exporter.get_finished_spans())
    assert attrs(request)["imagerouter.prompt"] == PROMPT


async def test_a_pinned_model_names_the_request_span(sandbox: OpenAISandbox, tp: TracerProvider,
                                                     exporter: InMemorySpanExporter) -> None:
    async with make_router(provider(sandbox), tracer_provider=tp) as router:
        await router.agenerate(ImageRequest(prompt="a cat", model="gpt-image-2"))
    request, _ = split(exporter.get_finished_spans())
    assert request.name == "generate_content gpt-image-2"
    assert attrs(request)["gen_ai.request.model"] == "gpt-image-2"


async def test_on_progress_gives_one_request_span_too(sandbox: OpenAISandbox, tp: TracerProvider,
                                                      exporter: InMemorySpanExporter) -> None:
    async with make_router(provider(sandbox), tracer_provider=tp) as router:
        await router.agenerate("a cat", on_progress=lambda event: None)
    split(exporter.get_finished_spans())


async def test_tracing_off_or_without_opentelemetry_is_a_no_op(
    sandbox: OpenAISandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not Tracing(False).enabled
    monkeypatch.setenv("IMAGEROUTER_OTEL", "0")
    assert not Tracing().enabled
    monkeypatch.delenv("IMAGEROUTER_OTEL")
    assert Tracing().enabled  # the global provider (a no-op one unless the app set one)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if the otel extra were not installed
    assert not Tracing().enabled
    async with make_router(provider(sandbox)) as router:
        assert not router._tracing.enabled
        result = await router.agenerate("a cat")
    assert result.provider == "openai"


async def test_spans_go_to_the_global_provider_once_the_app_sets_it(
    sandbox: OpenAISandbox, tp: TracerProvider, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry import trace

    async with make_router(provider(sandbox)) as router:
        await router.agenerate("a cat")  # no global provider yet: no spans, no cost
        assert exporter.get_finished_spans() == ()
        monkeypatch.setattr(trace, "get_tracer_provider", lambda: tp)  # the SDK lets a process set it once only
        await router.agenerate("a cat")
    _, attempts = split(exporter.get_finished_spans())
    assert len(attempts) == 1


def test_import_router_does_not_import_opentelemetry() -> None:
    code = "import router, sys; router.Router; router.AsyncRouter\nprint('opentelemetry' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("tracer_provider", [False, None], ids=["off", "global-no-op"])
def test_span_overhead_per_request_is_small(tracer_provider: Any) -> None:
    """The spans' share of the router's overhead budget (0.3 ms p50 per request); a loose bound."""
    tracing = Tracing(tracer_provider)
    request = ImageRequest(prompt="a cat", seed=1)
    from decimal import Decimal

    def one() -> None:
        with tracing.request(request, "balanced", "ir_x") as span:
            tracing.routed(span, 2)
            with tracing.attempt(provider="openai", provider_kind="openai", model="m", request_id="ir_x", rank=0,
                                 number=1, retry=0, estimated_usd=Decimal("0.01")):
                pass

    for _ in range(200):
        one()
    samples = []
    for _ in range(2000):
        t0 = time.perf_counter()
        one()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    assert samples[len(samples) // 2] < 100e-6


# --- logging ---------------------------------------------------------------------------


async def test_one_log_record_per_failed_attempt_and_per_request(
    sandbox: OpenAISandbox, sandbox2: OpenAISandbox, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox.faults.push(Fault.server_error(503), times=None)
    caplog.set_level(logging.INFO, logger="imagerouter")
    async with make_router(provider(sandbox), provider(sandbox2, "openai-backup"), max_retries=1) as router:
        result = await router.agenerate(PROMPT)
    records = [r for r in caplog.records if r.name == "imagerouter"]
    assert [(r.levelname, r.outcome, r.provider) for r in records] == [  # type: ignore[attr-defined]
        ("INFO", "error", "openai"), ("INFO", "error", "openai"), ("INFO", "success", "openai-backup")]
    for r in records:
        assert r.request_id == result.request_id and r.model == "gpt-image-2"  # type: ignore[attr-defined]
        assert isinstance(r.latency_s, float) and isinstance(r.cost_usd, str)  # type: ignore[attr-defined]
    assert records[0].error == "ProviderUnavailable" and records[1].retry == 1  # type: ignore[attr-defined]
    done = records[-1]
    assert done.cost_usd == str(result.cost.actual_usd) and done.attempts == 3  # type: ignore[attr-defined]
    assert done.policy == "balanced"  # type: ignore[attr-defined]
    assert all(PROMPT not in r.getMessage() and PROMPT not in json.dumps(r.__dict__, default=str) for r in records)


async def test_a_failed_request_is_logged_once(sandbox: OpenAISandbox, caplog: pytest.LogCaptureFixture) -> None:
    wrong = OpenAIProvider(api_key="sk-wrong-key-0123456789", base_url=sandbox.base_url)
    caplog.set_level(logging.INFO, logger="imagerouter")
    async with make_router(wrong, record_prompts=True) as router:
        with pytest.raises(AuthenticationError):
            await router.agenerate(PROMPT)
    last = caplog.records[-1]
    assert last.levelname == "INFO" and last.outcome == "error"  # type: ignore[attr-defined]
    assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING] == []  # no echo of the raised error
    assert last.error == "AuthenticationError" and last.prompt == PROMPT  # type: ignore[attr-defined]
    assert "sk-wrong-key-0123456789" not in caplog.text


def test_the_imagerouter_logger_redacts_secrets_whatever_the_handler() -> None:
    import router.router  # noqa: F401  (the router installs the filter)

    log = logging.getLogger("imagerouter")
    assert any(isinstance(f, RedactingFilter) for f in log.filters)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        log.info("calling with key %s and %s", "sk-live-abcdefghijklmnop", "Authorization: Bearer abcdefghijkl12345",
                 extra={"request_id": "ir_1", "detail": "api_key=r8_abcdefghijklmnopq", "cost_usd": "0.01"})
        try:
            raise RuntimeError("token=tok_abcdefghijklmnop failed")
        except RuntimeError:
            log.exception("boom")
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    text = stream.getvalue()
    for secret in ("sk-live-abcdefghijklmnop", "abcdefghijkl12345", "r8_abcdefghijklmnopq", "tok_abcdefghijklmnop"):
        assert secret not in text
    assert lines[0]["request_id"] == "ir_1" and lines[0]["cost_usd"] == "0.01" and lines[0]["level"] == "INFO"
    assert "[REDACTED]" in lines[0]["message"] and "[REDACTED]" in lines[0]["detail"]
    assert lines[1]["message"] == "boom" and "RuntimeError" in lines[1]["exception"]
