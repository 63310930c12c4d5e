"""Attacks by one merchant (or anyone) on everyone else's progress (issue 19).

Each case runs against real servers and, where it is a race, real PostgreSQL:

- webhook endpoint cap: 60 parallel creates leave at most 16 live endpoints;
- webhook tarpit: an endpoint that sends its headers one byte at a time delays no other
  merchant's deliveries, holds at most its per-endpoint share of the worker, and its own
  attempts end at the total deadline;
- huge bodies: an unauthenticated 128 MiB chunked POST is refused with 413 after about the
  limit, before authentication; the server's memory stays flat and ``/health`` answers;
- the expiry sweep: thousands of stale load orders of one shop are expired in small
  committed chunks while another shop's load creates answer; open ``requires_card`` orders
  per merchant are capped (429);
- clearing: one merchant refunding 1 fen at a time from 8 threads fails no merchant's
  batch; a refund forced between a batch's read of the payable and its payout waits for the
  batch (before the fix the payout overdrew: 409 ledger_refused); a capture committed after
  its day's batch and a top-up returned after it was settled are paid out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import re
import select as io_select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from tests.proof.conftest import Proof
from tests.settlement.support import (
    LiveServer,
    World,
    database_url,
    live_server,
    make_world,
    seed_float,
)
from webpurse.settlement import ledger, load_orders
from webpurse.settlement.auth import MERCHANT, Principal
from webpurse.settlement.clearing import (
    CHINA_STANDARD_TIME,
    ClearedDay,
    ClearingBatch,
    run_batch,
    run_day,
)
from webpurse.settlement.db import SessionFactory, make_engine, make_session_factory, migrate
from webpurse.settlement.expiry import SweepReport, sweep
from webpurse.settlement.merchants import create_merchant
from webpurse.settlement.models import Load, Merchant
from webpurse.settlement.routes_webhooks import MAX_ENDPOINTS_PER_MERCHANT, secret_box_for
from webpurse.settlement.service import Ctx
from webpurse.settlement.webhooks import (
    WebhookAttempt,
    WebhookEndpoint,
    WebhookEvent,
    WebhookMessage,
    WebhookWorker,
    enqueue_event,
)

SUITE = "attacks_stall"


@pytest.fixture
def pg_server(tmp_path: Path) -> Iterator[LiveServer]:
    with (
        database_url("postgresql", tmp_path, migrated=True) as url,
        live_server(url, tmp_path) as live,
    ):
        yield live


@pytest.mark.postgres
def test_sixty_parallel_endpoint_creates_leave_at_most_the_cap(
    pg_server: LiveServer, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "webhook endpoint cap under 60 parallel creates (PostgreSQL)",
        expected=f"at most {MAX_ENDPOINTS_PER_MERCHANT} live endpoints; the rest 400 "
        "too_many_endpoints",
    ) as row:
        headers = {"authorization": f"Bearer {pg_server.merchant_key}"}
        limits = httpx.Limits(max_connections=60)
        with httpx.Client(base_url=pg_server.base_url, timeout=60, limits=limits) as http:

            def create(i: int) -> httpx.Response:
                return http.post(
                    "/v1/webhook_endpoints",
                    json={"url": f"http://127.0.0.1:9/hook/{i}", "events": ["*"]},
                    headers=headers,
                )

            with ThreadPoolExecutor(60) as pool:
                answers = list(pool.map(create, range(60)))
        created = [a for a in answers if a.status_code == 201]
        refused = [a for a in answers if a.status_code == 400]
        busy = [a for a in answers if a.status_code == 503]  # pool wait ran out: did nothing
        assert len(created) + len(refused) + len(busy) == 60, [a.text for a in answers]
        assert all(a.json()["code"] == "too_many_endpoints" for a in refused)
        assert all(a.json()["code"] == "overloaded" for a in busy)
        with pg_server.factory() as session:
            live = session.scalar(
                select(func.count())
                .select_from(WebhookEndpoint)
                .where(WebhookEndpoint.deleted_at.is_(None))
            )
        assert live == len(created) == MAX_ENDPOINTS_PER_MERCHANT
        row.observed = (
            f"{len(created)} created, {len(refused)} refused, {len(busy)} busy (503), {live} live"
        )


# --- huge bodies before authentication -------------------------------------------------

CHUNK = 64 << 10
HUGE = 128 << 20


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _chunked_upload(base_url: str, path: str, on_4mib: Callable[[], None]) -> tuple[bytes, int]:
    """POST up to 128 MiB chunked, no key, until the server answers; (answer, bytes sent)."""
    host, port = base_url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            "transfer-encoding: chunked\r\n\r\n".encode()
        )
        chunk = f"{CHUNK:x}\r\n".encode() + b"[" * CHUNK + b"\r\n"
        try:
            while sent < HUGE:
                readable, _, _ = io_select.select([sock], [], [], 0)
                if readable:  # the server answered before the body ended
                    break
                sock.sendall(chunk)
                sent += CHUNK
                if sent == 4 << 20:
                    on_4mib()
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed after answering: read what it said
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while not _complete(answer):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
    return answer, sent


def _complete(answer: bytes) -> bool:
    """Whether ``answer`` holds a whole HTTP response (its headers and Content-Length bytes)."""
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def test_an_unauthenticated_huge_chunked_body_is_refused_before_it_is_read(
    tmp_path: Path, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "unauthenticated 128 MiB chunked POST /v1/batch (real uvicorn)",
        expected="413 payload_too_large problem+json after ~8 MiB, before any 401; "
        "server memory flat; /health answers meanwhile",
    ) as row:
        url = f"sqlite:///{tmp_path / 'settlement.db'}"
        with (
            live_server(url, tmp_path) as server,
            httpx.Client(base_url=server.base_url, timeout=5) as http,
        ):
            assert server.pid is not None
            assert http.get("/health").status_code == 200
            before = _rss_mib(server.pid)
            health: list[int] = []
            started = time.monotonic()
            answer, sent = _chunked_upload(
                server.base_url, "/v1/batch", lambda: health.append(http.get("/health").status_code)
            )
            seconds = time.monotonic() - started
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 413"), answer[:300]
            assert b"application/problem+json" in head.lower()
            assert json.loads(body)["code"] == "payload_too_large"
            assert sent <= 16 << 20, f"{sent} bytes went in before the refusal"
            after = _rss_mib(server.pid)
            assert after - before < 64, (before, after)
            assert health == [200]
            assert http.get("/health").status_code == 200
            # A declared length over the limit is refused without reading a byte of it.
            declared = http.post(
                "/v1/payments",
                content=b"{" + b" " * (2 << 20) + b"}",
                headers={"content-type": "application/json"},
            )
            assert declared.status_code == 413, declared.text
            assert declared.json()["code"] == "payload_too_large"
        row.observed = (
            f"413 after {sent >> 20} MiB in {seconds:.1f} s; RSS {before:.0f} → {after:.0f} MiB; "
            "/health 200 during and after"
        )


# --- a webhook tarpit --------------------------------------------------------------------

TARPIT_EVENTS = 20
OTHER_EVENTS = 5
DEADLINE = 5.0
PER_ENDPOINT = 4


async def test_a_tarpit_webhook_endpoint_delays_no_other_merchant(
    tmp_path: Path, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "webhook tarpit: an endpoint sends its headers one byte every 0.5 s",
        expected=f"other merchant's {OTHER_EVENTS} events delivered while the tarpit holds its "
        f"connections; at most {PER_ENDPOINT} of its messages in flight; each of its attempts "
        f"ends at the {DEADLINE:g} s deadline",
    ) as row:
        tarpit_open = 0
        tarpit_most = 0
        tarpit_connected = asyncio.Event()
        tarpit_dropped = asyncio.Event()

        async def tarpit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal tarpit_open, tarpit_most
            tarpit_open += 1
            # what the worker has in flight to this endpoint (the server side only learns
            # of a connection the worker gave up at its next write)
            tarpit_most = max(tarpit_most, *(w.in_flight().get(slow_id, 0) for w in workers))
            tarpit_connected.set()
            try:
                await reader.readuntil(b"\r\n\r\n")
                for byte in b"HTTP/1.1 200 OK\r\nx-slow: " + b"a" * 10_000:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.5)  # the attack: one byte every half second
            except (ConnectionError, asyncio.IncompleteReadError):
                tarpit_dropped.set()
            finally:
                tarpit_open -= 1
                writer.close()

        workers: list[WebhookWorker] = []
        slow_id = ""
        received: list[str] = []
        got_all = asyncio.Event()

        async def prompt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            event_id = re.search(rb"(?i)webhook-id: *(\S+)", head)
            received.append(event_id.group(1).decode() if event_id else "?")
            writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            if len(received) >= OTHER_EVENTS:
                got_all.set()

        slow_server = await asyncio.start_server(tarpit, "127.0.0.1", 0)
        fast_server = await asyncio.start_server(prompt, "127.0.0.1", 0)
        slow_port = slow_server.sockets[0].getsockname()[1]
        fast_port = fast_server.sockets[0].getsockname()[1]
        url = f"sqlite:///{tmp_path / 'settlement.db'}"
        with make_world(url) as world:
            endpoints = []
            for key, port in ((world.merchant_key, slow_port), (world.other_key, fast_port)):
                created = world.client.post(
                    "/v1/webhook_endpoints",
                    json={"url": f"http://127.0.0.1:{port}/hook", "events": ["*"]},
                    headers=world.auth(key),
                )
                assert created.status_code == 201, created.text
                endpoints.append(created.json()["id"])
            slow_id = endpoints[0]
            with world.factory() as session:
                other_id = session.scalars(
                    select(WebhookEndpoint.merchant_id).where(
                        WebhookEndpoint.merchant_id != world.merchant_id
                    )
                ).one()

            def enqueue(merchant_id: str, n: int) -> list[str]:
                with world.factory() as session, session.begin():
                    return [
                        enqueue_event(
                            session,
                            merchant_id,
                            "payment.succeeded",
                            {"id": f"pay_{i}"},
                            now=world.clock(),
                        )
                        for i in range(n)
                    ]

            enqueue(world.merchant_id, TARPIT_EVENTS)
            worker = WebhookWorker(
                world.factory,
                secret_box_for(world.settings),
                clock=world.clock,
                interval=0.2,
                allow_private=True,
                deadline=DEADLINE,
                per_endpoint=PER_ENDPOINT,
                max_in_flight=8,  # the tarpit's 20 messages alone could fill every slot
            )
            workers.append(worker)
            await worker.start()
            try:
                await asyncio.wait_for(tarpit_connected.wait(), timeout=30)
                started = time.monotonic()
                wanted = enqueue(other_id, OTHER_EVENTS)
                await asyncio.wait_for(got_all.wait(), timeout=30)
                prompt_seconds = time.monotonic() - started
                held = tarpit_open
                with world.factory() as session:
                    tarpit_attempts_so_far = session.scalar(
                        select(func.count())
                        .select_from(WebhookAttempt)
                        .join(WebhookMessage, WebhookMessage.id == WebhookAttempt.message_id)
                        .join(WebhookEvent, WebhookEvent.id == WebhookMessage.event_id)
                        .where(WebhookEvent.merchant_id == world.merchant_id)
                    )
                await asyncio.wait_for(tarpit_dropped.wait(), timeout=60)
                attempts = await _tarpit_attempts(world, world.merchant_id)
            finally:
                await worker.stop()
                slow_server.close()
                fast_server.close()
        assert sorted(received) == sorted(wanted)
        assert held > 0 and tarpit_attempts_so_far == 0, "delivered only after the tarpit"
        assert 0 < tarpit_most <= PER_ENDPOINT
        assert attempts and all(a.error and a.error.startswith("deadline") for a in attempts)
        assert all(DEADLINE * 1000 <= a.duration_ms < (DEADLINE + 5) * 1000 for a in attempts)
        row.observed = (
            f"{len(received)}/{OTHER_EVENTS} delivered in {prompt_seconds:.1f} s while the tarpit "
            f"held {held} connections (at most {tarpit_most} in flight); its attempts ended at "
            f"{min(a.duration_ms for a in attempts)} ms: deadline"
        )


async def _tarpit_attempts(world: World, merchant_id: str) -> list[WebhookAttempt]:
    """The tarpit merchant's recorded attempts, once its first ones are recorded."""
    for _ in range(200):  # bounded wait for the worker's own transaction, not a result race
        with world.factory() as session:
            rows = list(
                session.scalars(
                    select(WebhookAttempt)
                    .join(WebhookMessage, WebhookMessage.id == WebhookAttempt.message_id)
                    .join(WebhookEvent, WebhookEvent.id == WebhookMessage.event_id)
                    .where(WebhookEvent.merchant_id == merchant_id)
                )
            )
        if rows:
            return rows
        await asyncio.sleep(0.05)
    return []


# --- the expiry sweep and the open-order cap -----------------------------------------------

STALE_LOADS = 2000
SWEEP_CHUNK = 100


def _stale_load_orders(server: LiveServer, merchant_id: str, n: int, at: dt.datetime) -> None:
    """``n`` one-fen load orders of one shop, each holding its fen in ``held:loads``."""
    principal = Principal(role=MERCHANT, key_id="attack", merchant_id=merchant_id)
    with server.factory() as session, session.begin():
        ctx = Ctx(session, server.security, at, principal)
        for i in range(n):
            load_orders.create_order(
                ctx,
                amount=1,
                currency="CNY",
                funding_method="merchant_float",
                funding_reference=f"r{i}",
                merchant_id=merchant_id,
                card_number=None,
            )


@pytest.mark.postgres
def test_a_long_expiry_sweep_blocks_no_other_shops_load_creates(
    pg_server: LiveServer, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"expiry sweep of one shop's {STALE_LOADS} stale 1-fen load orders (PostgreSQL)",
        expected=f"swept in committed chunks of {SWEEP_CHUNK}; another shop's load creates all "
        "answer 201 while the sweep is still running",
    ) as row:
        with pg_server.factory() as session:
            attacker = session.scalars(select(Merchant.id)).one()
        with pg_server.factory() as session, session.begin():
            other, other_key = create_merchant(session, "Other shop", dt.datetime.now(dt.UTC))
            seed_float(session, other.id, 100_000, dt.datetime.now(dt.UTC))
            other_id = other.id
        now = dt.datetime.now(dt.UTC)
        _stale_load_orders(pg_server, attacker, STALE_LOADS, now)  # stale at now + 2 h
        done = threading.Event()
        first_chunk = threading.Event()
        reports: list[SweepReport] = []

        def factory() -> Session:
            """The server's sessions, telling the test when the first chunk has committed."""
            session = pg_server.factory()
            event.listen(session, "after_commit", lambda _: first_chunk.set())
            return session

        def run_sweep() -> None:
            try:
                reports.append(
                    sweep(
                        factory,
                        now + dt.timedelta(hours=2),  # the server sweeps on real time
                        requires_card_ttl=dt.timedelta(minutes=30),
                        authorised_ttl=dt.timedelta(minutes=2),
                        chunk=SWEEP_CHUNK,
                    )
                )
            finally:
                done.set()

        sweeper = threading.Thread(target=run_sweep)
        sweeper.start()
        latencies: list[float] = []
        answered_during_sweep = 0
        try:
            assert first_chunk.wait(timeout=120)
            with httpx.Client(base_url=pg_server.base_url, timeout=60) as http:
                for i in range(5):
                    started = time.monotonic()
                    answer = http.post(
                        "/v1/loads",
                        json={
                            "amount": 100,
                            "funding": {"method": "merchant_float", "reference": f"o{i}"},
                        },
                        headers={"authorization": f"Bearer {other_key}"},
                    )
                    latencies.append(time.monotonic() - started)
                    assert answer.status_code == 201, answer.text
                    answered_during_sweep += not done.is_set()
        finally:
            sweeper.join(timeout=300)
        # (the other shop's creates are stale at the sweep's clock too, if it reached them)
        assert reports and reports[0].loads_expired >= STALE_LOADS
        assert reports[0].chunks > STALE_LOADS // SWEEP_CHUNK
        assert answered_during_sweep == 5, "the creates waited for the whole sweep"
        with pg_server.factory() as session:
            assert ledger.check(session).ok
            expired = session.scalar(
                select(func.count())
                .select_from(Load)
                .where(Load.merchant_id == attacker, Load.status == "expired")
            )
            assert expired == STALE_LOADS
            theirs = session.scalar(
                select(func.count()).select_from(Load).where(Load.merchant_id == other_id)
            )
            assert theirs == 5
        row.observed = (
            f"{STALE_LOADS} expired in {reports[0].chunks} chunks; other shop's 5 "
            f"creates 201 during the sweep, slowest {max(latencies) * 1000:.0f} ms"
        )


def test_open_requires_card_orders_per_merchant_are_capped(tmp_path: Path, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "one merchant opens more requires_card payments and load orders than its cap",
        expected="429 too_many_open_orders problem+json beyond the cap (payments, loads, "
        "batch); other merchants unaffected; room again once one is canceled",
    ) as row:
        url = f"sqlite:///{tmp_path / 'settlement.db'}"
        with make_world(url) as world:
            cap = 5
            client = world.client
            client.app.state.settlement.settings = dataclasses.replace(  # type: ignore[attr-defined]
                world.settings, max_open_orders=cap
            )
            mine = world.auth(world.merchant_key)
            created = [
                client.post("/v1/payments", json={"amount": 1}, headers=mine) for _ in range(cap)
            ]
            assert all(a.status_code == 201 for a in created)
            over = client.post("/v1/payments", json={"amount": 1}, headers=mine)
            assert over.status_code == 429, over.text
            assert over.headers["content-type"].startswith("application/problem+json")
            assert over.json()["code"] == "too_many_open_orders"
            batch = client.post(
                "/v1/batch",
                json={"requests": [{"path": "/v1/payments", "body": {"amount": 1}}]},
                headers=mine,
            )
            assert batch.status_code == 200, batch.text
            assert batch.json()["responses"][0]["status"] == 429
            funding = {"method": "merchant_float", "reference": "x"}
            loads_made = [
                client.post("/v1/loads", json={"amount": 1, "funding": funding}, headers=mine)
                for _ in range(cap + 1)
            ]
            assert [a.status_code for a in loads_made] == [201] * cap + [429]
            theirs = client.post(
                "/v1/payments", json={"amount": 1}, headers=world.auth(world.other_key)
            )
            assert theirs.status_code == 201
            canceled = client.post(
                f"/v1/payments/{created[0].json()['id']}/cancel", json={}, headers=mine
            )
            assert canceled.status_code == 200, canceled.text
            again = client.post("/v1/payments", json={"amount": 1}, headers=mine)
            assert again.status_code == 201
        row.observed = "6th payment, batch item and 6th load 429 too_many_open_orders; other "
        row.observed += "merchant 201; after a cancel 201"


# --- clearing ----------------------------------------------------------------------------

CLEAR_DAYS = 8
REFUNDERS = 8


def _capture(factory: SessionFactory, merchant_id: str, amount: int, at: dt.datetime) -> None:
    with factory() as session, session.begin():
        tag = f"{merchant_id}:{at.isoformat()}:{amount}"
        ledger.post_transfer(
            session,
            f"{tag}:hold",
            "funding:test",
            ledger.HELD_PURCHASES,
            amount,
            "purchase_hold",
            now=at,
        )
        ledger.post_transfer(
            session,
            f"{tag}:capture",
            ledger.HELD_PURCHASES,
            ledger.merchant_account(merchant_id),
            amount,
            "purchase_capture",
            now=at,
        )


@pytest.mark.postgres
def test_one_merchant_refunding_from_eight_threads_fails_no_payout(
    tmp_path: Path, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"clearing {CLEAR_DAYS} days while one merchant refunds 1 fen at a time from "
        f"{REFUNDERS} threads (PostgreSQL)",
        expected="every run clears every merchant: no failure, the other merchant paid in full; "
        "the refunding merchant's payouts + payable + refunds == its captures",
    ) as row:
        days = [dt.date(2026, 11, 1) + dt.timedelta(days=i) for i in range(CLEAR_DAYS)]
        now = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
        with database_url("postgresql", tmp_path) as url:
            engine = make_engine(url, pool_size=REFUNDERS + 2, max_overflow=2)
            try:
                migrate(engine)
                factory = make_session_factory(engine)
                with factory() as session, session.begin():
                    busy = create_merchant(session, "Refunding shop", now)[0].id
                    calm = create_merchant(session, "Calm shop", now)[0].id
                for day in days:
                    noon = dt.datetime.combine(day, dt.time(12), tzinfo=CHINA_STANDARD_TIME)
                    _capture(factory, busy, 10_000, noon)
                    _capture(factory, calm, 10_000, noon)
                stop = threading.Event()
                refunded = [0] * REFUNDERS

                def refund_forever(worker: int) -> None:
                    for n in itertools.count():
                        if stop.is_set():
                            return
                        with contextlib.suppress(ledger.LedgerError), factory() as session:
                            with session.begin():
                                ledger.post_transfer(
                                    session,
                                    f"refund:{worker}:{n}",
                                    ledger.merchant_account(busy),
                                    ledger.REFUNDS_PENDING,
                                    1,
                                    "refund_reserve",
                                    now=now,
                                )
                            refunded[worker] += 1

                threads = [
                    threading.Thread(target=refund_forever, args=(i,)) for i in range(REFUNDERS)
                ]
                for thread in threads:
                    thread.start()
                runs: list[ClearedDay] = []
                try:
                    for day in days:
                        while sum(refunded) < 20 * (len(runs) + 1):  # refunds are flowing
                            time.sleep(0.01)  # waiting on the other threads' progress
                        runs.append(run_day(factory, day, now))
                finally:
                    stop.set()
                    for thread in threads:
                        thread.join(timeout=60)
                failures = [f for run in runs for f in run.failures]
                assert failures == []
                with factory() as session:
                    batches = session.scalars(select(ClearingBatch)).all()
                    assert len(batches) == 2 * CLEAR_DAYS
                    calm_paid = ledger.balance(session, ledger.payout_account(calm))
                    busy_paid = ledger.balance(session, ledger.payout_account(busy))
                    busy_left = ledger.balance(session, ledger.merchant_account(busy))
                    assert calm_paid == CLEAR_DAYS * 10_000
                    assert busy_paid + busy_left + sum(refunded) == CLEAR_DAYS * 10_000
                    # The refunds here are bare reserves (payable → refunds:pending) with no
                    # refund objects, which ledger.check rightly lists; everything else holds.
                    problems = ledger.check(session).problems
                    assert [p for p in problems if not p.startswith("refunds:pending")] == []
            finally:
                engine.dispose()
        row.observed = (
            f"{len(runs)} runs, 0 failures; {sum(refunded)} refunds meanwhile; calm shop paid "
            f"{calm_paid} fen in full, refunding shop paid {busy_paid} + {busy_left} payable"
        )


def test_a_late_commit_and_a_top_up_returned_after_clearing_are_paid_out(
    tmp_path: Path, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "capture stamped 23:59:59 committed after its day's batch; top-up returned after the "
        "batch that settled it",
        expected="the capture is in the next day's batch (once); the returned top-up goes back "
        "to the payable and is paid; payouts == captures − refunds − top-ups",
    ) as row:
        engine = make_engine(f"sqlite:///{tmp_path / 'settlement.db'}")
        try:
            migrate(engine)
            factory = make_session_factory(engine)
            day = dt.date(2026, 11, 26)
            after = dt.datetime(2026, 11, 27, 2, 0, tzinfo=dt.UTC)
            with factory() as session, session.begin():
                shop = create_merchant(session, "Shop", after)[0].id
            late = dt.datetime.combine(day, dt.time(23, 59, 59), tzinfo=CHINA_STANDARD_TIME)
            _capture(factory, shop, 3000, late - dt.timedelta(hours=1))
            with factory() as session, session.begin():  # a top-up sold on the day
                ledger.post_transfer(
                    session,
                    "load_1:hold",
                    ledger.topups_account(shop),
                    ledger.HELD_LOADS,
                    1000,
                    "load_hold",
                    now=late - dt.timedelta(hours=2),
                    reference="load_1",
                )
            with factory() as session, session.begin():
                first = run_batch(session, shop, day, after).batch
                assert (first.payment_total, first.topups_settled, first.payout) == (
                    3000,
                    1000,
                    2000,
                )
            # committed now, stamped before the batch's day ended
            _capture(factory, shop, 500, late)
            with factory() as session, session.begin():  # the load failed: returned
                ledger.post_transfer(
                    session,
                    "load_1:return",
                    ledger.HELD_LOADS,
                    ledger.topups_account(shop),
                    1000,
                    "load_return",
                    now=after,
                    reference="load_1",
                )
            with factory() as session, session.begin():
                second = run_batch(
                    session, shop, day + dt.timedelta(days=1), after + dt.timedelta(days=1)
                ).batch
            assert (second.payment_total, second.topup_total) == (500, -1000)
            assert (second.topups_settled, second.payout, second.carried_out) == (-1000, 1500, 0)
            with factory() as session:
                paid = ledger.balance(session, ledger.payout_account(shop))
                assert paid == 3000 + 500 - (1000 - 1000)
                assert ledger.balance(session, ledger.merchant_account(shop)) == 0
                assert ledger.balance(session, ledger.topups_account(shop)) == 0
                assert ledger.check(session).ok
        finally:
            engine.dispose()
        row.observed = (
            "late capture in the next batch; topups_settled −1000 back to the payable; "
            f"paid {paid} = 3500 captured − 0 net top-ups"
        )


@pytest.mark.postgres
def test_a_refund_between_the_batchs_read_and_its_payout_cannot_fail_it(
    tmp_path: Path, proof: Proof
) -> None:
    """The race of finding 6, forced: the moment the batch has read the payable's balance, a
    1-fen refund tries to commit (given up to 1 s). Unlocked, it commits and the payout of
    the balance read overdraws (409 ledger_refused); locked, it waits for the batch."""
    with proof.row(
        SUITE,
        "a 1-fen refund commits between clearing's read of the payable and its payout (PostgreSQL)",
        expected="the refund waits for the batch's lock; the payout posts; then the refund "
        "finds the payable paid out (refused); the ledger balances",
    ) as row:
        now = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
        day = dt.date(2026, 11, 1)
        with database_url("postgresql", tmp_path) as url:
            engine = make_engine(url, pool_size=4, max_overflow=2)
            try:
                migrate(engine)
                factory = make_session_factory(engine)
                with factory() as session, session.begin():
                    shop = create_merchant(session, "Shop", now)[0].id
                noon = dt.datetime.combine(day, dt.time(12), tzinfo=CHINA_STANDARD_TIME)
                _capture(factory, shop, 10_000, noon)
                refund_done = threading.Event()
                raced: list[bool] = []

                outcome: list[str] = []

                def refund() -> None:
                    try:
                        with factory() as session, session.begin():
                            ledger.post_transfer(
                                session,
                                "refund:race",
                                ledger.merchant_account(shop),
                                ledger.REFUNDS_PENDING,
                                1,
                                "refund_reserve",
                                now=now,
                            )
                        outcome.append("committed")
                    except ledger.LedgerError:
                        outcome.append("refused")
                    finally:
                        refund_done.set()

                def after_read(_c: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
                    reads_payable = statement.lstrip().startswith(
                        "SELECT ledger_accounts.balance"
                    ) and ledger.merchant_account(shop) in str(params)
                    if reads_payable and not raced:
                        racer = threading.Thread(target=refund)
                        racer.start()
                        raced.append(refund_done.wait(timeout=1.0))  # committed meanwhile?

                event.listen(engine, "after_cursor_execute", after_read)
                with factory() as session, session.begin():
                    batch = run_batch(session, shop, day, now).batch
                event.remove(engine, "after_cursor_execute", after_read)
                assert refund_done.wait(timeout=30)
                assert raced == [False], "the refund ended inside the batch's read window"
                # it ran after the batch: the payable was paid out, nothing left to refund
                assert outcome == ["refused"]
                with factory() as session:
                    assert batch.payout == 10_000
                    assert ledger.balance(session, ledger.payout_account(shop)) == 10_000
                    assert ledger.check(session).ok
            finally:
                engine.dispose()
        row.observed = (
            "refund waited for the batch, then refused (payable paid out); payout 10000 "
            "posted; ledger balanced"
        )
