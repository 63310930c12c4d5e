"""API keys and who may do what: merchants see their own objects, operators the rest.

Keys are random (``sk_mer_…`` / ``sk_op_…``), shown once, stored as SHA-256 hashes and
compared in constant time. Every route but the public ones depends on
:func:`require_merchant`, :func:`require_operator` or :func:`require_principal`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated

import structlog
from fastapi import Depends, Request
from sqlalchemy import Table, bindparam, select
from sqlalchemy.orm import Session

from webpurse.settlement.errors import forbidden, unauthenticated
from webpurse.settlement.models import ApiKey
from webpurse.settlement.sessions import get_session

log = structlog.get_logger(__name__)

MERCHANT = "merchant"
OPERATOR = "operator"
_PREFIX = {MERCHANT: "sk_mer_", OPERATOR: "sk_op_"}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a merchant (with its id) or an operator."""

    role: str
    key_id: str
    merchant_id: str | None = None

    @property
    def is_operator(self) -> bool:
        return self.role == OPERATOR

    @property
    def subject(self) -> str:
        """The namespace of this caller's idempotency keys and objects."""
        return self.merchant_id or f"op:{self.key_id}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_api_key(
    session: Session, role: str, now: dt.datetime, merchant_id: str | None = None, name: str = ""
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the clear key (show it once, never store it)."""
    if role not in _PREFIX:
        raise ValueError(f"unknown role {role!r}")
    if (role == MERCHANT) != (merchant_id is not None):
        raise ValueError("merchant keys need a merchant id; operator keys must not have one")
    clear = _PREFIX[role] + secrets.token_urlsafe(32)
    row = ApiKey(
        id="key_" + secrets.token_hex(8),
        key_hash=hash_key(clear),
        role=role,
        merchant_id=merchant_id,
        name=name,
        created_at=now,
    )
    session.add(row)
    session.flush()
    return row, clear


# Built once: the statement (and SQLAlchemy's cache key of it) is the same for every request.
# Core, over the table's columns: run on the session's connection it skips the ORM's
# execution path (the ORM entity form cost twice the Python time per request, issue 20).
_API_KEYS: Table = ApiKey.__table__  # type: ignore[assignment]
_BY_HASH = (
    select(
        _API_KEYS.c.id,
        _API_KEYS.c.key_hash,
        _API_KEYS.c.role,
        _API_KEYS.c.merchant_id,
        _API_KEYS.c.revoked_at,
    )
    .where(_API_KEYS.c.key_hash == bindparam("key_hash"))
    .limit(1)
)


def authenticate(session: Session, authorization: str | None) -> Principal:
    if not authorization:
        raise unauthenticated()
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(("sk_mer_", "sk_op_")):
        raise unauthenticated("use Authorization: Bearer <api key>")
    presented = hash_key(token)
    # Read in the request's transaction (as before), on its connection: nothing is pending
    # in the session yet, so there is nothing to flush first.
    row = session.connection().execute(_BY_HASH, {"key_hash": presented}).first()
    # The lookup is by hash; the compare below keeps the final check constant-time.
    if (
        row is None
        or row.revoked_at is not None
        or not hmac.compare_digest(row.key_hash, presented)
    ):
        log.info("auth.rejected")
        raise unauthenticated("unknown or revoked API key")
    return Principal(role=row.role, key_id=row.id, merchant_id=row.merchant_id)


def principal_of(request: Request, session: Session) -> Principal:
    """The caller of ``request``: its key looked up now (every request, never cached, so a
    revoked key is refused on its next request), kept in ``request.state.principal``."""
    principal = authenticate(session, request.headers.get("authorization"))
    request.state.principal = principal
    return principal


def require_principal(
    request: Request, session: Annotated[Session, Depends(get_session)]
) -> Principal:
    principal = principal_of(request, session)
    structlog.contextvars.bind_contextvars(principal=principal.subject)
    return principal


def merchant_only(principal: Principal) -> Principal:
    if principal.role != MERCHANT:
        raise forbidden("this route needs a merchant key")
    return principal


async def require_merchant(
    principal: Annotated[Principal, Depends(require_principal)],
) -> Principal:
    return merchant_only(principal)


async def require_operator(
    principal: Annotated[Principal, Depends(require_principal)],
) -> Principal:
    if principal.role != OPERATOR:
        raise forbidden("this route needs an operator key")
    return principal


MerchantPrincipal = Annotated[Principal, Depends(require_merchant)]
OperatorPrincipal = Annotated[Principal, Depends(require_operator)]
AnyPrincipal = Annotated[Principal, Depends(require_principal)]
