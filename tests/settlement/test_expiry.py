"""The expiry sweep: a function with the clock injected, and the server running it itself."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path

from fastapi.testclient import TestClient

from tests.settlement.support import FakeClock, make_world
from webpurse.settlement.app import create_app
from webpurse.settlement.db import make_engine
from webpurse.settlement.expiry import expire_stale


def test_expire_stale_is_a_pure_sweep_over_the_injected_clock(tmp_path: Path) -> None:
    with make_world(f"sqlite:///{tmp_path / 's.db'}") as world:
        waiting = world.terminal.create_payment(100)
        with world.factory() as session, session.begin():
            early = expire_stale(
                session,
                world.clock() + dt.timedelta(minutes=29),
                requires_card_ttl=dt.timedelta(minutes=30),
                authorised_ttl=dt.timedelta(minutes=2),
            )
        assert early.payments_expired == 0
        with world.factory() as session, session.begin():
            late = expire_stale(
                session,
                world.clock() + dt.timedelta(minutes=31),
                requires_card_ttl=dt.timedelta(minutes=30),
                authorised_ttl=dt.timedelta(minutes=2),
            )
        assert late.payments_expired == 1
        got = world.client.get(
            f"/v1/payments/{waiting['id']}", headers=world.auth(world.merchant_key)
        )
        assert got.json()["status"] == "expired"


def test_the_server_sweeps_by_itself(tmp_path: Path) -> None:
    clock = FakeClock()
    with make_world(f"sqlite:///{tmp_path / 's.db'}", clock=clock) as world:
        settings = dataclasses.replace(world.settings, sweep_interval=0.05)
        engine = make_engine(world.url)
        app = create_app(settings, security=world.security, engine=engine)
        try:
            with TestClient(app) as client:
                auth = world.auth(world.merchant_key)
                payment = client.post("/v1/payments", json={"amount": 5}, headers=auth).json()
                clock.advance(dt.timedelta(minutes=31))
                deadline = time.monotonic() + 10
                status = payment["status"]
                while status != "expired" and time.monotonic() < deadline:
                    time.sleep(0.05)  # bounded polling for the background sweep's effect
                    status = client.get(f"/v1/payments/{payment['id']}", headers=auth).json()[
                        "status"
                    ]
                assert status == "expired"
        finally:
            engine.dispose()
