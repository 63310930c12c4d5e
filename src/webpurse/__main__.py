"""``python -m webpurse`` runs the command line."""

from webpurse.cli import app

app(prog_name="webpurse")
