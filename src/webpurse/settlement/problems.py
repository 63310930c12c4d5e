"""Errors of the settlement server and their RFC 9457 problem+json form.

Inside, code raises :class:`ApiError` (or a subclass); the app's exception handler turns
it into ``application/problem+json`` with a stable ``code`` and the request id.
"""

from __future__ import annotations

from typing import Any

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://webpurse.dev/problems/"


class ApiError(Exception):
    """A refused request. ``commit`` says whether state changes made so far stand
    (a decline moves the payment to ``declined``); otherwise they are rolled back."""

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
        commit: bool = False,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or code.replace("_", " ").capitalize()
        self.param = param
        self.decline_code = decline_code
        self.extra = extra or {}
        self.commit = commit

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


def not_found(what: str, param: str | None = None) -> ApiError:
    return ApiError(404, "resource_missing", f"no such {what}", param=param)


def unauthenticated(detail: str = "a valid API key is required") -> ApiError:
    return ApiError(401, "unauthenticated", detail)


def forbidden(detail: str) -> ApiError:
    return ApiError(403, "forbidden", detail)


def bad_request(code: str, detail: str, param: str | None = None) -> ApiError:
    return ApiError(400, code, detail, param=param)


def conflict(code: str, detail: str) -> ApiError:
    return ApiError(409, code, detail)


def declined(
    decline_code: str, detail: str, *, extra: dict[str, Any] | None = None, commit: bool = True
) -> ApiError:
    return ApiError(
        402,
        "card_declined",
        detail,
        title="Card declined",
        decline_code=decline_code,
        extra=extra,
        commit=commit,
    )


def verification_failed(detail: str) -> ApiError:
    return ApiError(402, "verification_failed", detail, title="Verification failed", commit=True)


def ledger_refused(detail: str) -> ApiError:
    """409 ``ledger_refused``: a transfer the ledger will not post (its message as the detail).

    Not committed: the request's work rolls back and the refusal is stored under its
    idempotency key like any other (docs/settlement-api.md).
    """
    return ApiError(409, "ledger_refused", detail)
