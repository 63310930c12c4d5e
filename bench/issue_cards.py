"""Bench cards, personalised and registered: ``python -m bench.issue_cards COUNT``.

What ``webpurse settlement card issue`` does, without image files (the cards live in the
benchmark's memory). The settlement database, KEK and data dir come from the environment
(``WEBPURSE_DATABASE_URL``, ``WEBPURSE_KEK``, ``WEBPURSE_DATA_DIR``). Run as a module, it
prints the cards' states as one JSON list: the ``versions`` benchmark runs it with an
older revision's ``src`` first on ``PYTHONPATH``, so each revision's cards are registered
by that revision's code, in that revision's schema. It imports nothing else of ``bench``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping

from webpurse.protocol.purse import CardState


def issue_card_states(env: Mapping[str, str], count: int) -> list[CardState]:
    """Personalise and register ``count`` cards in the database ``env`` names."""
    from webpurse.settlement.db import make_engine, make_session_factory
    from webpurse.settlement.logs import configure_logging
    from webpurse.settlement.registry import issue_card
    from webpurse.settlement.security import SoftwareSecurityModule
    from webpurse.settlement.settings import Settings

    configure_logging(logging.WARNING)  # not one line per card issued
    settings = Settings.from_env(dict(env))
    engine = make_engine(settings.database_url)
    try:
        factory = make_session_factory(engine)
        security = SoftwareSecurityModule.from_settings(settings, factory)
        states = []
        with factory() as session, session.begin():
            for _ in range(count):
                _, state = issue_card(session, security, settings.clock())
                states.append(state)
        return states
    finally:
        engine.dispose()


def encode(states: list[CardState]) -> str:
    return json.dumps([json.loads(state.to_json()) for state in states])


def decode(text: str) -> list[CardState]:
    return [CardState.from_json(json.dumps(raw)) for raw in json.loads(text)]


def main() -> None:
    count = int(sys.argv[1])
    sys.stdout.write(encode(issue_card_states(os.environ, count)) + "\n")


if __name__ == "__main__":
    main()
