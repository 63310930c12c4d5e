"""What every settlement operation works with: the session, keys, clock and caller.

Also the strict parsers for the card's raw answers: settlement never trusts fields the
merchant's relay parsed (ARCHITECTURE.md "Settlement server").
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.orm import Session

from webpurse.protocol.errors import ProtocolError
from webpurse.protocol.records import IssuerData
from webpurse.settlement.auth import Principal
from webpurse.settlement.errors import bad_request
from webpurse.settlement.security import SecurityModule

T = TypeVar("T")


@dataclass(frozen=True)
class Ctx:
    session: Session
    security: SecurityModule
    now: dt.datetime
    principal: Principal
    # requires_card payments (and loads) a merchant may have open at once (quotas.py)
    max_open_orders: int | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


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
