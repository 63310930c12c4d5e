"""HTTP routes for funding (issue 12): a merchant's float; the operator's deposits,
bank statement imports and statement exceptions (docs/settlement-api.md "Funding")."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from webpurse.settlement import funding, idempotency
from webpurse.settlement.auth import MerchantPrincipal, OperatorPrincipal
from webpurse.settlement.deps import PROBLEMS, IdempotencyKey, SessionDep
from webpurse.settlement.funding import FundingPolicy
from webpurse.settlement.schemas import ExceptionReturn, FloatDepositCreate, StatementImport

router = APIRouter(prefix="/v1", tags=["funding"])


def _policy(request: Request) -> FundingPolicy:
    return FundingPolicy.from_settings(request.app.state.settlement.settings)


@router.get("/float", responses=PROBLEMS)
def get_float(
    request: Request, principal: MerchantPrincipal, session: SessionDep
) -> dict[str, Any]:
    """This merchant's prepaid top-up float: what its cash top-ups may still load."""
    assert principal.merchant_id is not None
    return funding.float_json(session, principal.merchant_id, _policy(request))


@router.post("/operator/floats/{merchant_id}/deposits", status_code=201, responses=PROBLEMS)
def record_deposit(
    request: Request,
    merchant_id: str,
    body: FloatDepositCreate,
    principal: OperatorPrincipal,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Record money a merchant paid into its float (idempotent on ``bank_reference``)."""
    now = request.app.state.settlement.clock()
    policy = _policy(request)

    def handler() -> tuple[int, dict[str, Any]]:
        deposit, created = funding.record_deposit(
            session, merchant_id, body.amount, body.bank_reference, now, body.currency
        )
        return (201 if created else 200), {
            **funding.deposit_json(deposit),
            "float": funding.float_json(session, merchant_id, policy),
        }

    return idempotency.run(
        request, session, principal, idempotency_key, body.model_dump(mode="json"), handler
    )


@router.post("/operator/statements", status_code=201, responses=PROBLEMS)
def import_statement(
    request: Request,
    body: StatementImport,
    principal: OperatorPrincipal,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Import one bank statement: fund the orders it pays, list the rest (idempotent)."""
    now = request.app.state.settlement.clock()
    policy = _policy(request)

    def handler() -> tuple[int, dict[str, Any]]:
        summary, created = funding.import_statement(
            session, body.statement, body.format, policy, now
        )
        return (201 if created else 200), summary

    return idempotency.run(
        request, session, principal, idempotency_key, body.model_dump(mode="json"), handler
    )


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
    request: Request,
    exception_id: str,
    body: ExceptionReturn,
    principal: OperatorPrincipal,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Record that the money went back to its payer (``returns:awaiting`` → ``returned:``)."""
    now = request.app.state.settlement.clock()

    def handler() -> tuple[int, dict[str, Any]]:
        exc = funding.return_exception(session, exception_id, body.return_reference, now)
        return 200, funding.exception_json(exc)

    return idempotency.run(
        request, session, principal, idempotency_key, body.model_dump(mode="json"), handler
    )
