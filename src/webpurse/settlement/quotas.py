"""Per-merchant quotas: how many payments and loads may wait for a card at once.

A ``requires_card`` payment or load order costs settlement a row, a held amount (loads)
and, later, work for the expiry sweep. One merchant creating them without end would make
every sweep long and the held accounts hot for everyone (issue 19, finding 4), so each
merchant may have at most ``Settings.max_open_orders`` of each kind open; beyond that a
create is refused with 429 ``too_many_open_orders`` until some are used, canceled or
expired (docs/settlement-api.md, "Limits"). Loads a refund created are not counted (they
wait for the card's next online contact by design), nor are an operator's loads.

The count stops at the cap (``LIMIT``), over a partial index of the open rows, so it costs
the same whatever the merchant's history. It is not taken under a lock: requests racing at
the cap may pass it by at most their number, which bounds the work all the same.
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import ScalarSelect, Select, func, select, true
from sqlalchemy.orm import Session

from webpurse.settlement.errors import TooMany
from webpurse.settlement.models import Load, Payment
from webpurse.settlement.transactions import Status

Kind = Literal["payment", "load"]

DEFAULT_MAX_OPEN_ORDERS = 1000


def _waiting_payments(merchant_id: Any) -> Select[Any]:
    """The merchant's payments waiting for a card, over ``ix_payments_merchant_open``."""
    return select(Payment.id).where(
        Payment.merchant_id == merchant_id,
        Payment.awaiting_card == true(),  # ix_payments_merchant_open
        Payment.status == Status.REQUIRES_CARD,
    )


def open_payments(merchant_id: Any, cap: Any) -> ScalarSelect[int]:
    """:func:`open_orders` of payments as a scalar subquery (``merchant_id`` and ``cap``
    values or bound parameters), to be read with other columns in one statement."""
    rows = _waiting_payments(merchant_id)
    return select(func.count()).select_from(rows.limit(cap).subquery()).scalar_subquery()


def open_orders(session: Session, merchant_id: str, kind: Kind, cap: int) -> int:
    """The merchant's ``requires_card`` orders of ``kind``, counted up to ``cap``."""
    if kind == "payment":
        rows: Select[Any] = _waiting_payments(merchant_id)
    else:
        rows = select(Load.id).where(
            Load.merchant_id == merchant_id,
            Load.status == Status.REQUIRES_CARD,
            Load.refund_id.is_(None),
        )
    limited = rows.limit(cap).subquery()
    return int(session.scalar(select(func.count()).select_from(limited)) or 0)


def room(session: Session, merchant_id: str, kind: Kind, cap: int | None) -> int | None:
    """How many more ``kind`` orders the merchant may open now (``None``: no cap)."""
    if cap is None:
        return None
    return max(cap - open_orders(session, merchant_id, kind, cap), 0)


def too_many(kind: Kind, cap: int) -> TooMany:
    return TooMany(
        f"this merchant already has {cap} {kind}s waiting for a card; use, cancel or let "
        "some expire first",
        code="too_many_open_orders",
        extra={"limit": cap},
    )


def ensure_room(session: Session, merchant_id: str | None, kind: Kind, cap: int | None) -> None:
    """Refuse (429 ``too_many_open_orders``) a create that would pass the merchant's cap."""
    if merchant_id is None or cap is None:
        return
    if room(session, merchant_id, kind, cap) == 0:
        raise too_many(kind, cap)
