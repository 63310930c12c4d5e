"""HTTP routes of webhooks: endpoints (register, list, delete) and events (list, get, redeliver).

A merchant key sees only its own endpoints and events (another merchant's ids answer 404).
An endpoint's secret is returned once, by the POST that creates it; afterwards it exists
only sealed in the database (see :class:`webpurse.settlement.webhooks.SecretBox`).
A URL whose host is or resolves to a non-public address is refused (422
``webhook_url_not_allowed``) unless ``Settings.webhook_allow_private``; delivery checks again.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
import structlog
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from webpurse.settlement.auth import MerchantPrincipal
from webpurse.settlement.db import for_update
from webpurse.settlement.models import Merchant, Payment
from webpurse.settlement.problems import PROBLEM_JSON, ApiError, bad_request, not_found
from webpurse.settlement.schemas import RequestBody
from webpurse.settlement.security import resolve_kek
from webpurse.settlement.sessions import get_session
from webpurse.settlement.settings import Clock, Settings
from webpurse.settlement.webhooks import (
    EVENT_FILTER_RE,
    EVENT_TYPE_RE,
    MessageStatus,
    SecretBox,
    TargetNotAllowedError,
    WebhookAttempt,
    WebhookEndpoint,
    WebhookEvent,
    WebhookMessage,
    WebhookWorker,
    check_target,
    event_bytes,
    event_matches,
    new_id,
    new_message,
    new_secret,
)

router = APIRouter(prefix="/v1", tags=["webhooks"])
log = structlog.get_logger(__name__)

DbSession = Annotated[Session, Depends(get_session)]
_PROBLEM = {"content": {PROBLEM_JSON: {}}, "description": "problem details (RFC 9457)"}
PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: _PROBLEM for status in (400, 401, 403, 404, 422)
}
MAX_ENDPOINTS_PER_MERCHANT = 16


def get_secret_box(request: Request) -> SecretBox:
    """The app's :class:`SecretBox`, keyed from the settlement KEK (made on first use)."""
    box: SecretBox | None = getattr(request.app.state, "webhook_secret_box", None)
    if box is None:
        box = secret_box_for(request.app.state.settlement.settings)
        request.app.state.webhook_secret_box = box
    return box


def secret_box_for(settings: Settings) -> SecretBox:
    """The webhook secret box of a settlement server (key derived from its KEK)."""
    return SecretBox(resolve_kek(settings))


Box = Annotated[SecretBox, Depends(get_secret_box)]


def _clock(request: Request) -> dt.datetime:
    clock: Clock = request.app.state.settlement.clock
    return clock()


Now = Annotated[dt.datetime, Depends(_clock)]


class EndpointCreate(RequestBody):
    """``POST /v1/webhook_endpoints``: where to send which events."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2048, description="http(s) URL that receives POSTed events")
    events: list[str] = Field(
        min_length=1,
        max_length=50,
        description="event types: exact (payment.succeeded), a family (payment.*) or *",
    )
    description: str = Field(default="", max_length=200)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an absolute http or https URL")
        if parts.username or parts.password:
            raise ValueError("url must not carry credentials")
        try:
            parts.port  # noqa: B018 - raises ValueError when out of range
            httpx.URL(value).host  # noqa: B018 - delivery sends to what httpx makes of it
        except (ValueError, httpx.InvalidURL) as exc:
            raise ValueError(f"url is not a valid http(s) URL: {exc}") from None
        return value

    @field_validator("events")
    @classmethod
    def _check_events(cls, value: list[str]) -> list[str]:
        for item in value:
            if not EVENT_FILTER_RE.fullmatch(item):
                raise ValueError(f"unknown event type {item!r} (e.g. payment.succeeded, load.*, *)")
        return sorted(set(value))


class EndpointOut(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: str
    created_at: dt.datetime


class EndpointCreated(EndpointOut):
    secret: str = Field(description="whsec_…: shown only in this response; keep it safe")


class EndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EndpointOut]
    has_more: bool = False


class Deleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    deleted: bool = True


class AttemptOut(BaseModel):
    attempted_at: dt.datetime
    status_code: int | None
    error: str | None
    duration_ms: int
    succeeded: bool


class DeliveryOut(BaseModel):
    endpoint: str
    url: str | None
    status: str
    attempts: int
    next_attempt_at: dt.datetime | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: dt.datetime | None
    log: list[AttemptOut] | None = None


class EventOut(BaseModel):
    id: str
    object: Literal["event"] = "event"
    type: str
    created_at: dt.datetime
    data: dict[str, Any]
    deliveries: list[DeliveryOut]


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventOut]
    has_more: bool


def _endpoint_out(row: WebhookEndpoint) -> EndpointOut:
    return EndpointOut(
        id=row.id,
        url=row.url,
        events=list(row.events),
        description=row.description,
        created_at=row.created_at,
    )


def _own_endpoint(session: Session, merchant_id: str, endpoint_id: str) -> WebhookEndpoint:
    row = session.get(WebhookEndpoint, endpoint_id)
    if row is None or row.merchant_id != merchant_id or row.deleted_at is not None:
        raise not_found("webhook endpoint", "id")
    return row


def _own_event(session: Session, merchant_id: str, event_id: str) -> WebhookEvent:
    row = session.get(WebhookEvent, event_id)
    if row is None or row.merchant_id != merchant_id:
        raise not_found("event", "id")
    return row


def _deliveries(
    session: Session, event_ids: Sequence[str], *, with_log: bool
) -> dict[str, list[DeliveryOut]]:
    """Each event's deliveries, for any number of events in one query (two with the log)."""
    rows = session.execute(
        select(WebhookMessage, WebhookEndpoint)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookMessage.endpoint_id)
        .where(WebhookMessage.event_id.in_(event_ids))
        .order_by(WebhookMessage.event_id, WebhookMessage.endpoint_id)
    ).all()
    logs: dict[str, list[AttemptOut]] = {}
    if with_log and rows:
        for a in session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.message_id.in_([message.id for message, _ in rows]))
            .order_by(WebhookAttempt.id)
        ):
            logs.setdefault(a.message_id, []).append(
                AttemptOut(
                    attempted_at=a.attempted_at,
                    status_code=a.status_code,
                    error=a.error,
                    duration_ms=a.duration_ms,
                    succeeded=a.succeeded,
                )
            )
    deliveries: dict[str, list[DeliveryOut]] = {event_id: [] for event_id in event_ids}
    for message, endpoint in rows:
        deliveries[message.event_id].append(
            DeliveryOut(
                endpoint=endpoint.id,
                url=endpoint.url if endpoint.deleted_at is None else None,
                status=message.status,
                attempts=message.attempts,
                next_attempt_at=message.next_attempt_at,
                last_status_code=message.last_status_code,
                last_error=message.last_error,
                delivered_at=message.delivered_at,
                log=logs.get(message.id, []) if with_log else None,
            )
        )
    return deliveries


def _events_out(
    session: Session, events: Sequence[WebhookEvent], *, with_log: bool
) -> list[EventOut]:
    """The events as the API shows them, in a constant number of queries however many.

    The payments that body-less events render from (``event_bytes``) are loaded at once
    first, so rendering finds each in the session instead of querying one by one.
    """
    named = [event.object_id for event in events if event.body is None and event.object_id]
    # Held here: the session's identity map keeps only weak references.
    payments = session.scalars(select(Payment).where(Payment.id.in_(named))).all() if named else []
    deliveries = _deliveries(session, [event.id for event in events], with_log=with_log)
    shown: list[EventOut] = []
    for event in events:
        body = json.loads(event_bytes(session, event))
        shown.append(
            EventOut(
                id=event.id,
                type=event.type,
                created_at=event.created_at,
                data=body["data"],
                deliveries=deliveries[event.id],
            )
        )
    del payments
    return shown


def _event_out(session: Session, event: WebhookEvent, *, with_log: bool) -> EventOut:
    return _events_out(session, [event], with_log=with_log)[0]


def _refuse_private_target(url: str) -> None:
    """422 ``webhook_url_not_allowed`` if ``url``'s host is or resolves to a non-public address.

    A name that does not resolve (yet) is accepted: every delivery resolves it again and
    refuses a non-public answer then.
    """
    try:
        check_target(url)
    except TargetNotAllowedError as exc:
        log.warning("webhooks.url_refused", detail=str(exc))
        raise ApiError(
            422,
            TargetNotAllowedError.code,
            f"{exc}: webhooks go only to public addresses",
            param="url",
        ) from None
    except (OSError, UnicodeError):  # socket.gaierror: checked again at each delivery
        return


@router.post(
    "/webhook_endpoints", status_code=201, response_model=EndpointCreated, responses=PROBLEMS
)
def create_endpoint(
    request: Request,
    body: EndpointCreate,
    principal: MerchantPrincipal,
    session: DbSession,
    box: Box,
    now: Now,
) -> EndpointCreated:
    """Register an endpoint; the response carries its signing secret, shown this once."""
    assert principal.merchant_id is not None
    settings: Settings = request.app.state.settlement.settings
    if not settings.webhook_allow_private:
        _refuse_private_target(body.url)
    # Count and insert under the merchant row's lock: two creates that both counted 15
    # live endpoints would otherwise both insert (issue 19, finding 9). PostgreSQL queues
    # a merchant's concurrent creates here; SQLite serialises writers anyway.
    lock = select(Merchant.id).where(Merchant.id == principal.merchant_id)
    session.execute(lock.with_for_update() if for_update(session) else lock)
    live = session.scalars(
        select(WebhookEndpoint.id).where(
            WebhookEndpoint.merchant_id == principal.merchant_id,
            WebhookEndpoint.deleted_at.is_(None),
        )
    ).all()
    if len(live) >= MAX_ENDPOINTS_PER_MERCHANT:
        raise bad_request(
            "too_many_endpoints", f"at most {MAX_ENDPOINTS_PER_MERCHANT} webhook endpoints"
        )
    endpoint_id = new_id("we")
    secret = new_secret()
    row = WebhookEndpoint(
        id=endpoint_id,
        merchant_id=principal.merchant_id,
        url=body.url,
        events=body.events,
        description=body.description,
        secret_sealed=box.seal(endpoint_id, secret),
        created_at=now,
    )
    session.add(row)
    session.flush()
    return EndpointCreated(**_endpoint_out(row).model_dump(), secret=secret)


@router.get("/webhook_endpoints", response_model=EndpointList, responses=PROBLEMS)
def list_endpoints(principal: MerchantPrincipal, session: DbSession) -> EndpointList:
    rows = session.scalars(
        select(WebhookEndpoint)
        .where(
            WebhookEndpoint.merchant_id == principal.merchant_id,
            WebhookEndpoint.deleted_at.is_(None),
        )
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    ).all()
    return EndpointList(data=[_endpoint_out(r) for r in rows])


@router.get("/webhook_endpoints/{endpoint_id}", response_model=EndpointOut, responses=PROBLEMS)
def get_endpoint(endpoint_id: str, principal: MerchantPrincipal, session: DbSession) -> EndpointOut:
    assert principal.merchant_id is not None
    return _endpoint_out(_own_endpoint(session, principal.merchant_id, endpoint_id))


@router.delete("/webhook_endpoints/{endpoint_id}", response_model=Deleted, responses=PROBLEMS)
def delete_endpoint(
    endpoint_id: str, principal: MerchantPrincipal, session: DbSession, now: Now
) -> Deleted:
    """Stop sending to an endpoint; its pending deliveries are canceled (events stay listed)."""
    assert principal.merchant_id is not None
    row = _own_endpoint(session, principal.merchant_id, endpoint_id)
    row.deleted_at = now
    for message in session.scalars(
        select(WebhookMessage).where(
            WebhookMessage.endpoint_id == row.id,
            WebhookMessage.status == MessageStatus.PENDING.value,
        )
    ):
        message.status = MessageStatus.CANCELED.value
        message.next_attempt_at = None
        message.updated_at = now
    return Deleted(id=row.id)


@router.get("/events", response_model=EventList, responses=PROBLEMS)
def list_events(
    principal: MerchantPrincipal,
    session: DbSession,
    type: Annotated[str | None, Query(max_length=64, description="e.g. payment.succeeded")] = None,
    delivery_status: Annotated[
        Literal["pending", "succeeded", "failed", "canceled"] | None,
        Query(description="only events with a delivery in this state (pending = undelivered)"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    starting_after: Annotated[str | None, Query(max_length=40)] = None,
) -> EventList:
    """The merchant's events, newest first, undelivered ones included (for replay and polling)."""
    assert principal.merchant_id is not None
    if type is not None and not EVENT_TYPE_RE.fullmatch(type):
        raise bad_request("invalid_event_type", f"unknown event type {type!r}", "type")
    query = select(WebhookEvent).where(WebhookEvent.merchant_id == principal.merchant_id)
    if type is not None:
        query = query.where(WebhookEvent.type == type)
    if delivery_status is not None:
        query = query.where(
            select(WebhookMessage.id)
            .where(
                WebhookMessage.event_id == WebhookEvent.id,
                WebhookMessage.status == delivery_status,
            )
            .exists()
        )
    if starting_after is not None:
        cursor = _own_event(session, principal.merchant_id, starting_after)
        query = query.where(
            or_(
                WebhookEvent.created_at < cursor.created_at,
                and_(WebhookEvent.created_at == cursor.created_at, WebhookEvent.id < cursor.id),
            )
        )
    rows = session.scalars(
        query.order_by(WebhookEvent.created_at.desc(), WebhookEvent.id.desc()).limit(limit + 1)
    ).all()
    return EventList(
        data=_events_out(session, rows[:limit], with_log=False),
        has_more=len(rows) > limit,
    )


@router.get("/events/{event_id}", response_model=EventOut, responses=PROBLEMS)
def get_event(event_id: str, principal: MerchantPrincipal, session: DbSession) -> EventOut:
    """One event with each endpoint's delivery state and its attempt log."""
    assert principal.merchant_id is not None
    return _event_out(session, _own_event(session, principal.merchant_id, event_id), with_log=True)


@router.post("/events/{event_id}/redeliver", response_model=EventOut, responses=PROBLEMS)
def redeliver_event(
    event_id: str, principal: MerchantPrincipal, session: DbSession, now: Now
) -> EventOut:
    """Send an event again, now, to every live endpoint subscribed to its type.

    A delivery that had succeeded, failed or was waiting is queued afresh (a new retry
    window); an endpoint registered after the event gets it for the first time. Receivers
    dedupe by the event id, which stays the same.
    """
    assert principal.merchant_id is not None
    event = _own_event(session, principal.merchant_id, event_id)
    endpoints = session.scalars(
        select(WebhookEndpoint).where(
            WebhookEndpoint.merchant_id == principal.merchant_id,
            WebhookEndpoint.deleted_at.is_(None),
        )
    ).all()
    targets = [e for e in endpoints if event_matches(list(e.events), event.type)]
    if not targets:
        raise bad_request(
            "no_webhook_endpoint", "no webhook endpoint is subscribed to this event's type"
        )
    for endpoint in targets:
        message = session.scalars(
            select(WebhookMessage).where(
                WebhookMessage.event_id == event.id, WebhookMessage.endpoint_id == endpoint.id
            )
        ).one_or_none()
        if message is None:
            session.add(new_message(event.id, endpoint.id, now))
            continue
        message.status = MessageStatus.PENDING.value
        message.window_started_at = now
        message.next_attempt_at = now
        message.updated_at = now
    session.flush()
    return _event_out(session, event, with_log=True)


@asynccontextmanager
async def webhook_worker_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the delivery worker while the app serves (unless ``settings.webhook_worker`` is off)."""
    state = app.state.settlement
    settings: Settings = state.settings
    if not settings.webhook_worker:
        yield
        return
    worker = WebhookWorker(
        state.session_factory,
        secret_box_for(settings),
        clock=state.clock,
        interval=settings.webhook_interval,
        allow_private=settings.webhook_allow_private,
        deadline=settings.webhook_deadline,
        per_endpoint=settings.webhook_per_endpoint,
    )
    await worker.start()
    try:
        yield
    finally:
        await worker.stop()
