"""Three settlement processes on one PostgreSQL: background work runs once, not three times.

Settlement nodes are stateless (issue 17): any number of ``webpurse serve settlement``
processes share one database. This starts three real ones, each on its own port, with a
fast sweep (every 0.2 s) and a webhook endpoint at a local receiver, and shows:

- the expiry sweep runs in exactly one process per tick: one process holds the sweep's
  advisory lock (``pg_locks``, its connection named after its pid), only that process
  logs sweep ticks, and the others log none;
- when that leader is SIGKILLed, another takes the sweep over, and the ticks of the old
  and the new leader never interleave;
- every webhook event is delivered exactly once although all three processes run a
  delivery worker on the same outbox (``FOR UPDATE SKIP LOCKED``), before and after the kill;
- the ledger invariants hold at the end.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from sqlalchemy import func, select, text

from tests.proof.conftest import Proof
from tests.proof.invariants import check_invariants
from tests.proof.processes import SettlementProcess
from tests.settlement.support import (
    SEED_FLOAT,
    Http,
    Terminal,
    database_url,
    deterministic_random,
    seed_float,
)
from tests.settlement.wc_support import Receiver
from webpurse.card import CardApplet, MemoryStore
from webpurse.settlement.db import SessionFactory, make_engine, make_session_factory, migrate
from webpurse.settlement.merchants import create_merchant
from webpurse.settlement.registry import issue_card
from webpurse.settlement.security import SoftwareSecurityModule, generate_master_keys
from webpurse.settlement.webhooks import MessageStatus, WebhookMessage

pytestmark = pytest.mark.postgres

SUITE = "faults_scaleout"
PROCESSES = 3
SWEEP_INTERVAL = 0.2
DEADLINE = 60.0


@dataclass(kw_only=True)
class Node(SettlementProcess):
    """One settlement process of the three: a fast sweep, webhooks to loopback allowed."""

    def environment(self) -> dict[str, str]:
        return {
            **super().environment(),
            "WEBPURSE_SWEEP_INTERVAL": str(SWEEP_INTERVAL),
            "WEBPURSE_WEBHOOK_ALLOW_PRIVATE": "1",  # the receiver is on 127.0.0.1
        }

    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def log_lines(self) -> list[dict[str, Any]]:
        """Every JSON log line of this process (all its starts)."""
        lines = []
        for path in sorted(self.directory.glob(f"{self.name}-*.log")):
            for raw in path.read_text(errors="replace").splitlines():
                if raw.startswith("{"):
                    try:
                        lines.append(json.loads(raw))
                    except json.JSONDecodeError:
                        continue
        return lines

    def ticks(self) -> list[str]:
        """The timestamps of the sweep ticks this process ran."""
        return [line["timestamp"] for line in self.log_lines() if line["event"] == "sweep.tick"]


@dataclass
class Cluster:
    nodes: list[Node]
    factory: SessionFactory
    security: SoftwareSecurityModule
    merchant_key: str
    terminal_id: str
    url: str

    def issue(self, seed: int) -> CardApplet:
        with self.factory() as session, session.begin():
            _, state = issue_card(session, self.security, dt.datetime.now(dt.UTC))
        return CardApplet(state, MemoryStore(state), deterministic_random(seed))

    def leaders(self) -> list[int]:
        """The pids of the processes holding the sweep's advisory lock (from PostgreSQL)."""
        with self.factory() as session:
            names = session.execute(
                text(
                    "SELECT a.application_name FROM pg_locks l "
                    "JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted "
                    "AND a.application_name LIKE 'webpurse-leader:expiry-sweep:%' "
                    "AND a.datname = current_database()"
                )
            ).scalars()
            pids = [int(name.rsplit(":", 1)[1]) for name in names]
        mine = {node.pid() for node in self.nodes}
        return [pid for pid in pids if pid in mine]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Bounded polling of the system's observable state (not a sleep as synchronisation)."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextmanager
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with ExitStack() as stack:
        url = stack.enter_context(database_url("postgresql", tmp_path))
        kek = secrets.token_bytes(32)
        engine = make_engine(url, pool_size=2, max_overflow=2)
        stack.callback(engine.dispose)
        migrate(engine)
        factory = make_session_factory(engine)
        now = dt.datetime.now(dt.UTC)
        generate_master_keys(factory, kek, now)
        security = SoftwareSecurityModule.load(factory, kek)
        with factory() as session, session.begin():
            merchant, key = create_merchant(session, "Scale-out shop", now)
            seed_float(session, merchant.id, SEED_FLOAT, now)
            terminal_id = merchant.terminal_id
        nodes = [
            Node(url=url, kek=kek, directory=tmp_path, name=f"settlement-{letter}")
            for letter in "abc"[:PROCESSES]
        ]
        for node in nodes:  # the three start side by side, then each is waited for
            stack.callback(node.stop)
            node.launch()
        for node in nodes:
            node.wait_ready()
        yield Cluster(nodes, factory, security, key, terminal_id, url)


def delivered_exactly_once(cluster: Cluster, receiver: Receiver) -> int:
    """Wait until every outbox message is delivered; assert one receipt per event id."""

    def settled() -> bool:
        with cluster.factory() as session:
            pending = session.scalar(
                select(func.count())
                .select_from(WebhookMessage)
                .where(WebhookMessage.status != MessageStatus.SUCCEEDED.value)
            )
        return pending == 0

    wait_until(settled, "every webhook message to be delivered")
    with cluster.factory() as session:
        messages = session.scalar(select(func.count()).select_from(WebhookMessage)) or 0
    received = receiver.wait_for(messages, timeout=DEADLINE)
    per_event = Counter(item.headers["webhook-id"] for item in received)
    twice = {event: n for event, n in per_event.items() if n > 1}
    assert not twice, f"delivered more than once: {twice}"
    assert len(received) == messages
    return messages


def buy_through(cluster: Cluster, nodes: list[Node], cards: list[CardApplet]) -> None:
    """One purchase per card, each through the next process round-robin."""
    for index, card in enumerate(cards):
        node = nodes[index % len(nodes)]
        with httpx.Client(base_url=node.base_url, timeout=30) as http:
            terminal = Terminal(cast(Http, http), cluster.merchant_key, cluster.terminal_id)
            assert terminal.purchase(card, 10)["status"] == "succeeded"


def test_three_processes_sweep_once_per_tick_and_deliver_each_webhook_once(
    tmp_path: Path, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "three settlement processes on one PostgreSQL; the sweep's leader SIGKILLed",
        expected="one process sweeps per tick, another takes over after the kill; "
        "each webhook delivered once; invariants hold",
    ) as row:
        with cluster(tmp_path) as live, Receiver([]) as receiver:
            first = live.nodes[0]
            with httpx.Client(base_url=first.base_url, timeout=30) as http:
                created = http.post(
                    "/v1/webhook_endpoints",
                    json={"url": receiver.url, "events": ["*"]},
                    headers={"authorization": f"Bearer {live.merchant_key}"},
                )
                assert created.status_code == 201, created.text
                cards = [live.issue(seed) for seed in range(1, 7)]
                terminal = Terminal(cast(Http, http), live.merchant_key, live.terminal_id)
                for card in cards:
                    terminal.load(card, 1_000)

            # Before the kill: one leader, and only it ticks.
            wait_until(lambda: len(live.leaders()) == 1, "a sweep leader")
            (leader,) = live.leaders()
            old = next(node for node in live.nodes if node.pid() == leader)
            wait_until(lambda: len(old.ticks()) >= 3, "the leader's sweep ticks")
            buy_through(live, live.nodes, cards)
            before = delivered_exactly_once(live, receiver)
            followers = [node for node in live.nodes if node is not old]
            assert [len(node.ticks()) for node in followers] == [0, 0]

            # The leader dies without a word; one of the others takes the sweep over.
            old.kill()
            old_ticks = old.ticks()
            survivors = {node.pid() for node in followers}

            # The dead leader's backend may linger in pg_locks for a moment after its exit.
            # One read of the leaders per poll: two reads could see the lock change hands.
            def a_survivor_leads() -> bool:
                leaders = live.leaders()
                return len(leaders) == 1 and leaders[0] in survivors

            wait_until(a_survivor_leads, "a new sweep leader")
            (successor,) = live.leaders()
            new = next(node for node in followers if node.pid() == successor)
            wait_until(lambda: len(new.ticks()) >= 3, "the new leader's sweep ticks")
            later = [live.issue(seed) for seed in range(7, 9)]
            with httpx.Client(base_url=new.base_url, timeout=30) as http:
                terminal = Terminal(cast(Http, http), live.merchant_key, live.terminal_id)
                for card in later:
                    terminal.load(card, 1_000)
            buy_through(live, followers, later)
            total = delivered_exactly_once(live, receiver)
            (other,) = [node for node in followers if node is not new]
            assert other.ticks() == []
            assert max(old_ticks) < min(new.ticks())  # never two sweepers at once
            report = check_invariants(live.factory, live.url, [])
        row.observed = (
            f"{PROCESSES} processes: {len(old_ticks)} ticks by the leader only, "
            f"{len(new.ticks())} by its successor after SIGKILL, 0 by the third; "
            f"{total} webhook messages ({before} before the kill), each received once; "
            f"{report.summary()}"
        )
