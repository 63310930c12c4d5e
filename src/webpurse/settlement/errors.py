"""The settlement services' refusals, in the domain's words (cosmicpython's ``InvalidSku``).

A service raises one of these; it knows nothing of HTTP. The HTTP edge
(:func:`webpurse.settlement.problems.problem`) gives each class its status and turns it
into problem+json with the same ``code``, and decides whether the request's changes stand
(:func:`webpurse.settlement.problems.keeps_changes`: only a :class:`Refused` keeps them —
a decline or a failed verification is itself recorded).
"""

from __future__ import annotations

from typing import Any


class SettlementError(Exception):
    """A refused request: ``code`` is the stable problem code clients branch on."""

    code = "error"

    def __init__(
        self,
        detail: str,
        *,
        code: str | None = None,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        if code is not None:
            self.code = code
        self.detail = detail
        self.param = param
        self.extra = extra or {}


class Invalid(SettlementError):
    """The input is malformed (a card answer that does not parse, bad hex)."""


class Unauthenticated(SettlementError):
    code = "unauthenticated"


class Forbidden(SettlementError):
    """This caller may not do this (an operator key has no float)."""

    code = "forbidden"


class NotFound(SettlementError):
    """No such thing for this caller (another merchant's is "no such" too)."""

    code = "resource_missing"

    def __init__(self, what: str, param: str | None = None) -> None:
        super().__init__(f"no such {what}", param=param)


class Conflict(SettlementError):
    """The thing's state does not allow this (a payment already captured, a used check)."""


class LedgerRefused(Conflict):
    """A transfer the ledger will not post (its message as the detail)."""

    code = "ledger_refused"


class Unprocessable(SettlementError):
    """Well-formed but not acceptable (an amount over what can still be refunded)."""


class TooMany(SettlementError):
    """A cap is reached (open orders of a merchant)."""


class Refused(SettlementError):
    """The card's answers refuse the request: what the request recorded of it stands."""


class Declined(Refused):
    code = "card_declined"

    def __init__(
        self, decline_code: str, detail: str, *, extra: dict[str, Any] | None = None
    ) -> None:
        super().__init__(detail, extra=extra)
        self.decline_code = decline_code


class VerificationFailed(Refused):
    code = "verification_failed"


# The constructors the services have always used.


def not_found(what: str, param: str | None = None) -> NotFound:
    return NotFound(what, param)


def unauthenticated(detail: str = "a valid API key is required") -> Unauthenticated:
    return Unauthenticated(detail)


def forbidden(detail: str) -> Forbidden:
    return Forbidden(detail)


def bad_request(code: str, detail: str, param: str | None = None) -> Invalid:
    return Invalid(detail, code=code, param=param)


def conflict(code: str, detail: str, *, extra: dict[str, Any] | None = None) -> Conflict:
    return Conflict(detail, code=code, extra=extra)


def declined(decline_code: str, detail: str, *, extra: dict[str, Any] | None = None) -> Declined:
    return Declined(decline_code, detail, extra=extra)


def verification_failed(detail: str) -> VerificationFailed:
    return VerificationFailed(detail)


def ledger_refused(detail: str) -> LedgerRefused:
    """Not kept: the request's work rolls back and the refusal is stored under its
    idempotency key like any other (docs/settlement-api.md)."""
    return LedgerRefused(detail)
