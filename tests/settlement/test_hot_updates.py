"""A purchase's card updates find room on their page: HOT updates on PostgreSQL (issue 20).

A HOT update writes the new row version on the row's own page and adds no index entry; it
needs room on that page. ``cards`` keeps 15 % of each page free (fillfactor 85, migration
0017); filled to 100 % as before, an update of a card on a full page went to another page
and into both indexes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.settlement.support import database_url
from webpurse.settlement.db import make_engine, migrate
from webpurse.settlement.models import CARDS_FILLFACTOR, PAYMENTS_FILLFACTOR

pytestmark = pytest.mark.postgres

CARDS = 400


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with database_url("postgresql", tmp_path) as url:
        engine = make_engine(url, pool_size=1, max_overflow=0)
        try:
            yield engine
        finally:
            engine.dispose()


def _fillfactor(engine: Engine) -> list[str] | None:
    with engine.connect() as connection:
        options = connection.execute(
            text("SELECT reloptions FROM pg_class WHERE oid = 'cards'::regclass")
        ).scalar_one()
    return None if options is None else list(options)


def _hot_share_of_open_updates(engine: Engine) -> tuple[int, int]:
    """Issue cards (full pages), then open a transaction on every 10th as authorise does,
    in one transaction: (updates, of which HOT)."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO cards (id, card_number, status, issuer_id, key_version,"
                " start_date, expiry_date, max_balance, shadow_balance, online_counter,"
                " offline_counter, flagged, created_at, updated_at)"
                " SELECT 'crd_' || lpad(g::text, 20, '0'), lpad(g::text, 20, '0'), 'active',"
                " '1', 1, current_date, current_date + 3650, 1000000, 0, 0, 0, false,"
                " now(), now() FROM generate_series(1, :n) AS g"
            ),
            {"n": CARDS},
        )
    with engine.begin() as connection:
        updated = connection.execute(
            text(
                "UPDATE cards SET open_transaction = 'pay_' || lpad(id, 36, 'x'),"
                " updated_at = now() WHERE right(id, 1) = '0'"
            )
        ).rowcount
        hot = connection.execute(
            text("SELECT pg_stat_get_xact_tuples_hot_updated('cards'::regclass)")
        ).scalar_one()
    return int(updated), int(hot)


def test_the_card_updates_of_a_purchase_stay_on_their_page(engine: Engine) -> None:
    migrate(engine)
    assert _fillfactor(engine) == [f"fillfactor={CARDS_FILLFACTOR}"]
    updated, hot = _hot_share_of_open_updates(engine)
    assert updated == CARDS // 10
    assert hot == updated


def test_at_the_old_fillfactor_they_did_not(engine: Engine) -> None:
    """The test above can fail: before migration 0017 the same updates left their pages."""
    migrate(engine, "0014_i20_one_transfer_purchase")
    assert _fillfactor(engine) is None
    updated, hot = _hot_share_of_open_updates(engine)
    assert hot < updated // 2


def test_downgrading_gives_the_table_its_default_fillfactor_back(engine: Engine) -> None:
    migrate(engine)
    migrate(engine, "0014_i20_one_transfer_purchase", downgrade=True)
    assert _fillfactor(engine) is None
    migrate(engine)
    assert _fillfactor(engine) == [f"fillfactor={CARDS_FILLFACTOR}"]


def _hot_share_of_captures(engine: Engine) -> tuple[int, int]:
    """Authorised payments (full pages), then every 10th captured as the batch does (status,
    MAC2, TAC, succeeded_at), in one transaction: (updates, of which HOT)."""
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO merchants (id, name, terminal_id, terminal_seq, created_at)"
                " VALUES ('mer_1', 'shop', 'AAAAAAAAAAAA', 0, now())"
            )
        )
        connection.execute(
            text(
                "INSERT INTO cards (id, card_number, status, issuer_id, key_version,"
                " start_date, expiry_date, max_balance, shadow_balance, online_counter,"
                " offline_counter, flagged, created_at, updated_at) VALUES ('crd_1',"
                " '1', 'active', '1', 1, current_date, current_date + 3650, 1000000, 0, 0, 0,"
                " false, now(), now())"
            )
        )
        connection.execute(
            text(
                "INSERT INTO payments (id, merchant_id, status, amount, currency, description,"
                " merchant_reference, metadata, terminal_id, key_index, card_id, card_number,"
                " counter, mac1, refunded_amount, authorised_at, created_at, updated_at)"
                " SELECT 'pay_' || lpad(g::text, 20, '0'), 'mer_1', 'authorised', 100, 'CNY',"
                " '', '', '{}', 'AAAAAAAAAAAA', 1, 'crd_1', '1', g, '00000000', 0, now(),"
                " now(), now() FROM generate_series(1, :n) AS g"
            ),
            {"n": CARDS},
        )
    with engine.begin() as connection:
        updated = connection.execute(
            text(
                "UPDATE payments SET status = 'succeeded', mac2 = '11111111', tac = '22222222',"
                " succeeded_at = now(), updated_at = now() WHERE right(id, 1) = '0'"
            )
        ).rowcount
        hot = connection.execute(
            text("SELECT pg_stat_get_xact_tuples_hot_updated('payments'::regclass)")
        ).scalar_one()
    return int(updated), int(hot)


def test_a_purchase_capture_is_a_hot_update(engine: Engine) -> None:
    """No index of payments names the status (migration 0018) and its pages keep room."""
    migrate(engine)
    updated, hot = _hot_share_of_captures(engine)
    assert updated == CARDS // 10
    assert hot == updated
    with engine.connect() as connection:
        options = connection.execute(
            text("SELECT reloptions FROM pg_class WHERE oid = 'payments'::regclass")
        ).scalar_one()
    assert list(options) == [f"fillfactor={PAYMENTS_FILLFACTOR}"]


def test_while_index_predicates_named_the_status_no_capture_was(engine: Engine) -> None:
    """The test above can fail: at migration 0017 the same captures were never HOT."""
    migrate(engine, "0017_i20_hot_payments")
    updated, hot = _hot_share_of_captures(engine)
    assert updated == CARDS // 10
    assert hot == 0
