"""The card-transaction lifecycle, written once over payments and loads.

A payment (a debit) and a load (a credit) go through the same steps: authorised with the
card locked, declined, proven (capture / complete), uncertain, resolved from the card's
counter and proof, released, canceled, expired (docs/architecture.md draws the table).
The steps are here, one module per noun — :mod:`.authorisation`, :mod:`.proof`,
:mod:`.resolution`, :mod:`.release`, over :mod:`.rows` (finding and locking). What differs
per kind — its INITIALIZE parser, its MAC step, its proof check, its ledger transfer, what
it gives back when it ends unproven, its event names — is the kind's :class:`Strategy`,
defined beside its service (:data:`..payments.STRATEGY`, :data:`..loads.STRATEGY`). Every
status change goes through the lifecycle table (:mod:`..transactions`).
"""

from webpurse.settlement.lifecycle.authorisation import (
    bind,
    decline,
    fail,
    hold,
    waiting_for_card,
)
from webpurse.settlement.lifecycle.proof import (
    post,
    prove,
    record_proof,
    release_disproved,
    succeed,
    verification_failure,
)
from webpurse.settlement.lifecycle.release import (
    cancel,
    expire,
    note_refusal,
    release,
    released,
)
from webpurse.settlement.lifecycle.resolution import mark_uncertain, resolve, uncertain
from webpurse.settlement.lifecycle.rows import (
    card_of,
    free_card,
    get,
    lock_with_card,
    need_status,
    still_open,
)
from webpurse.settlement.lifecycle.strategy import CardProof, Initialize, Strategy, emit

__all__ = [
    "CardProof",
    "Initialize",
    "Strategy",
    "bind",
    "cancel",
    "card_of",
    "decline",
    "emit",
    "expire",
    "fail",
    "free_card",
    "get",
    "hold",
    "lock_with_card",
    "mark_uncertain",
    "need_status",
    "note_refusal",
    "post",
    "prove",
    "record_proof",
    "release",
    "release_disproved",
    "released",
    "resolve",
    "still_open",
    "succeed",
    "uncertain",
    "verification_failure",
    "waiting_for_card",
]
