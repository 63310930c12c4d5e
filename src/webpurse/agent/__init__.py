"""webpurse.agent: the terminal agent beside the shopper's reader (``docs/remote-reader.md``)."""

from webpurse.agent.consent import Consent, always_yes, describe, terminal_consent
from webpurse.agent.guard import Allow, Ask, ConsentRequest, Guard, Kind, Refuse, Verdict
from webpurse.agent.pairing import DEFAULT_PORT, create_pairing_app, normalise_origins
from webpurse.agent.session import (
    AGENT_NAME,
    AgentSession,
    PairingRefused,
    ServerTarget,
    origin_of,
    target_for,
)
from webpurse.agent.terminal import AgentBusy, TerminalAgent

__all__ = [
    "AGENT_NAME",
    "DEFAULT_PORT",
    "AgentBusy",
    "AgentSession",
    "Allow",
    "Ask",
    "Consent",
    "ConsentRequest",
    "Guard",
    "Kind",
    "PairingRefused",
    "Refuse",
    "ServerTarget",
    "TerminalAgent",
    "Verdict",
    "always_yes",
    "create_pairing_app",
    "describe",
    "normalise_origins",
    "origin_of",
    "target_for",
    "terminal_consent",
]
