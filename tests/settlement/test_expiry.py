"""The expiry sweep: a function with the clock injected, and the server running it itself."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from tests.asgi import AppClient
from tests.settlement.support import FakeClock, World, make_world
from webpurse.settlement import events, idempotency, webhooks
from webpurse.settlement.app import create_app
from webpurse.settlement.db import make_engine
from webpurse.settlement.expiry import expire_stale, sweep
from webpurse.settlement.models import IdempotencyRecord, Payment
from webpurse.settlement.webhooks import WebhookEvent


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
            with AppClient(app) as client:
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


def test_an_expired_payment_is_told_to_its_merchant_like_an_expired_load(world: World) -> None:
    """Expiry emits ``payment.expired`` (loads: ``load.failed``) in the sweep's transaction."""
    waiting = world.terminal.create_payment(100)
    load = world.terminal.create_load(200)

    def sweep(at: dt.datetime) -> None:
        with world.factory() as session, session.begin():
            expire_stale(
                session,
                at,
                requires_card_ttl=dt.timedelta(minutes=30),
                authorised_ttl=dt.timedelta(minutes=2),
            )

    def events_of(object_id: str) -> list[tuple[str, dict[str, Any]]]:
        with world.factory() as session:
            rows = session.scalars(
                select(WebhookEvent).where(WebhookEvent.merchant_id == world.merchant_id)
            ).all()
        bodies = [(row.type, json.loads(row.body)["data"]["object"]) for row in rows]
        return [(kind, obj) for kind, obj in bodies if obj["id"] == object_id]

    sweep(world.clock() + dt.timedelta(minutes=29))
    assert events_of(waiting["id"]) == []
    sweep(world.clock() + dt.timedelta(minutes=31))
    ((kind, obj),) = events_of(waiting["id"])
    assert kind == "payment.expired"
    assert obj["status"] == "expired" and obj["amount"] == 100
    assert [kind for kind, _ in events_of(load["id"])] == ["load.failed"]
    assert "payment.expired" in events.EVENT_TYPES
    assert "payment.expired" in webhooks.EVENT_TYPES


def test_the_sweep_commits_in_chunks_and_leaves_nothing_stale(tmp_path: Path) -> None:
    with make_world(f"sqlite:///{tmp_path / 's.db'}") as world:
        for _ in range(7):
            world.terminal.create_payment(100)
        commits: list[int] = []

        def factory() -> Session:
            session = world.factory()
            event.listen(session, "after_commit", lambda _: commits.append(1))
            return session

        report = sweep(
            factory,
            world.clock() + dt.timedelta(minutes=31),
            requires_card_ttl=dt.timedelta(minutes=30),
            authorised_ttl=dt.timedelta(minutes=2),
            chunk=3,
        )
        # 3 + 3 + 1 expired, one transaction each, then one for the housekeeping
        assert (report.payments_expired, report.chunks, len(commits)) == (7, 3, 4)
        with world.factory() as session:
            assert (
                session.scalar(
                    select(func.count()).select_from(Payment).where(Payment.status == "expired")
                )
                == 7
            )
        with pytest.raises(ValueError):
            sweep(
                factory,
                world.clock(),
                requires_card_ttl=dt.timedelta(minutes=30),
                authorised_ttl=dt.timedelta(minutes=2),
                chunk=0,
            )


def test_old_idempotency_keys_are_forgotten_in_bounded_committed_chunks(world: World) -> None:
    """Keys older than KEEP_FOR go, oldest first, at most ``purge_chunk`` per transaction;
    a key inside the window stays (its retry is still replayed)."""
    now = world.clock() + idempotency.KEEP_FOR + dt.timedelta(days=1)
    rows = [
        IdempotencyRecord(
            principal="mer_x",
            key=f"old-{i}",
            fingerprint="0" * 64,
            state="done",
            response_status=201,
            response_body="{}",
            created_at=now - idempotency.KEEP_FOR - dt.timedelta(minutes=i + 1),
        )
        for i in range(5)
    ]
    young = IdempotencyRecord(
        principal="mer_x",
        key="young",
        fingerprint="0" * 64,
        state="done",
        response_status=201,
        response_body="{}",
        created_at=now - idempotency.KEEP_FOR + dt.timedelta(minutes=1),
    )
    with world.factory() as session, session.begin():
        session.add_all([*rows, young])
    commits: list[int] = []

    def factory() -> Session:
        session = world.factory()
        event.listen(session, "after_commit", lambda _: commits.append(1))
        return session

    sweep(
        factory,
        now,
        requires_card_ttl=dt.timedelta(minutes=30),
        authorised_ttl=dt.timedelta(minutes=2),
        purge_chunk=2,
    )
    # one expiry chunk (nothing stale), housekeeping with 2 keys, then 2 + 1 keys
    assert len(commits) == 4
    with world.factory() as session:
        assert list(session.scalars(select(IdempotencyRecord.key))) == ["young"]
        with pytest.raises(ValueError):
            idempotency.purge(session, now, limit=0)
