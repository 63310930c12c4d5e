"""Test support for the webhooks and clearing suites: a settlement stack on a real database.

Each test gets a fresh database from the core's ``tests.settlement.support.database_url``
(the ``db_url`` fixture of ``conftest.py``): a SQLite file, or a fresh schema on the
PostgreSQL server at ``WEBPURSE_TEST_POSTGRES_URL``; without PostgreSQL those cases skip,
except with ``CI=true`` where they fail. The schema is made by the Alembic migrations.
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fastapi import FastAPI
from sqlalchemy import Engine

from tests.settlement.support import BACKENDS, database_url, migrate_to_head
from webpurse.settlement.app import create_app
from webpurse.settlement.auth import MERCHANT, OPERATOR, new_api_key
from webpurse.settlement.db import SessionFactory, make_engine, make_session_factory
from webpurse.settlement.models import Merchant
from webpurse.settlement.security import generate_master_keys
from webpurse.settlement.settings import Settings

# The databases come from the settlement core's support (SQLite file, PostgreSQL schema).
__all__ = ["BACKENDS", "database_url"]


@dataclass
class FakeClock:
    """The injected clock: tests move time, nothing sleeps."""

    now: dt.datetime

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, delta: dt.timedelta) -> None:
        self.now += delta


@dataclass
class Stack:
    """A migrated settlement database with two merchants, their keys and an operator key."""

    app: FastAPI
    engine: Engine
    session_factory: SessionFactory
    clock: FakeClock
    settings: Settings
    keys: dict[str, str] = field(default_factory=dict)

    def auth(self, who: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.keys[who]}"}


MERCHANT_A = "mer_alpha"
MERCHANT_B = "mer_bravo"


@contextmanager
def settlement_stack(
    url: str,
    start: dt.datetime,
    *,
    webhook_worker: bool = False,
    real_clock: bool = False,
    allow_private: bool = True,
) -> Iterator[Stack]:
    """The stack; ``allow_private`` (on: the receivers listen on 127.0.0.1) is the operator
    setting that lets webhook URLs point at private addresses."""
    kek = secrets.token_bytes(32)
    clock = FakeClock(start)
    settings_clock = (lambda: dt.datetime.now(dt.UTC)) if real_clock else clock
    settings = Settings(
        database_url=url,
        kek=kek,
        clock=settings_clock,
        webhook_worker=webhook_worker,
        webhook_interval=0.05,
        pool_size=3,
        max_overflow=2,
        webhook_allow_private=allow_private,
    )
    engine = make_engine(url, pool_size=3, max_overflow=2)
    try:
        migrate_to_head(engine)
        factory = make_session_factory(engine)
        generate_master_keys(factory, kek, start)
        keys: dict[str, str] = {}
        with factory() as session, session.begin():
            for number, merchant_id in enumerate((MERCHANT_A, MERCHANT_B), start=1):
                session.add(
                    Merchant(
                        id=merchant_id,
                        name=merchant_id,
                        terminal_id=f"{number:012d}",
                        terminal_seq=0,
                        created_at=start,
                    )
                )
            session.flush()
            keys[MERCHANT_A] = new_api_key(session, MERCHANT, start, MERCHANT_A)[1]
            keys[MERCHANT_B] = new_api_key(session, MERCHANT, start, MERCHANT_B)[1]
            keys["operator"] = new_api_key(session, OPERATOR, start)[1]
        app = create_app(settings, engine=engine)
        yield Stack(app, engine, factory, clock, settings, keys)
    finally:
        engine.dispose()


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A real HTTP server on a free loopback port that answers POSTs with scripted codes.

    ``codes`` are answered in order; after they run out every request gets ``then``.
    """

    def __init__(self, codes: list[int], then: int = 200) -> None:
        self.codes = list(codes)
        self.then = then
        self.received: list[Received] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                with receiver.arrived:
                    receiver.received.append(
                        Received({k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    code = receiver.codes.pop(0) if receiver.codes else receiver.then
                    receiver.arrived.notify_all()
                self.send_response(code)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/webhooks"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until ``count`` requests arrived (bounded), then return them."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.received) >= count, timeout=timeout):
                raise AssertionError(f"receiver got {len(self.received)} of {count} requests")
            return list(self.received)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
