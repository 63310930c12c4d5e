"""The ``webpurse`` command line: one tool, a subcommand per role."""

from __future__ import annotations

import typer

from webpurse.agent.cli import app as agent_app
from webpurse.card.cli import app as card_app
from webpurse.demo_cli import demo_command
from webpurse.issuer import card_issue
from webpurse.merchant.cli import app as merchant_app
from webpurse.serve import app as serve_app
from webpurse.settlement.cli import app as settlement_app
from webpurse.settlement.cli import card_app as settlement_card_app
from webpurse.settlement.cli import ledger_app

app = typer.Typer(
    help="webpurse: pay on a merchant web page with the e-purse on a contactless card.",
    no_args_is_help=True,
)
# Issuing joins settlement and the card image file, so it is wired here (webpurse.issuer).
settlement_card_app.command("issue")(card_issue)
app.add_typer(card_app, name="card")
app.add_typer(agent_app, name="agent")
app.add_typer(settlement_app, name="settlement")
app.add_typer(ledger_app, name="ledger")
app.add_typer(merchant_app, name="merchant")
app.add_typer(serve_app, name="serve")
app.command("demo")(demo_command)


def main() -> None:  # pragma: no cover - console entry point
    app()
