"""idempotency keys: the unique index leads with the key, not the merchant

The look-up ``principal = ? AND key IN (…)`` ran on the unique constraint
``(principal, key)``. On a table without statistics (autovacuum off, never ANALYZEd) the
planner estimated that the principal alone narrows enough and chose a bitmap scan of the
whole merchant's keys with the key as a filter: 19.5 ms per 250-key batch at 49k keys,
growing with history (issue 20). The key is nearly unique by itself, so an index that
leads with it is a look-up whatever the statistics say. It replaces the old constraint (the
same uniqueness, one index per key row instead of two); ``INSERT … ON CONFLICT DO
NOTHING`` names no target and uses it as it used the constraint.

Revision ID: 0010_idempotency_key_index
Revises: 0009_clearing_marks
Create Date: 2026-12-06 05:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010_idempotency_key_index"
down_revision: str | None = "0009_clearing_marks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_idempotency_keys_key_principal"
# 0001 created the constraint unnamed: PostgreSQL named it itself; SQLite's batch mode
# rebuilds the table and needs a name to find it, which the naming convention gives.
_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _old_constraint() -> str:
    if op.get_bind().dialect.name == "postgresql":
        return "idempotency_keys_principal_key_key"
    return "uq_idempotency_keys_principal"


def upgrade() -> None:
    # The new index first: the keys stay unique at every moment of the migration.
    op.create_index(INDEX, "idempotency_keys", ["key", "principal"], unique=True)
    with op.batch_alter_table("idempotency_keys", naming_convention=_NAMING) as batch:
        batch.drop_constraint(_old_constraint(), type_="unique")


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys", naming_convention=_NAMING) as batch:
        batch.create_unique_constraint(_old_constraint(), ["principal", "key"])
    op.drop_index(INDEX, table_name="idempotency_keys")
