"""How the API shows a load and a refund (docs/settlement-api.md): plain dicts for JSON.

Their own module, below the services: ``funding`` and ``loads`` show a load, ``loads`` and
``refunds`` show a refund, without importing one another.
"""

from __future__ import annotations

from typing import Any

from webpurse.protocol.commands import CreditForLoad
from webpurse.protocol.records import decode_bcd_date, decode_bcd_time
from webpurse.settlement.models import Load, Refund


def load_json(load: Load) -> dict[str, Any]:
    authorisation = None
    if load.mac2 is not None:
        credit = CreditForLoad(
            decode_bcd_date(bytes.fromhex(load.txn_date or "")),
            decode_bcd_time(bytes.fromhex(load.txn_time or "")),
            bytes.fromhex(load.mac2),
        )
        authorisation = {
            "date": load.txn_date,
            "time": load.txn_time,
            "mac2": load.mac2,
            "credit_apdu": credit.to_apdu().to_bytes().hex().upper(),
        }
    return {
        "id": load.id,
        "object": "load",
        "status": load.status,
        "amount": load.amount,
        "currency": load.currency,
        "funding": {"method": load.funding_method, "reference": load.funding_reference or None},
        "expires_at": load.expires_at.isoformat() if load.expires_at else None,
        "refund": load.refund_id,
        "terminal_id": load.terminal_id,
        "key_index": load.key_index,
        "card_number": load.card_number or load.requested_card_number,
        "decline_code": load.decline_code,
        "tac": load.tac,
        "created_at": load.created_at.isoformat(),
        "updated_at": load.updated_at.isoformat(),
        "authorisation": authorisation,
    }


def refund_json(refund: Refund) -> dict[str, Any]:
    return {
        "id": refund.id,
        "object": "refund",
        "status": refund.status,
        "payment": refund.payment_id,
        "amount": refund.amount,
        "currency": refund.currency,
        "load": refund.load_id,
        "created_at": refund.created_at.isoformat(),
        "updated_at": refund.updated_at.isoformat(),
    }
