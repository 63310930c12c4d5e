"""Webhooks: signed event notifications to merchants, delivered at least once from an outbox.

Standard Webhooks 1.0 (design/payments-api.md, "Webhooks"): each delivery carries
``webhook-id`` (the event id, stable across retries so receivers can dedupe),
``webhook-timestamp`` (unix seconds of this attempt) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256(secret, "id.timestamp.body")>``, several space-separated while a
secret is rotated). The secret is ``whsec_<base64 of 32 random bytes>``; the key bytes are
the base64-decoded part after the prefix.

Layers, from pure to I/O:

- signing: :func:`sign`, :func:`verify`, :func:`new_secret` (pure; the merchant web server
  uses :func:`verify` to check what it receives);
- the retry schedule: :class:`RetryPolicy` (pure; exponential backoff with jitter, capped,
  given up after a maximum age);
- persistence: the ORM rows (endpoints, events, outbox, delivery attempts) and
  :func:`enqueue_event`, which writes an event and its outbox rows in the *caller's*
  transaction, so an event exists if and only if the state change that caused it committed;
- delivery targets: :func:`address_allowed` (pure) and :func:`check_target` refuse URLs whose
  host is or resolves to a private, loopback, link-local or otherwise non-public address
  (SSRF), at registration and again, pinned to the checked address, at every delivery
  (DNS rebinding), unless the operator allows private targets
  (``Settings.webhook_allow_private``);
- delivery: :func:`deliver_due` sends what is due with an injected HTTP client and clock;
  :class:`WebhookWorker` runs it in a loop inside the application's lifespan;
- retention: :func:`prune_delivered` forgets delivered messages, their attempt log and
  fully delivered events after :data:`DELIVERY_RETENTION` (called by the periodic sweep).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import random
import re
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import httpx
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    delete,
    func,
    select,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from webpurse.settlement.db import Base, UtcDateTime
from webpurse.settlement.event_types import EVENT_TYPES as _EVENT_TYPES

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE = 300
"""Seconds a delivery's timestamp may differ from the receiver's clock (5 minutes)."""

log = structlog.get_logger(__name__)

HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"


# --------------------------------------------------------------------------- errors


class WebhookError(Exception):
    """Base class of webhook failures; ``code`` is the stable machine code."""

    code = "webhook_error"


class WebhookVerificationError(WebhookError):
    """A delivery that must not be trusted. Subclasses say why."""

    code = "webhook_verification_failed"


class MissingHeaderError(WebhookVerificationError):
    """A Standard Webhooks header is absent or empty."""

    code = "webhook_missing_header"


class InvalidTimestampError(WebhookVerificationError):
    """``webhook-timestamp`` is not an integer, or too far from now (stale or future)."""

    code = "webhook_invalid_timestamp"


class InvalidSignatureError(WebhookVerificationError):
    """No ``v1`` signature in ``webhook-signature`` matches the body under the secret."""

    code = "webhook_invalid_signature"


class TargetNotAllowedError(WebhookError):
    """A webhook URL whose host is, or resolves to, an address that is not public (SSRF)."""

    code = "webhook_url_not_allowed"


class InvalidSecretError(WebhookError, ValueError):
    """A secret that is not ``whsec_<base64>``."""

    code = "webhook_invalid_secret"


# --------------------------------------------------------------------------- signing


def new_secret(random_bytes: bytes | None = None) -> str:
    """A fresh endpoint secret, ``whsec_<base64 of 32 random bytes>``."""
    raw = random_bytes if random_bytes is not None else secrets.token_bytes(32)
    if len(raw) < 24:
        raise InvalidSecretError("a webhook secret needs at least 24 random bytes")
    return SECRET_PREFIX + base64.b64encode(raw).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key bytes of a ``whsec_…`` secret (the base64-decoded part after the prefix)."""
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidSecretError("a webhook secret starts with 'whsec_'")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidSecretError("a webhook secret is whsec_ followed by base64") from exc
    if not key:
        raise InvalidSecretError("a webhook secret must not be empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value ``v1,<base64 HMAC-SHA256>`` over ``id.timestamp.body``."""
    signed = msg_id.encode("utf-8") + b"." + str(int(timestamp)).encode("ascii") + b"." + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def _unix_seconds(now: datetime | float) -> float:
    if isinstance(now, datetime):
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        return now.timestamp()
    return float(now)


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    now: datetime | float,
    tolerance: int = DEFAULT_TOLERANCE,
) -> None:
    """Check a delivery: raise a :class:`WebhookVerificationError` subclass unless it is genuine.

    ``headers`` may use any letter case; ``body`` must be the raw bytes as received (parse
    JSON only after verifying). ``now`` is the receiver's clock (unix seconds or an aware
    datetime). A timestamp more than ``tolerance`` seconds away from ``now`` is refused so a
    captured delivery cannot be replayed later. Signatures compare in constant time; any one
    ``v1`` signature of the space-separated list may match (secret rotation).
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    msg_id = lowered.get(HEADER_ID, "").strip()
    timestamp_text = lowered.get(HEADER_TIMESTAMP, "").strip()
    signatures = lowered.get(HEADER_SIGNATURE, "").strip()
    for name, value in (
        (HEADER_ID, msg_id),
        (HEADER_TIMESTAMP, timestamp_text),
        (HEADER_SIGNATURE, signatures),
    ):
        if not value:
            raise MissingHeaderError(f"missing header {name}")
    if not re.fullmatch(r"[0-9]{1,12}", timestamp_text):
        raise InvalidTimestampError("webhook-timestamp is not unix seconds")
    timestamp = int(timestamp_text)
    skew = _unix_seconds(now) - timestamp
    if skew > tolerance:
        raise InvalidTimestampError(f"webhook-timestamp is {int(skew)} s old (stale)")
    if skew < -tolerance:
        raise InvalidTimestampError(f"webhook-timestamp is {int(-skew)} s in the future")
    expected = sign(secret, msg_id, timestamp, body).encode("ascii")
    matched = False
    for candidate in signatures.split():
        # No early exit: every candidate is compared, each in constant time.
        matched |= hmac.compare_digest(candidate.encode("utf-8", "replace"), expected)
    if not matched:
        raise InvalidSignatureError("no webhook-signature matches the body")


def signed_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers (plus content type) for one delivery attempt."""
    return {
        HEADER_ID: msg_id,
        HEADER_TIMESTAMP: str(int(timestamp)),
        HEADER_SIGNATURE: sign(secret, msg_id, timestamp, body),
        "content-type": "application/json",
    }


# --------------------------------------------------------------------------- retry schedule


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped per wait, given up after ``max_age``.

    The wait after the n-th failed attempt (n ≥ 1) is ``min(cap, base · factor^(n-1))``
    scaled by a jitter factor drawn uniformly from ``[1 - jitter, 1 + jitter]``. With the
    defaults the waits are about 5 s, 10 s, 20 s, … reaching the 6 h cap after 13 attempts,
    and a message still undelivered 3 days after its event is marked failed.
    """

    base: timedelta = timedelta(seconds=5)
    factor: float = 2.0
    cap: timedelta = timedelta(hours=6)
    max_age: timedelta = timedelta(days=3)
    jitter: float = 0.2

    def next_delay(self, failed_attempts: int, unit_random: float) -> timedelta:
        """The wait before the next attempt, after ``failed_attempts`` failures.

        ``unit_random`` is a number in [0, 1) from the injected randomness.
        """
        if failed_attempts < 1:
            raise ValueError("failed_attempts counts from 1")
        exponent = min(failed_attempts - 1, 64)
        raw = min(self.cap.total_seconds(), self.base.total_seconds() * self.factor**exponent)
        scale = 1.0 - self.jitter + 2.0 * self.jitter * unit_random
        return timedelta(seconds=raw * scale)

    def next_attempt_at(
        self, first_created_at: datetime, now: datetime, failed_attempts: int, unit_random: float
    ) -> datetime | None:
        """When to try again, or ``None`` when the message has run out of time (give up)."""
        at = now + self.next_delay(failed_attempts, unit_random)
        if at - first_created_at > self.max_age:
            return None
        return at


# --------------------------------------------------------------------------- delivery targets

Resolver = Callable[[str, int], list[str]]
"""``(host, port) -> addresses``: how a webhook host is resolved (injected in tests)."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_allowed(address: str) -> bool:
    """Whether settlement may send a webhook to ``address`` (an IP literal).

    Only globally routable unicast addresses: loopback, private (RFC 1918, ULA), link-local
    (169.254.0.0/16 holds cloud metadata services), carrier-grade NAT, unspecified, reserved,
    documentation and multicast addresses are refused, also when wrapped in IPv6
    (IPv4-mapped, 6to4, NAT64). An unparsable address is refused.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (an IP literal resolves to itself); OSError if none."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _host_and_port(url: str) -> tuple[str, int]:
    parsed = httpx.URL(url)
    return parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80)


def check_target(url: str, resolver: Resolver = resolve_host) -> list[str]:
    """The addresses ``url``'s host resolves to, all of them public.

    Raises :class:`TargetNotAllowedError` if any is not (a name that resolves to a public
    and a private address is refused: the client could pick either), and ``OSError`` if the
    name does not resolve.
    """
    host, port = _host_and_port(url)
    addresses = resolver(host, port)
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    refused = [address for address in addresses if not address_allowed(address)]
    if refused:
        raise TargetNotAllowedError(
            f"{host} resolves to {refused[0]}, which is not a public address"
            if refused[0] != host
            else f"{host} is not a public address"
        )
    return addresses


# --------------------------------------------------------------------------- event types

_RESOURCES = ("payment", "refund", "load")
EVENT_TYPE_RE = re.compile(r"(payment|refund|load|float)\.[a-z][a-z_]{0,40}")
EVENT_FILTER_RE = re.compile(r"\*|(payment|refund|load|float)\.(\*|[a-z][a-z_]{0,40})")

EVENT_TYPES: tuple[str, ...] = tuple(sorted(_EVENT_TYPES))
"""The event types settlement emits today (others of the same families may be added)."""


def event_matches(filters: list[str], event_type: str) -> bool:
    """Whether an endpoint subscribed to ``filters`` (``*``, ``payment.*``, exact) wants it."""
    family = event_type.split(".", 1)[0]
    return any(f in ("*", event_type, f"{family}.*") for f in filters)


def event_body(
    event_id: str, event_type: str, created_at: datetime, data: Mapping[str, Any]
) -> bytes:
    """The JSON body every delivery of an event carries, byte for byte.

    ``data`` becomes the event's ``data`` member; a ``data`` without an ``object`` member
    that is itself an object (e.g. a bare Payment, whose ``object`` is ``"payment"``) is
    wrapped as ``{"object": data}``, so the body is always ``{id, type, created_at,
    data: {object: …}}``.
    """
    wrapped = dict(data) if isinstance(data.get("object"), dict) else {"object": dict(data)}
    document = {
        "id": event_id,
        "type": event_type,
        "created_at": _iso(created_at),
        "data": wrapped,
    }
    return json.dumps(document, separators=(",", ":"), default=_json_default).encode("utf-8")


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, bytes):
        return value.hex().upper()
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):
        return isoformat()
    raise TypeError(f"cannot put {type(value).__name__} into a webhook event")


# --------------------------------------------------------------------------- secrets at rest


class SecretBox:
    """Encrypts endpoint secrets at rest with AES-256-GCM (the endpoint id as associated data).

    The key is derived from the settlement key-encryption key (``WEBPURSE_KEK``) with HKDF,
    so a database dump alone reveals no secret. The API shows a secret once, at creation.
    """

    _INFO = b"webpurse webhook endpoint secrets v1"

    def __init__(self, kek: bytes) -> None:
        if len(kek) < 16:
            raise ValueError("the key-encryption key must have at least 16 bytes")
        self._key = HKDF(algorithm=SHA256(), length=32, salt=None, info=self._INFO).derive(kek)

    def seal(self, endpoint_id: str, secret: str) -> str:
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(self._key).encrypt(nonce, secret.encode("ascii"), endpoint_id.encode())
        return "v1:" + base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, endpoint_id: str, sealed: str) -> str:
        if not sealed.startswith("v1:"):
            raise WebhookError("unknown webhook secret encoding")
        blob = base64.b64decode(sealed[3:])
        plain = AESGCM(self._key).decrypt(blob[:12], blob[12:], endpoint_id.encode())
        return plain.decode("ascii")


# --------------------------------------------------------------------------- persistence


class MessageStatus(StrEnum):
    """Where one (event, endpoint) delivery stands."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(moment: datetime) -> datetime:
    """Datetimes read back from SQLite are naive; everything stored here is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class WebhookEndpoint(Base):
    """A merchant's receiving URL and the event types it subscribed to."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    merchant_id: Mapped[str] = mapped_column(ForeignKey("merchants.id"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]] = mapped_column(JSON)
    description: Mapped[str] = mapped_column(String(200), default="")
    secret_sealed: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)


class WebhookEvent(Base):
    """An event as it is delivered: its JSON body is fixed at creation, byte for byte."""

    __tablename__ = "webhook_events"
    __table_args__ = (Index("ix_webhook_events_merchant_created", "merchant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    merchant_id: Mapped[str] = mapped_column(ForeignKey("merchants.id"))
    type: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    body: Mapped[str] = mapped_column(Text)


class WebhookMessage(Base):
    """The outbox: one row per (event, endpoint), pending until delivered or given up."""

    __tablename__ = "webhook_messages"
    __table_args__ = (
        UniqueConstraint("event_id", "endpoint_id", name="uq_webhook_messages_event_endpoint"),
        Index("ix_webhook_messages_due", "status", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id"), index=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=MessageStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    window_started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(String(500), default=None)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class WebhookAttempt(Base):
    """The delivery log: one row per HTTP attempt, kept for the merchant to inspect."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("webhook_messages.id"), index=True)
    attempted_at: Mapped[datetime] = mapped_column(UtcDateTime())
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(String(500), default=None)
    duration_ms: Mapped[int] = mapped_column(Integer)
    succeeded: Mapped[bool] = mapped_column(Boolean)


def enqueue_event(
    session: Session,
    merchant_id: str,
    event_type: str,
    data: Mapping[str, Any],
    *,
    now: datetime | None = None,
) -> str:
    """Record an event and queue one delivery per subscribed endpoint; return ``evt_…``.

    Runs in the caller's transaction (it flushes, never commits): the event exists exactly
    when the state change that caused it commits. ``data`` is the event's ``data`` member
    (see :func:`event_body`), e.g. ``{"object": payment_json}`` or the bare payment JSON.
    """
    if not EVENT_TYPE_RE.fullmatch(event_type):
        raise WebhookError(f"unknown event type {event_type!r}")
    created = _aware(now) if now is not None else _utcnow()
    event_id = new_id("evt")
    body = event_body(event_id, event_type, created, data)
    session.add(
        WebhookEvent(
            id=event_id,
            merchant_id=merchant_id,
            type=event_type,
            created_at=created,
            body=body.decode("utf-8"),
        )
    )
    endpoints = session.scalars(
        select(WebhookEndpoint).where(
            WebhookEndpoint.merchant_id == merchant_id, WebhookEndpoint.deleted_at.is_(None)
        )
    ).all()
    for endpoint in endpoints:
        if event_matches(list(endpoint.events), event_type):
            session.add(new_message(event_id, endpoint.id, created))
    session.flush()
    return event_id


def new_message(event_id: str, endpoint_id: str, now: datetime) -> WebhookMessage:
    return WebhookMessage(
        id=new_id("msg"),
        event_id=event_id,
        endpoint_id=endpoint_id,
        status=MessageStatus.PENDING.value,
        attempts=0,
        window_started_at=now,
        next_attempt_at=now,
        updated_at=now,
    )


DELIVERY_RETENTION = timedelta(days=30)
"""How long a delivered message and its attempt log are kept (docs/webhooks.md)."""
PRUNE_BATCH = 5000
"""At most this many delivered messages are pruned per sweep, so one sweep stays short."""


def prune_delivered(
    session: Session,
    now: datetime,
    *,
    retention: timedelta = DELIVERY_RETENTION,
    batch: int = PRUNE_BATCH,
) -> int:
    """Forget deliveries that succeeded more than ``retention`` ago; return how many.

    Runs in the caller's transaction (the periodic expiry sweep). Deletes the delivered
    messages' attempt log and the messages, and then each event older than ``retention``
    whose every delivery was one of them. Undelivered, failed and canceled deliveries and
    their events stay (the merchant may still list and redeliver them), and so do events
    that never had an endpoint (listed for polling).
    """
    cutoff = _aware(now) - retention
    doomed = list(
        session.scalars(
            select(WebhookMessage.id)
            .where(
                WebhookMessage.status == MessageStatus.SUCCEEDED.value,
                WebhookMessage.delivered_at < cutoff,
            )
            .order_by(WebhookMessage.delivered_at, WebhookMessage.id)
            .limit(batch)
        )
    )
    if not doomed:
        return 0
    touched = set(
        session.scalars(
            select(WebhookMessage.event_id).where(WebhookMessage.id.in_(doomed)).distinct()
        )
    )
    session.execute(delete(WebhookAttempt).where(WebhookAttempt.message_id.in_(doomed)))
    session.execute(delete(WebhookMessage).where(WebhookMessage.id.in_(doomed)))
    remaining = set(
        session.scalars(
            select(WebhookMessage.event_id).where(WebhookMessage.event_id.in_(touched)).distinct()
        )
    )
    emptied = sorted(touched - remaining)
    if emptied:
        session.execute(
            delete(WebhookEvent).where(
                WebhookEvent.id.in_(emptied), WebhookEvent.created_at < cutoff
            )
        )
    log.info("webhooks.pruned", messages=len(doomed), events=len(emptied))
    return len(doomed)


# --------------------------------------------------------------------------- delivery


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
        taken: dict[str, int] = {}
        for message in session.scalars(query).all():
            if per_endpoint is not None:
                in_flight = busy.get(message.endpoint_id, 0) + taken.get(message.endpoint_id, 0)
                if in_flight >= per_endpoint:
                    continue  # stays due: claimed once this endpoint has room again
                taken[message.endpoint_id] = taken.get(message.endpoint_id, 0) + 1
            endpoint = session.get(WebhookEndpoint, message.endpoint_id)
            event = session.get(WebhookEvent, message.event_id)
            if endpoint is None or event is None or endpoint.deleted_at is not None:
                message.status = MessageStatus.CANCELED.value
                message.next_attempt_at = None
                message.updated_at = now
                canceled += 1
                continue
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
                continue
            message.next_attempt_at = now + lease
            jobs.append(
                _Job(
                    message_id=message.id,
                    endpoint_id=endpoint.id,
                    event_id=event.id,
                    url=endpoint.url,
                    secret=secret,
                    body=event.body.encode("utf-8"),
                )
            )
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


class WebhookWorker:
    """Delivers due messages continuously while the app serves (its lifespan).

    Never a pass that waits for its slowest request: each claimed message is sent by its own
    task, which records its outcome itself, and the loop claims more whenever a task ends
    (or every ``interval`` seconds). Each attempt has a total deadline (``deadline``
    seconds, then it is a failure retried per the policy); at most ``per_endpoint`` messages
    of one endpoint are in flight at once and at most ``max_in_flight`` in all. So an
    endpoint that answers slowly, or one byte at a time, delays only its own messages: the
    other endpoints keep the rest of the slots (issue 19, finding 3).
    """

    def __init__(
        self,
        session_factory: SessionMaker,
        secret_box: SecretBox,
        *,
        clock: Callable[[], datetime] = _utcnow,
        interval: float = 1.0,
        policy: RetryPolicy = DEFAULT_POLICY,
        http_client: httpx.AsyncClient | None = None,
        allow_private: bool = False,
        deadline: float = 10.0,
        per_endpoint: int = 4,
        max_in_flight: int = 256,
        lease: timedelta = timedelta(minutes=2),
        resolver: Resolver = resolve_host,
    ) -> None:
        if lease.total_seconds() <= deadline:
            raise ValueError("the lease must outlast an attempt's deadline")
        self._session_factory = session_factory
        self._allow_private = allow_private
        self._secret_box = secret_box
        self._clock = clock
        self._interval = interval
        self._policy = policy
        self._client = http_client
        self._deadline = deadline
        self._per_endpoint = per_endpoint
        self._max_in_flight = max_in_flight
        self._lease = lease
        self._resolver = resolver
        self._rng = random.Random()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._busy: dict[str, int] = {}

    async def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="webhook-worker")

    async def stop(self) -> None:
        """Stop claiming; abandon sends in flight (their lease makes them due again)."""
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    def in_flight(self) -> dict[str, int]:
        """Messages being sent now, per endpoint id."""
        return dict(self._busy)

    async def _run(self) -> None:
        owns_client = self._client is None
        client = self._client or httpx.AsyncClient(follow_redirects=False)
        try:
            while not self._stop.is_set():
                self._wake.clear()
                room = self._max_in_flight - len(self._sending)
                full = False
                if room > 0:
                    try:
                        full = await self._claim_and_send(client, room)
                    except Exception:  # the loop must survive a bad pass (DB restart, ...)
                        log.exception("webhooks.pass_failed")
                if full:  # every slot offered was taken: more may be due right away
                    continue
                with contextlib.suppress(TimeoutError):
                    # a send that ends frees a slot (and its endpoint) right away
                    await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
        finally:
            for task in list(self._sending):
                task.cancel()
            if self._sending:
                await asyncio.gather(*self._sending, return_exceptions=True)
            if owns_client:
                await client.aclose()

    async def _claim_and_send(self, client: httpx.AsyncClient, room: int) -> bool:
        now = _aware(self._clock())
        jobs, canceled = await asyncio.to_thread(
            _claim_due,
            self._session_factory,
            now,
            self._secret_box,
            room,
            self._lease,
            dict(self._busy),
            self._per_endpoint,
        )
        for job in jobs:
            self._busy[job.endpoint_id] = self._busy.get(job.endpoint_id, 0) + 1
            task = asyncio.create_task(self._deliver(client, job, now))
            self._sending.add(task)
            task.add_done_callback(self._sent)
        return len(jobs) + canceled >= room

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._wake.set()

    async def _deliver(self, client: httpx.AsyncClient, job: _Job, now: datetime) -> None:
        try:
            outcome = await _send(
                client, job, now, self._deadline, self._allow_private, self._resolver
            )
            await asyncio.to_thread(
                _record,
                self._session_factory,
                [outcome],
                _aware(self._clock()),
                self._policy,
                self._rng,
            )
        except asyncio.CancelledError:
            raise
        except Exception:  # recorded next time: the lease makes the message due again
            log.exception("webhooks.delivery_failed", message_id=job.message_id)
        finally:
            left = self._busy.get(job.endpoint_id, 1) - 1
            if left > 0:
                self._busy[job.endpoint_id] = left
            else:
                self._busy.pop(job.endpoint_id, None)
