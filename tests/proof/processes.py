"""Real settlement processes for the proof suites: ``webpurse serve settlement`` in a child
process on a free port, which a test can SIGKILL and start again on the same database.

:func:`live_settlement` makes the database (SQLite file or a fresh PostgreSQL schema),
its master keys and a merchant, then starts the server; :class:`Live` issues cards from the
same security module and funds them through the server's HTTP API.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import httpx

from tests.settlement.support import (
    SEED_FLOAT,
    Http,
    Terminal,
    database_url,
    deterministic_random,
    migrate_to_head,
    seed_float,
)
from webpurse.card import CardApplet, MemoryStore
from webpurse.settlement.db import SessionFactory, make_engine, make_session_factory
from webpurse.settlement.merchants import create_merchant
from webpurse.settlement.registry import issue_card
from webpurse.settlement.security import SoftwareSecurityModule, generate_master_keys

START_TIMEOUT = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(kw_only=True)
class ChildServer:
    """A ``webpurse serve …`` child process we can SIGKILL and start again on its port."""

    directory: Path
    name: str = "server"
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        raise NotImplementedError

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting for it (:meth:`wait_ready` waits)."""
        exe = str(Path(sys.executable).with_name("webpurse"))
        log_path = self.directory / f"{self.name}-{self.starts}.log"
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [exe, *self.command()],
                env={**os.environ, **self.environment()},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    def wait_ready(self) -> None:
        """Bounded polling of ``/health`` until the started process answers."""
        assert self.process is not None
        log_path = self.directory / f"{self.name}-{self.starts - 1}.log"
        deadline = time.monotonic() + START_TIMEOUT
        # One client for all the polls: a new one per poll loads the CA bundle again, which
        # costs the test process more CPU than the child needs to start.
        with httpx.Client(timeout=1) as http:
            while True:  # bounded polling for readiness
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited: {log_path.read_text()[-2000:]}")
                try:
                    if http.get(f"{self.base_url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not answer /health in {START_TIMEOUT} s")
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        assert self.process.returncode == -signal.SIGKILL
        self.kills += 1

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass(kw_only=True)
class SettlementProcess(ChildServer):
    """``webpurse serve settlement`` on ``url`` with the key-encryption key ``kek``."""

    url: str
    kek: bytes
    name: str = "settlement"

    def command(self) -> list[str]:
        return ["serve", "settlement", "--port", str(self.port), "--no-migrate"]

    def environment(self) -> dict[str, str]:
        return {
            "WEBPURSE_DATABASE_URL": self.url,
            "WEBPURSE_KEK": self.kek.hex(),
            "WEBPURSE_DATA_DIR": str(self.directory / "data"),
        }


@dataclass(kw_only=True)
class ShopProcess(ChildServer):
    """``webpurse serve merchant``: the shop, its orders in ``directory/shop``."""

    settlement_url: str
    api_key: str
    name: str = "shop"

    def command(self) -> list[str]:
        return ["serve", "merchant", "--port", str(self.port)]

    def start(self) -> None:
        (self.directory / "shop").mkdir(exist_ok=True)
        super().start()

    def environment(self) -> dict[str, str]:
        return {
            "WEBPURSE_DATA_DIR": str(self.directory / "shop"),
            "WEBPURSE_SETTLEMENT_URL": self.settlement_url,
            "WEBPURSE_SETTLEMENT_API_KEY": self.api_key,
            "WEBPURSE_MERCHANT_COOKIE_SECRET": "c" * 64,
        }


@dataclass
class Live:
    server: SettlementProcess
    factory: SessionFactory
    security: SoftwareSecurityModule
    merchant_key: str
    terminal_id: str
    seeds: Iterator[int] = field(default_factory=lambda: iter(range(1, 1000)))

    def issue(self) -> CardApplet:
        with self.factory() as session, session.begin():
            _, state = issue_card(session, self.security, dt.datetime.now(dt.UTC))
        return CardApplet(state, MemoryStore(state), deterministic_random(next(self.seeds)))

    def funded_card(self, amount: int) -> CardApplet:
        card = self.issue()
        with httpx.Client(base_url=self.server.base_url, timeout=15) as http:
            Terminal(cast(Http, http), self.merchant_key, self.terminal_id).load(card, amount)
        return card


@contextmanager
def live_settlement(backend: str, tmp_path: Path) -> Iterator[Live]:
    with database_url(backend, tmp_path, migrated=True) as url:
        kek = secrets.token_bytes(32)
        engine = make_engine(url, pool_size=2, max_overflow=2)
        try:
            migrate_to_head(engine)
            factory = make_session_factory(engine)
            now = dt.datetime.now(dt.UTC)
            generate_master_keys(factory, kek, now)
            security = SoftwareSecurityModule.load(factory, kek)
            with factory() as session, session.begin():
                merchant, key = create_merchant(session, "Proof shop", now)
                seed_float(session, merchant.id, SEED_FLOAT, now)
                terminal_id = merchant.terminal_id
            server = SettlementProcess(url=url, kek=kek, directory=tmp_path)
            server.start()
            try:
                yield Live(server, factory, security, key, terminal_id)
            finally:
                server.stop()
        finally:
            engine.dispose()
