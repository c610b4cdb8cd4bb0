"""What every hosted-API adapter shares: API keys, HTTP status → error class, connection
errors, Retry-After, billing of failed paid work, and the one-image-per-call fan-out.

Adapters keep only what is vendor-specific (their request shapes, their error codes);
the mapping below is the router's one reading of an HTTP answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import os
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import SecretStr

from providers.base import Billing
from router.errors import (
    AuthenticationError,
    ImageRouterError,
    InsufficientCredits,
    InvalidRequestError,
    MalformedResponse,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from router.images import ImageDecodeError, adata_url, averify

if TYPE_CHECKING:
    from router.fetch import SafeFetcher

T = TypeVar("T")

# 408 Request Timeout and 409 Conflict are transient by HTTP's own definition (RFC 9110 §15.5.9, §15.5.10):
# retried like 429 and 5xx, for every provider.
RETRIED_4XX = frozenset({408, 409, 429})


class ApiKey:
    """A vendor key from an argument or an environment variable, held as a :class:`SecretStr`."""

    def __init__(self, value: str | SecretStr | None, env: str) -> None:
        raw = value if value is not None else os.environ.get(env)
        self.env = env
        self.secret: SecretStr | None = SecretStr(raw) if isinstance(raw, str) else raw

    def value(self) -> str:
        """The key itself (empty when none is set); only for the request's auth header."""
        return self.secret.get_secret_value() if self.secret is not None else ""

    def problem(self) -> str | None:
        """Why the provider cannot be called (no key), or None."""
        return None if self.value() else f"not configured: set {self.env}"


def known_models(vendor: str, models: Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    """``models`` as a tuple, after checking each is one the adapter knows (a typo fails at construction)."""
    unknown = sorted(set(models) - set(known))
    if unknown:
        raise ValueError(f"unknown {vendor} models {unknown}; use {', '.join(known)}")
    return tuple(models)


def retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    """The wait a 429/503 asks for, from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value:
        with contextlib.suppress(ValueError):
            return max(0.0, float(value) / 1000)
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds()) if when.tzinfo else None


def status_error(
    status: int,
    text: str,
    *,
    provider: str,
    code: str | None = None,
    request_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> ImageRouterError:
    """An HTTP error answer as the router's error class. ``text`` is the vendor's detail (no secrets).

    401/403 → AuthenticationError (fatal); 402 → InsufficientCredits; 408/409/429 → RateLimited and
    5xx → ProviderUnavailable (retried); any other 4xx → InvalidRequestError (this candidate fails,
    the next one is tried). Vendor codes that mean more (content policy, credits) are the adapter's
    to check first.
    """
    kw: dict[str, Any] = {"provider": provider, "status_code": status, "code": code, "request_id": request_id}
    if status in (401, 403):
        return AuthenticationError(f"HTTP {status}: the API key was refused", **kw)
    if status == 402:
        return InsufficientCredits(text, **kw)
    if status in RETRIED_4XX:
        return RateLimited(text, retry_after=retry_after_s(headers), **kw)
    if status >= 500:
        return ProviderUnavailable(text, **kw)
    if 400 <= status < 500:
        return InvalidRequestError(text, **kw)
    return MalformedResponse(f"unexpected HTTP {status}", **kw)


def connection_error(exc: BaseException, *, provider: str, request_id: str | None = None) -> ImageRouterError:
    """A transport failure (httpx or a vendor SDK's) as the router's error: a timeout or an unavailable host.

    Only the exception's class name is kept: transport messages can quote URLs and headers.
    """
    name = type(exc).__name__
    if "Timeout" in name:
        return ProviderTimeout("the request timed out", provider=provider, request_id=request_id)
    return ProviderUnavailable(f"could not connect ({name})", provider=provider, request_id=request_id)


# --- billing of paid work --------------------------------------------------------------


def charged(exc: ImageRouterError, billing: Billing | None) -> ImageRouterError:
    """``exc`` carrying what the vendor billed before it (None or $0: nothing). Returns ``exc``."""
    if billing is not None and billing.cost_usd > 0:
        exc.billed = billing if exc.billed is None else combine([exc.billed, billing])
    return exc


def combine(parts: Sequence[Billing]) -> Billing:
    """One bill from several of one provider (the calls of a fan-out): costs and quantities added."""
    first = parts[0]
    details: dict[str, Any] = {"calls": [p.details for p in parts]} if len(parts) > 1 else dict(first.details)
    return Billing(
        cost_usd=sum((p.cost_usd for p in parts), Decimal(0)),
        unit=first.unit,
        quantity=sum((p.quantity for p in parts), Decimal(0)),
        price_table_version=first.price_table_version,
        details=details,
    )


def billed_by(errors: Sequence[ImageRouterError]) -> list[Billing]:
    """The bills that failed calls carry."""
    return [e.billed for e in errors if e.billed is not None]


# --- paid outputs ------------------------------------------------------------------------


async def download_paid(
    fetcher: SafeFetcher,
    url: str,
    *,
    provider: str,
    request_id: str | None,
    deadline: float,
    attempts: int,
    backoff_s: float,
    fresh_url: Callable[[], Awaitable[str | None]] | None = None,
) -> bytes:
    """The bytes of an output the vendor has already billed. A failed download is tried again (``backoff_s``
    doubling, ``attempts`` tries at most, never past ``deadline`` on the loop's clock), asking ``fresh_url`` for
    a new URL between tries where the API gives one; the job itself is never run again.

    Raises MalformedResponse when the output is unusable whatever we do (not an image, a URL the fetcher
    refuses, over its byte cap), ProviderTimeout when time ran out mid-download, else ProviderUnavailable.
    The caller attaches the bill (:func:`charged`).
    """
    import httpx

    loop = asyncio.get_running_loop()
    failure = "no time left"
    tries = 0
    for attempt in range(attempts):
        if attempt:
            wait = backoff_s * 2 ** (attempt - 1)
            if loop.time() + wait >= deadline:
                break
            await asyncio.sleep(wait)
            if fresh_url is not None:
                url = await fresh_url() or url
        left = deadline - loop.time()
        if left <= 0:
            break
        tries += 1
        try:
            async with asyncio.timeout(left):
                return await fetcher.fetch(url)
        except TimeoutError:
            raise ProviderTimeout(
                "the output download did not finish within the call's time", provider=provider, request_id=request_id
            ) from None
        except ImageDecodeError as exc:
            raise MalformedResponse(
                f"unusable output: {exc.message}", provider=provider, request_id=request_id
            ) from None
        except (ProviderUnavailable, ProviderTimeout) as exc:  # transient: try it again
            failure = exc.message
        except (httpx.HTTPError, OSError) as exc:  # the connection dropped mid-download
            failure = f"connection failed ({type(exc).__name__})"
        except InvalidRequestError as exc:  # a URL the fetcher refuses, an oversized body: trying again won't help
            raise MalformedResponse(
                f"output not downloadable: {exc.message}", provider=provider, request_id=request_id
            ) from None
    raise ProviderUnavailable(
        f"output download failed {tries} time(s) ({failure}); it is paid for and was not generated again",
        provider=provider,
        request_id=request_id,
    )


async def output_image(
    data: bytes, *, provider: str, request_id: str | None = None, status_code: int | None = None
) -> tuple[str, int, int]:
    """MIME type, width and height of an image a vendor returned, after the one check every output passes
    (:func:`router.images.averify`: the format, byte and pixel caps user images have, the file whole, every
    pixel decoded once, in a worker thread). A decompression bomb, a truncated file, another format: a
    MalformedResponse naming what is wrong, so the router falls back; the caller attaches the bill
    (:func:`charged`)."""
    try:
        return await averify(data, what="response image")
    except ImageDecodeError as exc:
        raise MalformedResponse(
            f"unusable output: {exc.message}", provider=provider, status_code=status_code, request_id=request_id
        ) from None


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")


def looks_like_url(ref: str) -> bool:
    """Whether ``ref`` names a scheme (``https:``, ``file:``, ``data:``) or is scheme-relative (``//host``), so a
    vendor would fetch it as a URL; a repository id such as ``owner/model`` or ``owner/model:version`` does not."""
    return bool(_SCHEME.match(ref)) or ref.startswith("//")


async def vendor_fetched_url(url: str, fetcher: SafeFetcher, *, what: str, provider: str) -> str:
    """The URL to send a vendor that fetches ``url`` itself (a LoRA's weights): where ``url`` ends after its
    redirects, every hop checked like a download's (:meth:`SafeFetcher.follow`: http(s), every address global),
    its body never read. Raises UnsafeURLError (the request is at fault).

    The vendor resolves the name again on its own network; images are therefore downloaded here and sent as
    bytes instead (:func:`vendor_image`), and only what cannot be (weights of hundreds of MB) is sent by URL.
    """
    from router.fetch import UnsafeURLError

    try:
        return await fetcher.follow(url, what=what)
    except UnsafeURLError as exc:
        exc.provider = provider
        raise


async def vendor_image(url: str, fetcher: SafeFetcher, *, what: str, provider: str) -> str:
    """An image URL a vendor would fetch, downloaded here through the safe fetcher (every hop checked, the
    caps applied) and returned as a ``data:`` URL, so the vendor never fetches a URL it was handed.
    Raises UnsafeURLError for a URL that must not be fetched, ImageDecodeError for bytes that are no image."""
    from router.fetch import UnsafeURLError

    try:
        data = await fetcher.fetch(url, what=what)
    except UnsafeURLError as exc:
        exc.provider = provider
        raise
    return await adata_url(data)


# --- one image per call --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FanOut(Generic[T]):
    """The outcome of :func:`fan_out`: what the calls returned (index order) and how the others failed."""

    done: list[T]
    errors: list[ImageRouterError] = field(default_factory=list)

    def warnings(self, n: int) -> tuple[str, ...]:
        """A warning naming the missing images, when some calls failed."""
        if not self.errors:
            return ()
        kinds = ", ".join(sorted({e.kind for e in self.errors}))
        return (f"{len(self.done)} of {n} images returned: {len(self.errors)} call(s) failed ({kinds})",)


async def fan_out(n: int, call: Callable[[int], Coroutine[Any, Any, T]]) -> FanOut[T]:
    """Run ``call(0) … call(n-1)`` concurrently, for backends that make one image per call.

    Every call runs to its end (a call the vendor accepted may be billed: cancelling it would
    lose paid work). When at least one succeeds, the successes come back with the errors of the
    others; when all fail, the first error is raised carrying every failed call's bill.
    An exception that is not an :class:`ImageRouterError` (a bug) is raised as it is.
    """
    if n == 1:
        return FanOut([await call(0)])
    outcomes = await asyncio.gather(*(call(i) for i in range(n)), return_exceptions=True)
    done: list[T] = []
    errors: list[ImageRouterError] = []
    for outcome in outcomes:
        if isinstance(outcome, ImageRouterError):
            errors.append(outcome)
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            done.append(outcome)
    if not done:
        first = errors[0]
        bills = billed_by(errors)
        first.billed = combine(bills) if bills else None
        raise first
    return FanOut(done, errors)


def seed_for(seed: int | None, index: int, modulus: int) -> int | None:
    """The seed of the ``index``-th image of a fan-out: ``seed + index``, within the vendor's range."""
    return None if seed is None else (seed + index) % modulus
