"""The merchant's own order book (SQLAlchemy 2; SQLite in the data dir by default).

An order is ``pending`` until settlement says otherwise. It becomes ``paid`` (``loaded``
for a top-up) only from a settlement object whose status is ``succeeded`` — the flow's
capture answer, a verified webhook followed by a re-fetch, or a poll; never from the card
or the browser alone.

A top-up order names its funding (``merchant_float``: cash a staff member took at the
till, ``staff_id`` and ``cash_received`` say who and how much; ``bank_transfer``: the
shopper's own transfer, ``payment_reference`` is settlement's reference for it) and keeps
settlement's last word on its load in ``settlement_status`` (``requires_funding`` until the
money has been matched).
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    DateTime,
    Integer,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from webpurse.merchant.cart import CartLine
from webpurse.sqlite_file import private_sqlite_file

PURCHASE = "purchase"
TOPUP = "topup"


class OrderStatus(StrEnum):
    """An order's status at the shop (docs/merchant.md).

    Settlement's own word for the order's payment or load is ``settlement_status``.
    """

    PENDING = "pending"
    PAID = "paid"
    LOADED = "loaded"
    DECLINED = "declined"
    INTERRUPTED = "interrupted"
    CANCELED = "canceled"


PENDING = OrderStatus.PENDING
PAID = OrderStatus.PAID
LOADED = OrderStatus.LOADED
DECLINED = OrderStatus.DECLINED
INTERRUPTED = OrderStatus.INTERRUPTED
CANCELED = OrderStatus.CANCELED
# Final: never changes again. A declined order may be tried again with another card.
FINAL = frozenset({PAID, LOADED, CANCELED})


class Base(DeclarativeBase):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(Integer)
    lines_json: Mapped[str] = mapped_column(Text, default="[]")
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    settlement_id: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    decline_code: Mapped[str | None] = mapped_column(String(64), default=None)
    card_number: Mapped[str | None] = mapped_column(String(20), default=None)
    balance_before: Mapped[int | None] = mapped_column(Integer, default=None)
    balance_after: Mapped[int | None] = mapped_column(Integer, default=None)
    counter: Mapped[int | None] = mapped_column(Integer, default=None)
    tac: Mapped[str | None] = mapped_column(String(8), default=None)
    round_trips: Mapped[int | None] = mapped_column(Integer, default=None)
    funding: Mapped[str | None] = mapped_column(String(20), default=None)
    payment_reference: Mapped[str | None] = mapped_column(String(64), default=None)
    funding_expires_at: Mapped[str | None] = mapped_column(String(40), default=None)
    settlement_status: Mapped[str | None] = mapped_column(String(24), default=None)
    staff_id: Mapped[str | None] = mapped_column(String(40), index=True, default=None)
    cash_received: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=_now, onupdate=_now
    )

    @property
    def lines(self) -> list[dict[str, Any]]:
        loaded = json.loads(self.lines_json or "[]")
        return loaded if isinstance(loaded, list) else []

    @property
    def is_final(self) -> bool:
        return self.status in FINAL


def new_order_id() -> str:
    return "ord_" + secrets.token_urlsafe(12).replace("-", "x").replace("_", "y")


def lines_to_json(lines: list[CartLine]) -> str:
    return json.dumps(
        [
            {
                "product": line.product.id,
                "quantity": line.quantity,
                "unit_price": line.product.price,
            }
            for line in lines
        ]
    )


def make_engine(url: str) -> Engine:
    """An engine with a bounded pool; SQLite gets WAL and a busy timeout, its files 0600."""
    if url.startswith("sqlite"):
        private_sqlite_file(url)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 15})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=15000")
            cursor.close()

        return engine
    return create_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True)


class OrderBook:
    """Orders over one engine: short transactions, returns detached rows."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions: Callable[[], Session] = sessionmaker(engine, expire_on_commit=False)
        Base.metadata.create_all(engine)
        add_missing_columns(engine, Order)

    def create(
        self,
        *,
        session_id: str,
        kind: str,
        amount: int,
        lines_json: str = "[]",
        funding: str | None = None,
        card_number: str | None = None,
        staff_id: str | None = None,
        cash_received: int | None = None,
    ) -> Order:
        order = Order(
            id=new_order_id(),
            session_id=session_id,
            kind=kind,
            amount=amount,
            lines_json=lines_json,
            status=PENDING,
            funding=funding,
            card_number=card_number,
            staff_id=staff_id,
            cash_received=cash_received,
        )
        with self._sessions() as session, session.begin():
            session.add(order)
        return order

    def get(self, order_id: str) -> Order | None:
        with self._sessions() as session:
            return session.get(Order, order_id)

    def by_settlement_id(self, settlement_id: str) -> Order | None:
        with self._sessions() as session:
            return session.scalars(
                select(Order).where(Order.settlement_id == settlement_id)
            ).first()

    def for_session(self, session_id: str, limit: int = 50) -> list[Order]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Order)
                    .where(Order.session_id == session_id)
                    .order_by(Order.created_at.desc())
                    .limit(limit)
                )
            )

    def till_orders(self, since: dt.datetime, until: dt.datetime, limit: int = 1000) -> list[Order]:
        """Top-ups staff sold at the till between ``since`` and ``until``, oldest first."""
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Order)
                    .where(Order.staff_id.is_not(None))
                    .where(Order.created_at >= since)
                    .where(Order.created_at < until)
                    .order_by(Order.created_at)
                    .limit(limit)
                )
            )

    def count(self) -> int:
        with self._sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Order)) or 0)

    def open_orders(self, limit: int = 100) -> list[Order]:
        """Orders still waiting on settlement's word (for the polling fallback)."""
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(Order)
                    .where(Order.status.in_((PENDING, INTERRUPTED)))
                    .where(Order.settlement_id.is_not(None))
                    .order_by(Order.updated_at)
                    .limit(limit)
                )
            )

    def update(self, order_id: str, **fields: Any) -> Order:
        """Set fields; a final status is never overwritten by a non-final one."""
        with self._sessions() as session, session.begin():
            order = session.get(Order, order_id, with_for_update=True)
            if order is None:
                raise KeyError(order_id)
            if order.is_final and fields.get("status", order.status) != order.status:
                fields.pop("status")
            for name, value in fields.items():
                setattr(order, name, value)
        return order


def add_missing_columns(engine: Engine, model: type[Base]) -> None:
    """Add the nullable columns a newer version of ``model`` has to an older table.

    The shop's database has no migration tool: its tables only ever gain nullable columns,
    which this adds (``ALTER TABLE … ADD COLUMN``) so an existing ``merchant.db`` keeps working.
    """
    table = model.__table__
    assert isinstance(table, Table)
    have = {column["name"] for column in inspect(engine).get_columns(table.name)}
    with engine.begin() as connection:
        for column in table.columns:
            if column.name in have or not column.nullable:
                continue
            kind = column.type.compile(dialect=engine.dialect)
            connection.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
