"""Property: any sequence of transfers, accepted or refused, leaves a ledger that checks out."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from tests.settlement.support import migrate_to_head
from webpurse.settlement import ledger
from webpurse.settlement.db import SessionFactory, make_engine, make_session_factory
from webpurse.settlement.ledger import LedgerError
from webpurse.settlement.models import Entry

NOW = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)
ACCOUNTS = [
    ledger.funding_account("cash"),
    ledger.card_account("crd_a"),
    ledger.card_account("crd_b"),
    ledger.merchant_account("mer_a"),
    ledger.HELD_PURCHASES,
    # Not refunds:pending: ledger.check also holds it to the refunds table (a refund's money
    # is never pending without an open refund), which arbitrary transfers cannot respect.
    ledger.HELD_LOADS,
]

transfers = st.lists(
    st.tuples(
        st.integers(0, 9),  # transfer id (repeats are retries or id reuse)
        st.sampled_from(ACCOUNTS),
        st.sampled_from(ACCOUNTS),
        st.integers(-5, 2_000),
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None)
@given(transfers)
def test_the_ledger_always_checks_out_and_matches_a_model(
    steps: list[tuple[int, str, str, int]],
) -> None:
    engine = make_engine("sqlite://")
    migrate_to_head(engine)
    model = dict.fromkeys(ACCOUNTS, 0)
    posted: dict[str, tuple[str, str, int]] = {}
    with make_session_factory(engine)() as session:
        for number, debit, credit, amount in steps:
            transfer_id = f"t{number}"
            try:
                with session.begin_nested():
                    result = ledger.post_transfer(
                        session, transfer_id, debit, credit, amount, "test", now=NOW
                    )
            except LedgerError:
                assert (
                    amount <= 0
                    or debit == credit
                    or posted.get(transfer_id, (debit, credit, amount)) != (debit, credit, amount)
                    or (not debit.startswith("funding:") and model[debit] < amount)
                )
                continue
            if result.created:
                posted[transfer_id] = (debit, credit, amount)
                model[debit] -= amount
                model[credit] += amount
            else:
                assert posted[transfer_id] == (debit, credit, amount)
        session.commit()
        report = ledger.check(session)
        assert report.ok, report.problems
        for account, expected in model.items():
            assert ledger.balance(session, account) == expected
    engine.dispose()


group = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(1, 700)),
    min_size=1,
    max_size=25,
)


@pytest.fixture
def ledger_db(migrated_db_url: str) -> Iterator[SessionFactory]:
    engine = make_engine(migrated_db_url)
    migrate_to_head(engine)
    yield make_session_factory(engine)
    engine.dispose()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=group)
def test_posting_a_group_equals_posting_one_by_one(
    ledger_db: SessionFactory, steps: list[tuple[int, int, int]]
) -> None:
    """post_transfers (one lock and one update per account, group commit) writes exactly the
    entries, versions and balances that post_transfer would, or refuses and writes nothing."""
    prefix = secrets.token_hex(4)  # each example its own accounts in the shared database
    names = [ledger.funding_account(prefix)] + [f"card:{prefix}{i}" for i in range(3)]
    funded = [(0, card, 1_000) for card in (1, 2, 3)]  # so most groups are accepted
    specs = [
        ledger.TransferSpec(f"{prefix}:{n}", names[d], names[c], amount, "test")
        for n, (d, c, amount) in enumerate(funded + steps)
    ]
    model = dict.fromkeys(names, 0)
    history: dict[str, list[tuple[int, int]]] = {name: [] for name in names}
    refused = False
    for spec in specs:
        if spec.debit_account == spec.credit_account or (
            spec.debit_account != names[0] and model[spec.debit_account] < spec.amount
        ):
            refused = True
            break
        for account, signed in (
            (spec.debit_account, -spec.amount),
            (spec.credit_account, spec.amount),
        ):
            model[account] += signed
            history[account].append((len(history[account]) + 1, model[account]))
    with ledger_db() as session:
        try:
            with session.begin_nested():
                ledger.post_transfers(session, specs, now=NOW)
        except LedgerError:
            assert refused
            session.commit()
            written = session.scalars(select(Entry).where(Entry.account_id.in_(names))).all()
            assert written == []
            return
        session.commit()
        assert not refused
        for name in names:
            # Versions and balances after are derived from the entry ids (migration 0015).
            lines = ledger.history(session, name)
            assert [(line.version, line.balance_after) for line in lines] == history[name]
            assert ledger.balance(session, name) == model[name]
