"""ledger entries: balance after and version derived; transfers read by id only (issue 20)

Each entry stored the account's balance after it and the account's version, under a
UNIQUE (account_id, account_version): per captured purchase two more columns and two more
unique-index insertions, for numbers the entries already give. From here an entry stores
its amount only. Every entry is inserted while its transaction holds the account's row
lock (``ledger._lock``), so on each account the entry ids ascend in commit order: the
version of an entry is its place in id order, the balance after it the running sum
(``ledger.history``), and clearing's marks become entry ids (``clearing_batches``:
``payable_version``/``topups_version`` → ``payable_entry``/``topups_entry``, each the id of
the entry at that version; ``ledger_entries`` gets an index on ``(account_id, id)`` for
clearing's "this account's entries after id N").

No query looks entries up by transfer (the check reads them whole, clearing goes from the
entry to its transfer) or transfers by account or reference (read by id; the ledger check
reads them whole): those four indexes go too.

Upgrading refuses (changing nothing) a ledger whose entry ids do not follow its versions on
some account: its marks would not convert. Downgrading recomputes each entry's version and
balance after from the ids and the marks' versions from the entry ids.

Revision ID: 0015_i20_entries_derived
Revises: 0016_i20_key_storage
Create Date: 2026-12-06 14:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_i20_entries_derived"
down_revision: str | None = "0016_i20_key_storage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 0001 created the unique constraint unnamed: PostgreSQL named it itself; SQLite's batch mode
# rebuilds the table and finds it by the name this convention gives it.
_NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
_TRANSFER_INDEXES = ("debit_account", "credit_account", "reference")
_MARKS = (("payable", "merchant"), ("topups", "topups"))

_OUT_OF_ORDER = """
SELECT account_id FROM (
    SELECT account_id, account_version,
           row_number() OVER (PARTITION BY account_id ORDER BY id) AS place
    FROM ledger_entries
) AS entries
WHERE account_version != place
ORDER BY account_id
"""

# The last entry at or before the batch's version (NULL stays NULL: a batch of before 0009).
_TO_ENTRY = """
UPDATE clearing_batches SET {name}_entry = CASE
    WHEN {name}_version IS NULL THEN NULL
    ELSE COALESCE((
        SELECT max(e.id) FROM ledger_entries e
        WHERE e.account_id = '{prefix}:' || clearing_batches.merchant_id
          AND e.account_version <= clearing_batches.{name}_version
    ), 0)
END
"""

_TO_VERSION = """
UPDATE clearing_batches SET {name}_version = CASE
    WHEN {name}_entry IS NULL THEN NULL
    ELSE (
        SELECT count(*) FROM ledger_entries e
        WHERE e.account_id = '{prefix}:' || clearing_batches.merchant_id
          AND e.id <= clearing_batches.{name}_entry
    )
END
"""

_DERIVE = """
UPDATE ledger_entries
SET account_version = derived.place, balance_after = derived.running
FROM (
    SELECT id,
           row_number() OVER (PARTITION BY account_id ORDER BY id) AS place,
           sum(amount) OVER (PARTITION BY account_id ORDER BY id) AS running
    FROM ledger_entries
) AS derived
WHERE ledger_entries.id = derived.id
"""


def _unique_name() -> str:
    if op.get_bind().dialect.name == "postgresql":
        return "ledger_entries_account_id_account_version_key"
    return "uq_ledger_entries_account_id"


def upgrade() -> None:
    bind = op.get_bind()
    disordered = bind.execute(sa.text(_OUT_OF_ORDER)).scalars().first()
    if disordered is not None:
        raise RuntimeError(
            f"ledger account {disordered}: entry ids do not follow its versions; "
            "run `webpurse ledger check` and repair it before upgrading"
        )
    with op.batch_alter_table("clearing_batches") as batch:
        for name, _prefix in _MARKS:
            batch.add_column(sa.Column(f"{name}_entry", sa.BigInteger(), nullable=True))
    for name, prefix in _MARKS:
        op.execute(_TO_ENTRY.format(name=name, prefix=prefix))
    with op.batch_alter_table("clearing_batches") as batch:
        for name, _prefix in _MARKS:
            batch.drop_column(f"{name}_version")

    with op.batch_alter_table("ledger_entries", naming_convention=_NAMING) as batch:
        batch.drop_constraint(_unique_name(), type_="unique")
        batch.drop_index("ix_ledger_entries_transfer_id")
        batch.drop_column("balance_after")
        batch.drop_column("account_version")
        batch.create_index("ix_ledger_entries_account_id", ["account_id", "id"])
    with op.batch_alter_table("ledger_transfers") as batch:
        for column in _TRANSFER_INDEXES:
            batch.drop_index(f"ix_ledger_transfers_{column}")


def downgrade() -> None:
    with op.batch_alter_table("ledger_transfers") as batch:
        for column in _TRANSFER_INDEXES:
            batch.create_index(f"ix_ledger_transfers_{column}", [column])

    with op.batch_alter_table("ledger_entries") as batch:
        batch.add_column(sa.Column("balance_after", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("account_version", sa.BigInteger(), nullable=True))
    op.execute(_DERIVE)
    with op.batch_alter_table("ledger_entries", naming_convention=_NAMING) as batch:
        batch.alter_column("balance_after", existing_type=sa.BigInteger(), nullable=False)
        batch.alter_column("account_version", existing_type=sa.BigInteger(), nullable=False)
        batch.drop_index("ix_ledger_entries_account_id")
        batch.create_index("ix_ledger_entries_transfer_id", ["transfer_id"])
        batch.create_unique_constraint(_unique_name(), ["account_id", "account_version"])

    with op.batch_alter_table("clearing_batches") as batch:
        for name, _prefix in _MARKS:
            batch.add_column(sa.Column(f"{name}_version", sa.BigInteger(), nullable=True))
    for name, prefix in _MARKS:
        op.execute(_TO_VERSION.format(name=name, prefix=prefix))
    with op.batch_alter_table("clearing_batches") as batch:
        for name, _prefix in _MARKS:
            batch.drop_column(f"{name}_entry")
