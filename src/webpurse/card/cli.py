"""``webpurse card …``: personalise a card image, show it, drive it with APDUs."""

from __future__ import annotations

import datetime as dt
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from webpurse.card.image import CardBusy, ImageFile, open_card
from webpurse.card.personalise import MasterKeys, parse_serial, personalise
from webpurse.card.state import CardState
from webpurse.card.vpcd import DEFAULT_HOST, DEFAULT_PORT, VpcdClient
from webpurse.protocol.apdu import ResponseApdu, describe_sw
from webpurse.protocol.errors import FieldError

app = typer.Typer(help="Card images: personalise, inspect and drive an emulated e-purse card.")
console = Console()
err = Console(stderr=True)


@contextmanager
def _stopped_by_signals(stop: Callable[[], None]) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM call ``stop`` (a server's run returns); the previous
    handlers come back on the way out."""
    previous = {
        sig: signal.signal(sig, lambda *_: stop()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(2)


@app.command("issue")
def issue(
    image: Annotated[Path, typer.Argument(help="card image file to create")],
    serial: Annotated[str, typer.Option(help="10-byte application serial number, hex")],
    keys: Annotated[Path, typer.Option(help="JSON file with hex master keys dpk, dlk, dtk")],
    max_balance: Annotated[int, typer.Option(help="maximum balance in fen")] = 100_000,
    expiry: Annotated[str | None, typer.Option(help="expiry date YYYY-MM-DD")] = None,
) -> None:
    """Personalise a new card image from issuer master keys."""
    try:
        master = MasterKeys.from_file(keys)
        state = personalise(
            master,
            parse_serial(serial),
            start=dt.datetime.now(dt.UTC).date(),
            expiry=dt.date.fromisoformat(expiry) if expiry else None,
            max_balance=max_balance,
        )
        ImageFile(image).create(state)
    except (FieldError, OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"issued card {state.issuer.card_number} → {image}")


def _fen(amount: int) -> str:
    return f"¥{amount // 100:,}.{amount % 100:02d}"


def render_state(state: CardState) -> Table:
    table = Table(title=f"card {state.issuer.card_number}", show_header=False)
    table.add_row("serial", state.issuer.card_number)
    table.add_row("issuer", state.issuer.issuer_id.hex().upper())
    table.add_row("valid", f"{state.issuer.start_date} … {state.issuer.expiry_date}")
    table.add_row("balance", f"{state.balance} fen ({_fen(state.balance)})")
    table.add_row("maximum balance", f"{state.max_balance} fen")
    table.add_row("online counter (loads)", str(state.online_counter))
    table.add_row("offline counter (purchases)", str(state.offline_counter))
    status = "locked" if state.locked else "blocked" if state.blocked else "active"
    table.add_row("status", f"{status}, {state.mac_failures} MAC failures")
    for n, record in enumerate(state.log, 1):
        kind = {0x02: "load", 0x06: "purchase"}.get(record.transaction_type, "other")
        table.add_row(
            f"log {n}",
            f"#{record.counter} {kind} {record.amount} fen terminal "
            f"{record.terminal_id.hex().upper()} {record.date} {record.time}",
        )
    return table


@app.command("show")
def show(image: Annotated[Path, typer.Argument(help="card image file")]) -> None:
    """Print serial, balance, counters and transaction log."""
    try:
        state = ImageFile(image).load()
    except (OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    console.print(render_state(state))


def format_response(response: ResponseApdu, explain: bool) -> str:
    text = str(response)
    return f"{text} {describe_sw(response.sw)}" if explain else text


@app.command("apdu")
def apdu(
    image: Annotated[Path, typer.Argument(help="card image file")],
    explain: Annotated[bool, typer.Option(help="append the status word's name")] = False,
) -> None:
    """Read hex APDUs from standard input, one per line; answer each as `<data> <SW>`."""
    try:
        with open_card(image) as card:
            for line in sys.stdin:
                text = "".join(line.split())
                if not text or text.startswith("#"):
                    continue
                try:
                    raw = bytes.fromhex(text)
                except ValueError:
                    print(f"error: {line.strip()!r} is not hex", flush=True)
                    continue
                response = ResponseApdu.from_bytes(card.process(raw))
                print(format_response(response, explain), flush=True)
    except (CardBusy, OSError, ValueError) as exc:
        raise _fail(str(exc)) from None


@app.command("serve")
def serve(
    image: Annotated[Path, typer.Argument(help="card image file (every commit persists)")],
    host: Annotated[
        str, typer.Option(help="host where pcscd's vpcd driver listens")
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="vpcd port: 35963 slot 0, 35964 slot 1")] = DEFAULT_PORT,
) -> None:
    """Put the card into pcscd's virtual reader (vsmartcard vpcd) until stopped.

    Every PC/SC program then sees it in "Virtual PCD 00 00". Ctrl-C or SIGTERM takes the
    card out of the reader. See docs/pcsc.md.
    """
    try:
        with open_card(image) as card:
            client = VpcdClient(card, host, port, on_status=lambda m: err.print(m))
            try:
                with _stopped_by_signals(client.stop):
                    err.print(f"serving card {card.state.issuer.card_number} to vpcd {host}:{port}")
                    client.run()
            finally:
                client.close()
    except (CardBusy, OSError, ValueError) as exc:
        raise _fail(str(exc)) from None


@app.command("serve-pn532")
def serve_pn532(
    image: Annotated[Path, typer.Argument(help="card image file (every commit persists)")],
) -> None:
    """Serve the card in a simulated PN532 on a new pseudo-terminal until stopped.

    Prints the pty's path: use it as the PN532's serial line, e.g. ``webpurse agent --reader
    pn532:/dev/pts/N`` or libnfc's ``LIBNFC_DEFAULT_DEVICE=pn532_uart:/dev/pts/N nfc-list``.
    Ctrl-C or SIGTERM stops it. See docs/readers.md.
    """
    from webpurse.card.pn532sim import Pn532Chip, PtyServer

    try:
        with open_card(image) as card:
            server = PtyServer(Pn532Chip(card))
            try:
                with _stopped_by_signals(server.stop):
                    err.print(f"serving card {card.state.issuer.card_number} in a PN532 on")
                    print(server.path, flush=True)
                    server.run()
            finally:
                server.close()
    except (CardBusy, OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
