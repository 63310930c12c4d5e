"""The HTTP edge's errors: RFC 9457 problem+json for every refusal.

Services raise :mod:`webpurse.settlement.errors` (no status, no HTTP); :func:`problem` gives
each its status and body, and :func:`keeps_changes` says whether the request's changes
stand. :class:`ApiError` is a refusal made at the edge itself (validation, idempotency,
batch paths) with its status spelled out. The service constructors (``not_found``,
``conflict``, …) are re-exported from here for the routes.
"""

from __future__ import annotations

from typing import Any

from webpurse.settlement.errors import (
    Conflict,
    Declined,
    Forbidden,
    Invalid,
    NotFound,
    Refused,
    SettlementError,
    TooMany,
    Unauthenticated,
    Unprocessable,
    bad_request,
    conflict,
    declined,
    forbidden,
    ledger_refused,
    not_found,
    unauthenticated,
    verification_failed,
)

__all__ = [
    "PROBLEM_BASE",
    "PROBLEM_JSON",
    "ApiError",
    "bad_request",
    "conflict",
    "declined",
    "forbidden",
    "keeps_changes",
    "ledger_refused",
    "not_found",
    "problem",
    "unauthenticated",
    "verification_failed",
]

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://webpurse.dev/problems/"

# The status of each domain refusal (the first class of the error's MRO found here).
STATUS: dict[type[SettlementError], int] = {
    Invalid: 400,
    Unauthenticated: 401,
    Refused: 402,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    Unprocessable: 422,
    TooMany: 429,
}


class ApiError(SettlementError):
    """A refusal with its HTTP status (``status``, ``code``, ``detail``, …)."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        param: str | None = None,
        decline_code: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail, code=code, param=param, extra=extra)
        self.status = status
        self.title = title or code.replace("_", " ").capitalize()
        self.decline_code = decline_code

    def body(self, request_id: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_BASE + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if self.decline_code is not None:
            body["decline_code"] = self.decline_code
        if self.param is not None:
            body["param"] = self.param
        body.update(self.extra)
        body["request_id"] = request_id
        return body


def problem(error: SettlementError) -> ApiError:
    """``error`` as the problem the API answers (the same status, code and body always)."""
    if isinstance(error, ApiError):
        return error
    status = next(STATUS[cls] for cls in type(error).__mro__ if cls in STATUS)
    return ApiError(
        status,
        error.code,
        error.detail,
        param=error.param,
        decline_code=error.decline_code if isinstance(error, Declined) else None,
        extra=error.extra,
    )


def keeps_changes(error: SettlementError) -> bool:
    """Whether the request's changes are committed with the refusal: a decline moves the
    payment to ``declined``, a failed verification records an event; all else rolls back."""
    return isinstance(error, Refused)
