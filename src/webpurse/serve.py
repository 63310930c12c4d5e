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
        int,
        typer.Option(min=1, help="worker processes (one core each), each on its own socket"),
    ] = 1,
    reuse_port: Annotated[
        bool,
        typer.Option(help="share the port with other processes that set it too (SO_REUSEPORT)"),
    ] = False,
) -> None:
    """The settlement server (settings from WEBPURSE_DATABASE_URL, WEBPURSE_KEK…).

    Any number of these may share one PostgreSQL database, each on its own port (behind a
    load balancer) or on one port with --reuse-port; background jobs run once at a time
    across them.
    """
    from webpurse.settlement.cli import serve

    serve(host=host, port=port, migrate=migrate, workers=workers, reuse_port=reuse_port)


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
