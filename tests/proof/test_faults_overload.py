"""Fault: settlement's database pool is exhausted (every connection busy past its timeout).

Found by the soak's first version (100 requests in flight against a 20-connection pool on
a loaded machine): settlement answered 500 from an unhandled ``sqlalchemy`` pool timeout.
Busy is not broken: the request never got a connection, so nothing of it happened, and the
caller is told to retry (503 problem+json ``overloaded``, ``Retry-After``). Real PostgreSQL,
the real app with a one-connection pool whose only connection a test holds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select

from tests.asgi import AppClient
from tests.proof.conftest import Proof
from tests.settlement.support import database_url
from webpurse.settlement.app import create_app
from webpurse.settlement.db import make_session_factory, migrate, normalise_url
from webpurse.settlement.merchants import create_merchant
from webpurse.settlement.models import Payment
from webpurse.settlement.security import SoftwareSecurityModule, generate_master_keys
from webpurse.settlement.settings import Settings

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]


def test_an_exhausted_pool_is_a_503_to_retry_and_changes_nothing(
    tmp_path: Path, proof: Proof
) -> None:
    with (
        database_url("postgresql", tmp_path) as url,
        proof.row(
            "faults",
            "settlement's database pool exhausted (PostgreSQL): every connection busy",
            expected="503 problem+json overloaded with Retry-After; nothing created; "
            "served again once a connection frees",
        ) as row,
    ):
        engine = create_engine(normalise_url(url), pool_size=1, max_overflow=0, pool_timeout=0.5)
        try:
            migrate(engine)
            factory = make_session_factory(engine)
            kek = secrets.token_bytes(32)
            now = dt.datetime.now(dt.UTC)
            generate_master_keys(factory, kek, now)
            with factory() as session, session.begin():
                _, key = create_merchant(session, "Busy shop", now)
            settings = dataclasses.replace(
                Settings(database_url=url, kek=kek), webhook_worker=False
            )
            security = SoftwareSecurityModule.load(factory, kek)
            app = create_app(settings, security=security, engine=engine)
            body = {"amount": 100, "currency": "CNY", "description": "x"}
            auth = {"authorization": f"Bearer {key}"}
            with AppClient(app) as client:
                held = engine.connect()  # someone else holds the only connection
                try:
                    busy = client.post("/v1/payments", json=body, headers=auth)
                finally:
                    held.close()
                assert busy.status_code == 503, busy.text
                assert busy.headers["content-type"].startswith("application/problem+json")
                assert busy.json()["code"] == "overloaded"
                assert busy.headers["retry-after"] == "1"
                with factory() as session:
                    assert session.scalar(select(func.count()).select_from(Payment)) == 0
                again = client.post("/v1/payments", json=body, headers=auth)
                assert again.status_code == 201, again.text
        finally:
            engine.dispose()
        row.observed = (
            f"{busy.status_code} {busy.json()['code']}, Retry-After "
            f"{busy.headers['retry-after']}; 0 payments created; then {again.status_code}"
        )
