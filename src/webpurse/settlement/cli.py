"""``webpurse settlement …`` and ``webpurse ledger …``: the local admin tools.

These touch keys or the whole database, so they run on the settlement host and never
over HTTP. Settings come from the environment (see :class:`.settings.Settings`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from webpurse.listen import run_asgi
from webpurse.settlement import clearing, expiry
from webpurse.settlement.auth import OPERATOR, new_api_key
from webpurse.settlement.clearing_cli import app as clearing_app
from webpurse.settlement.db import make_engine, make_session_factory, migrate
from webpurse.settlement.logs import configure_logging
from webpurse.settlement.merchants import MerchantError, create_merchant
from webpurse.settlement.registry import RegistryError, find_card, set_status
from webpurse.settlement.security import (
    SecurityError,
    SoftwareSecurityModule,
    generate_master_keys,
    resolve_kek,
)
from webpurse.settlement.settings import Settings

app = typer.Typer(
    help="Settlement server administration (local: touches keys).", no_args_is_help=True
)
merchant_app = typer.Typer(help="Merchants and their API keys.", no_args_is_help=True)
operator_app = typer.Typer(help="Operator API keys.", no_args_is_help=True)
card_app = typer.Typer(help="Cards issued by settlement.", no_args_is_help=True)
app.add_typer(merchant_app, name="merchant")
app.add_typer(operator_app, name="operator")
app.add_typer(card_app, name="card")
app.add_typer(clearing_app, name="clearing")
ledger_app = typer.Typer(help="The settlement ledger.", no_args_is_help=True)

console = Console()
err = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(2)


def _settings() -> Settings:
    configure_logging(logging.WARNING)
    try:
        return Settings.from_env()
    except SecurityError as exc:
        raise _fail(str(exc)) from None


@contextlib.contextmanager
def _engine(settings: Settings) -> Iterator[Engine]:
    """The settings' database for one command; its connections closed after."""
    engine = make_engine(settings.database_url)
    try:
        yield engine
    finally:
        engine.dispose()


@contextlib.contextmanager
def _transaction(settings: Settings) -> Iterator[Session]:
    """One transaction on the settings' database: committed, or rolled back on error."""
    with _engine(settings) as engine, make_session_factory(engine)() as session, session.begin():
        yield session


def _prepare_sqlite_dir(settings: Settings) -> None:
    if settings.database_url.startswith("sqlite:///"):
        Path(settings.database_url.removeprefix("sqlite:///")).parent.mkdir(
            parents=True, exist_ok=True
        )


@app.command("init")
def init() -> None:
    """Create the schema (Alembic) and the master keys if absent (in the database under the
    KEK, or in the PKCS#11 token with WEBPURSE_SECURITY_MODULE=pkcs11); idempotent."""
    settings = _settings()
    _prepare_sqlite_dir(settings)
    try:
        with _engine(settings) as engine:
            migrate(engine)
            # The KEK seals the webhook secrets whichever module holds the master keys.
            kek = resolve_kek(settings, create=True)
            if settings.security_module == "pkcs11":
                from webpurse.settlement.pkcs11 import Pkcs11SecurityModule, token_config

                token = Pkcs11SecurityModule(token_config(settings))
                try:
                    created = token.generate_master_keys()
                finally:
                    token.close()
            else:
                created = generate_master_keys(make_session_factory(engine), kek, settings.clock())
                SoftwareSecurityModule.load(make_session_factory(engine), kek)
    except SecurityError as exc:
        raise _fail(str(exc)) from None
    console.print(
        "schema up to date; " + ("master keys created" if created else "master keys present")
    )


@app.command("migrate-keys-to-token")
def migrate_keys_to_token() -> None:
    """Copy the software module's master keys into the PKCS#11 token, once, and store every
    issued card's TAC key there; then set WEBPURSE_SECURITY_MODULE=pkcs11."""
    from webpurse.settlement.pkcs11 import Pkcs11SecurityModule, migrate_from_software, token_config

    settings = _settings()
    try:
        with _engine(settings) as engine:
            factory = make_session_factory(engine)
            software = SoftwareSecurityModule.load(factory, resolve_kek(settings))
            token = Pkcs11SecurityModule(token_config(settings))
            try:
                versions, cards = migrate_from_software(software, token, factory)
            finally:
                token.close()
    except SecurityError as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"master keys of versions {versions} imported into the token; TAC keys of {cards}"
        " cards stored. Set WEBPURSE_SECURITY_MODULE=pkcs11, then move the KEK offline."
    )


@merchant_app.command("create")
def merchant_create(
    name: Annotated[str, typer.Argument(help="merchant name")],
    terminal_id: Annotated[str | None, typer.Option(help="6-byte terminal id, hex")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Register a merchant with its virtual terminal; prints its API key once."""
    settings = _settings()
    try:
        with _transaction(settings) as session:
            merchant, key = create_merchant(
                session, name, settings.clock(), terminal_id=terminal_id
            )
            out = {"id": merchant.id, "terminal_id": merchant.terminal_id, "api_key": key}
    except MerchantError as exc:
        raise _fail(str(exc)) from None
    if json_output:
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        console.print(f"merchant {out['id']} terminal {out['terminal_id']}")
        console.print(f"API key (shown once): {out['api_key']}", soft_wrap=True)


@operator_app.command("create")
def operator_create(
    name: Annotated[str, typer.Argument(help="who holds this key")] = "operator",
    json_output: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Create an operator API key; prints it once."""
    settings = _settings()
    with _transaction(settings) as session:
        _, key = new_api_key(session, OPERATOR, settings.clock(), name=name)
    if json_output:
        sys.stdout.write(json.dumps({"api_key": key}) + "\n")
    else:
        console.print(f"operator API key (shown once): {key}", soft_wrap=True)


@card_app.command("status")
def card_status(
    card_number: Annotated[str, typer.Argument(help="20 hex digits")],
    status: Annotated[str, typer.Argument(help="active, blocked, lost or expired")],
    reason: Annotated[str, typer.Option(help="why (kept in the card's history)")] = "",
) -> None:
    """Block, report lost, expire or reactivate a card (blocked and lost are blacklisted)."""
    settings = _settings()
    try:
        with _transaction(settings) as session:
            card = find_card(session, card_number)
            if card is None:
                raise _fail(f"no card {card_number.upper()} is registered")
            user = os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"
            set_status(session, card, status, settings.clock(), reason, by=f"cli:{user}")
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    console.print(f"card {card_number.upper()} is now {status}")


@app.command("sweep")
def sweep() -> None:
    """Expire stale payments and loads (authorised ones become uncertain)."""
    settings = _settings()
    with _engine(settings) as engine:
        report = expiry.sweep(
            make_session_factory(engine),
            settings.clock(),
            requires_card_ttl=settings.requires_card_ttl,
            authorised_ttl=settings.authorised_ttl,
            card_hold_ttl=settings.card_hold_ttl,
        )
    console.print(json.dumps(report.to_json()))


@ledger_app.command("check")
def ledger_check() -> None:
    """Recompute every balance from the entries and reconcile the clearing batches with the
    entries between their marks; exit 1 unless the ledger is consistent."""
    settings = _settings()
    with _engine(settings) as engine, make_session_factory(engine)() as session:
        report = clearing.ledger_check(session)
    for kind, total in sorted(report.totals.items()):
        console.print(f"{kind:>10} {total:>14,} fen")
    console.print(f"{report.accounts} accounts, {report.transfers} transfers")
    if not report.ok:
        for problem in report.problems:
            err.print(f"[red]✗[/red] {problem}")
        raise typer.Exit(1)
    console.print("[green]ledger consistent[/green]: all balances agree with the entries")


def serve(
    *, host: str, port: int, migrate: bool, workers: int = 1, reuse_port: bool = False
) -> None:
    """Run the settlement server; ``workers`` > 1 runs that many uvicorn worker processes.

    The app is built once here first (settings, keys and, on SQLite, migrations are checked
    before anything listens); each worker then builds its own from the same environment.
    The listening sockets are ours (``webpurse.listen``), so accepted connections have
    ``TCP_NODELAY`` whatever uvicorn does; each worker has its own (``SO_REUSEPORT``), and
    ``reuse_port`` lets a one-worker server share its port with other servers too.
    """
    from webpurse.settlement.app import create_app

    settings = _settings()
    _prepare_sqlite_dir(settings)
    configure_logging(logging.INFO)
    try:
        sqlite = settings.database_url.startswith("sqlite")
        application = create_app(dataclasses.replace(settings, migrate=migrate and sqlite))
    except SecurityError as exc:
        raise _fail(str(exc)) from None
    except SQLAlchemyError as exc:
        raise _fail(
            f"database not ready ({type(exc).__name__}): run `webpurse settlement init`"
        ) from None
    quiet: dict[str, Any] = {"log_config": None, "access_log": False}
    if workers <= 1:
        run_asgi(application, host=host, port=port, reuse_port=reuse_port, **quiet)
        return
    application.state.settlement.engine.dispose()
    del application
    run_asgi(
        "webpurse.settlement.cli:worker_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        **quiet,
    )


def worker_app() -> Any:
    """One worker's app (``serve --workers N``): settings from the environment, no migrating."""
    from webpurse.settlement.app import create_app

    configure_logging(logging.INFO)
    return create_app(dataclasses.replace(Settings.from_env(), migrate=False))


# --- funding (issue 12): floats, bank statements, exceptions --------------------------

float_app = typer.Typer(help="Merchants' prepaid top-up floats.", no_args_is_help=True)
statement_app = typer.Typer(
    help="Bank statements of the settlement account and their exceptions.", no_args_is_help=True
)
app.add_typer(float_app, name="float")
app.add_typer(statement_app, name="statement")


def _funding_run(work: Any) -> Any:
    """Run ``work(session, settings)`` in one transaction; refusals exit 2 with their code."""
    from webpurse.settlement.errors import SettlementError

    settings = _settings()
    try:
        with _transaction(settings) as session:
            return work(session, settings)
    except SettlementError as exc:
        raise _fail(f"{exc.code}: {exc.detail}") from None


@float_app.command("deposit")
def float_deposit(
    merchant_id: Annotated[str, typer.Argument(help="the merchant (mer_…)")],
    amount: Annotated[int, typer.Argument(help="fen received, > 0")],
    bank_reference: Annotated[
        str, typer.Option("--bank-reference", help="the bank's reference of the credit")
    ],
    json_output: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Record money a merchant paid into its float (idempotent on the bank reference)."""
    from webpurse.settlement import funding

    if amount <= 0 or not bank_reference.strip():
        raise _fail("the amount must be > 0 fen and the bank reference not empty")

    def work(session: Any, settings: Settings) -> dict[str, Any]:
        deposit, created = funding.record_deposit(
            session, merchant_id, amount, bank_reference.strip(), settings.clock()
        )
        policy = funding.FundingPolicy.from_settings(settings)
        return {
            **funding.deposit_json(deposit),
            "created": created,
            "float": funding.float_json(session, merchant_id, policy),
        }

    out = _funding_run(work)
    if json_output:
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        verb = "recorded" if out["created"] else "already recorded"
        console.print(
            f"deposit {out['id']} {verb}: {amount:,} fen; float of {merchant_id} is"
            f" {out['float']['balance']:,} fen"
        )


@float_app.command("show")
def float_show(
    merchant_id: Annotated[str, typer.Argument(help="the merchant (mer_…)")],
) -> None:
    """A merchant's float balance."""
    from webpurse.settlement import funding

    def work(session: Any, settings: Settings) -> dict[str, Any]:
        return funding.float_json(
            session, merchant_id, funding.FundingPolicy.from_settings(settings)
        )

    sys.stdout.write(json.dumps(_funding_run(work)) + "\n")


@statement_app.command("import")
def statement_import(
    path: Annotated[Path, typer.Argument(help="the statement file")],
    fmt: Annotated[str, typer.Option("--format", help="mt940 or csv")] = "mt940",
) -> None:
    """Import a statement: fund the top-ups it pays, list the rest (idempotent)."""
    from webpurse.settlement import funding

    if fmt not in ("mt940", "csv"):
        raise _fail("--format is mt940 or csv")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"cannot read {path}: {exc}") from None

    def work(session: Any, settings: Settings) -> dict[str, Any]:
        summary, created = funding.import_statement(
            session, text, fmt, funding.FundingPolicy.from_settings(settings), settings.clock()
        )
        return {**summary, "created": created}

    sys.stdout.write(json.dumps(_funding_run(work)) + "\n")


@statement_app.command("exceptions")
def statement_exceptions(
    status: Annotated[
        str | None, typer.Option(help="awaiting_return or returned (default: all)")
    ] = None,
) -> None:
    """Money received that funds no top-up (one JSON object a line)."""
    from webpurse.settlement import funding

    def work(session: Any, settings: Settings) -> list[dict[str, Any]]:
        return [funding.exception_json(x) for x in funding.list_exceptions(session, status)]

    for row in _funding_run(work):
        sys.stdout.write(json.dumps(row) + "\n")


@statement_app.command("return")
def statement_return(
    exception_id: Annotated[str, typer.Argument(help="the exception (sexc_…)")],
    return_reference: Annotated[
        str, typer.Argument(help="the bank reference of the transfer back to the payer")
    ],
) -> None:
    """Record that an exception's money went back to its payer."""
    from webpurse.settlement import funding

    def work(session: Any, settings: Settings) -> dict[str, Any]:
        exc = funding.return_exception(session, exception_id, return_reference, settings.clock())
        return funding.exception_json(exc)

    sys.stdout.write(json.dumps(_funding_run(work)) + "\n")
