"""The merchant's side of the remote-reader protocol (``docs/remote-reader.md``).

- :class:`Pairings` issues the single-use pairing token (and its short code) for one
  payment or load, behind a small :class:`PairingStore` (in memory by default), with an
  injected clock;
- :class:`ReaderHub` is the session registry and the WebSocket endpoint the merchant app
  mounts; it turns each agent connection into a :class:`RemoteReader`;
- :class:`RemoteReader` implements :class:`webpurse.reader.base.Reader` over that
  connection, so the purchase and load flows do not care where the reader is.

A dropped socket keeps the session for a grace period: a batch that was out when it
dropped fails with :class:`~webpurse.reader.base.OutcomeUnknown` (it is never re-sent);
the agent reconnects with its resume token and the reader works again.

One noun per module: :mod:`.pairing`, :mod:`.limiter`, :mod:`.link`, :mod:`.reader`,
:mod:`.hub`; everything is re-exported here.
"""

from webpurse.reader.remote.hub import ReaderHub
from webpurse.reader.remote.limiter import (
    CODE_ATTEMPTS,
    CODE_CLIENTS,
    CODE_GUESS_BUDGET,
    CODE_SITE_ATTEMPTS,
    CodeLimiter,
    client_network,
)
from webpurse.reader.remote.link import Link
from webpurse.reader.remote.pairing import (
    CODE_ALPHABET,
    CODE_LENGTH,
    PAIRING_LIFETIME,
    Clock,
    MemoryPairingStore,
    Pairing,
    PairingError,
    PairingRecord,
    Pairings,
    PairingStore,
    normalise_code,
    utc_now,
)
from webpurse.reader.remote.reader import RemoteReader

__all__ = [
    "CODE_ALPHABET",
    "CODE_ATTEMPTS",
    "CODE_CLIENTS",
    "CODE_GUESS_BUDGET",
    "CODE_LENGTH",
    "CODE_SITE_ATTEMPTS",
    "PAIRING_LIFETIME",
    "Clock",
    "CodeLimiter",
    "Link",
    "MemoryPairingStore",
    "Pairing",
    "PairingError",
    "PairingRecord",
    "PairingStore",
    "Pairings",
    "ReaderHub",
    "RemoteReader",
    "client_network",
    "normalise_code",
    "utc_now",
]
