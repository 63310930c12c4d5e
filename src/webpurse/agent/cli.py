"""``webpurse-agent`` (also ``webpurse agent``): the terminal agent beside the shopper's reader.

Two ways to pair: the payment page posts the merchant's token to the loopback endpoint
(127.0.0.1, ``--port``, only from ``--allow-origin`` sites), or the shopper types the
short code: ``webpurse-agent --reader … --code ABCD-EFGH --server https://shop.example/reader``.
The shopper confirms each payment, load or data share in a dialog window (``--consent
dialog``), on the terminal (``terminal``), or where a display exists in the dialog and
otherwise on the terminal (``auto``, the default). See ``docs/agent.md``.
"""

from __future__ import annotations

import asyncio
import logging
from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console

from webpurse.agent.consent import Consent, always_yes, show_text, terminal_consent
from webpurse.agent.dialog import (
    DEFAULT_TIMEOUT,
    dialog_consent,
    dialog_unavailable,
    system_language,
)
from webpurse.agent.pairing import DEFAULT_PORT, create_pairing_app, normalise_origins
from webpurse.agent.session import PairingRefused
from webpurse.agent.terminal import TerminalAgent
from webpurse.reader.base import ReaderError

app = typer.Typer(help="The terminal agent: relays a merchant's card batches to a local reader.")
console = Console()
err = Console(stderr=True)


class ConsentMode(StrEnum):
    AUTO = "auto"
    DIALOG = "dialog"
    TERMINAL = "terminal"


def _fail(message: str) -> typer.Exit:
    err.print("[red]error:[/red] ", end="")
    err.print(message, markup=False, highlight=False)
    return typer.Exit(2)


def choose_consent(mode: ConsentMode, yes: bool, language: str, timeout: float) -> Consent:
    """The shopper's prompt for ``--consent``; raises ValueError if a dialog cannot be shown."""
    if yes:
        return always_yes(console)
    why = dialog_unavailable()
    if mode is ConsentMode.DIALOG and why is not None:
        raise ValueError(f"--consent dialog: {why}")
    if mode is ConsentMode.TERMINAL or why is not None:
        return terminal_consent(console, language)
    return dialog_consent(language, timeout)


@app.callback(invoke_without_command=True)
def agent(
    reader: Annotated[
        str, typer.Option(help="sim:IMAGE (card image file), pcsc, pcsc:NAME, or pn532:PORT[:BAUD]")
    ],
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
    consent: Annotated[
        ConsentMode,
        typer.Option(help="ask in a dialog window, on the terminal, or auto (dialog if a display)"),
    ] = ConsentMode.AUTO,
    language: Annotated[
        str | None, typer.Option(help="en or zh (default: the system locale)")
    ] = None,
    dialog_timeout: Annotated[
        float, typer.Option(help="seconds the dialog waits before it cancels", min=1)
    ] = DEFAULT_TIMEOUT,
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
        prompt = choose_consent(consent, yes, language or system_language(), dialog_timeout)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    try:
        asyncio.run(_run(reader, prompt, sorted(origins), port, code, server, once))
    except (ReaderError, PairingRefused, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def _run(
    spec: str,
    consent: Consent,
    origins: list[str],
    port: int,
    code: str | None,
    server: str | None,
    once: bool,
) -> None:
    from webpurse.reader.factory import open_reader

    local = open_reader(spec)
    agent = TerminalAgent(local, consent=consent, show=show_text(console))
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
        show_text(console)(
            f"agent on {local.name}: pairing at http://127.0.0.1:{port}/pair "
            f"for {', '.join(origins)} (Ctrl-C stops it)"
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


def main() -> None:
    """The ``webpurse-agent`` command."""
    app(prog_name="webpurse-agent")
