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

import contextlib
import json
import select as io_select
import socket
import time
from collections.abc import Callable, Iterator
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


# --- huge bodies before authentication -------------------------------------------------

CHUNK = 64 << 10
HUGE = 128 << 20


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _chunked_upload(base_url: str, path: str, on_4mib: Callable[[], None]) -> tuple[bytes, int]:
    """POST up to 128 MiB chunked, no key, until the server answers; (answer, bytes sent)."""
    host, port = base_url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            "transfer-encoding: chunked\r\n\r\n".encode()
        )
        chunk = f"{CHUNK:x}\r\n".encode() + b"[" * CHUNK + b"\r\n"
        try:
            while sent < HUGE:
                readable, _, _ = io_select.select([sock], [], [], 0)
                if readable:  # the server answered before the body ended
                    break
                sock.sendall(chunk)
                sent += CHUNK
                if sent == 4 << 20:
                    on_4mib()
            else:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed after answering: read what it said
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n\r\n" not in answer or len(answer) < 200:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
    return answer, sent


def test_an_unauthenticated_huge_chunked_body_is_refused_before_it_is_read(
    tmp_path: Path, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "unauthenticated 128 MiB chunked POST /v1/batch (real uvicorn)",
        expected="413 payload_too_large problem+json after ~8 MiB, before any 401; "
        "server memory flat; /health answers meanwhile",
    ) as row:
        url = f"sqlite:///{tmp_path / 'settlement.db'}"
        with (
            live_server(url, tmp_path) as server,
            httpx.Client(base_url=server.base_url, timeout=5) as http,
        ):
            assert server.pid is not None
            assert http.get("/health").status_code == 200
            before = _rss_mib(server.pid)
            health: list[int] = []
            started = time.monotonic()
            answer, sent = _chunked_upload(
                server.base_url, "/v1/batch", lambda: health.append(http.get("/health").status_code)
            )
            seconds = time.monotonic() - started
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 413"), answer[:300]
            assert b"application/problem+json" in head.lower()
            assert json.loads(body)["code"] == "payload_too_large"
            assert sent <= 16 << 20, f"{sent} bytes went in before the refusal"
            after = _rss_mib(server.pid)
            assert after - before < 64, (before, after)
            assert health == [200]
            assert http.get("/health").status_code == 200
            # A declared length over the limit is refused without reading a byte of it.
            declared = http.post(
                "/v1/payments",
                content=b"{" + b" " * (2 << 20) + b"}",
                headers={"content-type": "application/json"},
            )
            assert declared.status_code == 413, declared.text
            assert declared.json()["code"] == "payload_too_large"
        row.observed = (
            f"413 after {sent >> 20} MiB in {seconds:.1f} s; RSS {before:.0f} → {after:.0f} MiB; "
            "/health 200 during and after"
        )
