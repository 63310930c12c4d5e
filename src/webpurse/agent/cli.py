"""``webpurse agent``: the terminal agent beside the shopper's reader.

Two ways to pair: the payment page posts the merchant's token to the loopback endpoint
(127.0.0.1, ``--port``, only from ``--allow-origin`` sites), or the shopper types the
short code: ``webpurse agent --reader … --code ABCD-EFGH --server https://shop.example/reader``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import typer
from rich.console import Console

from webpurse.agent.consent import always_yes, terminal_consent
from webpurse.agent.pairing import DEFAULT_PORT, create_pairing_app, normalise_origins
from webpurse.agent.session import PairingRefused
from webpurse.agent.terminal import TerminalAgent
from webpurse.reader.base import ReaderError

app = typer.Typer(help="The terminal agent: relays a merchant's card batches to a local reader.")
console = Console()
err = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(2)


@app.callback(invoke_without_command=True)
def agent(
    reader: Annotated[str, typer.Option(help="sim:IMAGE (card image file), pcsc, or pcsc:NAME")],
    yes: Annotated[
        bool, typer.Option("--yes", help="allow debits and loads without asking (unattended)")
    ] = False,
    allow_origin: Annotated[
        list[str] | None,
        typer.Option(help="merchant site allowed to pair through the loopback endpoint"),
    ] = None,
    port: Annotated[int, typer.Option(help="loopback pairing port")] = DEFAULT_PORT,
    code: Annotated[
        str | None, typer.Option(help="pair with this short code instead (needs --server)")
    ] = None,
    server: Annotated[
        str | None, typer.Option(help="the merchant's reader URL shown with the code")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="exit after one session")] = False,
) -> None:
    """Run the agent: pair with a merchant and relay its card batches to READER."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if code is not None and server is None:
        raise _fail("--code needs --server (the merchant's URL)")
    try:
        origins = normalise_origins(allow_origin or [])
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if code is None and not origins:
        raise _fail("give --allow-origin for the loopback endpoint, or --code and --server")
    try:
        asyncio.run(_run(reader, yes, sorted(origins), port, code, server, once))
    except (ReaderError, PairingRefused, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def _run(
    spec: str,
    yes: bool,
    origins: list[str],
    port: int,
    code: str | None,
    server: str | None,
    once: bool,
) -> None:
    from webpurse.reader.factory import open_reader

    local = open_reader(spec)
    consent = always_yes(console) if yes else terminal_consent(console)
    agent = TerminalAgent(local, consent=consent, show=console.print)
    try:
        if code is not None and server is not None:
            await agent.pair(server, code=code)
            await agent.wait_session()
            return
        import uvicorn

        config = uvicorn.Config(
            create_pairing_app(agent, allowed_origins=origins),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
        )
        pairing_server = uvicorn.Server(config)
        console.print(
            f"agent on {local.name}: pairing at http://127.0.0.1:{port}/pair "
            f"for {', '.join(origins)}"
        )
        if once:

            async def stop_after_one() -> None:
                await agent.wait_ended()
                pairing_server.should_exit = True

            stopper = asyncio.create_task(stop_after_one())
            await pairing_server.serve()
            stopper.cancel()
        else:
            await pairing_server.serve()
    finally:
        await agent.close()
        await local.close()
