"""The shop's staff: accounts, server-side sessions, the audit trail, the shift report.

Tables live in the shop's order database (beside ``orders``). Passwords are hashed with
Argon2id (argon2-cffi); a sign-in for an unknown name verifies against a dummy hash, so
the answer takes as long as for a known one. A session is a random id the browser holds
signed (:func:`webpurse.merchant.security.sign`); the database keeps only its SHA-256,
with the session's CSRF token and expiry. Every staff action writes an :class:`AuditEntry`.

:func:`shift_report` is pure: till orders in, one row per staff member out (cash taken
against value loaded; the difference is cash to give back or to look into).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import DateTime, ForeignKey, Integer, String, Text, delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from webpurse.merchant.orders import LOADED, Base, Order

SESSION_HOURS = 12
"""A staff session lasts one shift at most."""
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,31}$")
MIN_PASSWORD = 10


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class StaffError(Exception):
    """A staff account could not be created or changed; the message says why."""


class StaffMember(Base):
    __tablename__ = "staff"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)


class StaffSession(Base):
    __tablename__ = "staff_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    staff_id: Mapped[str] = mapped_column(ForeignKey("staff.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    __tablename__ = "staff_audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    staff_name: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(40))
    detail: Mapped[str] = mapped_column(Text, default="{}")
    client: Mapped[str] = mapped_column(String(64), default="")

    @property
    def details(self) -> dict[str, object]:
        loaded = json.loads(self.detail or "{}")
        return loaded if isinstance(loaded, dict) else {}


@dataclass(frozen=True, slots=True)
class SignedIn:
    """Who a valid session belongs to, and the CSRF token its forms must carry."""

    staff_id: str
    name: str
    csrf_token: str


def _hash_id(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _aware(moment: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes: they were written in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


class StaffBook:
    """Staff accounts, sessions and the audit trail over the shop's database."""

    def __init__(
        self,
        engine: Engine,
        hasher: PasswordHasher | None = None,
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        self._sessions: Callable[[], Session] = sessionmaker(engine, expire_on_commit=False)
        self._hasher = hasher or PasswordHasher()
        self._clock = clock
        Base.metadata.create_all(engine)
        self._dummy = self._hasher.hash(secrets.token_urlsafe(16))

    # --- accounts ----------------------------------------------------------------------

    def add(self, name: str, password: str) -> StaffMember:
        if not NAME.fullmatch(name):
            raise StaffError("a name is 2-32 of a-z, 0-9, '.', '_' or '-', starting alphanumeric")
        if len(password) < MIN_PASSWORD:
            raise StaffError(f"a password has at least {MIN_PASSWORD} characters")
        member = StaffMember(
            id="stf_" + secrets.token_hex(8), name=name, password_hash=self._hasher.hash(password)
        )
        try:
            with self._sessions() as session, session.begin():
                session.add(member)
        except IntegrityError:
            raise StaffError(f"a staff member named {name!r} exists already") from None
        self.audit(name, "staff_added", {}, client="cli")
        return member

    def names(self) -> list[str]:
        with self._sessions() as session:
            return list(session.scalars(select(StaffMember.name).order_by(StaffMember.name)))

    def authenticate(self, name: str, password: str) -> StaffMember | None:
        """The member when the password is right; None otherwise, in about the same time."""
        with self._sessions() as session:
            member = session.scalars(select(StaffMember).where(StaffMember.name == name)).first()
        try:
            self._hasher.verify(member.password_hash if member else self._dummy, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if member is None:
            return None
        if self._hasher.check_needs_rehash(member.password_hash):
            with self._sessions() as session, session.begin():
                stored = session.get(StaffMember, member.id)
                if stored is not None:
                    stored.password_hash = self._hasher.hash(password)
        return member

    # --- sessions ----------------------------------------------------------------------

    def open_session(self, member: StaffMember) -> tuple[str, SignedIn]:
        """A new session: its id (for the cookie, never stored) and who it signs in."""
        session_id = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = self._clock()
        with self._sessions() as session, session.begin():
            session.add(
                StaffSession(
                    id_hash=_hash_id(session_id),
                    staff_id=member.id,
                    csrf_token=csrf,
                    created_at=now,
                    expires_at=now + dt.timedelta(hours=SESSION_HOURS),
                )
            )
            session.execute(delete(StaffSession).where(StaffSession.expires_at < now))
        return session_id, SignedIn(member.id, member.name, csrf)

    def session(self, session_id: str | None) -> SignedIn | None:
        if not session_id:
            return None
        with self._sessions() as session:
            row = session.get(StaffSession, _hash_id(session_id))
            if row is None or _aware(row.expires_at) <= self._clock():
                return None
            member = session.get(StaffMember, row.staff_id)
            if member is None:
                return None
            return SignedIn(member.id, member.name, row.csrf_token)

    def close_session(self, session_id: str) -> None:
        with self._sessions() as session, session.begin():
            session.execute(
                delete(StaffSession).where(StaffSession.id_hash == _hash_id(session_id))
            )

    # --- the audit trail -----------------------------------------------------------------

    def audit(
        self, staff_name: str, action: str, detail: dict[str, object], *, client: str = ""
    ) -> None:
        with self._sessions() as session, session.begin():
            session.add(
                AuditEntry(
                    at=self._clock(),
                    staff_name=staff_name[:32],
                    action=action[:40],
                    detail=json.dumps(detail, sort_keys=True),
                    client=client[:64],
                )
            )

    def audit_trail(
        self, since: dt.datetime | None = None, until: dt.datetime | None = None, limit: int = 500
    ) -> list[AuditEntry]:
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        if since is not None:
            query = query.where(AuditEntry.at >= since)
        if until is not None:
            query = query.where(AuditEntry.at < until)
        with self._sessions() as session:
            return list(session.scalars(query))

    def names_by_id(self) -> dict[str, str]:
        with self._sessions() as session:
            return {m.id: m.name for m in session.scalars(select(StaffMember))}


@dataclass(frozen=True, slots=True)
class ShiftRow:
    """One staff member's till in a period: cash taken against value loaded onto cards."""

    staff: str
    topups: int
    cash_taken: int
    loaded: int
    loads: int
    not_loaded: int
    """Cash of top-ups that did not (yet) reach a card: to hand back, or still running."""


def shift_report(orders: Iterable[Order], names: dict[str, str]) -> list[ShiftRow]:
    """Per staff member (by name), in name order. Pure: the page and the tests share it."""
    rows: dict[str, list[Order]] = {}
    for order in orders:
        if order.staff_id is None:
            continue
        rows.setdefault(names.get(order.staff_id, order.staff_id), []).append(order)
    report = []
    for staff, mine in sorted(rows.items()):
        # A top-up refused before the cash changed hands (no float) took no cash.
        taken = [o for o in mine if o.decline_code != "insufficient_float"]
        cash = sum(o.cash_received or 0 for o in taken)
        loaded = [o for o in taken if o.status == LOADED]
        report.append(
            ShiftRow(
                staff=staff,
                topups=len(taken),
                cash_taken=cash,
                loaded=sum(o.amount for o in loaded),
                loads=len(loaded),
                not_loaded=cash - sum(o.cash_received or 0 for o in loaded),
            )
        )
    return report


def totals(rows: Sequence[ShiftRow]) -> ShiftRow:
    return ShiftRow(
        staff="",
        topups=sum(r.topups for r in rows),
        cash_taken=sum(r.cash_taken for r in rows),
        loaded=sum(r.loaded for r in rows),
        loads=sum(r.loads for r in rows),
        not_loaded=sum(r.not_loaded for r in rows),
    )
