"""Red-team attacks on two of issue 20's changes: the foreign keys migration 0019 dropped
(a purchase's payment, entries and webhook event name their merchant, card and transfer
unguarded; ``ledger check`` proves the names instead) and the merchant's batcher with two
or more batches in flight (a small batch held back beside a big one).

Tried as a hostile merchant (authorise with card data naming no card, on the single and
the batch endpoint), a database tamperer (rows renamed to name nothing), an operator
downgrading over orphans, and a stream of callers against the batcher (a batch that fails
or is malformed while callers are held back, a held caller cancelled, a steady stream of
big batches). The batcher's transport is a fake whose answers the test releases with
``asyncio.Event``; every wait is bounded by a timeout that fails the test. Rows go to the
``attacks_orphans_batcher`` proof table.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import inspect, select, text

from tests.proof.conftest import Proof
from tests.settlement.support import BACKENDS, World, database_url, make_world
from webpurse.merchant import settlement as settlement_module
from webpurse.merchant.settlement import (
    RETRY_PAUSES,
    BatchingSettlementClient,
    Kind,
    SettlementError,
)
from webpurse.settlement import ledger
from webpurse.settlement.db import make_engine, migrate
from webpurse.settlement.models import Card, Payment

SUITE = "attacks_orphans_batcher"
WAIT = 5.0  # seconds: any wait longer than this is a hang, and fails the test


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with database_url(str(request.param), tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


def backend(world: World) -> str:
    return "PostgreSQL" if world.url.startswith("postgresql") else "SQLite"


def _reference_problems(world: World) -> list[str]:
    with world.factory() as session:
        problems = ledger.check(session).problems
    return [p for p in problems if "names unknown" in p or "unknown transfer" in p]


# --- migration 0019: names no foreign key guards -----------------------------------------


def test_card_data_naming_no_card_creates_no_orphan(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"hostile merchant authorises with issuer data naming no card (a byte of a real"
        f" card's serial, the card number, altered), on the single and the batch endpoint; the"
        f" other merchant authorises this merchant's payment ({backend(world)})",
        expected="every attempt refused; no payment names a card or merchant that does not"
        " exist; ledger check reports no unknown name",
    ) as row:
        applet = world.funded_card(1000)
        terminal = world.terminal
        issuer, init = terminal.purchase_batch1(applet, 10)
        codes: set[int] = set()
        accepted: list[int] = []
        for position in (10, 13, 16, 19):  # the serial: the card number
            forged = bytearray(issuer)
            forged[position] ^= 0x01
            payment = terminal.create_payment(10)
            single = terminal.authorise_payment(payment["id"], bytes(forged), init)
            codes.add(single.status_code)
            if single.status_code == 200:
                accepted.append(position)
            payment = terminal.create_payment(10)
            batch = world.client.post(
                "/v1/batch",
                json={
                    "requests": [
                        {
                            "path": f"/v1/payments/{payment['id']}/authorise",
                            "body": {
                                "issuer_data": bytes(forged).hex(),
                                "initialize_response": init.hex(),
                                "terminal_id": terminal.terminal_id,
                            },
                        }
                    ]
                },
                headers=world.auth(world.merchant_key),
            )
            assert batch.status_code == 200, batch.text
            codes.add(int(batch.json()["responses"][0]["status"]))
        payment = terminal.create_payment(10)
        stolen = world.other_terminal.authorise_payment(payment["id"], issuer, init)
        codes.add(stolen.status_code)
        assert 200 not in codes, (codes, accepted, len(issuer))
        with world.factory() as session:
            card_ids = set(session.scalars(select(Card.id)))
            named = set(
                session.scalars(select(Payment.card_id).where(Payment.card_id.is_not(None)))
            )
        assert named <= card_ids, named - card_ids
        assert _reference_problems(world) == []
        row.observed = f"answers {sorted(codes)}; no payment names an unknown card or merchant"


def test_an_operator_names_no_merchant_and_creates_nothing(world: World, proof: Proof) -> None:
    variants = [
        "mer_ghost",
        world.merchant_id.upper(),
        world.merchant_id + " ",
        " " + world.merchant_id,
        world.merchant_id[:-1],
    ]
    with proof.row(
        SUITE,
        f"operator (and the merchant's own key) books a float deposit for a merchant that"
        f" does not exist: an unknown id, the real id in upper case, with a space, cut"
        f" short ({backend(world)})",
        expected="every one 404 (or 403 for the merchant's key); no row names an unknown"
        " merchant; ledger check reports none",
    ) as row:
        codes: list[int] = []
        for number, merchant_id in enumerate(variants):
            for key in (world.operator_key, world.merchant_key):
                answer = world.client.post(
                    f"/v1/operator/floats/{merchant_id}/deposits",
                    json={"amount": 100, "bank_reference": f"R{number}"},
                    headers={**world.auth(key), "idempotency-key": f"k{number}{key[-4:]}"},
                )
                codes.append(answer.status_code)
        assert set(codes) <= {403, 404}, codes
        assert 404 in codes, codes
        with world.factory() as session:
            merchants = {m for (m,) in session.execute(text("SELECT id FROM merchants"))}
            named = {m for (m,) in session.execute(text("SELECT merchant_id FROM float_deposits"))}
            named |= {m for (m,) in session.execute(text("SELECT merchant_id FROM webhook_events"))}
        assert named <= merchants, named - merchants
        assert _reference_problems(world) == []
        row.observed = f"answers {sorted(set(codes))}; nothing names an unknown merchant"


def test_ledger_check_reports_each_renamed_row(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"database tamperer renames a purchase's rows to name nothing: a payment's merchant,"
        f" a payment's card, a webhook event's merchant, a ledger entry's transfer, each"
        f" alone ({backend(world)})",
        expected="ledger check names each tampered row and the unknown name; the untampered"
        " database reports none",
    ) as row:
        applet = world.funded_card(1000)
        world.terminal.purchase(applet, 10)
        assert _reference_problems(world) == []
        tamperings = [
            ("UPDATE payments SET merchant_id = 'mer_ghost'", "unknown merchant mer_ghost"),
            ("UPDATE payments SET card_id = 'crd_ghost'", "unknown card crd_ghost"),
            ("UPDATE webhook_events SET merchant_id = 'mer_ghost'", "unknown merchant mer_ghost"),
            (
                "UPDATE ledger_entries SET transfer_id = 'trf_ghost'"
                " WHERE id = (SELECT max(id) FROM ledger_entries)",
                "trf_ghost",
            ),
        ]
        seen: list[str] = []
        for statement, expected in tamperings:
            with world.factory() as session:
                changed = session.execute(text(statement)).rowcount  # type: ignore[attr-defined]
                assert changed >= 1, statement
                session.flush()
                problems = ledger.check(session).problems
                session.rollback()  # each tampering alone
            hits = [p for p in problems if expected in p]
            assert hits, (statement, problems)
            seen.append(hits[0])
        assert _reference_problems(world) == []
        row.observed = "; ".join(seen)[:280]


def test_downgrade_over_orphans_fails_and_keeps_the_rows(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"operator downgrades below 0019 while a payment names a card that does not exist"
        f" ({backend(world)})",
        expected="the downgrade raises, the database stays at head with its rows and no"
        " foreign key is half restored",
    ) as row:
        applet = world.funded_card(1000)
        world.terminal.purchase(applet, 10)
        with world.factory() as session, session.begin():
            session.execute(text("UPDATE payments SET card_id = 'crd_ghost'"))
        engine = make_engine(world.url, pool_size=1, max_overflow=0)
        try:
            with engine.connect() as connection:
                head = connection.scalar(text("SELECT version_num FROM alembic_version"))
                payments = connection.scalar(text("SELECT count(*) FROM payments"))
            with pytest.raises(Exception) as refused:
                migrate(engine, "0018_i20_payment_holds", downgrade=True)
            with engine.connect() as connection:
                after = connection.scalar(text("SELECT version_num FROM alembic_version"))
                assert connection.scalar(text("SELECT count(*) FROM payments")) == payments
            found = inspect(engine)
            restored = {
                (table, fk["referred_table"])
                for table in ("ledger_entries", "payments", "webhook_events")
                for fk in found.get_foreign_keys(table)
                if fk["referred_table"] in ("ledger_transfers", "merchants", "cards")
            }
        finally:
            engine.dispose()
        assert after == head, (head, after, repr(refused.value)[:300])
        assert restored == set(), restored
        assert any("unknown card crd_ghost" in p for p in _reference_problems(world))
        row.observed = f"refused: {type(refused.value).__name__}; still at {after}"


# --- the batcher with two or more in flight ----------------------------------------------


class Gate(httpx.AsyncBaseTransport):
    """Each batch waits for its own release; a batch of ``fail_size`` items raises a
    transport error once released (and every resend of it at once: the client's retries),
    one of ``wrong_size`` items is answered with one answer too many."""

    def __init__(self, *, fail_size: int = 0, wrong_size: int = 0) -> None:
        self.sizes: list[int] = []
        self.releases: list[asyncio.Event] = []
        self.arrived = asyncio.Condition()
        self.fail_size = fail_size
        self.wrong_size = wrong_size
        self.failing = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        items = json.loads(request.content)["requests"]
        failing = len(items) == self.fail_size
        if not (failing and self.failing):
            release = asyncio.Event()
            self.sizes.append(len(items))
            self.releases.append(release)
            async with self.arrived:
                self.arrived.notify_all()
            await release.wait()
        if failing:
            self.failing = True
            raise httpx.ConnectError("settlement went away")
        count = len(items) + (1 if len(items) == self.wrong_size else 0)
        body = {"id": "pay_1", "status": "requires_card", "amount": 100}
        answer = {"status": 201, "body": body, "replayed": False}
        return httpx.Response(200, json={"object": "batch", "responses": [answer] * count})

    async def sent(self, count: int) -> None:
        async def until() -> None:
            async with self.arrived:
                await self.arrived.wait_for(lambda: len(self.sizes) >= count)

        await asyncio.wait_for(until(), WAIT)


def _creates(client: BatchingSettlementClient, count: int, tag: str) -> list[asyncio.Task[Any]]:
    return [
        asyncio.ensure_future(
            client.create(Kind.PAYMENT, 100, description="tea", reference=f"{tag}{i}")
        )
        for i in range(count)
    ]


async def _settle(tasks: list[asyncio.Task[Any]]) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT)


async def _turns(count: int = 20) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


@pytest.mark.parametrize("failure", ["transport error", "wrong count"])
async def test_held_callers_are_sent_when_the_big_batch_fails(
    proof: Proof, failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settlement_module, "RETRY_PAUSES", tuple(0.0 for _ in RETRY_PAUSES))
    with proof.row(
        SUITE,
        f"two in flight: a big batch fails ({failure}) while a few callers are held back beside it",
        expected="the big batch's callers get SettlementError; the held callers are sent"
        " next and answered; no slot is lost (a later batch goes)",
    ) as row:
        transport = Gate(
            **({"fail_size": 40} if failure == "transport error" else {"wrong_size": 40})
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as http:
            client = BatchingSettlementClient(http, "sk_mer_x", max_in_flight=2)
            big = _creates(client, 40, "big")
            await transport.sent(1)
            few = _creates(client, 3, "few")
            await _turns()
            assert transport.sizes == [40] and not any(t.done() for t in few)
            transport.releases[0].set()
            await transport.sent(2)
            transport.releases[1].set()
            big_answers = await _settle(big)
            few_answers = await _settle(few)
            later = _creates(client, 5, "later")
            await transport.sent(3)
            transport.releases[2].set()
            later_answers = await _settle(later)
        assert all(isinstance(a, SettlementError) for a in big_answers), big_answers[:2]
        assert not any(isinstance(a, BaseException) for a in few_answers + later_answers)
        assert transport.sizes == [40, 3, 5]
        row.observed = f"batches {transport.sizes}; 40 errors, 3+5 answered"


async def test_a_held_caller_cancelled_leaks_nothing(proof: Proof) -> None:
    with proof.row(
        SUITE,
        "two in flight: a held-back caller's task is cancelled while it waits beside a big batch",
        expected="the cancelled caller sees CancelledError; the others held with it and the"
        " next callers are answered; the batcher ends with nothing in flight",
    ) as row:
        transport = Gate()
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as http:
            client = BatchingSettlementClient(http, "sk_mer_x", max_in_flight=2)
            big = _creates(client, 40, "big")
            await transport.sent(1)
            few = _creates(client, 3, "few")
            await _turns()
            few[0].cancel()
            await _turns()
            transport.releases[0].set()
            await transport.sent(2)
            transport.releases[1].set()
            answers = await _settle(big + few)
            later = _creates(client, 2, "later")
            await transport.sent(3)
            transport.releases[2].set()
            answers += await _settle(later)
        assert isinstance(answers[40], asyncio.CancelledError)
        others = answers[:40] + answers[41:]
        assert not any(isinstance(a, BaseException) for a in others)
        assert client._flying == [] and client._queue == []  # nothing in flight, nothing queued
        row.observed = f"batches {transport.sizes}; cancelled caller alone saw CancelledError"


async def test_a_steady_stream_of_big_batches_does_not_starve_the_few(proof: Proof) -> None:
    with proof.row(
        SUITE,
        "two in flight: a steady stream (a wave of 40 callers every time a batch comes back,"
        " always one big batch on its way) while 3 callers are held back",
        expected="the 3 held callers go at the front of the next batch sent and are answered"
        " after at most one batch comes back",
    ) as row:
        transport = Gate()
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as http:
            client = BatchingSettlementClient(http, "sk_mer_x", max_in_flight=2)
            waves = [_creates(client, 40, "w0")]
            await transport.sent(1)
            few = _creates(client, 3, "few")
            await _turns()
            assert transport.sizes == [40]
            for wave in range(1, 6):
                waves.append(_creates(client, 40, f"w{wave}"))
                await transport.sent(len(transport.sizes) + 1)
                transport.releases[wave - 1].set()
                await _turns()
                if all(task.done() for task in few):
                    break
            assert all(task.done() for task in few), transport.sizes
            for release in transport.releases:
                release.set()
            for tasks in waves:
                await _settle(tasks)
            for _ in range(3):  # batches sent by the last releases
                for release in transport.releases:
                    release.set()
                await _turns()
            answers = await _settle(few)
        assert not any(isinstance(a, BaseException) for a in answers)
        assert transport.sizes[1] == 43, transport.sizes
        row.observed = f"batches {transport.sizes}: the 3 rode the next wave's batch"


async def test_one_in_flight_is_unchanged(proof: Proof) -> None:
    with proof.row(
        SUITE,
        "one in flight (the default): 512 callers queued while a batch is on its way",
        expected="batches of max_batch and the rest (500 and 12), as before the change",
    ) as row:
        transport = Gate()
        async with httpx.AsyncClient(transport=transport, base_url="http://s") as http:
            client = BatchingSettlementClient(http, "sk_mer_x")
            first = _creates(client, 1, "first")
            await transport.sent(1)
            rest = _creates(client, 512, "rest")
            await _turns()
            transport.releases[0].set()
            await transport.sent(2)
            transport.releases[1].set()
            await transport.sent(3)
            transport.releases[2].set()
            answers = await _settle(first + rest)
        assert not any(isinstance(a, BaseException) for a in answers)
        assert transport.sizes == [1, 500, 12]
        row.observed = f"batches {transport.sizes}"
