"""Property: any sequence of transfers, accepted or refused, leaves a ledger that checks out."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from webpurse.settlement import ledger
from webpurse.settlement.db import make_engine, make_session_factory, migrate
from webpurse.settlement.ledger import LedgerError

NOW = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)
ACCOUNTS = [
    ledger.funding_account("cash"),
    ledger.card_account("crd_a"),
    ledger.card_account("crd_b"),
    ledger.merchant_account("mer_a"),
    ledger.HELD_PURCHASES,
    ledger.REFUNDS_PENDING,
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
    migrate(engine)
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
