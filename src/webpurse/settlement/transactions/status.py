"""The statuses of payments, loads and refunds, and the one table of legal moves.

The table is the lifecycle (docs/architecture.md draws it)::

    payment  requires_card → authorised | declined | canceled | expired
             authorised    → succeeded | uncertain | canceled
             uncertain     → succeeded | canceled
             canceled      → succeeded   (healed: the card proves a released debit ran)
    load     requires_funding → requires_card | canceled | expired   (a bank-transfer order)
             then as a payment
    refund   pending → succeeded | failed

``authorised``/``uncertain`` → ``canceled`` is a release: the card proved (resolve, or a
verified answer of another transaction at the same counter) that no debit or credit ran.
A released payment (``canceled`` after authorisation, its hold returned) is the one way
back: the card's verified proof that the debit did run re-holds and captures it
(``holds.heal``, issue 19); a released load is settled by a load completed at its
counter instead. Every other end (:data:`FINAL`) has no way out. Sans-I/O: no database
here, only the rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Protocol


class Status(StrEnum):
    """The ``status`` column of payments, loads and refunds (the strings stored today)."""

    REQUIRES_FUNDING = "requires_funding"  # a bank-transfer load waiting for its money
    REQUIRES_CARD = "requires_card"
    AUTHORISED = "authorised"
    UNCERTAIN = "uncertain"
    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    CANCELED = "canceled"
    EXPIRED = "expired"
    PENDING = "pending"  # a refund waiting for its load
    FAILED = "failed"  # a refund whose load gave the money back


class CardStatus(StrEnum):
    """The ``status`` column of a registered card (the operator sets it, a clone blocks it)."""

    ACTIVE = "active"
    BLOCKED = "blocked"
    LOST = "lost"
    EXPIRED = "expired"


class Kind(StrEnum):
    PAYMENT = "payment"
    LOAD = "load"
    REFUND = "refund"


S = Status

_CARD_TRANSACTION: dict[Status, frozenset[Status]] = {
    S.REQUIRES_CARD: frozenset({S.AUTHORISED, S.DECLINED, S.CANCELED, S.EXPIRED}),
    S.AUTHORISED: frozenset({S.SUCCEEDED, S.UNCERTAIN, S.CANCELED}),
    S.UNCERTAIN: frozenset({S.SUCCEEDED, S.CANCELED}),
    S.SUCCEEDED: frozenset(),
    S.DECLINED: frozenset(),
    S.CANCELED: frozenset(),
    S.EXPIRED: frozenset(),
}

TRANSITIONS: dict[Kind, dict[Status, frozenset[Status]]] = {
    Kind.PAYMENT: {**_CARD_TRANSACTION, S.CANCELED: frozenset({S.SUCCEEDED})},
    Kind.LOAD: {
        S.REQUIRES_FUNDING: frozenset({S.REQUIRES_CARD, S.CANCELED, S.EXPIRED}),
        **_CARD_TRANSACTION,
    },
    Kind.REFUND: {
        S.PENDING: frozenset({S.SUCCEEDED, S.FAILED}),
        S.SUCCEEDED: frozenset(),
        S.FAILED: frozenset(),
    },
}

# The card transaction a card may still be in the middle of (its counter's fate unknown).
OPEN = (S.AUTHORISED, S.UNCERTAIN)
# Ends: no way out (``canceled`` too, but for a payment the card proves: see above).
FINAL = frozenset({S.SUCCEEDED, S.DECLINED, S.EXPIRED, S.FAILED})
# A load that gave its funds back (or never took the card's counter).
RETURNED = (S.DECLINED, S.CANCELED, S.EXPIRED)


class IllegalTransition(Exception):
    """A move the lifecycle table does not allow: a bug or a race lost, never data."""

    def __init__(self, kind: Kind, current: str, new: str) -> None:
        super().__init__(f"a {kind} cannot go from {current} to {new}")
        self.kind = kind
        self.current = current
        self.new = new


def transition(kind: Kind, current: str, new: Status) -> Status:
    """``new`` if the table allows ``current`` → ``new`` for ``kind``; else raise."""
    table = TRANSITIONS[kind]
    try:
        allowed = table[Status(current)]
    except (ValueError, KeyError):
        raise IllegalTransition(kind, current, new) from None
    if new not in allowed:
        raise IllegalTransition(kind, current, new)
    return new


class _HasStatus(Protocol):
    status: str


def move(kind: Kind, row: _HasStatus, new: Status) -> None:
    """Set ``row.status`` to ``new`` through the table."""
    row.status = transition(kind, row.status, new)


def reachable(kind: Kind, start: Status) -> frozenset[Status]:
    """Every status ``kind`` can reach from ``start`` (``start`` included)."""
    table = TRANSITIONS[kind]
    seen = {start}
    todo: list[Status] = [start]
    while todo:
        for nxt in table.get(todo.pop(), frozenset()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return frozenset(seen)


def initial(kind: Kind) -> Iterable[Status]:
    """The statuses a new ``kind`` starts in."""
    if kind is Kind.REFUND:
        return (S.PENDING,)
    if kind is Kind.LOAD:
        return (S.REQUIRES_FUNDING, S.REQUIRES_CARD)
    return (S.REQUIRES_CARD,)
