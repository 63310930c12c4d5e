"""``webpurse merchant …``: the shop's local admin tools (staff accounts).

They open the shop's database directly (``WEBPURSE_MERCHANT_DATABASE_URL``, else
``$WEBPURSE_DATA_DIR/merchant.db``), so they run on the shop's host, never over HTTP.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from webpurse.merchant.orders import make_engine
from webpurse.merchant.settings import MerchantSettings
from webpurse.merchant.staff import StaffBook, StaffError

app = typer.Typer(help="The merchant shop's administration (local).", no_args_is_help=True)
staff_app = typer.Typer(help="Shop staff who sell top-ups at the till.", no_args_is_help=True)
app.add_typer(staff_app, name="staff")


def _book() -> StaffBook:
    settings = MerchantSettings.from_env()
    return StaffBook(make_engine(settings.resolved_database_url()))


@staff_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="sign-in name: a-z, 0-9, '.', '_', '-'")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from standard input")
    ] = False,
) -> None:
    """Create a staff account (the password is asked for, or read from stdin)."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        _book().add(name, password)
    except StaffError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"staff member {name} added")


@staff_app.command("list")
def list_staff() -> None:
    """The staff accounts, by name."""
    for name in _book().names():
        typer.echo(name)
