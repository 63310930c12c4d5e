"""Attacks by one merchant (or anyone) on everyone else's progress (issue 19).

Each case runs against real servers and, where it is a race, real PostgreSQL:

- webhook endpoint cap: 60 parallel creates leave at most 16 live endpoints;
- webhook tarpit: an endpoint that sends its headers one byte at a time delays no other
  merchant's deliveries, and its own attempts end at the total deadline;
- huge bodies: an unauthenticated 64 MiB chunked POST is refused with 413 before it is
  read, the server's memory stays flat and ``/health`` keeps answering;
- the expiry sweep: thousands of stale load orders of one shop are expired in small
  committed chunks while another shop's load creates answer promptly; open ``requires_card``
  orders per merchant are capped;
- clearing: one merchant refunding 1 fen at a time from 8 threads fails no other merchant's
  payout, and its own batch still balances.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from tests.proof.conftest import Proof
from tests.settlement.support import LiveServer, database_url, live_server
from webpurse.settlement.routes_webhooks import MAX_ENDPOINTS_PER_MERCHANT
from webpurse.settlement.webhooks import WebhookEndpoint

SUITE = "attacks_stall"


@pytest.fixture
def pg_server(tmp_path: Path) -> Iterator[LiveServer]:
    with database_url("postgresql", tmp_path) as url, live_server(url, tmp_path) as live:
        yield live


@pytest.mark.postgres
def test_sixty_parallel_endpoint_creates_leave_at_most_the_cap(
    pg_server: LiveServer, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "webhook endpoint cap under 60 parallel creates (PostgreSQL)",
        expected=f"at most {MAX_ENDPOINTS_PER_MERCHANT} live endpoints; the rest 400 "
        "too_many_endpoints",
    ) as row:
        headers = {"authorization": f"Bearer {pg_server.merchant_key}"}
        limits = httpx.Limits(max_connections=60)
        with httpx.Client(base_url=pg_server.base_url, timeout=60, limits=limits) as http:

            def create(i: int) -> httpx.Response:
                return http.post(
                    "/v1/webhook_endpoints",
                    json={"url": f"http://127.0.0.1:9/hook/{i}", "events": ["*"]},
                    headers=headers,
                )

            with ThreadPoolExecutor(60) as pool:
                answers = list(pool.map(create, range(60)))
        created = [a for a in answers if a.status_code == 201]
        refused = [a for a in answers if a.status_code == 400]
        busy = [a for a in answers if a.status_code == 503]  # pool wait ran out: did nothing
        assert len(created) + len(refused) + len(busy) == 60, [a.text for a in answers]
        assert all(a.json()["code"] == "too_many_endpoints" for a in refused)
        assert all(a.json()["code"] == "overloaded" for a in busy)
        with pg_server.factory() as session:
            live = session.scalar(
                select(func.count())
                .select_from(WebhookEndpoint)
                .where(WebhookEndpoint.deleted_at.is_(None))
            )
        assert live == len(created) == MAX_ENDPOINTS_PER_MERCHANT
        row.observed = (
            f"{len(created)} created, {len(refused)} refused, {len(busy)} busy (503), {live} live"
        )
