"""Merchants: one registered virtual terminal each, and the terminal sequence numbers.

Settlement plays the PSAM for every merchant terminal: it issues the 4-byte terminal
transaction sequence numbers that go into DEBIT FOR PURCHASE (ARCHITECTURE.md).
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from webpurse.settlement import ledger
from webpurse.settlement.auth import MERCHANT, new_api_key
from webpurse.settlement.db import for_update
from webpurse.settlement.models import Merchant

# Loads an operator creates directly are relayed under this terminal id.
OPERATOR_TERMINAL_ID = "000000000000"
MAX_TERMINAL_SEQ = 0xFFFFFFFF


class MerchantError(Exception):
    """A merchant operation that cannot be done (duplicate terminal id, bad terminal id)."""


def _new_terminal_id() -> str:
    while True:
        candidate = secrets.token_hex(6).upper()
        if candidate != OPERATOR_TERMINAL_ID:
            return candidate


def create_merchant(
    session: Session, name: str, now: dt.datetime, *, terminal_id: str | None = None
) -> tuple[Merchant, str]:
    """Register a merchant with its virtual terminal; returns the row and its API key."""
    if terminal_id is None:
        terminal_id = _new_terminal_id()
    terminal_id = terminal_id.upper()
    try:
        if len(bytes.fromhex(terminal_id)) != 6:
            raise ValueError
    except ValueError:
        raise MerchantError("a terminal id is 6 bytes of hex (12 digits)") from None
    if terminal_id == OPERATOR_TERMINAL_ID:
        raise MerchantError("terminal id 000000000000 is reserved for operator loads")
    clash = session.scalars(select(Merchant).where(Merchant.terminal_id == terminal_id)).first()
    if clash is not None:
        raise MerchantError(f"terminal id {terminal_id} is already registered")
    merchant = Merchant(
        id="mer_" + secrets.token_hex(8),
        name=name,
        terminal_id=terminal_id,
        terminal_seq=0,
        created_at=now,
    )
    session.add(merchant)
    session.flush()
    ledger.ensure_account(session, ledger.merchant_account(merchant.id), now)
    _, key = new_api_key(session, MERCHANT, now, merchant.id, name=f"{name} default")
    return merchant, key


# The terminal sequence numbers on PostgreSQL (migration 0012): one SEQUENCE, no row lock.
_NEXT_VALUES = text("SELECT nextval('terminal_seq') FROM generate_series(1, :count)")


def terminal_seqs(session: Session, merchant_id: str, count: int) -> list[int]:
    """``count`` new terminal transaction sequence numbers, each issued once, ascending.

    On PostgreSQL they come from the ``terminal_seq`` SEQUENCE: no row is locked, so
    concurrent authorisations of one merchant do not queue on its merchant row until they
    commit (issue 20). The sequence is shared by every terminal: a terminal's numbers are
    still unique and increasing (that is what DEBIT FOR PURCHASE and the TAC need), with
    gaps where another terminal took one. SQLite (one writer at a time anyway) keeps the
    merchant row's counter.
    """
    if count <= 0:
        return []
    if for_update(session):
        seqs = sorted(int(seq) for seq in session.scalars(_NEXT_VALUES, {"count": count}).all())
    else:
        last = session.execute(
            update(Merchant)
            .where(Merchant.id == merchant_id)
            .values(terminal_seq=Merchant.terminal_seq + count)
            .returning(Merchant.terminal_seq)
        ).scalar_one()
        seqs = list(range(int(last) - count + 1, int(last) + 1))
    if seqs[-1] > MAX_TERMINAL_SEQ:
        raise MerchantError("the terminal's sequence numbers are exhausted")
    return seqs


def next_terminal_seq(session: Session, merchant_id: str) -> int:
    """The next terminal transaction sequence number, issued once (:func:`terminal_seqs`)."""
    return terminal_seqs(session, merchant_id, 1)[0]


def merchant_json(merchant: Merchant) -> dict[str, Any]:
    return {
        "id": merchant.id,
        "object": "merchant",
        "name": merchant.name,
        "terminal_id": merchant.terminal_id,
        "created_at": merchant.created_at.isoformat(),
    }
