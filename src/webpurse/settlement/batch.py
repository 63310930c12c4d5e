"""Batches: many payment operations in one request and one database transaction.

Group commit, as high-throughput ledgers do it (payments-api.md, "Ledger"): a merchant
server with many shoppers at the till sends their create / authorise / capture calls
together (``POST /v1/batch``, docs/settlement-api.md "Batches"), and settlement answers
each item exactly as the single endpoint would — same status, same body, same
idempotency key semantics — while the whole batch costs one transaction and one commit.

Two paths, one outcome:

- the **fast path** takes the common case set-based: plain creates, approvals of cards
  with nothing open, captures whose MAC2/TAC verify. Rows are read and locked once per
  batch in a fixed order — payments to authorise, every card the batch touches (one
  sorted statement), payments to capture, ledger accounts (last, just before the
  commit) — which keeps the single endpoints' orders (authorise: payment, then card;
  capture: card, then payment). The terminal sequence numbers come from one statement on
  a SEQUENCE (:func:`merchants.terminal_seqs`, no row lock), and the ledger posts every
  transfer with one lock of each hot account (:func:`ledger.post_transfers`);
- everything else (declines, recovery, uncertain, resolve, cancel, retried keys, anything
  the fast path does not recognise) runs through the same service functions as the
  single endpoints (:mod:`.payments`), one SAVEPOINT per item, after the fast items, in
  the batch's order. A fast item that an earlier per-item one touches (its payment or its
  card) runs on the per-item path too (:func:`_in_order`), so every item answers as the
  same calls one by one would.

The fast path runs first, when the transaction holds only reads: if anything in it is
refused (a ledger overdraft the shadow balance did not predict, a constraint), the whole
transaction is rolled back and the batch runs again with every item on the per-item path,
so a surprise costs speed, never correctness.
"""

from __future__ import annotations

import collections
import functools
import json
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import NoneType, SimpleNamespace, UnionType
from typing import Annotated, Any, Literal, Union, cast, get_args, get_origin

import orjson
import structlog
from pydantic import BaseModel, ValidationError
from sqlalchemy import (
    Delete,
    Result,
    Select,
    String,
    Table,
    bindparam,
    delete,
    func,
    literal_column,
    or_,
    select,
)
from sqlalchemy.exc import DBAPIError, IntegrityError

from webpurse.protocol.commands import DebitForPurchaseResponse, InitializeForPurchaseResponse
from webpurse.protocol.errors import ProtocolError
from webpurse.protocol.records import IssuerData
from webpurse.settlement import (
    changes,
    holds,
    idempotency,
    ledger,
    payments,
    quotas,
    registry,
    views,
    webhooks,
)
from webpurse.settlement.db import (
    among_bound,
    among_values,
    bulk_insert,
    bulk_update,
    dialect_name,
    for_update,
)
from webpurse.settlement.errors import SettlementError, ledger_refused, not_found
from webpurse.settlement.ledger import HotCredits, LedgerError, TransferSpec
from webpurse.settlement.merchants import MerchantError, terminal_seqs
from webpurse.settlement.models import Card, IdempotencyRecord, Merchant, Payment, PaymentHold
from webpurse.settlement.problems import ApiError, keeps_changes, problem
from webpurse.settlement.schemas import (
    BatchItemIn,
    Cancel,
    Empty,
    PaymentCreate,
    PurchaseAuthorise,
    PurchaseCapture,
    Resolve,
)
from webpurse.settlement.service import Ctx, card_time, new_id
from webpurse.settlement.transactions import Kind, Status

log = structlog.get_logger(__name__)

MAX_ITEMS = 1000
TRANSIENT_SQLSTATES = frozenset({"40P01", "40001"})
"""Items per batch: enough to amortise a commit, small enough to keep locks short."""

_PAYMENTS: Table = Payment.__table__  # type: ignore[assignment]
_CARDS: Table = Card.__table__  # type: ignore[assignment]
_HOLDS: Table = PaymentHold.__table__  # type: ignore[assignment]
_MERCHANTS: Table = Merchant.__table__  # type: ignore[assignment]
_KEYS: Table = IdempotencyRecord.__table__  # type: ignore[assignment]
_EVENTS: Table = webhooks.WebhookEvent.__table__  # type: ignore[assignment]
_MESSAGES: Table = webhooks.WebhookMessage.__table__  # type: ignore[assignment]

_NO_VALUES: dict[str, Any] = {column.name: None for column in _PAYMENTS.c}
_VIEW_NAMES = frozenset("metadata_" if name == "metadata" else name for name in _NO_VALUES)
_PATH = re.compile(
    r"^/v1/payments(?:/(?P<id>[A-Za-z0-9_]{1,40})/"
    r"(?P<action>authorise|capture|uncertain|resolve|cancel))?$"
)
# action -> the request body's schema (None: the body must be empty or absent)
_SCHEMAS: dict[str, type[BaseModel]] = {
    "create": PaymentCreate,
    "authorise": PurchaseAuthorise,
    "capture": PurchaseCapture,
    "uncertain": Empty,
    "resolve": Resolve,
    "cancel": Cancel,
}
Answer = tuple[int, dict[str, Any]]
# model_validate's own validators, without its Python wrapper (~0.7 µs an item)
_VALIDATORS = {action: schema.__pydantic_validator__ for action, schema in _SCHEMAS.items()}


def _json_native(annotation: Any) -> bool:
    """Whether every value of ``annotation`` dumps to itself in JSON mode: str, int,
    bool, None, a Literal of those, a dict or list of them (constraints aside)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _json_native(get_args(annotation)[0])
    if origin is Literal:
        return all(type(arg) in (str, int, bool) for arg in get_args(annotation))
    if origin in (Union, UnionType, dict, list):
        return all(_json_native(arg) for arg in get_args(annotation))
    return annotation in (str, int, bool, NoneType)


# The schemas whose fields a payload reads as they are (model_dump would copy them).
_NATIVE = frozenset(
    schema
    for schema in _SCHEMAS.values()
    if schema.model_config.get("extra") == "forbid"
    and all(_json_native(field.annotation) for field in schema.model_fields.values())
)


# The schemas whose bodies carry issuer data (EF 0x15).
_WITH_ISSUER = frozenset(s for s in _SCHEMAS.values() if "issuer_data" in s.model_fields)


@dataclass(slots=True)
class Item:
    """One request of a batch, as parsed, and (once known) its answer."""

    index: int
    path: str
    action: str
    payment_id: str | None
    body: BaseModel | None
    key: str | None
    fingerprint: str = ""
    new_key: bool = False  # a key not stored yet: stored with the answer at the end
    answer: Answer | None = None
    replayed: bool = False
    failed: bool = False  # an unexpected error: its key is not stored, so a retry can run
    duplicate_of: int | None = None
    as_of: str | None = None  # the purchase step its answer re-renders as of (views.STEPS)
    _encoded: str | None = None
    _issuer: IssuerData | None = None
    _issuer_parsed: bool = False

    @property
    def issuer(self) -> IssuerData | None:
        """The issuer data (EF 0x15) its body carries, parsed once; None if none parses."""
        if not self._issuer_parsed:
            self._issuer_parsed = True
            # Only bodies of a schema with the field (a missing attribute of a pydantic
            # model is a slow AttributeError; so is reading model_fields off the class).
            body = self.body
            raw = body.__dict__.get("issuer_data") if type(body) in _WITH_ISSUER else None
            if isinstance(raw, str):
                try:
                    self._issuer = IssuerData.from_bytes(bytes.fromhex(raw))
                except (ProtocolError, ValueError):
                    self._issuer = None
        return self._issuer

    @property
    def encoded(self) -> str:
        """The answer's body as JSON text, encoded once (stored as is)."""
        if self._encoded is None:
            assert self.answer is not None
            self._encoded = orjson.dumps(self.answer[1]).decode()
        return self._encoded

    @property
    def sent(self) -> dict[str, Any] | orjson.Fragment:
        """The answer's body as the response carries it: its JSON text where it has one
        (a stored body replays exactly as stored), else the dict, which the response's one
        ``orjson.dumps`` writes as :attr:`encoded` would (an answer stored by reference is
        never encoded on its own: issue 20, the batch's answers)."""
        if self._encoded is not None:
            return orjson.Fragment(self._encoded)
        assert self.answer is not None
        return self.answer[1]

    def answer_payment(self, status: int, payment: Payment, step: str) -> None:
        """Answer with ``payment`` right after ``step``; stored as a reference if it
        re-renders exactly (:func:`views.renders_as_of`)."""
        body = payments.payment_json(payment)
        self.answer = (status, body)
        if views.renders_as_of(body, payment, step):
            self.as_of = step

    @property
    def payload(self) -> Any:
        """What the single endpoint fingerprints for this request (routes_payments.py):
        ``model_dump(mode="json")``, ``exclude_none`` for a cancel, read straight off the
        model where every field is JSON already (:func:`_json_native`): the model's own
        ``__dict__``, not a copy (only read, by :func:`idempotency.fingerprint`)."""
        body = self.body
        if self.action == "uncertain" or body is None:
            return {}
        if type(body) not in _NATIVE:
            if self.action == "cancel":
                return body.model_dump(mode="json", exclude_none=True)
            return body.model_dump(mode="json")
        if self.action == "cancel":
            return {name: value for name, value in body.__dict__.items() if value is not None}
        return body.__dict__


@dataclass
class Outcome:
    """What :func:`run` did, for the route and the metrics."""

    answers: list[tuple[int, dict[str, Any] | orjson.Fragment, bool]]  # (Item.sent)
    fast: int = 0
    slow: int = 0
    problems: list[ApiError] = field(default_factory=list)
    # The fast path's credits to the merchant's payable, posted last (ledger.HotCredits).
    hot: HotCredits | None = None


# --- parsing ---------------------------------------------------------------------------


def _refusal(error: SettlementError, request_id: str | None) -> Answer:
    answer = problem(error)
    return answer.status, answer.body(request_id)


def parse_item(index: int, raw: BatchItemIn, request_id: str | None) -> Item:
    """One entry of ``requests``: a path this batch serves and a body of its schema."""
    match = _PATH.fullmatch(raw.path)
    if match is None:
        item = Item(index, raw.path, "", None, None, None)
        item.answer = _refusal(
            ApiError(
                404,
                "batch_path_not_supported",
                "a batch carries POSTs to /v1/payments and /v1/payments/{id}/<action>",
                param="path",
            ),
            request_id,
        )
        return item
    action = match["action"] or "create"
    item = Item(index, raw.path, action, match["id"], None, raw.idempotency_key)
    if raw.idempotency_key is not None and "\x00" in raw.idempotency_key:
        # No header can carry it, and PostgreSQL's text cannot hold it: the look-up of the
        # batch's keys would fail the whole batch. Refused as the single endpoint refuses
        # a malformed key; its key is not stored (item.key None).
        item.key = None
        item.answer = _refusal(
            ApiError(
                400,
                "invalid_idempotency_key",
                "idempotency_key must not contain U+0000",
                param="idempotency_key",
            ),
            request_id,
        )
        return item
    if raw.body is None and action in ("uncertain", "cancel"):
        return item
    try:
        body = raw.body
        item.body = _VALIDATORS[action].validate_python(body if body is not None else {})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first.get("loc", ()))
        item.answer = _refusal(
            ApiError(
                422,
                "validation_error",
                str(first.get("msg", "invalid request")),
                param=f"body.{loc}" if loc else "body",
            ),
            request_id,
        )
    return item


# --- idempotency -----------------------------------------------------------------------


def _key_reused(request_id: str | None) -> Answer:
    return _refusal(
        ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used with different request parameters",
            param="idempotency_key",
        ),
        request_id,
    )


class KeyRace(Exception):
    """A key this batch is about to store was stored meanwhile by another request.

    Both ran the item; only the other one may stand. The caller rolls the whole batch
    back and runs it again, and then the key's stored answer is replayed.
    """


def _check_keys(ctx: Ctx, items: list[Item], request_id: str | None) -> None:
    """Look the items' keys up (one SELECT): replay what is stored, refuse reuse.

    Keys not stored yet are written with their answers at the end, in the same
    transaction as the work (:func:`_store_answers`); a duplicate running concurrently is
    caught there. One row write per key instead of a claim and an update.
    """
    subject = ctx.principal.subject
    first_of: dict[str, Item] = {}
    keyed: list[Item] = []
    for item in items:
        if item.answer is not None or item.key is None:
            continue
        # A body of a _NATIVE schema (or none) is plain JSON: not walked again.
        plain = item.body is None or type(item.body) in _NATIVE
        item.fingerprint = idempotency.fingerprint("POST", item.path, item.payload, plain=plain)
        if item.key in first_of:
            item.duplicate_of = first_of[item.key].index
            continue
        first_of[item.key] = item
        keyed.append(item)
    if not keyed:
        return
    keys = [item.key for item in keyed if item.key is not None]
    dialect = dialect_name(ctx.session)
    # The batch's first statement after the key's check: nothing is pending in the session,
    # so it runs on the connection (the ORM's execution path costs more than the statement).
    # No key here holds a NUL (parse_item refused those, 400), so the keys bind as one array.
    values = idempotency.lookup_values(subject, keys, dialect)
    rows = ctx.session.connection().execute(idempotency.lookup_bound(dialect), values).all()
    stored = {row.key: row for row in rows}
    referenced = _referenced(ctx, stored.values())
    for item in keyed:
        record = stored.get(item.key or "")
        if record is None:
            item.new_key = True
        elif record.fingerprint != item.fingerprint:
            item.answer = _key_reused(request_id)
        elif record.state == "done" and record.response_body is None and record.step:
            payment = referenced[record.object_id]
            item.answer = (
                int(record.response_status or 200),
                views.payment_as_of(payment, record.step),
            )
            item.replayed = True
        elif record.state != "done" or record.response_body is None:
            # Only rows an older version left while its request ran (see idempotency.py).
            item.answer = _refusal(
                ApiError(
                    409,
                    "idempotency_in_flight",
                    "a request with this Idempotency-Key is still running",
                ),
                request_id,
            )
        else:
            item.answer = (int(record.response_status or 200), json.loads(record.response_body))
            item.replayed, item._encoded = True, record.response_body


def _referenced(ctx: Ctx, records: Iterable[Any]) -> dict[str, Payment]:
    """The payments whose answers stored keys name instead of a body (one SELECT)."""
    ids = sorted({r.object_id for r in records if r.response_body is None and r.object_id})
    if not ids:
        return {}
    dialect = dialect_name(ctx.session)
    rows = ctx.session.execute(_referenced_stmt(dialect), {"ids": among_values(dialect, ids)})
    return _views(rows)


def _store_answers(ctx: Ctx, items: Iterable[Item]) -> None:
    """Store each new key with its answer (one INSERT); a key taken meanwhile: KeyRace.

    A purchase step's answer is stored as its payment's id and the step (re-rendered on
    replay, :func:`views.payment_as_of`), any other answer as its JSON text; ``state`` is
    the column's default, ``done``.
    """
    principal, stored_fingerprint = ctx.principal.subject, idempotency.stored_fingerprint
    rows: list[dict[str, object]] = [
        {
            "principal": principal,
            "key": item.key,
            "fingerprint": stored_fingerprint(item.fingerprint),
            "response_status": item.answer[0],
            "response_body": None if item.as_of else item.encoded,
            "object_id": item.answer[1]["id"] if item.as_of else None,
            "step": item.as_of,
            "created_at": ctx.now,
        }
        for item in items
        if item.new_key and item.answer is not None and not item.failed
    ]
    # A plain INSERT (ON CONFLICT DO NOTHING is a speculative insertion, 40 % dearer per
    # row): a key another request stored meanwhile fails it, and the whole batch with it.
    try:
        bulk_insert(ctx.session, _KEYS, rows)
    except IntegrityError as error:
        if not _key_taken(error):
            raise
        raise KeyRace("an idempotency key of this batch was stored by another request") from error


def _key_taken(error: IntegrityError) -> bool:
    """The unique key of ``idempotency_keys`` refused the insert (PostgreSQL names the
    constraint; SQLite names the table)."""
    diag = getattr(error.orig, "diag", None)
    if diag is not None:
        return getattr(diag, "constraint_name", None) == "pk_idempotency_keys"
    return "idempotency_keys" in str(error.orig) and "UNIQUE" in str(error.orig)


# --- the per-item path -----------------------------------------------------------------


def _handler(ctx: Ctx, item: Item) -> Callable[[], Payment]:
    body, payment_id = item.body, item.payment_id or ""
    if item.action == "create":
        assert isinstance(body, PaymentCreate)
        return lambda: payments.create(ctx, body)
    if item.action == "authorise":
        assert isinstance(body, PurchaseAuthorise)
        return lambda: payments.authorise(ctx, payment_id, body)
    if item.action == "capture":
        assert isinstance(body, PurchaseCapture)
        return lambda: payments.capture(ctx, payment_id, body)
    if item.action == "resolve":
        assert isinstance(body, Resolve)
        return lambda: payments.resolve(ctx, payment_id, body)
    if item.action == "cancel":
        assert body is None or isinstance(body, Cancel)
        return lambda: payments.cancel(ctx, payment_id, body)
    return lambda: payments.uncertain(ctx, payment_id)


def _run_one(ctx: Ctx, item: Item, request_id: str | None, outcome: Outcome) -> None:
    """The single endpoint's service call, in a SAVEPOINT: a refusal undoes only this item."""
    status = 201 if item.action == "create" else 200
    item.as_of = None
    savepoint = ctx.session.begin_nested()
    try:
        payment = _handler(ctx, item)()
        ctx.session.flush()
        if item.action in views.STEPS:
            item.answer_payment(status, payment, item.action)
        else:
            item.answer = (status, payments.payment_json(payment))
        savepoint.commit()
    except SettlementError as error:
        if keeps_changes(error):
            savepoint.commit()
        else:
            savepoint.rollback()
        outcome.problems.append(problem(error))
        item.answer = _refusal(error, request_id)
    except LedgerError as error:
        savepoint.rollback()
        log.warning("ledger.refused", detail=str(error), path=item.path)
        refusal = problem(ledger_refused(str(error)))
        outcome.problems.append(refusal)
        item.answer = _refusal(refusal, request_id)
    except DBAPIError as error:
        if transient(error):
            raise  # a deadlock or serialization failure: the route runs the batch again
        savepoint.rollback()
        log.exception("batch.item_failed", path=item.path)
        item.failed = True
        item.answer = _refusal(
            ApiError(500, "internal_error", "this item failed; it changed nothing, retry it"),
            request_id,
        )
    except Exception:
        savepoint.rollback()
        log.exception("batch.item_failed", path=item.path)
        item.failed = True
        item.answer = _refusal(
            ApiError(500, "internal_error", "this item failed; it changed nothing, retry it"),
            request_id,
        )


# --- the fast path ---------------------------------------------------------------------


def _view(columns: Mapping[str, Any]) -> Payment:
    """A payment's columns as the attributes :func:`payments.payment_json` reads.

    Not an ORM instance: building one per item costs more than the rest of an item.
    """
    values = {**_NO_VALUES, **columns}
    values["metadata_"] = values.pop("metadata")
    return cast(Payment, SimpleNamespace(**values))


@functools.cache
def _view_class(names: tuple[str, ...], kind: str = "PaymentView") -> Any:
    """The view of a payments row of these columns: a named tuple, made from the row and
    read attribute by attribute in C (a SimpleNamespace per row cost a dict built and
    copied twice, and slower reads: ~2 µs a row more, issue 20)."""
    return collections.namedtuple(kind, names)


def _views(result: Result[Any], expected: frozenset[str] = _VIEW_NAMES) -> dict[str, Any]:
    """Rows of ``payments`` (all columns, or the ``expected`` ones) as :func:`_view`
    payments (read-only: :func:`_updated` makes a changed one), by id. The names are the
    result's, taken once (a row's ``_mapping`` builds its key view per row)."""
    columns = result.keys()
    names = tuple("metadata_" if name == "metadata" else name for name in columns)
    if set(names) != expected or len(names) != len(expected):
        raise ValueError(f"not a payments row: {names}")  # each column once, none missing
    views = list(map(_view_class(names)._make, result.all()))
    return {view.id: view for view in views}


@functools.cache
def _update_plan(view_class: Any, changed: tuple[str, ...]) -> tuple[Any, Any]:
    """How :func:`_updated` makes a view of ``view_class`` with ``changed`` set: the class
    of the columns of both, and which of (the view's values, the changes') each one takes."""
    fields: tuple[str, ...] = view_class._fields
    names = fields + tuple(name for name in changed if name not in fields)
    at = {name: index for index, name in enumerate(fields)}
    at |= {name: len(fields) + index for index, name in enumerate(changed)}
    return _view_class(names), operator.itemgetter(*(at[name] for name in names))


_new_tuple = tuple.__new__


def _updated(payment: Any, changes: Mapping[str, Any]) -> Payment:
    """A :func:`_views` payment with ``changes`` (columns other than ``metadata``) made."""
    view_class, pick = _update_plan(payment.__class__, tuple(changes))
    return cast(Payment, _new_tuple(view_class, pick(payment + tuple(changes.values()))))


# What the fast path reads of the payments it takes, by their status (the step's): what
# the step's checks, decision and answer read, and _touches (card_number). Not the
# columns the step writes anyway (changes.authorised, changes.succeeded: read, they are
# overwritten) nor those no step reads: reading times costs most, and a view without a
# column fails loudly where one read as None would not.
_UNREAD = {
    Status.REQUIRES_CARD: {
        "card_id",
        "balance_before",
        "counter",
        "supersedes",
        "key_version",
        "card_random",
        "txn_date",
        "txn_time",
        "terminal_seq",
        "mac1",
        "mac2",
        "authorised_at",
        "succeeded_at",
        "updated_at",
        "awaiting_card",
    },
    Status.AUTHORISED: {
        "mac2",
        "tac",
        "authorised_at",
        "succeeded_at",
        "updated_at",
        "awaiting_card",
    },
}
_READS = {
    status: tuple(name for name in _NO_VALUES if name not in unread)
    for status, unread in _UNREAD.items()
}


def _payments(ctx: Ctx, items: list[Item], status: Status, *, lock: bool) -> dict[str, Any]:
    """The caller's payments named by ``items`` that are ``status``, in id order, as
    :func:`_view` payments of the columns the step reads (:data:`_READS`).

    With ``lock``, locked on PostgreSQL; rows in another status are neither returned nor
    locked (PostgreSQL re-checks the status after waiting for a lock).
    """
    ids = sorted({item.payment_id for item in items if item.payment_id})
    if not ids:
        return {}
    dialect = dialect_name(ctx.session)
    stmt = _payments_stmt(dialect, lock and for_update(ctx.session), status)
    params = {"ids": among_values(dialect, ids), "merchant": ctx.principal.merchant_id}
    return _views(ctx.session.execute(stmt, params), _VIEW_NAMES - _UNREAD[status])


# The fast path's statements, built once per dialect (building and keying a statement
# cost more than running it): each batch binds its own values.


def _of_merchant() -> Any:
    """``payments.merchant_id = :merchant``, written so that no plan can reach the rows
    through the merchant's index (``ix_payments_merchant_created``, ``merchant_id`` first).

    A batch names its payments by id, so the primary key finds them in ~1 probe each
    whatever the merchant's history. Compared as a plain column, the merchant is an index
    condition too, and where the statistics were taken while the merchant had few payments
    (a new merchant, or autovacuum off as on this machine kind) PostgreSQL chose that index
    and read every entry of the merchant with the ids as a filter: seen in ``bench
    versions`` (auto_explain) for the capture's lock-read of its payments, its cards' read
    and the touches' card numbers, each growing with the merchant's history (issue 20).
    As an expression it is only a filter on the rows the ids found (the result is the same:
    ``merchant_id`` is never NULL).
    """
    return func.coalesce(_PAYMENTS.c.merchant_id, literal_column("''", String)) == bindparam(
        "merchant", type_=String()
    )


@functools.cache
def _payments_stmt(dialect: str, lock: bool, status: Status) -> Select[Any]:
    stmt = (
        select(*(_PAYMENTS.c[name] for name in _READS[status]))
        .where(
            among_bound(dialect, _PAYMENTS.c.id, "ids"),
            _of_merchant(),
            _PAYMENTS.c.status == status,
        )
        .order_by(_PAYMENTS.c.id)
    )
    return stmt.with_for_update() if lock else stmt


# What the fast path reads of a card: the decision's values (registry.record_of), its key
# version and open transaction. Not flagged nor the times: a row's two times cost more to
# read than the rest of it.
_CARD_COLUMNS = (
    "id",
    "card_number",
    "status",
    "issuer_id",
    "key_version",
    "start_date",
    "expiry_date",
    "max_balance",
    "shadow_balance",
    "online_counter",
    "offline_counter",
    "open_transaction",
)
# A card row as the fast path reads it, attribute by attribute, ~20 times an item: a named
# tuple reads each in C, a Row by name in Python (~0.3 µs each).
_CardView = collections.namedtuple("_CardView", _CARD_COLUMNS)  # type: ignore[misc]


@functools.cache
def _cards_stmt(dialect: str, lock: bool) -> Select[Any]:
    stmt = (
        select(*(_CARDS.c[name] for name in _CARD_COLUMNS))
        .where(
            or_(
                among_bound(dialect, _CARDS.c.card_number, "numbers"),
                among_bound(dialect, _CARDS.c.id, "ids"),
            )
        )
        .order_by(_CARDS.c.id)
    )
    return stmt.with_for_update() if lock else stmt


@functools.cache
def _capture_cards_stmt(dialect: str) -> Select[Any]:
    return select(_PAYMENTS.c.card_id).where(
        among_bound(dialect, _PAYMENTS.c.id, "ids"),
        _of_merchant(),
        _PAYMENTS.c.status == Status.AUTHORISED,
        _PAYMENTS.c.card_id.is_not(None),
    )


@functools.cache
def _release_stmt(dialect: str) -> Delete:
    return delete(_HOLDS).where(among_bound(dialect, _HOLDS.c.payment_id, "ids"))


@functools.cache
def _card_numbers_stmt(dialect: str) -> Select[Any]:
    return select(_PAYMENTS.c.id, _PAYMENTS.c.card_number).where(
        among_bound(dialect, _PAYMENTS.c.id, "ids"),
        _of_merchant(),
        _PAYMENTS.c.card_number.is_not(None),
    )


@functools.cache
def _referenced_stmt(dialect: str) -> Select[Any]:
    return select(_PAYMENTS).where(among_bound(dialect, _PAYMENTS.c.id, "ids"))


_ENDPOINTS_STMT = select(webhooks.WebhookEndpoint.id, webhooks.WebhookEndpoint.events).where(
    webhooks.WebhookEndpoint.merchant_id == bindparam("merchant"),
    webhooks.WebhookEndpoint.deleted_at.is_(None),
)
_MERCHANT_STMT = select(_MERCHANTS.c.id, _MERCHANTS.c.terminal_id).where(
    _MERCHANTS.c.id == bindparam("merchant")
)
# The same, with the merchant's open payments counted up to the cap (quotas.room) in the
# same round trip: what a batch with creates reads.
_MERCHANT_ROOM_STMT = select(
    _MERCHANTS.c.id,
    _MERCHANTS.c.terminal_id,
    quotas.open_payments(bindparam("merchant"), bindparam("cap")).label("open_payments"),
).where(_MERCHANTS.c.id == bindparam("merchant"))


def _merchant(ctx: Ctx, creates: bool) -> tuple[Any, int | None]:
    """The caller's merchant row and, if the batch creates payments under a cap, the room
    left under it (:func:`quotas.room`): one statement, on the connection (nothing is
    pending in the session before the fast path)."""
    cap = ctx.max_open_orders
    connection = ctx.session.connection()
    if not creates or cap is None:
        merchant = connection.execute(
            _MERCHANT_STMT, {"merchant": ctx.principal.merchant_id}
        ).first()
        return merchant, None
    merchant = connection.execute(
        _MERCHANT_ROOM_STMT, {"merchant": ctx.principal.merchant_id, "cap": cap}
    ).first()
    return merchant, None if merchant is None else max(cap - merchant.open_payments, 0)


def _lock_cards(ctx: Ctx, numbers: Sequence[str], ids: Sequence[str]) -> Sequence[Any]:
    """Every card the batch touches, locked with one statement in id order."""
    if not numbers and not ids:
        return []
    dialect = dialect_name(ctx.session)
    stmt = _cards_stmt(dialect, for_update(ctx.session))
    params = {"numbers": among_values(dialect, numbers), "ids": among_values(dialect, ids)}
    rows = ctx.session.execute(stmt, params).all()  # fetched at once, not row by row
    return list(map(_CardView._make, rows))


@dataclass
class _Approval:
    item: Item
    payment: Any
    card: Any
    issuer: IssuerData
    initialize: InitializeForPurchaseResponse


@dataclass
class _Capture:
    item: Item
    payment: Any
    card: Any
    answer: DebitForPurchaseResponse


@dataclass
class _Writes:
    """What the fast path writes, gathered and then written set by set."""

    payment_rows: list[dict[str, object]] = field(default_factory=list)
    authorised: list[dict[str, object]] = field(default_factory=list)
    succeeded: list[dict[str, object]] = field(default_factory=list)
    card_open: list[dict[str, object]] = field(default_factory=list)
    card_settled: list[dict[str, object]] = field(default_factory=list)
    # payment_holds: a row per authorised payment, and the captured ones' rows to delete
    holds: list[dict[str, object]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    transfers: list[TransferSpec] = field(default_factory=list)
    # (type, the payment's JSON, whether the event names the payment instead of a body)
    events: list[tuple[str, dict[str, Any], bool]] = field(default_factory=list)
    hot: HotCredits | None = None


def _fast_create(ctx: Ctx, merchant: Any, items: list[Item], writes: _Writes) -> None:
    for item in items:
        body = item.body
        assert isinstance(body, PaymentCreate)
        row: dict[str, object] = {
            "id": new_id("pay"),
            "merchant_id": merchant.id,
            "status": Status.REQUIRES_CARD,
            "awaiting_card": True,
            "amount": body.amount,
            "currency": body.currency,
            "description": body.description,
            "merchant_reference": body.merchant_reference,
            "metadata": dict(body.metadata),
            "terminal_id": merchant.terminal_id,
            "key_index": 1,
            "refunded_amount": 0,
            "created_at": ctx.now,
            "updated_at": ctx.now,
        }
        writes.payment_rows.append(row)
        item.answer_payment(201, _view(row), "create")


Candidate = tuple[Item, Any, IssuerData, InitializeForPurchaseResponse]


def _authorise_candidates(ctx: Ctx, items: list[Item], read: dict[str, Any]) -> list[Candidate]:
    """Authorisations of payments waiting for a card (locked), with parseable answers.

    The rows read are added to ``read`` (by id)."""
    rows = _payments(ctx, items, Status.REQUIRES_CARD, lock=True)
    read.update(rows)
    candidates: list[Candidate] = []
    for item in items:
        row = rows.get(item.payment_id or "")
        body = item.body
        assert isinstance(body, PurchaseAuthorise)
        issuer = item.issuer
        if row is None or issuer is None:
            continue
        try:
            init = InitializeForPurchaseResponse.from_data(bytes.fromhex(body.initialize_response))
        except (ProtocolError, ValueError):
            continue
        candidates.append((item, row, issuer, init))
    return candidates


def _approvals(
    ctx: Ctx,
    merchant: Any,
    candidates: list[Candidate],
    cards: dict[str, Any],
    seen: set[str],
) -> list[_Approval]:
    """The authorisations the fast path may take: approved, nothing open on the card."""
    approvals: list[_Approval] = []
    merchant_terminal = bytes.fromhex(merchant.terminal_id)
    # A card this merchant held past the bound at that counter: the per-item path refuses.
    refused = holds.exhausted(ctx, merchant.id, sorted({card.id for card in cards.values()}))
    for item, row, issuer, init in candidates:
        card = cards.get(issuer.card_number)
        if card is None or card.open_transaction is not None or card.id in seen:
            continue
        if (card.id, init.offline_counter) in refused:
            continue
        body = item.body
        assert isinstance(body, PurchaseAuthorise)
        record = registry.record_of(card)  # nothing open: no ledger read needed
        decision = payments.decide(ctx, record, body, issuer, init, merchant_terminal, row.amount)
        if not decision.approved or decision.supersedes is not None:
            continue
        seen.add(card.id)
        approvals.append(_Approval(item, row, card, issuer, init))
    return approvals


def _fast_authorise(ctx: Ctx, merchant: Any, approvals: list[_Approval], writes: _Writes) -> None:
    if not approvals:
        return
    # Nothing is posted: each hold is its payment's status. The card must cover it, as the
    # single path's (lifecycle.hold); a refusal sends the batch to the per-item path.
    available = ledger.available(ctx.session, [a.card.id for a in approvals])
    for approval in approvals:
        payment, card = approval.payment, approval.card
        funds = available[card.id]
        refusal = changes.purchase_hold_refusal(
            card.id,
            funds.amount,
            payment.amount,
            currency=payment.currency,
            account_currency=funds.currency,
        )
        if refusal is not None:
            raise LedgerError(refusal)
    try:
        seqs = terminal_seqs(ctx.session, merchant.id, len(approvals))
    except MerchantError as error:
        raise LedgerError(str(error)) from None  # the per-item path refuses each one
    date, time = card_time(ctx.now)
    terminal_id = bytes.fromhex(merchant.terminal_id)
    for seq, approval in zip(seqs, approvals, strict=True):
        payment, card, init = approval.payment, approval.card, approval.initialize
        mac1 = ctx.security.purchase_mac1(
            approval.issuer.serial,
            card.key_version,
            random=init.random,
            offline_counter=init.offline_counter,
            terminal_seq=seq,
            amount=payment.amount,
            terminal_id=terminal_id,
            date=date,
            time=time,
        )
        authorised: dict[str, object] = {
            **changes.authorised(
                Kind.PAYMENT,
                payment.status,
                card_id=card.id,
                card_number=approval.issuer.card_number,
                key_version=card.key_version,
                balance=init.balance,
                counter=init.offline_counter,
                random=init.random,
                date=date,
                time=time,
                now=ctx.now,
                supersedes=None,
            ),
            "terminal_seq": seq,
            "mac1": mac1.hex().upper(),
        }
        writes.authorised.append({"id": payment.id, **authorised, "awaiting_card": False})
        writes.holds.append(
            {
                "payment_id": payment.id,
                "card_id": card.id,
                "amount": payment.amount,
                "authorised_at": ctx.now,
            }
        )
        writes.card_open.append(
            {"id": card.id, "open_transaction": payment.id, "updated_at": ctx.now}
        )
        approval.item.answer_payment(200, _updated(payment, authorised), "authorise")


def _capture_cards(ctx: Ctx, items: list[Item]) -> list[str]:
    """The cards of the payments ``items`` capture (read unlocked: the card comes first)."""
    ids = sorted({item.payment_id for item in items if item.payment_id})
    if not ids:
        return []
    dialect = dialect_name(ctx.session)
    params = {"ids": among_values(dialect, ids), "merchant": ctx.principal.merchant_id}
    found = ctx.session.scalars(_capture_cards_stmt(dialect), params).all()
    return sorted({str(card_id) for card_id in found})


def _captures(
    ctx: Ctx, items: list[Item], cards: dict[str, Any], seen: set[str], read: dict[str, Any]
) -> list[_Capture]:
    """The captures the fast path may take: authorised, unlinked, the card's open one.

    The cards are locked already (before these payments, as the single capture does). The
    rows read are added to ``read`` (by id).
    """
    rows = _payments(ctx, items, Status.AUTHORISED, lock=True)
    read.update(rows)
    captures: list[_Capture] = []
    for item in items:
        row = rows.get(item.payment_id or "")
        body = item.body
        assert isinstance(body, PurchaseCapture)
        if row is None or row.supersedes is not None:
            continue
        card = cards.get(row.card_id)
        if card is None or card.open_transaction != row.id or card.id in seen:
            continue
        try:
            answer = DebitForPurchaseResponse.from_data(bytes.fromhex(body.debit_response))
        except (ProtocolError, ValueError):
            continue
        # Core rows carry the columns payments.verify reads from the ORM objects.
        if not payments.verify(
            ctx, row, card, answer.mac2, answer.tac
        ):  # the per-item path records the failure and refuses it
            continue
        seen.add(card.id)
        captures.append(_Capture(item, row, card, answer))
    return captures


def _fast_capture(ctx: Ctx, captures: list[_Capture], writes: _Writes) -> None:
    for capture in captures:
        payment, card = capture.payment, capture.card
        succeeded = changes.succeeded(
            Kind.PAYMENT,
            payment.status,
            mac2=capture.answer.mac2,
            tac=capture.answer.tac,
            now=ctx.now,
        )
        writes.succeeded.append({"id": payment.id, **succeeded})
        writes.released.append(payment.id)
        settled = changes.card_settled(
            Kind.PAYMENT,
            balance_before=payment.balance_before,
            amount=payment.amount,
            counter=payment.counter,
            now=ctx.now,
        )
        # No card_events row: the payment (its TAC, counter, succeeded_at) is the card's
        # purchase record (routes_admin.card_events).
        writes.card_settled.append({"id": card.id, **settled, "open_transaction": None})
        writes.transfers.append(
            changes.purchase_capture(payment.id, card.id, payment.merchant_id, payment.amount)
        )
        view = _updated(payment, succeeded)
        capture.item.answer_payment(200, view, "capture")
        assert capture.item.answer is not None
        body = capture.item.answer[1]
        named = capture.item.as_of is not None  # the event re-renders from the row too
        writes.events.append((payments.STRATEGY.events[Status.SUCCEEDED], body, named))


def _enqueue_events(
    ctx: Ctx, merchant_id: str, events: list[tuple[str, dict[str, Any], bool]]
) -> None:
    """:func:`webhooks.enqueue_event` for many events: one SELECT, two INSERTs.

    An event whose payment renders its body again (``named``, checked by the caller with
    :func:`views.renders_as_of`) stores the payment's id instead of the body.
    """
    if not events:
        return
    endpoints = [
        (endpoint_id, list(types))
        for endpoint_id, types in ctx.session.execute(
            _ENDPOINTS_STMT, {"merchant": merchant_id}
        ).all()
    ]
    targets: dict[str, list[str]] = {}  # event type -> the endpoints that want it, in order
    event_rows: list[dict[str, object]] = []
    message_rows: list[dict[str, object]] = []
    for event_type, data, named in events:
        event_id = webhooks.new_id("evt")
        if named:
            fields: dict[str, object] = {"body": None, "object_id": data["id"]}
        else:
            body = webhooks.event_body(event_id, event_type, ctx.now, data)
            fields = {"body": body.decode("utf-8"), "object_id": None}
        event_rows.append(
            {
                "id": event_id,
                "merchant_id": merchant_id,
                "type": event_type,
                "created_at": ctx.now,
                **fields,
            }
        )
        wanted = targets.get(event_type)
        if wanted is None:
            wanted = targets[event_type] = [
                endpoint_id
                for endpoint_id, types in endpoints
                if webhooks.event_matches(types, event_type)
            ]
        for endpoint_id in wanted:
            message_rows.append(
                {
                    "id": webhooks.new_id("msg"),
                    "event_id": event_id,
                    "endpoint_id": endpoint_id,
                    "status": webhooks.MessageStatus.PENDING.value,
                    "attempts": 0,
                    "window_started_at": ctx.now,
                    "next_attempt_at": ctx.now,
                    "updated_at": ctx.now,
                }
            )
    bulk_insert(ctx.session, _EVENTS, event_rows)
    bulk_insert(ctx.session, _MESSAGES, message_rows)


def _write(ctx: Ctx, writes: _Writes) -> None:
    """Each kind of change as one statement (:func:`bulk_insert`, :func:`bulk_update`)."""
    session = ctx.session
    bulk_insert(session, _PAYMENTS, writes.payment_rows)
    bulk_update(session, _PAYMENTS, writes.authorised)
    bulk_update(session, _PAYMENTS, writes.succeeded)
    # The holds begun and ended by this batch (a payment's status and its payment_holds
    # row change together; models._sync_payment_holds does it for the ORM paths).
    ended = set(writes.released)
    bulk_insert(session, _HOLDS, [h for h in writes.holds if h["payment_id"] not in ended])
    begun = {str(h["payment_id"]) for h in writes.holds}
    if ended - begun:
        dialect = dialect_name(session)
        session.execute(
            _release_stmt(dialect), {"ids": among_values(dialect, sorted(ended - begun))}
        )
    bulk_update(session, _CARDS, writes.card_open)
    bulk_update(session, _CARDS, writes.card_settled)
    assert ctx.principal.merchant_id is not None
    _enqueue_events(ctx, ctx.principal.merchant_id, writes.events)
    # The hot account (the merchant's payable) is only credited: it is locked and written
    # by run() as the last thing before the commit (ledger.post_hot_credits), so that a
    # concurrent batch of the merchant waits on it for the commit only.
    payable = frozenset({ledger.merchant_account(ctx.principal.merchant_id)})
    writes.hot = ledger.post_transfers(session, writes.transfers, now=ctx.now, defer=payable)


def _touches(
    ctx: Ctx, items: list[Item], read: Mapping[str, Any] | None = None
) -> dict[int, frozenset[str]]:
    """What each item still to run may read or change: its payment and its card(s).

    The card of a payment named by id is the one settlement has for it (read unlocked: it
    only orders this batch's items); an authorisation also names the card of its answer.
    A create touches nothing an earlier item could (its payment does not exist yet).
    ``read``: this merchant's payment rows the batch has read already in this transaction
    (and not changed yet), by id; only the others are read here.
    """
    read = read or {}
    pending = [i for i in items if i.answer is None and i.duplicate_of is None]
    by_id = {i.payment_id for i in pending if i.payment_id}
    cards: dict[str, str] = {}
    for payment_id in by_id & read.keys():
        number = read[payment_id].card_number
        if number is not None:
            cards[payment_id] = number.upper()
    ids = sorted(by_id - read.keys())
    if ids:
        dialect = dialect_name(ctx.session)
        params = {"ids": among_values(dialect, ids), "merchant": ctx.principal.merchant_id}
        cards |= {
            row.id: row.card_number.upper()
            for row in ctx.session.execute(_card_numbers_stmt(dialect), params).all()
        }
    touched: dict[int, frozenset[str]] = {}
    for item in pending:
        keys = {f"payment:{item.payment_id}"} if item.payment_id else set()
        issuer = item.issuer
        named = issuer.card_number.upper() if issuer is not None else None
        for number in (cards.get(item.payment_id or ""), named):
            if number is not None:
                keys.add(f"card:{number}")
        touched[item.index] = frozenset(keys)
    return touched


def _in_order(items: list[Item], taken: set[int], touched: dict[int, frozenset[str]]) -> set[int]:
    """The fast items that may run before the per-item ones and answer as one by one.

    The fast path runs before the per-item path, so a fast item jumps ahead of every
    per-item one placed before it in the batch. That is the same as running them in order
    exactly when none of those touches its payment or card: ``[cancel P, authorise P]``
    must cancel first (then the authorisation finds P canceled), and a decline that blocks
    a card must come before a later authorisation of it. Any other fast item goes back to
    the per-item path, which runs in the batch's order; one pass in that order suffices,
    since a dropped item can only affect the items after it.
    """
    kept = set(taken)
    blocked: set[str] = set()
    for item in items:
        keys = touched.get(item.index)
        if keys is None:
            continue  # answered already (refused, replayed) or a duplicate: changes nothing
        if item.index in kept and keys.isdisjoint(blocked):
            continue
        kept.discard(item.index)
        if item.action != "create":
            blocked |= keys
    return kept


def _none_before(items: list[Item], taken: set[int]) -> bool:
    """Whether no item of the per-item path can change what an item in ``taken`` reads:
    every item still to run is taken, or is a create (it blocks nothing, :func:`_in_order`).

    Then :func:`_in_order` keeps all of ``taken`` whatever :func:`_touches` says, so
    neither runs: the common batch, every item fast, reads no card numbers for its order.
    """
    return all(
        item.index in taken or item.action == "create"
        for item in items
        if item.answer is None and item.duplicate_of is None
    )


def _fast(ctx: Ctx, items: list[Item], outcome: Outcome) -> int:
    """Take what the fast path can; returns how many items it answered (0 after a fallback)."""
    by_action: dict[str, list[Item]] = {"create": [], "authorise": [], "capture": []}
    named: set[str] = set()
    for item in items:
        if item.answer is not None or item.duplicate_of is not None:
            continue
        if item.action not in by_action:
            continue
        if item.payment_id is not None:
            if item.payment_id in named:
                continue  # the same payment twice: the later one runs on the per-item path
            named.add(item.payment_id)
        by_action[item.action].append(item)
    if not any(by_action.values()):
        return 0
    merchant, room = _merchant(ctx, bool(by_action["create"]))
    if merchant is None:
        raise not_found("merchant")
    # Read per item (_fast_create): a named tuple's attributes are read in C, a Row's not.
    merchant = _view_class(tuple(merchant._fields), "MerchantView")._make(merchant)
    if room is not None and room < len(by_action["create"]):
        by_action["create"] = []  # past the cap: the per-item path refuses each one (429)
    taken: list[Item] = []
    try:
        writes = _Writes()
        _fast_create(ctx, merchant, by_action["create"], writes)
        taken += by_action["create"]
        # Lock order: payments to authorise, then every card (one sorted statement), then
        # payments to capture, ledger accounts. As the single endpoints:
        # authorise locks its payment before the card, capture the card before its payment.
        read: dict[str, Any] = {}  # payment rows read (locked), by id
        candidates = _authorise_candidates(ctx, by_action["authorise"], read)
        capture_card_ids = _capture_cards(ctx, by_action["capture"])
        numbers = sorted({issuer.card_number for _, _, issuer, _ in candidates})
        cards = _lock_cards(ctx, numbers, capture_card_ids)
        seen: set[str] = set()  # one transaction per card in the fast path
        approvals = _approvals(
            ctx, merchant, candidates, {card.card_number: card for card in cards}, seen
        )
        captures = _captures(
            ctx, by_action["capture"], {card.id: card for card in cards}, seen, read
        )
        fast = {a.item.index for a in approvals + captures}
        if _none_before(items, fast):
            kept = fast  # what _in_order keeps when nothing runs before: no _touches read
        else:
            kept = _in_order(items, fast, _touches(ctx, items, read))
        approvals = [a for a in approvals if a.item.index in kept]
        captures = [c for c in captures if c.item.index in kept]
        _fast_authorise(ctx, merchant, approvals, writes)
        _fast_capture(ctx, captures, writes)
        taken += [a.item for a in approvals] + [c.item for c in captures]
        _write(ctx, writes)
        outcome.hot = writes.hot
    except (LedgerError, SettlementError, DBAPIError) as error:
        if isinstance(error, DBAPIError) and transient(error):
            raise  # a deadlock or serialization failure: the route runs the batch again
        log.warning("batch.fast_path_refused", detail=str(error), items=len(taken))
        raise _FastRefused from error
    return len(taken)


class _FastRefused(Exception):
    """The fast path was refused midway: :func:`run` rolls the transaction back (nothing
    but reads came before it) and runs the batch again without it."""


def transient(error: DBAPIError) -> bool:
    """PostgreSQL aborted the transaction to break a lock cycle (deadlock_detected,
    serialization_failure): nothing of it happened, and running it again is the cure."""
    return getattr(error.orig, "sqlstate", None) in TRANSIENT_SQLSTATES


# --- the batch ---------------------------------------------------------------------------


def run(ctx: Ctx, raw_items: Sequence[BatchItemIn], request_id: str | None) -> Outcome:
    """Answer every item of a batch inside the caller's transaction (the caller commits).

    The transaction holds only reads when the fast path starts (the key's check, the
    stored keys), so a fast path refused midway rolls it all back and the batch runs
    again on the per-item path alone — as a SAVEPOINT around the fast path did, without
    its two round trips in every batch (issue 20: a batch's fixed cost).
    """
    try:
        return _run(ctx, raw_items, request_id, fast=True)
    except _FastRefused:
        ctx.session.rollback()
    return _run(ctx, raw_items, request_id, fast=False)


def _run(
    ctx: Ctx, raw_items: Sequence[BatchItemIn], request_id: str | None, *, fast: bool
) -> Outcome:
    items = [parse_item(index, raw, request_id) for index, raw in enumerate(raw_items)]
    _check_keys(ctx, items, request_id)
    outcome = Outcome([])
    if fast:
        outcome.fast = _fast(ctx, items, outcome)
    ctx.session.expire_all()
    for item in items:
        if item.answer is None and item.duplicate_of is None:
            _run_one(ctx, item, request_id, outcome)
            outcome.slow += 1
    for item in items:
        if item.duplicate_of is not None:
            first = items[item.duplicate_of]
            if first.fingerprint != item.fingerprint:
                item.answer = _key_reused(request_id)
            else:
                item.answer, item.replayed, item._encoded = first.answer, True, first.encoded
    _store_answers(ctx, items)
    if outcome.hot is not None:
        ledger.post_hot_credits(ctx.session, outcome.hot)  # the last statements: see _write
    for item in items:
        assert item.answer is not None
        outcome.answers.append((item.answer[0], item.sent, item.replayed))
    log.info("batch.done", items=len(items), fast=outcome.fast, per_item=outcome.slow)
    return outcome
