"""``webpurse demo``: the whole system on one machine, from a fresh data dir.

It initialises the settlement server (SQLite, master keys), starts it and the merchant
shop as uvicorn processes, registers the merchant (API key, webhook endpoint), issues a
demo card from settlement's master keys and loads it through the real load flow, starts
the terminal agent with the emulated card, and prints the shop's address. Ctrl-C stops
everything it started. ``--scripted`` runs one purchase headless through the shop, the
agent and the card, then one online top-up paid by bank transfer (it writes a CSV bank
statement paying the top-up's reference, imports it as the operator would, and loads the card
through the shop), prints both receipts and exits 0 when both succeeded and the ledger checks
out.

Value is never free: setup records a deposit into the merchant's top-up float (what the
shop's till may load for cash) and creates a staff account for the till (its name and
password are printed on start).

:class:`DemoStack` is also the end-to-end tests' harness (tests/e2e).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import httpx
import typer

from webpurse.card.image import ImageFile

STATE_FILE = "demo.json"
DEMO_LOAD = 50_000
DEMO_FLOAT = 1_000_000  # ¥10,000 prepaid by the merchant into its top-up float
DEMO_TOPUP = 10_000  # the scripted online top-up: ¥100 by bank transfer
STAFF_NAME = "till"


class DemoError(Exception):
    """Something the demo needs did not work; the message says what."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def webpurse_command() -> list[str]:
    """How to run ``webpurse`` from this interpreter's environment."""
    script = Path(sys.executable).parent / "webpurse"
    if script.exists():
        return [str(script)]
    found = shutil.which("webpurse")
    if found:
        return [found]
    return [sys.executable, "-c", "from webpurse.cli import app; app(prog_name='webpurse')"]


def wait_http(
    url: str,
    timeout: float = 30.0,
    process: subprocess.Popen[bytes] | None = None,
    *,
    verify: ssl.SSLContext | bool = True,
) -> None:
    """Poll ``url`` until it answers 200, the process dies, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise DemoError(f"{url}: the server exited with {process.returncode}")
        try:
            answer = httpx.get(url, timeout=2.0, verify=verify)
            if answer.status_code == 200:
                return
            last = str(answer.status_code)
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise DemoError(f"{url} did not come up within {timeout:g} s ({last})")


@dataclass
class DemoState:
    """What setup created; kept in ``<data>/demo.json`` (mode 600: it holds API keys)."""

    merchant_id: str
    terminal_id: str
    api_key: str = field(repr=False)
    operator_key: str = field(repr=False)
    card_image: str
    card_loaded: bool = False
    staff_name: str = STAFF_NAME
    staff_password: str = field(default="", repr=False)

    def save(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.__dict__, handle, indent=2)

    @classmethod
    def load(cls, path: Path) -> DemoState | None:
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (FileNotFoundError, ValueError, TypeError):
            return None


@dataclass(frozen=True)
class Ports:
    """The ports ``webpurse demo`` was asked to serve on (0: any free one)."""

    shop: int
    settlement: int
    agent: int


@dataclass
class DemoStack:
    """Settlement and merchant servers (uvicorn processes) over one data dir."""

    data_dir: Path
    settlement_port: int = 8100
    merchant_port: int = 8000
    agent_port: int = 47800
    host: str = "127.0.0.1"
    quiet: bool = True
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    state: DemoState | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    scheme: ClassVar[str] = "http"
    """How the shopper and the shop reach settlement and the shop (the cluster: https)."""

    @classmethod
    def on_ports(cls, data_dir: Path, ports: Ports, *, scripted: bool, **fields: Any) -> Self:
        """A stack in ``data_dir`` on the ports asked for (0: a free one). Scripted, every
        port is a free one: headless runs must not clash with a demo (or anything else) on
        the usual ports."""
        if scripted:
            ports = Ports(0, 0, 0)
        return cls(
            data_dir.resolve(),
            settlement_port=ports.settlement or free_port(),
            merchant_port=ports.shop or free_port(),
            agent_port=ports.agent or free_port(),
            **fields,
        )

    @property
    def settlement_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.settlement_port}"

    @property
    def merchant_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.merchant_port}"

    @property
    def agent_url(self) -> str:
        return f"http://{self.host}:{self.agent_port}"

    @property
    def webhook_base_url(self) -> str:
        """Where settlement delivers the shop's webhooks (the cluster: an internal port)."""
        return self.merchant_url

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["WEBPURSE_DATA_DIR"] = str(self.data_dir)
        # The demo is throwaway: its KEK stays in its own data folder, asked for explicitly
        # (a real settlement keeps it outside: docs/settlement-api.md "Security module").
        env.setdefault("WEBPURSE_KEK_IN_DATA_DIR", "1")
        env.setdefault("WEBPURSE_PUBLIC_DOCS", "1")  # the demo shows its API documentation
        env.pop("WEBPURSE_DATABASE_URL", None)
        env.pop("WEBPURSE_MERCHANT_DATABASE_URL", None)
        return env

    def _log(self, name: str) -> Any:
        if not self.quiet:
            return None
        return open(self.data_dir / f"{name}.log", "ab")

    def run_cli(self, *args: str, stdin: str | None = None) -> str:
        """Run ``webpurse ARGS`` against this data dir; return its standard output."""
        done = subprocess.run(  # noqa: S603 - our own CLI, argument list
            [*webpurse_command(), *args],
            env=self.env(),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise DemoError(f"webpurse {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def spawn(
        self,
        name: str,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        *,
        terminal: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start a process; its output goes to ``<data>/<name>.log`` unless ``terminal``."""
        log = None if terminal else self._log(name)
        process = subprocess.Popen(  # noqa: S603 - our own servers, argument list
            list(args),
            env=env or self.env(),
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    # --- settlement ---------------------------------------------------------------------

    def setup_settlement(self) -> DemoState:
        """Schema, master keys, merchant, operator key, the demo card (idempotent)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        state_path = self.data_dir / STATE_FILE
        existing = DemoState.load(state_path)
        if existing is not None and Path(existing.card_image).exists():
            self.state = existing
            if not existing.staff_password:  # a data dir from before funded top-ups
                self.seed_float(existing.merchant_id)
                existing.staff_password = self.add_staff()
                existing.save(state_path)
            return existing
        self.run_cli("settlement", "init")
        merchant = json.loads(
            self.run_cli("settlement", "merchant", "create", "Purse & Co.", "--json")
        )
        operator = json.loads(self.run_cli("settlement", "operator", "create", "demo", "--json"))
        image = self.data_dir / "demo-card.json"
        self.issue_card(image)
        self.seed_float(merchant["id"])
        password = self.add_staff()
        self.state = DemoState(
            merchant_id=merchant["id"],
            terminal_id=merchant["terminal_id"],
            api_key=merchant["api_key"],
            operator_key=operator["api_key"],
            card_image=str(image),
            staff_password=password,
        )
        self.state.save(state_path)
        return self.state

    def seed_float(self, merchant_id: str) -> None:
        """The merchant prepaid its top-up float (a bank transfer to settlement, recorded by
        the operator): what the till may load for cash. Idempotent on the bank reference."""
        self.run_cli(
            "settlement",
            "float",
            "deposit",
            merchant_id,
            str(DEMO_FLOAT),
            "--bank-reference",
            "DEMO-FLOAT-0001",
        )

    def add_staff(self) -> str:
        """A staff account for the shop's till; returns its (new, random) password."""
        password = secrets.token_urlsafe(12)
        self.run_cli(
            "merchant", "staff", "add", STAFF_NAME, "--password-stdin", stdin=password + "\n"
        )
        return password

    def issue_card(self, image: Path) -> str:
        out = self.run_cli("settlement", "card", "issue", str(image))
        match = re.search(r"card ([0-9A-F]{20})", out)
        return match.group(1) if match else ""

    def start_settlement(self) -> None:
        env = self.env()
        # The shop's webhook endpoint is on this host (127.0.0.1): allow private targets.
        env["WEBPURSE_WEBHOOK_ALLOW_PRIVATE"] = "1"
        process = self.spawn(
            "settlement",
            [
                *webpurse_command(),
                "serve",
                "settlement",
                "--host",
                self.host,
                "--port",
                str(self.settlement_port),
            ],
            env,
        )
        wait_http(f"{self.settlement_url}/health", process=process)

    def verify(self) -> ssl.SSLContext | bool:
        """How this process's clients check the servers' certificates (plain HTTP: none)."""
        return True

    def settlement_client(self, key: str | None = None) -> httpx.Client:
        assert self.state is not None
        return httpx.Client(
            base_url=self.settlement_url,
            headers={"Authorization": f"Bearer {key or self.state.api_key}"},
            timeout=15.0,
            verify=self.verify(),
        )

    def register_webhook(self) -> str:
        """A webhook endpoint for the shop; its secret is shown once, so make a new one."""
        with self.settlement_client() as client:
            listed = client.get("/v1/webhook_endpoints")
            if listed.status_code == 200:
                for endpoint in listed.json().get("data", []):
                    client.delete(f"/v1/webhook_endpoints/{endpoint['id']}")
            response = client.post(
                "/v1/webhook_endpoints",
                json={"url": f"{self.webhook_base_url}/webhooks/settlement", "events": ["*"]},
            )
        if response.status_code != 201:
            raise DemoError(f"webhook endpoint: {response.status_code} {response.text}")
        self.webhook_secret = str(response.json()["secret"])
        return self.webhook_secret

    def import_statement(self, credits: Sequence[tuple[str, int]]) -> dict[str, Any]:
        """Write the settlement account's next bank statement (CSV) paying ``credits``
        (remittance text, fen) and import it as the operator does (``webpurse settlement
        statement import``); returns settlement's summary (``matched``, ``exceptions``)."""
        from webpurse.settlement.db import make_engine, make_session_factory
        from webpurse.settlement.funding import next_statement
        from webpurse.settlement.settings import Settings
        from webpurse.settlement.statements import Line, Statement, render_csv

        assert self.state is not None
        settings = Settings.from_env(self.env())
        account = settings.settlement_account
        # The bank numbers its statements: the next one follows the last imported one (the
        # demo's, or any the operator imported by hand into this data dir).
        engine = make_engine(settings.database_url)
        try:
            with make_session_factory(engine)() as session:
                number, opening = next_statement(session, account)
        finally:
            engine.dispose()
        today = time.strftime("%Y-%m-%d")
        lines = tuple(
            Line(
                line_no=i,
                amount=fen,
                booked_on=dt.date.fromisoformat(today),
                bank_reference=f"DEMO-{number}-{i}",
                payer="Demo Cardholder",
                remittance=text,
            )
            for i, (text, fen) in enumerate(credits, start=1)
        )
        closing = opening + sum(line.amount for line in lines)
        statement = Statement(
            account=account,
            number=number,
            currency="CNY",
            opening_balance=opening,
            closing_balance=closing,
            lines=lines,
        )
        path = self.data_dir / f"statement-{number:04d}.csv"
        path.write_text(render_csv(statement), encoding="utf-8")
        summary: dict[str, Any] = json.loads(
            self.run_cli("settlement", "statement", "import", str(path), "--format", "csv")
        )
        summary["file"] = str(path)
        return summary

    def ledger_check(self) -> dict[str, Any]:
        assert self.state is not None
        with self.settlement_client(self.state.operator_key) as client:
            response = client.get("/v1/ledger/check")
        if response.status_code != 200:
            raise DemoError(f"ledger check: {response.status_code} {response.text}")
        result: dict[str, Any] = response.json()
        return result

    # --- merchant -----------------------------------------------------------------------

    def start_merchant(self) -> None:
        assert self.state is not None
        env = self.env()
        env["WEBPURSE_SETTLEMENT_URL"] = self.settlement_url
        env["WEBPURSE_SETTLEMENT_API_KEY"] = self.state.api_key
        env["WEBPURSE_AGENT_URL"] = self.agent_url
        if self.webhook_secret:
            env["WEBPURSE_MERCHANT_WEBHOOK_SECRET"] = self.webhook_secret
        process = self.spawn(
            "merchant",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "webpurse.merchant.app:app_from_env",
                "--host",
                self.host,
                "--port",
                str(self.merchant_port),
                "--log-level",
                "warning",
                # uvicorn would believe X-Forwarded-For from 127.0.0.1 (any local process):
                # the demo has no proxy in front (webpurse.listen.proxy_options).
                "--no-proxy-headers",
            ],
            env,
        )
        wait_http(f"{self.merchant_url}/health", process=process)

    # --- the card -----------------------------------------------------------------------

    def load_card(self, image: Path, amount: int) -> int:
        """Load ``amount`` onto the card in ``image`` through the real load flow."""
        return asyncio.run(self.load_card_async(image, amount))

    async def load_card_async(self, image: Path, amount: int) -> int:
        assert self.state is not None
        return await _load(self.settlement_url, self.state.api_key, image, amount)

    def start_agent(self, image: Path, *, yes: bool) -> subprocess.Popen[bytes]:
        args = [
            *webpurse_command(),
            "agent",
            "--reader",
            f"sim:{image}",
            "--allow-origin",
            self.merchant_url,
            "--port",
            str(self.agent_port),
        ]
        if yes:
            args.append("--yes")
        # Asking for consent needs the shopper's terminal; unattended, it logs to a file.
        process = self.spawn("agent", args, terminal=not yes)
        wait_port(self.host, self.agent_port, process)
        return process

    # --- the whole thing ----------------------------------------------------------------

    def up(self, *, load: int = DEMO_LOAD) -> DemoState:
        state = self.setup_settlement()
        self.start_settlement()
        self.register_webhook()
        self.start_merchant()
        if not state.card_loaded:
            self.load_card(Path(state.card_image), load)
            state.card_loaded = True
            state.save(self.data_dir / STATE_FILE)
        return state

    def stop(self) -> None:
        """Stop every process this stack started (and only those), newest first."""
        for process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        self.processes.clear()

    @contextlib.contextmanager
    def running(self) -> Iterator[DemoStack]:
        try:
            yield self
        finally:
            self.stop()


def wait_port(
    host: str, port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise DemoError(f"the process for port {port} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        time.sleep(0.1)
    raise DemoError(f"nothing listens on {host}:{port} after {timeout:g} s")


async def _load(settlement_url: str, api_key: str, image: Path, amount: int) -> int:
    from webpurse.merchant.flows import run_transaction
    from webpurse.merchant.settlement import Kind, SettlementClient
    from webpurse.reader.sim import SimReader

    async with httpx.AsyncClient(base_url=settlement_url, timeout=15.0) as http:
        client = SettlementClient(http, api_key)
        # Value the shop sold for cash at its till: drawn from the merchant's float.
        load = await client.create(
            Kind.LOAD, amount, description="demo load", reference="demo", funding="merchant_float"
        )
        reader = SimReader.from_image(image)
        try:
            outcome = await run_transaction(reader, client, load, card_timeout=5.0)
        finally:
            await reader.close()
    if outcome.status != "succeeded" or outcome.balance_after is None:
        raise DemoError(f"loading the demo card failed: {outcome.status} {outcome.decline_code}")
    return outcome.balance_after


def card_balance(image: Path) -> int:
    return ImageFile(image).load().balance


def scripted_purchase(
    stack: DemoStack, product: str = "tea", timeout: float = 60.0
) -> dict[str, Any]:
    """One purchase as a shopper's browser would make it, headless: returns the receipt."""
    assert stack.state is not None
    image = Path(stack.state.card_image)
    before = card_balance(image)
    with httpx.Client(base_url=stack.merchant_url, timeout=15.0) as shop:
        shop.post("/cart/add", data={"product": product, "quantity": "1"})
        checkout = shop.post("/checkout")
        if checkout.status_code != 303:
            raise DemoError(f"checkout failed: {checkout.status_code} {checkout.text[:200]}")
        pay_path = checkout.headers["location"]
        order_id = pay_path.split("/")[2]
        status = _pay_through_agent(stack, shop, order_id, timeout)
    return {
        "order": order_id,
        "payment": status.get("settlement_id"),
        **_outcome(status, before, image),
    }


def _outcome(status: dict[str, Any], before: int, image: Path) -> dict[str, Any]:
    """What a scripted order's receipt tells of the card: the order's final status, the
    balance before and after, the TAC, the round trips, any decline."""
    return {
        "status": status.get("status"),
        "amount": status.get("amount"),
        "balance_before": before,
        "balance_after": card_balance(image),
        "tac": status.get("tac"),
        "round_trips": status.get("round_trips"),
        "decline_code": status.get("decline_code"),
    }


def _pay_through_agent(
    stack: DemoStack, shop: httpx.Client, order_id: str, timeout: float
) -> dict[str, Any]:
    """Open the order's payment page, pair the agent as the page's script would, and wait
    until settlement's verdict; returns the order's status."""
    page = shop.get(f"/orders/{order_id}/pay").text
    token = re.search(r'data-token="([^"]+)"', page)
    if token is None:
        raise DemoError("the payment page has no pairing token")
    paired = httpx.post(
        f"{stack.agent_url}/pair",
        json={"token": token.group(1), "server": f"{stack.merchant_url}/reader"},
        headers={"Origin": stack.merchant_url},
        timeout=30.0,
    )
    if paired.status_code != 200:
        raise DemoError(f"the agent refused to pair: {paired.status_code} {paired.text}")
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = shop.get(f"/orders/{order_id}/status").json()
        if status["status"] in ("paid", "loaded", "declined", "canceled"):
            break
        time.sleep(0.2)
    return status


def scripted_funded_topup(
    stack: DemoStack, amount: int = DEMO_TOPUP, timeout: float = 60.0
) -> dict[str, Any]:
    """One online top-up as a cardholder makes it, headless: order it on the shop's page
    (bank transfer, the card's printed number), pay it (a bank statement line quoting its
    reference, imported by the operator), then load it through the agent. The receipt."""
    assert stack.state is not None
    image = Path(stack.state.card_image)
    card_number = ImageFile(image).load().serial.hex().upper()
    before = card_balance(image)
    with httpx.Client(base_url=stack.merchant_url, timeout=15.0) as shop:
        ordered = shop.post(
            "/topup",
            data={"amount": str(amount), "method": "bank_transfer", "card_number": card_number},
        )
        if ordered.status_code != 303:
            raise DemoError(f"top-up order failed: {ordered.status_code} {ordered.text[:200]}")
        order_id = ordered.headers["location"].split("/")[2]
        ordered_status = shop.get(f"/orders/{order_id}/status").json()
        reference = ordered_status.get("payment_reference")
        if not reference:
            raise DemoError(f"the top-up has no payment reference: {ordered_status}")
        summary = stack.import_statement([(f"webpurse top-up {reference}", amount)])
        if len(summary.get("matched", [])) != 1:
            raise DemoError(f"the statement matched nothing: {summary}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            funded = shop.get(f"/orders/{order_id}/status").json()
            if funded.get("settlement_status") != "requires_funding":
                break
            time.sleep(0.2)
        status = _pay_through_agent(stack, shop, order_id, timeout)
    return {
        "order": order_id,
        "load": status.get("settlement_id"),
        "reference": reference,
        "statement": summary["file"],
        **_outcome(status, before, image),
    }


def _fen(amount: int | None) -> str:
    if amount is None:
        return "-"
    return f"¥{amount // 100:,}.{amount % 100:02d}"


def demo(
    *,
    data_dir: Path,
    scripted: bool,
    ports: Ports,
) -> None:
    """Run settlement, the shop, and an agent with an emulated card; Ctrl-C stops them."""
    stack = DemoStack.on_ports(data_dir, ports, scripted=scripted)

    def addresses(state: DemoState, image: Path, yes: bool) -> list[str]:
        return [
            "",
            f"  shop:       {stack.merchant_url}/",
            f"  till:       {stack.merchant_url}/staff  (staff {state.staff_name},"
            f" password {state.staff_password})",
            f"  float:      {_fen(DEMO_FLOAT)} deposited for cash top-ups at the till",
            f"  settlement: {stack.settlement_url}/docs",
            f"  agent:      {stack.agent_url}  (card {image})",
            "  consent:    " + ("automatic (no terminal)" if yes else "asked in this terminal"),
            "",
            "Open the shop in a browser, buy something, pay with the card. Ctrl-C stops.",
            "Top up: sign in at the till and take cash (the float pays for the value), or",
            "order a bank transfer on the shop's top-up page and pay it with a statement:",
            "  webpurse settlement statement import FILE --format csv   (docs/merchant.md)",
        ]

    run_stack(
        stack,
        scripted=scripted,
        setting_up=f"setting up in {stack.data_dir} …",
        run_scripted=_scripted_purchase_and_topup,
        addresses=addresses,
        stopped="a server stopped; shutting down",
    )


def _scripted_purchase_and_topup(stack: DemoStack) -> bool:
    """``demo --scripted``: a purchase and a funded top-up; whether both went through."""
    receipt = scripted_purchase(stack)
    topup = scripted_funded_topup(stack)
    ledger = stack.ledger_check()
    _print_receipt(receipt, ledger)
    _print_topup_receipt(topup)
    return receipt["status"] == "paid" and topup["status"] == "loaded" and ledger.get("ok") is True


def run_stack(
    stack: DemoStack,
    *,
    scripted: bool,
    setting_up: str,
    run_scripted: Callable[[DemoStack], bool],
    addresses: Callable[[DemoState, Path, bool], list[str]],
    stopped: str,
) -> None:
    """Set ``stack`` up and start its agent on the demo card; then, scripted, exit 0 when
    ``run_scripted`` passed (1 otherwise), else print ``addresses`` (of the state, the card
    image, whether consent is automatic) and run until Ctrl-C or until a process stops."""
    out = typer.echo
    _interrupt_on_signals()
    with stack.running():
        try:
            out(setting_up)
            state = stack.up()
            image = Path(state.card_image)
            out(f"demo card {image.name}: balance {_fen(card_balance(image))}")
            yes = scripted or not sys.stdin.isatty()
            stack.start_agent(image, yes=yes)
            if scripted:
                raise typer.Exit(0 if run_scripted(stack) else 1)
            for line in addresses(state, image, yes):
                out(line)
            while all(p.poll() is None for p in stack.processes):
                time.sleep(0.5)
            out(stopped)
        except DemoError as exc:
            typer.echo(f"error: {exc} (logs in {stack.data_dir})", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            out("\nstopping …")


def _interrupt_on_signals() -> None:
    """Ctrl-C (even when started with SIGINT ignored) and SIGTERM both stop the demo cleanly."""

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def _outcome_lines(receipt: dict[str, Any]) -> list[str]:
    """A receipt's lines for its :func:`_outcome`."""
    return [
        f"  status          {receipt['status']}"
        + (f" ({receipt['decline_code']})" if receipt.get("decline_code") else ""),
        f"  amount          {_fen(receipt['amount'])}",
        f"  balance before  {_fen(receipt['balance_before'])}",
        f"  balance after   {_fen(receipt['balance_after'])}",
        f"  TAC             {receipt['tac']}",
        f"  round trips     {receipt['round_trips']}",
    ]


def _print_receipt(receipt: dict[str, Any], ledger: dict[str, Any]) -> None:
    lines = [
        "receipt",
        f"  order           {receipt['order']}",
        f"  payment         {receipt['payment']}",
        *_outcome_lines(receipt),
        "  ledger check    "
        + ("consistent" if ledger.get("ok") else f"PROBLEMS: {ledger.get('problems')}"),
    ]
    typer.echo("\n".join(lines))


def _print_topup_receipt(receipt: dict[str, Any]) -> None:
    lines = [
        "top-up receipt (bank transfer)",
        f"  order           {receipt['order']}",
        f"  load            {receipt['load']}",
        f"  reference       {receipt['reference']}",
        f"  statement       {receipt['statement']}",
        *_outcome_lines(receipt),
    ]
    typer.echo("\n".join(lines))
