"""``webpurse settlement card issue``: settlement issues a card and writes its image file.

Issuing joins two roles: settlement personalises and registers the card (it imports only
``protocol``), and the card emulator's image file receives it. That join lives here, outside
both packages, so ``settlement`` never imports ``card`` (docs/architecture.md). The command
is mounted under ``webpurse settlement card`` by :mod:`webpurse.cli`.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from webpurse.card.image import ImageFile
from webpurse.protocol.errors import FieldError
from webpurse.protocol.issuance import parse_serial
from webpurse.settlement.cli import _fail, _settings, console
from webpurse.settlement.db import make_engine, make_session_factory
from webpurse.settlement.registry import RegistryError, issue_card
from webpurse.settlement.security import SecurityError
from webpurse.settlement.security_factory import open_security_module


def card_issue(
    image: Annotated[Path, typer.Argument(help="card image file to create")],
    serial: Annotated[
        str | None, typer.Option(help="10-byte serial, hex (random if absent)")
    ] = None,
    max_balance: Annotated[int, typer.Option(help="maximum balance in fen")] = 100_000,
    expiry_date: Annotated[str | None, typer.Option("--expiry", help="YYYY-MM-DD")] = None,
) -> None:
    """Personalise a card from the master keys and register it, in one step."""
    settings = _settings()
    engine = make_engine(settings.database_url)
    try:
        factory = make_session_factory(engine)
        security = open_security_module(settings, factory)
        if image.exists():
            raise _fail(f"{image} already holds a card image")
        with factory() as session, session.begin():
            card, state = issue_card(
                session,
                security,
                settings.clock(),
                serial=parse_serial(serial) if serial else None,
                expiry=dt.date.fromisoformat(expiry_date) if expiry_date else None,
                max_balance=max_balance,
            )
            ImageFile(image).create(state)
            number = card.card_number
    except (SecurityError, RegistryError, FieldError, OSError, ValueError) as exc:
        raise _fail(str(exc)) from None
    finally:
        engine.dispose()
    console.print(f"issued card {number} → {image}")
