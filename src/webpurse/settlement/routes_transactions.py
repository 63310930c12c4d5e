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
from types import NoneType, UnionType
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from webpurse.settlement.auth import Principal
from webpurse.settlement.deps import PROBLEMS, SessionDep, WriteDep, make_ctx
from webpurse.settlement.schemas import Cancel, Empty, Resolve
from webpurse.settlement.service import Ctx
from webpurse.settlement.views import STEPS

Service = Callable[..., Any]


def _dump(body: BaseModel | None) -> Any:
    return body.model_dump(mode="json") if body is not None else {}


def _dump_set(body: BaseModel | None) -> Any:
    return body.model_dump(mode="json", exclude_none=True) if body is not None else {}


@dataclass(frozen=True)
class Action:
    """One lifecycle POST: ``/{id}/<name>`` runs ``service(ctx, id, body)``."""

    name: str  # "authorise", "capture", …
    service: Service
    body: Any  # its schema; ``X | None`` for an optional body
    payload: Callable[[BaseModel | None], Any] = _dump  # what the idempotency key fingerprints


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
    uncertain: Callable[[Ctx, str], Any]
    resolve: Service
    cancel: Service
    docs: dict[str, str]  # route name → its description (none: no description)

    @property
    def id_param(self) -> str:
        return f"{self.name}_id"

    def actions(self) -> tuple[Action, ...]:
        uncertain = self.uncertain
        return (
            Action("authorise", self.authorise, self.authorise_body),
            Action(self.finish_action, self.finish, self.finish_body),
            Action(
                "uncertain",
                lambda ctx, object_id, _body: uncertain(ctx, object_id),
                Empty | None,
                lambda _body: {},
            ),
            Action("resolve", self.resolve, Resolve),
            Action("cancel", self.cancel, Cancel | None, _dump_set),
        )


def _route(
    router: APIRouter,
    kind: Kind,
    method: str,
    path: str,
    name: str,
    endpoint: Callable[..., Any],
    body: Any = None,
) -> None:
    """Add ``endpoint`` as the kind's: its path parameter (``payment_id``) in place of
    ``object_id``, its principal dependency and its ``body`` schema (required unless the
    schema admits ``None``)."""
    signature = inspect.signature(endpoint)
    parameters = []
    for param in signature.parameters.values():
        if param.name == "object_id":
            param = param.replace(name=kind.id_param)
        elif param.name == "principal":
            param = param.replace(annotation=kind.principal)
        elif param.name == "body" and body is not None:
            optional = isinstance(body, UnionType) and NoneType in body.__args__
            default = None if optional else inspect.Parameter.empty
            param = param.replace(annotation=body, default=default)
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


def _post(kind: Kind, action: Action) -> Callable[..., JSONResponse]:
    # A payment's authorise and capture answers are stored as references (views.STEPS).
    as_of = action.name if kind.name == "payment" and action.name in STEPS else None

    def post(
        object_id: str, *, body: BaseModel | None = None, principal: Principal, write: WriteDep
    ) -> JSONResponse:
        return write.once(
            principal,
            action.payload(body),
            lambda ctx: kind.to_json(action.service(ctx, object_id, body)),
            as_of=as_of,
        )

    return post


def add_routes(router: APIRouter, kind: Kind) -> None:
    """Add ``GET /{id}`` and the kind's lifecycle POSTs (authorise, capture or complete,
    uncertain, resolve, cancel) to ``router``."""

    def get(
        request: Request, object_id: str, principal: Principal, session: SessionDep
    ) -> dict[str, Any]:
        return kind.to_json(kind.get(make_ctx(request, session, principal), object_id))

    _route(router, kind, "GET", "/{id}", f"get_{kind.name}", get)
    for action in kind.actions():
        name = f"{action.name}_{kind.name}"
        _route(
            router, kind, "POST", f"/{{id}}/{action.name}", name, _post(kind, action), action.body
        )
