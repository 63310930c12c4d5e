"""a purchase's answers, event and card history rendered from the payment row

Issue 20 (a lean purchase): a purchase wrote its payment three more times — each step's
answer under its idempotency key (~500 B each), the ``payment.succeeded`` webhook body
(~800 B) and a ``purchase`` row in ``card_events`` repeating the payment's TAC and
counter. The payment row holds all of it once it also knows when it was captured:

- ``payments.succeeded_at``: the capture's time. Existing succeeded payments take it from
  their ``purchase`` card event, which then moves into the payment (deleted); the operator's
  list of a card's events shows the payments as those events (``routes_admin``);
- ``idempotency_keys.object_id``/``step``: a purchase step's answer stored as the payment
  and the step, ``response_body`` NULL (re-rendered as of the step, ``views.payment_as_of``);
- ``webhook_events.object_id``, ``body`` nullable: a ``payment.succeeded`` event names its
  payment and is rendered at delivery, byte for byte the body it would have stored.

Existing rows keep their bodies. Downgrading writes the purchase card events back from the
payments (each card's events rewritten in the order its history shows them: an older
version lists them by id), and renders every referenced answer and event body into its
row (the bodies this version would have stored, an answer as the batch encodes it), so the
older version finds them all.

Revision ID: 0013b_i20_slim_outbox
Revises: 0012_i20_terminal_seq_sequence
Create Date: 2026-12-06 10:30:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0013b_i20_slim_outbox"
down_revision: str | None = "0012_i20_terminal_seq_sequence"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The payment a purchase card event names, in its JSON ``detail``, per dialect.
_OF_EVENT = {
    "postgresql": "card_events.detail->>'payment'",
    "sqlite": "json_extract(card_events.detail, '$.payment')",
}
_SUCCEEDED_AT = (
    "UPDATE payments SET succeeded_at = (SELECT min(card_events.created_at)"
    " FROM card_events WHERE card_events.card_id = payments.card_id"
    " AND card_events.kind = 'purchase' AND {of_event} = payments.id)"
    " WHERE status = 'succeeded' AND card_id IS NOT NULL"
)
_MOVED = (
    "DELETE FROM card_events WHERE kind = 'purchase' AND EXISTS (SELECT 1 FROM payments"
    " WHERE payments.id = {of_event} AND payments.card_id = card_events.card_id"
    " AND payments.succeeded_at IS NOT NULL)"
)


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("payments") as batch_op:
        batch_op.add_column(sa.Column("succeeded_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("idempotency_keys") as batch_op:
        batch_op.add_column(sa.Column("object_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("step", sa.String(length=12), nullable=True))
    with op.batch_alter_table("webhook_events") as batch_op:
        batch_op.add_column(sa.Column("object_id", sa.String(length=40), nullable=True))
        batch_op.alter_column("body", existing_type=sa.Text(), nullable=True)
    # The purchase card events move into their payments.
    of_event = _OF_EVENT[bind.dialect.name]
    op.execute(sa.text(_SUCCEEDED_AT.format(of_event=of_event)))
    op.execute(sa.text(_MOVED.format(of_event=of_event)))


# The columns a payment's JSON is rendered from, as of this revision.
_RENDERED = (
    "id",
    "status",
    "amount",
    "currency",
    "description",
    "merchant_reference",
    "terminal_id",
    "key_index",
    "card_number",
    "decline_code",
    "tac",
    "refunded_amount",
    "mac1",
    "terminal_seq",
    "txn_date",
    "txn_time",
)
_TIMES = ("created_at", "updated_at", "authorised_at", "succeeded_at")


def _render_references() -> None:
    """Write each referenced answer and event body into its row, rendered as this revision's
    code renders it (``views.payment_as_of``, ``webhooks.event_body``) from this revision's
    columns (a Core table: the ORM models may have moved on)."""
    from types import SimpleNamespace

    import orjson

    from webpurse.settlement.db import UtcDateTime
    from webpurse.settlement.views import payment_as_of
    from webpurse.settlement.webhooks.bodies import event_body

    bind = op.get_bind()
    payments = sa.table(
        "payments",
        *(sa.column(name) for name in _RENDERED),
        sa.column("metadata", sa.JSON()),
        *(sa.column(name, UtcDateTime()) for name in _TIMES),
    )
    keys = sa.table(
        "idempotency_keys",
        sa.column("id"),
        sa.column("object_id"),
        sa.column("step"),
        sa.column("response_body"),
    )
    events = sa.table(
        "webhook_events",
        sa.column("id"),
        sa.column("type"),
        sa.column("created_at", UtcDateTime()),
        sa.column("object_id"),
        sa.column("body"),
    )

    def payment(payment_id: str) -> Any:
        row = bind.execute(sa.select(payments).where(payments.c.id == payment_id)).one()
        values = dict(row._mapping)
        values["metadata_"] = values.pop("metadata")
        return SimpleNamespace(**values)

    referenced = sa.select(keys.c.id, keys.c.object_id, keys.c.step).where(
        keys.c.response_body.is_(None), keys.c.step.is_not(None)
    )
    for key_id, object_id, step in bind.execute(referenced).all():
        # As the batch encoded and stored it (and sends it again as is on a replay); the
        # single endpoint replays any encoding of the same JSON the same.
        body = orjson.dumps(payment_as_of(payment(object_id), step)).decode()
        bind.execute(sa.update(keys).where(keys.c.id == key_id).values(response_body=body))
    named = sa.select(events.c.id, events.c.type, events.c.created_at, events.c.object_id).where(
        events.c.body.is_(None)
    )
    for event_id, event_type, created_at, object_id in bind.execute(named).all():
        step = {"payment.succeeded": "capture"}[event_type]
        data = payment_as_of(payment(object_id), step)
        body = event_body(event_id, event_type, created_at, data).decode("utf-8")
        bind.execute(sa.update(events).where(events.c.id == event_id).values(body=body))


def _write_back_purchases() -> None:
    """Each card's purchase events back from its payments, in the order the history shows
    them (``changes.card_history``): an older version lists a card's events by id, so the
    card's events are written again in that order, not the purchases appended after them."""
    from webpurse.settlement.changes import card_history
    from webpurse.settlement.db import UtcDateTime

    bind = op.get_bind()
    events = sa.table(
        "card_events",
        sa.column("id"),
        sa.column("card_id"),
        sa.column("kind"),
        sa.column("detail", sa.JSON()),
        sa.column("created_at", UtcDateTime()),
    )
    payments = sa.table(
        "payments",
        sa.column("id"),
        sa.column("card_id"),
        sa.column("amount"),
        sa.column("counter"),
        sa.column("tac"),
        sa.column("succeeded_at", UtcDateTime()),
    )
    captured = payments.c.succeeded_at.is_not(None)
    card_ids = bind.execute(
        sa.select(payments.c.card_id)
        .where(captured, payments.c.card_id.is_not(None))
        .distinct()
        .order_by(payments.c.card_id)
    ).scalars()
    for card_id in list(card_ids):
        recorded = bind.execute(
            sa.select(events.c.kind, events.c.detail, events.c.created_at)
            .where(events.c.card_id == card_id)
            .order_by(events.c.id)
        ).all()
        purchases = bind.execute(
            sa.select(
                payments.c.id,
                payments.c.amount,
                payments.c.counter,
                payments.c.tac,
                payments.c.succeeded_at,
            )
            .where(payments.c.card_id == card_id, captured)
            .order_by(payments.c.counter, payments.c.id)
        ).all()
        history = card_history(recorded, purchases)
        bind.execute(sa.delete(events).where(events.c.card_id == card_id))
        bind.execute(
            sa.insert(events),
            [
                {"card_id": card_id, "kind": kind, "detail": detail, "created_at": at}
                for kind, detail, at in history
            ],
        )


def downgrade() -> None:
    _render_references()
    _write_back_purchases()
    with op.batch_alter_table("webhook_events") as batch_op:
        batch_op.alter_column("body", existing_type=sa.Text(), nullable=False)
        batch_op.drop_column("object_id")
    with op.batch_alter_table("idempotency_keys") as batch_op:
        batch_op.drop_column("step")
        batch_op.drop_column("object_id")
    with op.batch_alter_table("payments") as batch_op:
        batch_op.drop_column("succeeded_at")
