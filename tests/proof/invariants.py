"""The invariants every proof scenario ends with (ARCHITECTURE.md "Invariants").

:func:`check_invariants` reads the settlement database (and the merchant's order book, and
the real cards) after a scenario and its recovery, and raises :class:`InvariantBroken`
naming every broken rule:

1. value conserved: every transfer sums to zero; funds received (float deposits and bank
   statement credits, ``received:``; ``funding:``/``topups:`` in databases from before
   issue 12) == Σ card stored value + merchant payables + payouts + refunds pending + held +
   unused floats + matched money not yet loaded + money awaiting return + money returned,
   recomputed here from the ledger entries and, independently, by ``webpurse ledger check``
   (exit status 0);
2. each card's real balance and counters (read from the emulator) equal settlement's shadow
   balance and counters and its ``card:`` ledger account — once recovery has settled;
3. nothing debited (or credited) twice: at most one hold per payment/load, never both a
   capture and a release, a capture exactly for succeeded payments; the card's balance is
   its succeeded loads minus its succeeded payments and each counter moved once per
   succeeded transaction of its kind;
4. a path to a final state: held amounts are exactly the open items; once settled nothing
   is ``authorised``/``uncertain`` and no card has an open transaction;
5. the merchant's orders agree with settlement (paid/loaded exactly when succeeded).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from webpurse.card import CardApplet
from webpurse.settlement import clearing, ledger
from webpurse.settlement.models import Card, Entry, Load, Payment, Transfer

OPEN = frozenset({"authorised", "uncertain"})
ORDER_SUCCESS = frozenset({"paid", "loaded"})


class InvariantBroken(AssertionError):
    """One or more invariants do not hold after a scenario."""


@dataclass
class InvariantReport:
    funded: int = 0
    totals: dict[str, int] = field(default_factory=dict)
    payments: Counter[str] = field(default_factory=Counter)
    loads: Counter[str] = field(default_factory=Counter)
    cards: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the proof table's "observed" column."""
        kinds = ledger.HOLDING_KINDS
        parts = " + ".join(f"{k} {self.totals.get(k, 0)}" for k in kinds if self.totals.get(k))
        pays = ",".join(f"{n} {s}" for s, n in sorted(self.payments.items())) or "none"
        lds = ",".join(f"{n} {s}" for s, n in sorted(self.loads.items())) or "none"
        cards = ",".join(str(b) for b in self.cards.values())
        return (
            f"funded {self.funded} = {parts or '0'}; payments {pays}; loads {lds}; "
            f"card balance(s) {cards} = shadow; ledger check ok"
        )


def ledger_check_cli(database_url: str, *, subprocess_run: bool = False) -> tuple[int, str]:
    """Run ``webpurse ledger check`` on ``database_url``: (exit code, output)."""
    env = {"WEBPURSE_DATABASE_URL": database_url}
    if subprocess_run:
        exe = str(Path(sys.executable).with_name("webpurse"))
        done = subprocess.run(
            [exe, "ledger", "check"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return done.returncode, done.stdout + done.stderr
    from webpurse.cli import app

    # The CLI configures logging for its process (structlog at WARNING); tests/conftest.py
    # puts each test's configuration back afterwards.
    result = CliRunner().invoke(app, ["ledger", "check"], env=env)
    return result.exit_code, result.output


def _entries_by_kind(session: Session) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for account_id, amount in session.execute(select(Entry.account_id, Entry.amount)):
        totals[ledger.account_kind(account_id)] += amount
    # Purchase holds are the open payments' status, not entries (issue 20): shown as held.
    result = dict(totals)
    ledger.derive_purchase_holds(result, ledger.open_holds_by_card(session))
    return result


def check_invariants(
    factory: sessionmaker[Session],
    database_url: str,
    cards: Sequence[CardApplet] = (),
    *,
    orders: Sequence[tuple[str, str | None]] = (),
    settled: bool = True,
    cli_subprocess: bool = False,
) -> InvariantReport:
    """Check every invariant; raise :class:`InvariantBroken` listing what does not hold.

    ``orders`` are the merchant's (order status, settlement object id) pairs; ``settled``
    says recovery has run, so nothing may be left open.
    """
    report = InvariantReport()
    p = report.problems
    with factory() as session:
        # 1. Value conserved, from the entries, then by the ledger's own check.
        totals = _entries_by_kind(session)
        report.totals = totals
        if sum(totals.values()) != 0:
            p.append(f"ledger accounts sum to {sum(totals.values())}, not 0")
        report.funded = ledger.funds_received(totals)
        held_value = ledger.funds_held(totals)
        if report.funded != held_value:
            p.append(f"funded {report.funded} != value held {held_value} ({totals})")
        check = clearing.ledger_check(session)
        p.extend(f"ledger.check: {problem}" for problem in check.problems)

        payments = list(session.scalars(select(Payment)))
        loads = list(session.scalars(select(Load)))
        report.payments = Counter(x.status for x in payments)
        report.loads = Counter(x.status for x in loads)
        transfers: dict[str, list[str]] = defaultdict(list)
        for transfer in session.scalars(select(Transfer)):
            if transfer.reference:
                transfers[transfer.reference].append(transfer.kind)

        # 3. Nothing twice; the ledger moves match each object's status.
        for payment in payments:
            kinds = Counter(transfers.get(payment.id, []))
            if any(n > 1 for n in kinds.values()):
                p.append(f"{payment.id}: repeated transfers {dict(kinds)}")
            # A released payment the card later proved (holds.heal) is held again first.
            if kinds["purchase_capture"] and kinds["purchase_release"] > kinds["purchase_rehold"]:
                p.append(f"{payment.id}: both captured and released")
            if (payment.status == "succeeded") != bool(kinds["purchase_capture"]):
                p.append(f"{payment.id}: status {payment.status} but transfers {dict(kinds)}")
        for load in loads:
            kinds = Counter(transfers.get(load.id, []))
            if any(n > 1 for n in kinds.values()):
                p.append(f"{load.id}: repeated transfers {dict(kinds)}")
            if kinds["load_credit"] and kinds["load_return"]:
                p.append(f"{load.id}: both credited and returned")
            if (load.status == "succeeded") != bool(kinds["load_credit"]):
                p.append(f"{load.id}: status {load.status} but transfers {dict(kinds)}")

        # 4. Held amounts are exactly the open items; settled means nothing open.
        held_purchases = sum(x.amount for x in payments if x.status in OPEN)
        held_loads = sum(x.amount for x in loads if x.status in OPEN | {"requires_card"})
        if ledger.balance(session, ledger.HELD_PURCHASES) != held_purchases:
            p.append(
                f"held:purchases {ledger.balance(session, ledger.HELD_PURCHASES)}"
                f" != open payments {held_purchases}"
            )
        if ledger.balance(session, ledger.HELD_LOADS) != held_loads:
            p.append(
                f"held:loads {ledger.balance(session, ledger.HELD_LOADS)}"
                f" != open loads {held_loads}"
            )
        if settled:
            stuck = [x.id for x in payments if x.status in OPEN]
            stuck += [x.id for x in loads if x.status in OPEN]
            if stuck:
                p.append(f"left open after recovery: {stuck}")
            open_cards = list(
                session.scalars(select(Card.card_number).where(Card.open_transaction.is_not(None)))
            )
            if open_cards:
                p.append(f"cards still with an open transaction: {open_cards}")

        # 2 and 3. Each real card against its shadow, its account and its history.
        for applet in cards:
            state = applet.state
            number = state.issuer.card_number
            card = session.scalars(select(Card).where(Card.card_number == number)).one_or_none()
            if card is None:
                p.append(f"card {number} is not registered")
                continue
            report.cards[number] = state.balance
            account = ledger.balance(session, ledger.card_account(card.id))
            paid = [x for x in payments if x.card_id == card.id and x.status == "succeeded"]
            loaded = [x for x in loads if x.card_id == card.id and x.status == "succeeded"]
            expected = sum(x.amount for x in loaded) - sum(x.amount for x in paid)
            if state.balance != expected:
                p.append(
                    f"card {number}: balance {state.balance} != succeeded loads - payments"
                    f" {expected}"
                )
            if state.offline_counter != len(paid) or state.online_counter != len(loaded):
                p.append(
                    f"card {number}: counters offline {state.offline_counter} online"
                    f" {state.online_counter} != succeeded payments {len(paid)} loads"
                    f" {len(loaded)}"
                )
            if settled:
                if card.shadow_balance != state.balance:
                    p.append(f"card {number}: shadow {card.shadow_balance} != card {state.balance}")
                if account != state.balance:
                    p.append(f"card {number}: ledger account {account} != card {state.balance}")
                if (card.offline_counter, card.online_counter) != (
                    state.offline_counter,
                    state.online_counter,
                ):
                    p.append(
                        f"card {number}: shadow counters {card.offline_counter}/"
                        f"{card.online_counter} != card {state.offline_counter}/"
                        f"{state.online_counter}"
                    )

        # 5. The merchant's orders agree with settlement.
        statuses = {x.id: x.status for x in payments}
        statuses.update({x.id: x.status for x in loads})
        for order_status, object_id in orders:
            if object_id is None:
                continue
            status = statuses.get(object_id)
            if (order_status in ORDER_SUCCESS) != (status == "succeeded"):
                p.append(f"order {order_status} but settlement {object_id} is {status}")

    code, output = ledger_check_cli(database_url, subprocess_run=cli_subprocess)
    if code != 0:
        p.append(f"webpurse ledger check exited {code}: {output.strip()[-400:]}")
    if p:
        raise InvariantBroken("; ".join(p))
    return report
