"""Test support for the settlement core: a migrated database, the app, cards and a terminal.

Each test gets a fresh database: a SQLite file, or a fresh schema on the PostgreSQL server
at ``WEBPURSE_TEST_POSTGRES_URL`` (dropped afterwards). Without PostgreSQL the PostgreSQL
cases skip, except with ``CI=true`` where they fail. The schema is made by Alembic.

Running the migrations for every test cost most of a settlement test's time (a second on
PostgreSQL, half of one on SQLite, on 2 busy cores). So the migrations run once per test
process into a template: a SQLite file that a new, empty SQLite database is copied from,
and a PostgreSQL database that ``database_url(..., migrated=True)`` clones with
``CREATE DATABASE ... TEMPLATE`` (its own database, dropped afterwards). The result is the
same schema, byte for byte on SQLite; tests/settlement/test_migrations.py still runs every
migration up and down on empty databases of both kinds.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import hashlib
import itertools
import json
import os
import queue
import secrets
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine, make_url

from tests.asgi import AppClient
from webpurse.card import CardApplet, MemoryStore
from webpurse.protocol.apdu import CommandApdu
from webpurse.protocol.commands import (
    EP_AID,
    SFI_ISSUER,
    GetTransactionProve,
    InitializeForLoad,
    InitializeForPurchase,
    ReadBinary,
    Select,
)
from webpurse.settlement.app import create_app
from webpurse.settlement.auth import OPERATOR, new_api_key
from webpurse.settlement.db import SessionFactory, make_engine, make_session_factory, migrate
from webpurse.settlement.funding import next_statement, record_deposit
from webpurse.settlement.merchants import create_merchant
from webpurse.settlement.registry import issue_card
from webpurse.settlement.security import SoftwareSecurityModule, generate_master_keys
from webpurse.settlement.settings import Settings
from webpurse.settlement.statements import Line, Statement, render_csv

POSTGRES_URL = os.environ.get(
    "WEBPURSE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
START = dt.datetime(2026, 11, 27, 12, 0, 0, tzinfo=dt.UTC)


def _libpq(url: str) -> str:
    return "postgresql://" + url.split("://", 1)[1]


def require_postgres() -> None:
    try:
        psycopg.connect(_libpq(POSTGRES_URL), connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {POSTGRES_URL} is required in CI: {exc}")
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL}: {exc}")


# --- migrated templates (one per test process and backend) ---------------------------

_templates: dict[str, str] = {}  # backend -> the SQLite file / PostgreSQL database name
_cloned: set[str] = set()  # PostgreSQL databases cloned from the template (already at head)


def _sqlite_template() -> Path:
    """A SQLite file migrated to head, made once per process."""
    if "sqlite" not in _templates:
        folder = tempfile.mkdtemp(prefix="webpurse-template-")
        atexit.register(shutil.rmtree, folder, True)
        path = Path(folder) / "template.db"
        engine = make_engine(f"sqlite:///{path}")
        try:
            migrate(engine)
        finally:
            engine.dispose()  # NullPool: the last connection closed checkpoints the WAL
        _templates["sqlite"] = str(path)
    return Path(_templates["sqlite"])


def _postgres_url(database: str) -> str:
    base = (
        POSTGRES_URL
        if "+psycopg" in POSTGRES_URL
        else POSTGRES_URL.replace("://", "+psycopg://", 1)
    )
    return make_url(base).set(database=database).render_as_string(hide_password=False)


def _drop_database(name: str) -> None:
    with psycopg.connect(_libpq(POSTGRES_URL), autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


_to_drop: queue.Queue[str | None] = queue.Queue()
_dropper: list[threading.Thread] = []


def _drop_later(name: str) -> None:
    """Drop a test's database in a background thread: DROP DATABASE waits for a checkpoint,
    which the next test need not wait for. Whatever is queued is dropped before the process
    ends (``atexit``)."""
    if not _dropper:

        def drop_queued() -> None:
            while (queued := _to_drop.get()) is not None:
                with contextlib.suppress(psycopg.Error):
                    _drop_database(queued)

        thread = threading.Thread(target=drop_queued, name="drop-test-databases", daemon=True)
        thread.start()
        _dropper.append(thread)

        def finish() -> None:
            _to_drop.put(None)
            thread.join(timeout=120)

        atexit.register(finish)
    _to_drop.put(name)


def _postgres_template() -> str:
    """A PostgreSQL database migrated to head, made once per process, dropped at exit.
    It takes no connections once made, so that autovacuum or a stray connection cannot
    keep ``CREATE DATABASE ... TEMPLATE`` from copying it."""
    if "postgresql" not in _templates:
        name = f"wp_template_{os.getpid()}_{secrets.token_hex(4)}"
        with psycopg.connect(_libpq(POSTGRES_URL), autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        atexit.register(_drop_database, name)
        engine = make_engine(_postgres_url(name), pool_size=1, max_overflow=0)
        try:
            migrate(engine)
        finally:
            engine.dispose()
        with psycopg.connect(_libpq(POSTGRES_URL), autocommit=True) as admin:
            admin.execute(
                sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
                    sql.Identifier(name)
                )
            )
        _templates["postgresql"] = name
    return _templates["postgresql"]


def _empty_sqlite_file(path: str | None) -> bool:
    if not path or path == ":memory:":
        return False
    file = Path(path)
    wal = file.with_name(file.name + "-wal")
    return (not file.exists() or file.stat().st_size == 0) and not wal.exists()


def migrate_to_head(engine: Engine) -> None:
    """``migrate(engine)`` for a new database: a new SQLite file becomes a copy of the
    migrated template, a database cloned from the PostgreSQL template is already there;
    any other database is migrated by Alembic."""
    if engine.dialect.name == "sqlite" and engine.url.database in (None, "", ":memory:"):
        with engine.connect() as connection:  # in memory: the engine's one connection
            driver = connection.connection.driver_connection
            assert driver is not None
            if driver.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                with contextlib.closing(sqlite3.connect(_sqlite_template())) as template:
                    template.backup(driver)
                return
    elif engine.dialect.name == "sqlite" and _empty_sqlite_file(engine.url.database):
        path = str(engine.url.database)
        shutil.copyfile(_sqlite_template(), path)  # keeps an existing file's 0600 mode
        return
    if engine.dialect.name == "postgresql" and engine.url.database in _cloned:
        return
    migrate(engine)


@contextmanager
def database_url(backend: str, tmp_path: Path, *, migrated: bool = False) -> Iterator[str]:
    """The URL of an empty database: a SQLite file or a fresh PostgreSQL schema. With
    ``migrated`` on PostgreSQL: a fresh database cloned from the migrated template (a
    SQLite file is filled from its template by :func:`migrate_to_head` either way)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'settlement.db'}"
        return
    require_postgres()
    if migrated:
        template = _postgres_template()
        name = f"wp_core_{secrets.token_hex(6)}"
        with psycopg.connect(_libpq(POSTGRES_URL), autocommit=True) as admin:
            admin.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
        _cloned.add(name)
        try:
            yield _postgres_url(name)
        finally:
            _cloned.discard(name)
            _drop_later(name)
        return
    schema = f"wp_core_{secrets.token_hex(6)}"
    with psycopg.connect(_libpq(POSTGRES_URL), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    base = (
        POSTGRES_URL
        if "+psycopg" in POSTGRES_URL
        else POSTGRES_URL.replace("://", "+psycopg://", 1)
    )
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(_libpq(POSTGRES_URL), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )


@dataclass
class FakeClock:
    """The injected clock: tests move time, nothing sleeps."""

    now: dt.datetime = START

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, delta: dt.timedelta) -> None:
        self.now += delta


class Http(Protocol):
    def post(self, url: str, **kwargs: Any) -> httpx.Response: ...
    def get(self, url: str, **kwargs: Any) -> httpx.Response: ...


def deterministic_random(seed: int) -> Any:
    counter = itertools.count(seed * 1000)
    return lambda n: bytes((next(counter) * 7 + i * 13) % 256 for i in range(n))


def apdu(applet: CardApplet, command: CommandApdu) -> tuple[bytes, int]:
    raw = applet.process(command.to_bytes())
    return raw[:-2], int.from_bytes(raw[-2:], "big")


def ok(applet: CardApplet, command: CommandApdu | bytes) -> bytes:
    raw = applet.process(command if isinstance(command, bytes) else command.to_bytes())
    data, sw = raw[:-2], int.from_bytes(raw[-2:], "big")
    assert sw == 0x9000, f"card answered {sw:04X}"
    return data


def read_issuer(applet: CardApplet) -> bytes:
    ok(applet, Select(name=EP_AID).to_apdu())
    return ok(applet, ReadBinary(SFI_ISSUER).to_apdu())


@dataclass
class Terminal:
    """Plays the merchant's side of the two round trips, over any HTTP client."""

    http: Http
    key: str
    terminal_id: str

    def headers(self, idempotency_key: str | None = None) -> dict[str, str]:
        headers = {"authorization": f"Bearer {self.key}"}
        if idempotency_key is not None:
            headers["idempotency-key"] = idempotency_key
        return headers

    def post(self, path: str, body: dict[str, Any] | None = None, **kw: Any) -> httpx.Response:
        return self.http.post(path, json=body or {}, headers=self.headers(kw.get("key")))

    def create_payment(self, amount: int) -> dict[str, Any]:
        answer = self.post("/v1/payments", {"amount": amount, "description": "test"})
        assert answer.status_code == 201, answer.text
        return dict(answer.json())

    def purchase_batch1(self, applet: CardApplet, amount: int) -> tuple[bytes, bytes]:
        issuer = read_issuer(applet)
        init = ok(
            applet, InitializeForPurchase(1, amount, bytes.fromhex(self.terminal_id)).to_apdu()
        )
        return issuer, init

    def authorise_payment(
        self, payment_id: str, issuer: bytes, init: bytes, **extra: Any
    ) -> httpx.Response:
        body = {
            "issuer_data": issuer.hex(),
            "initialize_response": init.hex(),
            "terminal_id": self.terminal_id,
            **extra,
        }
        return self.post(f"/v1/payments/{payment_id}/authorise", body)

    def purchase(self, applet: CardApplet, amount: int) -> dict[str, Any]:
        """The whole purchase: create, batch 1, authorise, DEBIT, capture."""
        payment = self.create_payment(amount)
        issuer, init = self.purchase_batch1(applet, amount)
        answer = self.authorise_payment(payment["id"], issuer, init)
        assert answer.status_code == 200, answer.text
        debit = bytes.fromhex(answer.json()["authorisation"]["debit_apdu"])
        debit_response = ok(applet, debit)
        captured = self.post(
            f"/v1/payments/{payment['id']}/capture", {"debit_response": debit_response.hex()}
        )
        assert captured.status_code == 200, captured.text
        return dict(captured.json())

    def create_load(
        self, amount: int, card_number: str | None = None, *, method: str = "merchant_float"
    ) -> dict[str, Any]:
        funding = (
            {"method": method, "reference": "till-1"}
            if method == "merchant_float"
            else {"method": method}
        )
        body: dict[str, Any] = {"amount": amount, "funding": funding}
        if card_number:
            body["card_number"] = card_number
        answer = self.post("/v1/loads", body)
        assert answer.status_code == 201, answer.text
        return dict(answer.json())

    def load_batch1(self, applet: CardApplet, amount: int, terminal_id: str) -> tuple[bytes, bytes]:
        issuer = read_issuer(applet)
        init = ok(applet, InitializeForLoad(1, amount, bytes.fromhex(terminal_id)).to_apdu())
        return issuer, init

    def run_load(self, applet: CardApplet, load: dict[str, Any]) -> dict[str, Any]:
        issuer, init = self.load_batch1(applet, load["amount"], load["terminal_id"])
        answer = self.post(
            f"/v1/loads/{load['id']}/authorise",
            {
                "issuer_data": issuer.hex(),
                "initialize_response": init.hex(),
                "terminal_id": load["terminal_id"],
            },
        )
        assert answer.status_code == 200, answer.text
        credit = bytes.fromhex(answer.json()["authorisation"]["credit_apdu"])
        tac = ok(applet, credit)
        done = self.post(f"/v1/loads/{load['id']}/complete", {"credit_response": tac.hex()})
        assert done.status_code == 200, done.text
        return dict(done.json())

    def load(self, applet: CardApplet, amount: int) -> dict[str, Any]:
        return self.run_load(applet, self.create_load(amount))

    def card_check(self, applet: CardApplet, decline: dict[str, Any]) -> dict[str, Any]:
        """Run the card check a decline offered on ``applet``; settlement's verdict."""
        check = decline["card_check"]
        answer = ok(applet, bytes.fromhex(check["initialize_apdu"]))
        done = self.post(f"/v1/card_checks/{check['id']}", {"initialize_response": answer.hex()})
        assert done.status_code == 200, done.text
        return dict(done.json())


def prove(applet: CardApplet, transaction_type: int, counter: int) -> tuple[bytes, int]:
    return apdu(applet, GetTransactionProve(transaction_type, counter).to_apdu())


@dataclass
class World:
    """A migrated database, the app and its keys: one merchant, a second one, an operator."""

    url: str
    settings: Settings
    clock: FakeClock
    factory: SessionFactory
    security: Any  # SoftwareSecurityModule or Pkcs11SecurityModule
    client: AppClient
    merchant_id: str
    merchant_key: str
    terminal_id: str
    other_key: str
    other_terminal_id: str
    operator_key: str
    seeds: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def terminal(self) -> Terminal:
        return Terminal(self.client, self.merchant_key, self.terminal_id)

    @property
    def other_terminal(self) -> Terminal:
        return Terminal(self.client, self.other_key, self.other_terminal_id)

    def auth(self, key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    def issue(self, **kwargs: Any) -> CardApplet:
        """A card personalised by settlement's security module and registered."""
        with self.factory() as session, session.begin():
            _, state = issue_card(session, self.security, self.clock(), **kwargs)
        return CardApplet(state, MemoryStore(state), deterministic_random(next(self.seeds)))

    def funded_card(self, balance: int) -> CardApplet:
        applet = self.issue()
        if balance:
            self.terminal.load(applet, balance)
        return applet


SETTLEMENT_ACCOUNT = Settings.settlement_account


def statement_csv(
    number: int,
    credits: list[tuple[str, int]],
    *,
    opening: int = 0,
    account: str = SETTLEMENT_ACCOUNT,
    currency: str = "CNY",
) -> str:
    """A CSV statement whose credit lines pay ``(remittance, fen)`` each."""
    lines = tuple(
        Line(
            line_no=i,
            amount=fen,
            booked_on=START.date(),
            bank_reference=f"B{number}-{i}",
            payer="Zhang San",
            remittance=text,
        )
        for i, (text, fen) in enumerate(credits, start=1)
    )
    return render_csv(
        Statement(
            account=account,
            number=number,
            currency=currency,
            opening_balance=opening,
            closing_balance=opening + sum(line.amount for line in lines),
            lines=lines,
        )
    )


def pay_by_statement(world: World, credits: list[tuple[str, int]]) -> dict[str, Any]:
    """Import the next statement of the settlement account, paying ``credits``."""
    with world.factory() as session:
        number, opening = next_statement(session, world.settings.settlement_account)
    answer = world.client.post(
        "/v1/operator/statements",
        json={"format": "csv", "statement": statement_csv(number, credits, opening=opening)},
        headers=world.auth(world.operator_key),
    )
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


SEED_FLOAT = 10_000_000  # fen in each test merchant's float unless a test says otherwise


def seed_float(session: Any, merchant_id: str, amount: int, now: dt.datetime) -> None:
    """Money the merchant prepaid into its top-up float (a recorded deposit)."""
    if amount > 0:
        record_deposit(session, merchant_id, amount, f"seed-{merchant_id}", now)


@contextmanager
def make_world(
    url: str,
    *,
    clock: FakeClock | None = None,
    float_fen: int = SEED_FLOAT,
    security_module: str | None = None,
) -> Iterator[World]:
    """A settlement server on ``url``; with ``security_module="pkcs11"`` its keys are in a
    fresh SoftHSM2 token (the software module's master keys migrated into it). The default
    is ``WEBPURSE_TEST_SECURITY_MODULE`` (software if unset): any suite built on this world,
    e.g. the slow recovery suite, runs on the token with that variable set."""
    clock = clock or FakeClock()
    security_module = security_module or os.environ.get("WEBPURSE_TEST_SECURITY_MODULE", "software")
    kek = secrets.token_bytes(32)
    settings = Settings(
        database_url=url,
        kek=kek,
        clock=clock,
        webhook_worker=False,
        pool_size=5,
        max_overflow=5,
        webhook_allow_private=True,  # the test shops listen on loopback or unresolvable names
        public_docs=True,  # as in the demo; tests/settlement/test_auth.py checks it off
    )
    engine = make_engine(url, pool_size=5, max_overflow=5)
    closers: list[Any] = []
    try:
        migrate_to_head(engine)
        factory = make_session_factory(engine)
        generate_master_keys(factory, kek, clock())
        security: Any = SoftwareSecurityModule.load(factory, kek)
        if security_module == "pkcs11":
            from tests.settlement.pkcs11_support import new_token
            from webpurse.settlement.pkcs11 import Pkcs11SecurityModule, migrate_from_software

            folder = tempfile.TemporaryDirectory(prefix="webpurse-pin-")
            closers.append(folder.cleanup)
            token = Pkcs11SecurityModule(new_token(Path(folder.name)))
            closers.insert(0, token.close)
            migrate_from_software(security, token, factory)
            security = token
        with factory() as session, session.begin():
            merchant, merchant_key = create_merchant(session, "Shop A", clock())
            other, other_key = create_merchant(session, "Shop B", clock())
            _, operator_key = new_api_key(session, OPERATOR, clock(), name="ops")
            seed_float(session, merchant.id, float_fen, clock())
            seed_float(session, other.id, float_fen, clock())
            ids = (merchant.id, merchant.terminal_id, other.terminal_id)
        app = create_app(settings, security=security, engine=engine)
        with AppClient(app) as client:
            yield World(
                url=url,
                settings=settings,
                clock=clock,
                factory=factory,
                security=security,
                client=client,
                merchant_id=ids[0],
                merchant_key=merchant_key,
                terminal_id=ids[1],
                other_key=other_key,
                other_terminal_id=ids[2],
                operator_key=operator_key,
            )
    finally:
        for close in closers:
            close()
        engine.dispose()


# --- a real uvicorn process ----------------------------------------------------------


@dataclass
class LiveServer:
    base_url: str
    url: str
    kek: bytes
    factory: SessionFactory
    security: SoftwareSecurityModule
    merchant_key: str
    terminal_id: str
    operator_key: str
    pid: int | None = None  # the server process
    seeds: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def issue(self) -> CardApplet:
        with self.factory() as session, session.begin():
            _, state = issue_card(session, self.security, dt.datetime.now(dt.UTC))
        return CardApplet(state, MemoryStore(state), deterministic_random(next(self.seeds)))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def live_server(
    url: str, tmp_path: Path, *, workers: int = 1, float_fen: int = SEED_FLOAT
) -> Iterator[LiveServer]:
    """Migrate ``url``, then run ``webpurse serve settlement`` on a free port until done."""
    import subprocess
    import sys
    import time

    kek = secrets.token_bytes(32)
    engine = make_engine(url, pool_size=5, max_overflow=5)
    migrate_to_head(engine)
    factory = make_session_factory(engine)
    now = dt.datetime.now(dt.UTC)
    generate_master_keys(factory, kek, now)
    security = SoftwareSecurityModule.load(factory, kek)
    with factory() as session, session.begin():
        merchant, merchant_key = create_merchant(session, "Live shop", now)
        seed_float(session, merchant.id, float_fen, now)
        _, operator_key = new_api_key(session, OPERATOR, now, name="ops")
        terminal_id = merchant.terminal_id
    port = _free_port()
    env = {
        **os.environ,
        "WEBPURSE_DATABASE_URL": url,
        "WEBPURSE_KEK": kek.hex(),
        "WEBPURSE_DATA_DIR": str(tmp_path / "data"),
        "WEBPURSE_WEBHOOK_ALLOW_PRIVATE": "1",  # test endpoints are on 127.0.0.1
        "WEBPURSE_PUBLIC_DOCS": "1",
    }
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("webpurse")),
            "serve",
            "settlement",
            "--port",
            str(port),
            "--no-migrate",
            *(["--workers", str(workers)] if workers > 1 else []),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"settlement server exited: {(tmp_path / 'server.log').read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("settlement server did not answer /health within 90 s")
            time.sleep(0.05)  # bounded polling for readiness, not synchronisation of results
        yield LiveServer(
            base_url,
            url,
            kek,
            factory,
            security,
            merchant_key,
            terminal_id,
            operator_key,
            pid=process.pid,
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        engine.dispose()


def fingerprint_formula(method: str, path: str, payload: Any) -> str:
    """An idempotency key's stored fingerprint by the documented formula alone
    (``idempotency.fingerprint``'s docstring: SHA-256 of the method, the path and the
    payload as ``json.dumps`` canonical JSON), to check the fast paths against."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()
