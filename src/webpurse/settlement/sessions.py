"""The request-scoped database session (a FastAPI dependency): the HTTP edge's transaction.

A route's session is committed when it returns and rolled back on error; :mod:`.db` holds
the engines and session factories and knows nothing of requests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from webpurse.settlement.db import SessionFactory


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for one request: committed when the route returns, rolled back on error.

    Creating a session does no I/O, so it happens on the event loop; the route (and the
    auth dependency) use it in worker threads. The end costs a thread hop only when the
    route left a transaction open (a route that commits, as every POST does through
    :func:`~webpurse.settlement.idempotency.run`, has already released its connection).
    """
    factory: SessionFactory = request.app.state.settlement.session_factory
    session = factory()
    try:
        yield session
    except BaseException:
        await run_in_threadpool(_finish, session, False)
        raise
    if session.in_transaction():
        await run_in_threadpool(_finish, session, True)
    else:
        session.close()


def _finish(session: Session, commit: bool) -> None:
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]
