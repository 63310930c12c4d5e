"""``webpurse demo --cluster``: N shop and M settlement processes behind HAProxy (issue 17).

One PostgreSQL server holds settlement's database and the shop's (two databases, created
when missing); Redis carries what shop processes share (``WEBPURSE_REDIS_URL``); HAProxy
(:mod:`webpurse.balancer`) ends TLS with a certificate made at start into the data dir's
``tls/`` and balances over each process's own port:

- ``https://HOST:PORT/`` the shop for browsers (the page dials the agent's ``wss://``,
  cookies are ``Secure``); settlement's webhooks come to the shop on an internal plain
  HTTP port on loopback;
- ``https://HOST:SETTLEMENT_PORT/`` settlement's API, which the shop processes call.

The servers believe HAProxy's ``X-Forwarded-For`` (``WEBPURSE_TRUSTED_PROXIES`` is the
balancer's address) and nobody else's. :class:`ClusterStack` is also the cluster tests'
harness: it can SIGKILL one process and start it again on its port.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from webpurse import demo as single
from webpurse.balancer import (
    Backend,
    Layout,
    command,
    server_stats,
    stats_path,
    write_config,
)
from webpurse.balancer.tls import TlsFiles, make_certificates
from webpurse.cluster_defaults import DEFAULT_POSTGRES, DEFAULT_REDIS
from webpurse.demo import DemoError, DemoStack, Ports, free_port, wait_http, webpurse_command

# How HAProxy picks a shop process: round-robin. The shops share their state over Redis
# (WEBPURSE_REDIS_URL), so a purchase's page, agent, cashier and webhook may each be
# served by a different process.
SHOP_BALANCE = "roundrobin"

# How long a cluster process may take to answer its health check (seconds).
UP_WITHIN = 60.0


def _libpq(url: str) -> str:
    return "postgresql://" + url.split("://", 1)[1]


def ensure_database(url: str) -> bool:
    """Create the PostgreSQL database ``url`` names if it does not exist (then True)."""
    import psycopg
    from psycopg import sql

    target = _libpq(url)
    name = target.rsplit("/", 1)[1].split("?", 1)[0]
    admin_url = target.rsplit("/", 1)[0] + "/postgres"
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
            found = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if found.fetchone() is not None:
                return False
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            return True
    except psycopg.Error as exc:
        raise DemoError(f"PostgreSQL at {admin_url.split('@')[-1]}: {exc}") from None


def drop_database(url: str) -> None:
    import psycopg
    from psycopg import sql

    target = _libpq(url)
    name = target.rsplit("/", 1)[1].split("?", 1)[0]
    admin_url = target.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@dataclass
class ClusterStack(DemoStack):
    """``shops`` shop and ``settlements`` settlement processes behind HAProxy.

    ``merchant_port``/``settlement_port`` are HAProxy's TLS frontends; each process gets
    its own port (``shop_ports``, ``settlement_ports``) for its health check.
    """

    database_url: str = DEFAULT_POSTGRES
    redis_url: str = DEFAULT_REDIS
    redis_prefix: str = "webpurse-cluster"
    shops: int = 2
    settlements: int = 2
    shop_balance: str = SHOP_BALANCE
    shop_internal_port: int = field(default_factory=free_port)
    shop_ports: list[int] = field(default_factory=list)
    settlement_ports: list[int] = field(default_factory=list)
    tls: TlsFiles | None = None
    named: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    scheme: ClassVar[str] = "https"  # HAProxy terminates TLS in front of every process

    def __post_init__(self) -> None:
        if self.shops < 1 or self.settlements < 1:
            raise DemoError("a cluster needs at least one shop and one settlement process")
        self.shop_ports = self.shop_ports or [free_port() for _ in range(self.shops)]
        self.settlement_ports = self.settlement_ports or [
            free_port() for _ in range(self.settlements)
        ]

    # --- where things are ------------------------------------------------------------

    @property
    def webhook_base_url(self) -> str:
        return f"http://{self.host}:{self.shop_internal_port}"

    @property
    def merchant_database_url(self) -> str:
        base, _, query = self.database_url.partition("?")
        return base + "_shop" + (f"?{query}" if query else "")

    def verify(self) -> ssl.SSLContext:
        """A client context trusting this cluster's CA (and only it)."""
        assert self.tls is not None, "the balancer's certificates are made at start"
        return ssl.create_default_context(cafile=str(self.tls.ca))

    def env(self) -> dict[str, str]:
        env = super().env()
        env["WEBPURSE_DATABASE_URL"] = self.database_url
        env["WEBPURSE_MERCHANT_DATABASE_URL"] = self.merchant_database_url
        env["WEBPURSE_REDIS_URL"] = self.redis_url
        env["WEBPURSE_REDIS_PREFIX"] = self.redis_prefix  # every shop key starts with it
        # HAProxy connects from loopback: only its X-Forwarded-For is believed.
        env["WEBPURSE_TRUSTED_PROXIES"] = "127.0.0.1"
        if self.tls is not None:
            env["SSL_CERT_FILE"] = str(self.tls.ca)  # the shop's calls, the agent's wss://
        return env

    # --- processes -------------------------------------------------------------------

    def start_named(self, name: str) -> subprocess.Popen[bytes]:
        """Start (or start again) the process ``shopN``/``settlementN`` on its own port."""
        match = re.fullmatch(r"(shop|settlement)([1-9][0-9]*)", name)
        if match is None:
            raise DemoError(f"no process named {name!r}")
        kind, index = match.group(1), int(match.group(2)) - 1
        env = self.env()
        if kind == "settlement":
            port = self.settlement_ports[index]
            env["WEBPURSE_WEBHOOK_ALLOW_PRIVATE"] = "1"
            args = ["serve", "settlement", "--host", self.host, "--port", str(port)]
        elif kind == "shop":
            assert self.state is not None
            port = self.shop_ports[index]
            env["WEBPURSE_SETTLEMENT_URL"] = self.settlement_url
            env["WEBPURSE_SETTLEMENT_API_KEY"] = self.state.api_key
            env["WEBPURSE_AGENT_URL"] = self.agent_url
            env["WEBPURSE_MERCHANT_PUBLIC_URL"] = self.merchant_url
            env["WEBPURSE_NODE_NAME"] = name  # its node id in Redis: shop1_<random>
            if self.webhook_secret:
                env["WEBPURSE_MERCHANT_WEBHOOK_SECRET"] = self.webhook_secret
            args = ["serve", "merchant", "--host", self.host, "--port", str(port)]
        process = self.spawn(name, [*webpurse_command(), *args], env)
        self.named[name] = process
        wait_http(f"http://{self.host}:{port}/health", UP_WITHIN, process)
        return process

    def stats(self) -> dict[tuple[str, str], dict[str, str]]:
        """HAProxy's counters per (backend, server): ``stot`` served, ``scur`` open now."""
        return server_stats(stats_path(self.data_dir))

    def kill(self, name: str) -> None:
        """SIGKILL one process (and its children), as a crash would."""
        process = self.named[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def setup_settlement(self) -> single.DemoState:
        created = ensure_database(self.database_url)
        ensure_database(self.merchant_database_url)
        if not created and not (self.data_dir / single.STATE_FILE).exists():
            # Its master keys are sealed under another data dir's KEK.
            raise DemoError(
                f"the database {self.database_url.split('@')[-1]} belongs to another data"
                " dir: drop it (and its _shop twin) or choose another with --database-url"
            )
        return super().setup_settlement()

    def start_settlement(self) -> None:
        """Settlement processes, then HAProxy (the shop's backends come up later)."""
        for index in range(self.settlements):
            self.start_named(f"settlement{index + 1}")
        self.start_balancer()

    def start_balancer(self) -> None:
        self.tls = make_certificates(self.data_dir / "tls", hosts=("localhost", self.host))
        layout = Layout(
            shop=[Backend(f"shop{i + 1}", self.host, p) for i, p in enumerate(self.shop_ports)],
            settlement=[
                Backend(f"settlement{i + 1}", self.host, p)
                for i, p in enumerate(self.settlement_ports)
            ],
            shop_port=self.merchant_port,
            shop_internal_port=self.shop_internal_port,
            settlement_port=self.settlement_port,
            host=self.host,
            shop_balance=self.shop_balance,
        )
        config = write_config(self.data_dir, layout, self.tls)
        process = self.spawn("haproxy", command(config))
        self.named["haproxy"] = process
        wait_http(f"{self.settlement_url}/health", UP_WITHIN, process, verify=self.verify())

    def start_merchant(self) -> None:
        for index in range(self.shops):
            self.start_named(f"shop{index + 1}")
        wait_http(f"{self.merchant_url}/health", UP_WITHIN, verify=self.verify())

    async def load_card_async(self, image: Path, amount: int) -> int:
        # The load flow's client trusts the environment's CA file (httpx: SSL_CERT_FILE).
        assert self.tls is not None
        os.environ["SSL_CERT_FILE"] = str(self.tls.ca)
        return await super().load_card_async(image, amount)

    def up(self, *, load: int = single.DEMO_LOAD) -> single.DemoState:
        state = super().up(load=load)
        # This process's own clients (the scripted purchase, the load flow) trust the CA.
        assert self.tls is not None
        os.environ["SSL_CERT_FILE"] = str(self.tls.ca)
        return state


def cluster_demo(
    data_dir: Path,
    *,
    scripted: bool,
    ports: Ports,
    database_url: str,
    redis_url: str,
    shops: int = 2,
    settlements: int = 2,
) -> None:
    """The demo with 2 + 2 processes behind HAProxy (what ``demo --cluster`` runs)."""
    stack = ClusterStack.on_ports(
        data_dir,
        ports,
        scripted=scripted,
        database_url=database_url,
        redis_url=redis_url,
        shops=shops,
        settlements=settlements,
    )

    def addresses(state: single.DemoState, image: Path, yes: bool) -> list[str]:
        assert stack.tls is not None
        return [
            "",
            f"  shop:       {stack.merchant_url}/   (HAProxy, TLS; CA {stack.tls.ca})",
            *(
                f"    shop{i + 1}:    http://{stack.host}:{number}/health"
                for i, number in enumerate(stack.shop_ports)
            ),
            f"  till:       {stack.merchant_url}/staff  (staff {state.staff_name},"
            f" password {state.staff_password})",
            f"  settlement: {stack.settlement_url}/docs",
            *(
                f"    settlement{i + 1}: http://{stack.host}:{number}/health"
                for i, number in enumerate(stack.settlement_ports)
            ),
            f"  agent:      {stack.agent_url}  (card {image})",
            f"  databases:  {stack.database_url.split('@')[-1]} (+ _shop); {redis_url}",
            "",
            "The certificate is self-signed: the browser asks once. Ctrl-C stops.",
        ]

    single.run_stack(
        stack,
        scripted=scripted,
        setting_up=f"setting up {shops} shop + {settlements} settlement processes"
        f" in {stack.data_dir} …",
        run_scripted=_scripted_purchase,
        addresses=addresses,
        stopped="a process stopped; shutting down",
    )


def _scripted_purchase(stack: single.DemoStack) -> bool:
    """``demo --cluster --scripted``: one purchase through HAProxy; whether it was paid."""
    receipt = single.scripted_purchase(stack)
    ledger = stack.ledger_check()
    single._print_receipt(receipt, ledger)
    return receipt["status"] == "paid" and ledger.get("ok") is True
