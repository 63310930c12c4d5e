"""Card transactions (payments, loads) and the refunds they carry: one lifecycle.

:mod:`.status` holds the statuses and the one table of legal moves (h11's ``_state.py``
is the model): every status change in settlement goes through :func:`transition`, which
raises :class:`IllegalTransition` on any other move.
"""

from webpurse.settlement.transactions.status import (
    FINAL,
    OPEN,
    RETURNED,
    TRANSITIONS,
    CardStatus,
    IllegalTransition,
    Kind,
    Status,
    move,
    reachable,
    transition,
)

__all__ = [
    "FINAL",
    "OPEN",
    "RETURNED",
    "TRANSITIONS",
    "CardStatus",
    "IllegalTransition",
    "Kind",
    "Status",
    "move",
    "reachable",
    "transition",
]
