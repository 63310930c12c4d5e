"""What the shared steps know of one kind of card transaction: its :class:`Strategy`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from webpurse.protocol.records import TransactionType
from webpurse.settlement import events
from webpurse.settlement.ledger import TransferSpec
from webpurse.settlement.models import Card, Load, Payment
from webpurse.settlement.service import Ctx
from webpurse.settlement.transactions import Kind, Status

Row = TypeVar("Row", Payment, Load)


@dataclass(frozen=True, slots=True)
class Initialize:
    """What resolve reads of the card's fresh INITIALIZE answer (either command's)."""

    counter: int  # offline (purchase) or online (load)
    balance: int
    random: bytes


@dataclass(frozen=True, slots=True)
class CardProof:
    """The card's proof of a debit or credit: its TAC, and the MAC2 its answer carries.

    DEBIT FOR PURCHASE and GET TRANSACTION PROVE answer with a MAC2 (the card's, for a
    purchase; for a load the one settlement issued); CREDIT FOR LOAD answers with the TAC
    only (spec §4, §5, §6).
    """

    tac: bytes
    mac2: bytes | None = None


def _nothing(ctx: Ctx, row: Any) -> None:
    """No step of the kind's own after its success."""


@dataclass(frozen=True)
class Strategy(Generic[Row]):
    """One kind of card transaction: what the shared steps need to know of it."""

    kind: Kind
    model: type[Row]
    transaction_type: TransactionType  # its GET TRANSACTION PROVE type
    to_json: Callable[[Row], dict[str, Any]]
    events: dict[Status, str]  # the webhook event a move to this status emits
    initialize: Callable[[str], Initialize]  # parse the card's INITIALIZE answer
    verify: Callable[[Ctx, Row, Card, CardProof], bool]  # does the proof prove the row?
    # End the row at a status without a debit or credit, giving back what it holds (a
    # payment holds nothing but its status; a load's funds go back to their source).
    close: Callable[[Ctx, Row, Status], None]
    transfer: Callable[[Row, Card], TransferSpec]  # the one ledger transfer success posts
    # A funded bank-transfer load waits for its own card: a decline leaves it as it is.
    keeps_on_decline: Callable[[Row], bool]
    # A load's verified TAC also releases open loads at its counter the card no longer
    # links (``holds.release_stale`` unlinked them); a payment looks only when linked.
    releases_unlinked: bool
    unproven_needs_proof: bool  # a load: "the counter did not move" proves nothing
    after_success: Callable[[Ctx, Row], None] = _nothing  # a refund's load ends its refund

    @property
    def name(self) -> str:
        return self.kind.value


def emit(ctx: Ctx, strategy: Strategy[Row], row: Row, status: Status) -> None:
    """The kind's webhook event for ``row`` now being ``status``."""
    events.emit(
        ctx.session, row.merchant_id, strategy.events[status], strategy.to_json(row), now=ctx.now
    )
