"""One page of a list endpoint: newest first, a cursor of the last id seen.

The answer's shape is the API's list object (docs/settlement-api.md "Lists"):
``{"object": "list", "data": [...], "has_more": bool}``. Rows are ordered by
``created_at`` then ``id``, both descending, so that rows made in the same instant still
page in one order; the cursor (``starting_after``) is a row the caller may see.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session


class _Listed(Protocol):
    created_at: Any
    id: Any


Row = TypeVar("Row", bound=_Listed)


def newest_first(
    session: Session,
    stmt: Select[Row],
    model: type[Row],
    *,
    limit: int,
    render: Callable[[Row], dict[str, Any]],
    after: Row | None = None,
) -> dict[str, Any]:
    """The page of ``stmt``'s rows that follows ``after`` (the first page without it)."""
    created: InstrumentedAttribute[Any] = model.created_at
    ident: InstrumentedAttribute[Any] = model.id
    if after is not None:
        stmt = stmt.where(
            or_(created < after.created_at, and_(created == after.created_at, ident < after.id))
        )
    rows = list(session.scalars(stmt.order_by(created.desc(), ident.desc()).limit(limit + 1)))
    return {
        "object": "list",
        "data": [render(row) for row in rows[:limit]],
        "has_more": len(rows) > limit,
    }
