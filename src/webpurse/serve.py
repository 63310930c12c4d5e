"""``webpurse serve …``: run a server role under uvicorn (one subcommand per server)."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="Run a webpurse server (settlement, merchant, …).", no_args_is_help=True)


@app.command("settlement")
def settlement(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8100,
    migrate: Annotated[
        bool, typer.Option(help="apply database migrations at start (SQLite default)")
    ] = True,
    workers: Annotated[
        int, typer.Option(min=1, help="uvicorn worker processes (one core each)")
    ] = 1,
) -> None:
    """The settlement server (settings from WEBPURSE_DATABASE_URL, WEBPURSE_KEK…)."""
    from webpurse.settlement.cli import serve

    serve(host=host, port=port, migrate=migrate, workers=workers)


@app.command("merchant")
def merchant(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
) -> None:
    """The merchant web shop (settings from WEBPURSE_SETTLEMENT_URL, …; docs/merchant.md)."""
    from webpurse.listen import run_asgi

    run_asgi(
        "webpurse.merchant.app:app_from_env", factory=True, host=host, port=port, access_log=False
    )
