"""Delivery: claim due outbox messages (``SKIP LOCKED``), send them signed, record each attempt."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog
from cryptography.exceptions import InvalidTag
from sqlalchemy import (
    Select,
    func,
    select,
)
from sqlalchemy.orm import Session

from webpurse.settlement.webhooks.errors import TargetNotAllowedError, WebhookError
from webpurse.settlement.webhooks.outbox import event_bytes
from webpurse.settlement.webhooks.retry import RetryPolicy
from webpurse.settlement.webhooks.secret_box import SecretBox
from webpurse.settlement.webhooks.signing import signed_headers
from webpurse.settlement.webhooks.tables import (
    MessageStatus,
    WebhookAttempt,
    WebhookEndpoint,
    WebhookEvent,
    WebhookMessage,
    _aware,
)
from webpurse.settlement.webhooks.targets import Resolver, check_target, resolve_host

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _Job:
    message_id: str
    endpoint_id: str
    event_id: str
    url: str
    secret: str
    body: bytes


@dataclass(frozen=True, slots=True)
class _Outcome:
    job: _Job
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """What one :func:`deliver_due` pass did."""

    attempted: int = 0
    succeeded: int = 0
    retrying: int = 0
    failed: int = 0
    canceled: int = 0


DEFAULT_POLICY = RetryPolicy()
SessionMaker = Callable[[], Session]


async def deliver_due(
    session_factory: SessionMaker,
    http_client: httpx.AsyncClient,
    now: datetime,
    *,
    secret_box: SecretBox,
    policy: RetryPolicy = DEFAULT_POLICY,
    rng: random.Random | None = None,
    limit: int = 50,
    timeout: float = 10.0,
    lease: timedelta = timedelta(minutes=2),
    allow_private: bool = False,
    resolver: Resolver = resolve_host,
    per_endpoint: int | None = None,
) -> DeliveryReport:
    """Deliver every outbox message due at ``now``; record each attempt; schedule retries.

    One pass, for tests and tools (the app runs :class:`WebhookWorker`, which never waits
    for a whole pass). ``timeout`` is each attempt's total deadline, from the first byte sent
    to the response's status line, so the pass ends within about ``timeout`` however slowly
    an endpoint answers; ``per_endpoint`` bounds how many messages of one endpoint it claims.

    At least once: a message is claimed by moving its ``next_attempt_at`` one ``lease``
    ahead (rows locked with ``SKIP LOCKED`` on PostgreSQL, so several workers share the
    outbox), then sent; if the worker dies before recording the outcome, the message is due
    again when the lease runs out. A 2xx answer delivers it; anything else (another status,
    a timeout, a refused connection) is logged and retried per ``policy``, and marked
    ``failed`` once the policy gives up. Messages to deleted endpoints are canceled.

    Unless ``allow_private``, each attempt first resolves the endpoint's host with
    ``resolver`` and refuses to send if any address is not public (:func:`check_target`):
    the refusal is the attempt's error (``last_error``), retried like any failure, since a
    name that once resolved to a public address may since have been pointed at an internal
    one (DNS rebinding). The request then goes to the checked address itself (``Host``
    header and TLS server name stay the URL's host), so no second lookup can change it.
    """
    now = _aware(now)
    rng = rng if rng is not None else random.Random()
    # The database work runs on a worker thread: the event loop keeps serving requests
    # while a transaction waits for a lock.
    jobs, canceled = await asyncio.to_thread(
        _claim_due, session_factory, now, secret_box, limit, lease, {}, per_endpoint
    )
    if not jobs:
        return DeliveryReport(canceled=canceled)
    outcomes = await asyncio.gather(
        *(_send(http_client, job, now, timeout, allow_private, resolver) for job in jobs)
    )
    report = await asyncio.to_thread(_record, session_factory, outcomes, now, policy, rng)
    return dataclasses.replace(report, canceled=canceled)


def _record(
    session_factory: SessionMaker,
    outcomes: list[_Outcome],
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random,
) -> DeliveryReport:
    """Log each attempt; mark delivered, schedule the retry, or give up."""
    succeeded = retrying = failed = 0
    with session_factory() as session, session.begin():
        for outcome in outcomes:
            message = session.get(WebhookMessage, outcome.job.message_id)
            if message is None or message.status != MessageStatus.PENDING.value:
                continue
            session.add(
                WebhookAttempt(
                    message_id=message.id,
                    attempted_at=now,
                    status_code=outcome.status_code,
                    error=outcome.error,
                    duration_ms=outcome.duration_ms,
                    succeeded=outcome.succeeded,
                )
            )
            message.attempts += 1
            message.last_status_code = outcome.status_code
            message.last_error = outcome.error
            message.updated_at = now
            if outcome.succeeded:
                message.status = MessageStatus.SUCCEEDED.value
                message.delivered_at = now
                message.next_attempt_at = None
                succeeded += 1
                continue
            retry_at = policy.next_attempt_at(
                _aware(message.window_started_at), now, message.attempts, rng.random()
            )
            if retry_at is None:
                message.status = MessageStatus.FAILED.value
                message.next_attempt_at = None
                failed += 1
                log.warning("webhooks.given_up", message_id=message.id, event_id=message.event_id)
            else:
                message.next_attempt_at = retry_at
                retrying += 1
    return DeliveryReport(
        attempted=len(outcomes),
        succeeded=succeeded,
        retrying=retrying,
        failed=failed,
    )


def _due_query(
    session: Session,
    now: datetime,
    limit: int,
    busy: Mapping[str, int],
    per_endpoint: int | None,
) -> Select[WebhookMessage]:
    """The due messages, oldest first, at most ``per_endpoint`` per endpoint not full.

    On PostgreSQL the rows are locked ``SKIP LOCKED``: several workers share the outbox.
    """
    due = (
        WebhookMessage.status == MessageStatus.PENDING.value,
        WebhookMessage.next_attempt_at <= now,
    )
    query = select(WebhookMessage)
    if per_endpoint is None:
        query = query.where(*due)
    else:
        full = [endpoint for endpoint, n in busy.items() if n >= per_endpoint]
        ranked = (
            select(
                WebhookMessage.id,
                func.row_number()
                .over(
                    partition_by=WebhookMessage.endpoint_id,
                    order_by=(WebhookMessage.next_attempt_at, WebhookMessage.id),
                )
                .label("rank"),
            )
            .where(*due, WebhookMessage.endpoint_id.not_in(full))
            .subquery()
        )
        first = select(ranked.c.id).where(ranked.c.rank <= per_endpoint)
        query = query.where(*due, WebhookMessage.id.in_(first))
    query = query.order_by(WebhookMessage.next_attempt_at, WebhookMessage.id).limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return query


def _claim_one(
    session: Session,
    message: WebhookMessage,
    now: datetime,
    secret_box: SecretBox,
    lease: timedelta,
) -> _Job | MessageStatus:
    """Lease one due message for sending: its job, or the status it ended in instead.

    A message whose endpoint or event is gone is canceled; one whose endpoint's secret
    cannot be opened fails.
    """
    endpoint = session.get(WebhookEndpoint, message.endpoint_id)
    event = session.get(WebhookEvent, message.event_id)
    if endpoint is None or event is None or endpoint.deleted_at is not None:
        message.status = MessageStatus.CANCELED.value
        message.next_attempt_at = None
        message.updated_at = now
        return MessageStatus.CANCELED
    try:
        secret = secret_box.open(endpoint.id, endpoint.secret_sealed)
    except (WebhookError, InvalidTag, ValueError):
        # One endpoint whose secret cannot be opened (another KEK, a damaged row)
        # must not stall every merchant's deliveries: fail this message, loudly.
        log.error("webhooks.secret_unreadable", endpoint=endpoint.id, message=message.id)
        message.status = MessageStatus.FAILED.value
        message.last_error = "endpoint secret cannot be opened"
        message.next_attempt_at = None
        message.updated_at = now
        return MessageStatus.FAILED
    message.next_attempt_at = now + lease
    return _Job(
        message_id=message.id,
        endpoint_id=endpoint.id,
        event_id=event.id,
        url=endpoint.url,
        secret=secret,
        body=event_bytes(session, event),
    )


def _claim_due(
    session_factory: SessionMaker,
    now: datetime,
    secret_box: SecretBox,
    limit: int,
    lease: timedelta,
    busy: Mapping[str, int] | None = None,
    per_endpoint: int | None = None,
) -> tuple[list[_Job], int]:
    """Claim up to ``limit`` due messages, at most ``per_endpoint`` per endpoint in flight.

    ``busy`` counts the messages of each endpoint this worker is still sending: an endpoint
    at ``per_endpoint`` gets nothing more, so a slow one holds at most that many of the
    worker's slots and the rest go to other endpoints' messages (issue 19, finding 3).
    """
    busy = busy or {}
    jobs: list[_Job] = []
    canceled = 0
    with session_factory() as session, session.begin():
        query = _due_query(session, now, limit, busy, per_endpoint)
        taken: dict[str, int] = {}
        for message in session.scalars(query).all():
            if per_endpoint is not None:
                in_flight = busy.get(message.endpoint_id, 0) + taken.get(message.endpoint_id, 0)
                if in_flight >= per_endpoint:
                    continue  # stays due: claimed once this endpoint has room again
                taken[message.endpoint_id] = taken.get(message.endpoint_id, 0) + 1
            claimed = _claim_one(session, message, now, secret_box, lease)
            if isinstance(claimed, _Job):
                jobs.append(claimed)
            elif claimed is MessageStatus.CANCELED:
                canceled += 1
    return jobs, canceled


async def _pinned(
    job: _Job, headers: dict[str, str], resolver: Resolver
) -> tuple[httpx.URL, dict[str, Any]]:
    """The URL to send to, pinned to a checked public address, and the request extensions.

    Raises :class:`TargetNotAllowedError` or ``OSError`` (the name does not resolve).
    """
    url = httpx.URL(job.url)
    addresses = await asyncio.to_thread(check_target, job.url, resolver)
    headers["host"] = url.netloc.decode("ascii")
    extensions: dict[str, Any] = {}
    if url.scheme == "https":
        extensions["sni_hostname"] = url.host  # the certificate is checked against the name
    return url.copy_with(host=addresses[0]), extensions


async def _send(
    client: httpx.AsyncClient,
    job: _Job,
    now: datetime,
    timeout: float,
    allow_private: bool = False,
    resolver: Resolver = resolve_host,
) -> _Outcome:
    headers = signed_headers(job.secret, job.event_id, int(now.timestamp()), job.body)
    headers["user-agent"] = "webpurse-webhooks/1"
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    url: httpx.URL | str = job.url
    extensions: dict[str, Any] = {}
    if not allow_private:
        try:
            url, extensions = await _pinned(job, headers, resolver)
        except TargetNotAllowedError as exc:
            log.warning("webhooks.target_refused", message_id=job.message_id, detail=str(exc))
            error = f"{TargetNotAllowedError.code}: {exc}"[:500]
        except Exception as exc:  # one bad URL must not fail the whole pass
            error = f"cannot resolve the endpoint's host: {type(exc).__name__}: {exc}"[:500]
        if error is not None:
            duration_ms = int((time.monotonic() - started) * 1000)
            return _Outcome(job=job, status_code=None, error=error, duration_ms=duration_ms)
    try:
        # httpx's timeout bounds each read and write; an endpoint that sends its headers one
        # byte at a time never trips it. The attempt as a whole gets ``timeout`` seconds.
        async with asyncio.timeout(timeout):
            async with client.stream(
                "POST",
                url,
                content=job.body,
                headers=headers,
                timeout=timeout,
                extensions=extensions or None,
            ) as response:
                status = response.status_code
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
    except TimeoutError:
        status = None
        error = f"deadline: no complete answer within {timeout:g} s"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    duration_ms = int((time.monotonic() - started) * 1000)
    return _Outcome(job=job, status_code=status, error=error, duration_ms=duration_ms)
