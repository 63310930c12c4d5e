"""The HTTP routes payments and loads share, built once for each kind.

``/v1/payments/{payment_id}/…`` and ``/v1/loads/{load_id}/…`` run the same card-transaction
lifecycle (authorise, capture or complete, uncertain, resolve, cancel): :func:`add_routes`
adds those routes to a kind's router from a :class:`Kind` description. Each route keeps the
name, path parameter and description it always had, so the OpenAPI document is unchanged.
"""

# No ``from __future__ import annotations``: :func:`_route` rewrites the endpoints'
# signatures (the kind's path parameter, principal and body) from real annotations.

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from webpurse.settlement import idempotency
from webpurse.settlement.auth import Principal
from webpurse.settlement.deps import PROBLEMS, IdempotencyKey, SessionDep, make_ctx
from webpurse.settlement.schemas import Cancel, Empty, Resolve
from webpurse.settlement.service import Ctx

Service = Callable[..., Any]


@dataclass(frozen=True)
class Kind:
    """What differs between payments and loads at the HTTP edge."""

    name: str  # "payment" | "load": route names end in it (authorise_payment)
    principal: Any  # the Annotated dependency that authenticates the caller
    out: type[BaseModel]
    to_json: Callable[[Any], dict[str, Any]]
    get: Callable[[Ctx, str], Any]
    authorise: Service
    authorise_body: type[BaseModel]
    finish_action: str  # "capture" | "complete"
    finish: Service
    finish_body: type[BaseModel]
    uncertain: Service
    resolve: Service
    cancel: Service
    docs: dict[str, str]  # route name → its description (none: no description)

    @property
    def id_param(self) -> str:
        return f"{self.name}_id"


def _route(
    router: APIRouter,
    kind: Kind,
    method: str,
    path: str,
    name: str,
    endpoint: Callable[..., Any],
    body: type[BaseModel] | None = None,
) -> None:
    """Add ``endpoint`` as the kind's: its path parameter (``payment_id``) in place of
    ``object_id``, its principal dependency and its ``body`` schema."""
    signature = inspect.signature(endpoint)
    parameters = []
    for param in signature.parameters.values():
        if param.name == "object_id":
            param = param.replace(name=kind.id_param)
        elif param.name == "principal":
            param = param.replace(annotation=kind.principal)
        elif param.name == "body" and body is not None:
            param = param.replace(annotation=body)
        parameters.append(param)

    def call(**kwargs: Any) -> Any:
        kwargs["object_id"] = kwargs.pop(kind.id_param)
        return endpoint(**kwargs)

    call.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    call.__name__ = name
    router.add_api_route(
        path.replace("{id}", "{" + kind.id_param + "}"),
        call,
        methods=[method],
        name=name,
        response_model=kind.out,
        responses=PROBLEMS,
        description=kind.docs.get(name, ""),
    )


def _run(
    request: Request,
    session: Session,
    principal: Principal,
    key: str | None,
    payload: Any,
    work: Callable[[], Any],
    to_json: Callable[[Any], dict[str, Any]],
) -> JSONResponse:
    return idempotency.run(
        request, session, principal, key, payload, lambda: (200, to_json(work()))
    )


def add_routes(router: APIRouter, kind: Kind) -> None:
    """Add get, authorise, capture/complete, uncertain, resolve and cancel for ``kind``."""

    def get(
        request: Request, object_id: str, principal: Principal, session: SessionDep
    ) -> dict[str, Any]:
        return kind.to_json(kind.get(make_ctx(request, session, principal), object_id))

    def authorise(
        request: Request,
        object_id: str,
        body: BaseModel,
        principal: Principal,
        session: SessionDep,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        ctx = make_ctx(request, session, principal)
        return _run(
            request,
            session,
            principal,
            idempotency_key,
            body.model_dump(mode="json"),
            lambda: kind.authorise(ctx, object_id, body),
            kind.to_json,
        )

    def finish(
        request: Request,
        object_id: str,
        body: BaseModel,
        principal: Principal,
        session: SessionDep,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        ctx = make_ctx(request, session, principal)
        return _run(
            request,
            session,
            principal,
            idempotency_key,
            body.model_dump(mode="json"),
            lambda: kind.finish(ctx, object_id, body),
            kind.to_json,
        )

    def uncertain(
        request: Request,
        object_id: str,
        principal: Principal,
        session: SessionDep,
        body: Empty | None = None,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        ctx = make_ctx(request, session, principal)
        return _run(
            request,
            session,
            principal,
            idempotency_key,
            {},
            lambda: kind.uncertain(ctx, object_id),
            kind.to_json,
        )

    def resolve(
        request: Request,
        object_id: str,
        body: Resolve,
        principal: Principal,
        session: SessionDep,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        ctx = make_ctx(request, session, principal)
        return _run(
            request,
            session,
            principal,
            idempotency_key,
            body.model_dump(mode="json"),
            lambda: kind.resolve(ctx, object_id, body),
            kind.to_json,
        )

    def cancel(
        request: Request,
        object_id: str,
        principal: Principal,
        session: SessionDep,
        body: Cancel | None = None,
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        ctx = make_ctx(request, session, principal)
        return _run(
            request,
            session,
            principal,
            idempotency_key,
            body.model_dump(mode="json", exclude_none=True) if body else {},
            lambda: kind.cancel(ctx, object_id, body),
            kind.to_json,
        )

    name = kind.name
    _route(router, kind, "GET", "/{id}", f"get_{name}", get)
    _route(
        router, kind, "POST", "/{id}/authorise", f"authorise_{name}", authorise, kind.authorise_body
    )
    action = kind.finish_action
    _route(router, kind, "POST", f"/{{id}}/{action}", f"{action}_{name}", finish, kind.finish_body)
    _route(router, kind, "POST", "/{id}/uncertain", f"uncertain_{name}", uncertain)
    _route(router, kind, "POST", "/{id}/resolve", f"resolve_{name}", resolve)
    _route(router, kind, "POST", "/{id}/cancel", f"cancel_{name}", cancel)
