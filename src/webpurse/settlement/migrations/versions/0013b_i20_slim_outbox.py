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
payments, and renders every referenced answer and event body into its row (the bodies
this version would have stored), so the older version finds them all.

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
# A purchase card event's detail, as changes.card_event wrote it, per dialect.
_DETAIL = {
    "postgresql": "json_build_object('payment', id, 'amount', amount, 'counter', counter,"
    " 'tac', tac)",
    "sqlite": "json_object('payment', id, 'amount', amount, 'counter', counter, 'tac', tac)",
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
_BACK = (
    "INSERT INTO card_events (card_id, kind, detail, created_at)"
    " SELECT card_id, 'purchase', {detail}, succeeded_at FROM payments"
    " WHERE succeeded_at IS NOT NULL AND card_id IS NOT NULL"
    " ORDER BY succeeded_at, counter"
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
    import json
    from types import SimpleNamespace

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
        body = json.dumps(payment_as_of(payment(object_id), step))
        bind.execute(sa.update(keys).where(keys.c.id == key_id).values(response_body=body))
    named = sa.select(events.c.id, events.c.type, events.c.created_at, events.c.object_id).where(
        events.c.body.is_(None)
    )
    for event_id, event_type, created_at, object_id in bind.execute(named).all():
        step = {"payment.succeeded": "capture"}[event_type]
        data = payment_as_of(payment(object_id), step)
        body = event_body(event_id, event_type, created_at, data).decode("utf-8")
        bind.execute(sa.update(events).where(events.c.id == event_id).values(body=body))


def downgrade() -> None:
    bind = op.get_bind()
    _render_references()
    op.execute(sa.text(_BACK.format(detail=_DETAIL[bind.dialect.name])))
    with op.batch_alter_table("webhook_events") as batch_op:
        batch_op.alter_column("body", existing_type=sa.Text(), nullable=False)
        batch_op.drop_column("object_id")
    with op.batch_alter_table("idempotency_keys") as batch_op:
        batch_op.drop_column("step")
        batch_op.drop_column("object_id")
    with op.batch_alter_table("payments") as batch_op:
        batch_op.drop_column("succeeded_at")
