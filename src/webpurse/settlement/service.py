"""What every settlement operation works with: the session, keys, clock and caller.

Also the strict parsers for the card's raw answers: settlement never trusts fields the
merchant's relay parsed (ARCHITECTURE.md "Settlement server").
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from webpurse.protocol.errors import ProtocolError
from webpurse.protocol.records import IssuerData
from webpurse.settlement.auth import Principal
from webpurse.settlement.db import new_row_id
from webpurse.settlement.errors import bad_request, not_found
from webpurse.settlement.security import SecurityModule

T = TypeVar("T")


class _Owned(Protocol):
    id: Any
    merchant_id: Any


Owned = TypeVar("Owned", bound=_Owned)


@dataclass(frozen=True)
class Ctx:
    session: Session
    security: SecurityModule
    now: dt.datetime
    principal: Principal
    # requires_card payments (and loads) a merchant may have open at once (quotas.py)
    max_open_orders: int | None = None


def visible(stmt: Select[Owned], model: type[Owned], principal: Principal) -> Select[Owned]:
    """``stmt``'s rows the caller may see: every merchant's for an operator, else its own."""
    if principal.is_operator:
        return stmt
    return stmt.where(model.merchant_id == principal.merchant_id)


def get_owned(ctx: Ctx, model: type[Owned], object_id: str, what: str) -> Owned:
    """The caller's ``model`` row ``object_id`` (another merchant's is "no such": 404)."""
    stmt = visible(select(model).where(model.id == object_id), model, ctx.principal)
    row = ctx.session.scalars(stmt).first()
    if row is None:
        raise not_found(what, "id")
    return row


def new_id(prefix: str) -> str:
    """``prefix``, an underscore and 24 random hex digits (:func:`db.new_row_id`)."""
    return new_row_id(prefix)


def card_time(now: dt.datetime) -> tuple[dt.date, dt.time]:
    """The card's date and time fields, derived from UTC (ARCHITECTURE.md conventions)."""
    utc = now.astimezone(dt.UTC)
    return utc.date(), utc.time().replace(microsecond=0)


def unhex(text: str, param: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise bad_request("invalid_hex", f"{param} is not hex", param) from None


def parse(text: str, param: str, parser: Callable[[bytes], T]) -> T:
    """Parse a card answer strictly; a malformed one is a 400 naming the field."""
    raw = unhex(text, param)
    try:
        return parser(raw)
    except (ProtocolError, ValueError) as exc:
        raise bad_request(f"invalid_{param}", f"{param}: {exc}", param) from None


def parse_issuer(text: str) -> IssuerData:
    return parse(text, "issuer_data", IssuerData.from_bytes)
