"""HTTP routes for funding (issue 12): a merchant's float; the operator's deposits,
bank statement imports and statement exceptions (docs/settlement-api.md "Funding")."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from webpurse.settlement import funding
from webpurse.settlement.auth import MerchantPrincipal, OperatorPrincipal
from webpurse.settlement.deps import PROBLEMS, SessionDep, Write, WriteDep
from webpurse.settlement.funding import FundingPolicy
from webpurse.settlement.schemas import ExceptionReturn, FloatDepositCreate, StatementImport

router = APIRouter(prefix="/v1", tags=["funding"])


def _policy(request: Request) -> FundingPolicy:
    return FundingPolicy.from_settings(request.app.state.settlement.settings)


def _funding_call(write: Write) -> tuple[Session, dt.datetime, FundingPolicy]:
    """The session, the time (now, once) and the funding policy an operator's POST uses."""
    return write.session, write.request.app.state.settlement.clock(), _policy(write.request)


@router.get("/float", responses=PROBLEMS)
def get_float(
    request: Request, principal: MerchantPrincipal, session: SessionDep
) -> dict[str, Any]:
    """This merchant's prepaid top-up float: what its cash top-ups may still load."""
    assert principal.merchant_id is not None
    return funding.float_json(session, principal.merchant_id, _policy(request))


@router.post("/operator/floats/{merchant_id}/deposits", status_code=201, responses=PROBLEMS)
def record_deposit(
    merchant_id: str, body: FloatDepositCreate, principal: OperatorPrincipal, write: WriteDep
) -> JSONResponse:
    """Record money a merchant paid into its float (idempotent on ``bank_reference``)."""
    session, now, policy = _funding_call(write)

    def handler() -> tuple[int, dict[str, Any]]:
        deposit, created = funding.record_deposit(
            session, merchant_id, body.amount, body.bank_reference, now, body.currency
        )
        return (201 if created else 200), {
            **funding.deposit_json(deposit),
            "float": funding.float_json(session, merchant_id, policy),
        }

    return write.run(principal, body, handler)


@router.post("/operator/statements", status_code=201, responses=PROBLEMS)
def import_statement(
    body: StatementImport, principal: OperatorPrincipal, write: WriteDep
) -> JSONResponse:
    """Import one bank statement: fund the orders it pays, list the rest (idempotent)."""
    session, now, policy = _funding_call(write)

    def handler() -> tuple[int, dict[str, Any]]:
        summary, created = funding.import_statement(
            session, body.statement, body.format, policy, now
        )
        return (201 if created else 200), summary

    return write.run(principal, body, handler)


@router.get("/operator/statement-exceptions", responses=PROBLEMS)
def list_exceptions(
    principal: OperatorPrincipal,
    session: SessionDep,
    status: Literal["awaiting_return", "returned"] | None = None,
) -> dict[str, Any]:
    """Money received that funds no top-up, oldest first."""
    rows = funding.list_exceptions(session, status)
    return {"object": "list", "data": [funding.exception_json(x) for x in rows], "has_more": False}


@router.post("/operator/statement-exceptions/{exception_id}/return", responses=PROBLEMS)
def return_exception(
    exception_id: str, body: ExceptionReturn, principal: OperatorPrincipal, write: WriteDep
) -> JSONResponse:
    """Record that the money went back to its payer (``returns:awaiting`` → ``returned:``)."""
    session, now = write.session, write.request.app.state.settlement.clock()

    def handler() -> tuple[int, dict[str, Any]]:
        exc = funding.return_exception(session, exception_id, body.return_reference, now)
        return 200, funding.exception_json(exc)

    return write.run(principal, body, handler)
