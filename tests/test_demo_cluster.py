"""``webpurse demo --cluster --scripted``: 2 shop + 2 settlement processes behind HAProxy
(TLS) on PostgreSQL and Redis pay once headless; the ledger checks out. Skips without
haproxy, PostgreSQL or Redis, unless CI=true (fails)."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
from pathlib import Path

import pytest

from webpurse.balancer import haproxy_path
from webpurse.cluster import drop_database
from webpurse.demo import webpurse_command

POSTGRES = os.environ.get(
    "WEBPURSE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _need(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2):
        return True
    return False


def _demo(data: Path, database: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["WEBPURSE_CLUSTER_DATABASE_URL"] = database
    return subprocess.run(
        [*webpurse_command(), "demo", "--cluster", "--scripted", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        stdin=subprocess.DEVNULL,
        env=env,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cluster_demo_pays_through_haproxy(tmp_path: Path) -> None:
    _need(haproxy_path() is not None, "haproxy is not installed (apt-get install haproxy)")
    _need(_listening(5432) and _listening(6379), "PostgreSQL or Redis is not listening")
    base = POSTGRES.split("?", 1)[0].rsplit("/", 1)[0]
    database = f"{base}/webpurse_cluster_{secrets.token_hex(4)}"
    try:
        done = _demo(tmp_path / "demo", database)
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        assert "2 shop + 2 settlement processes" in out
        assert "status          paid" in out and "round trips     2" in out
        assert "ledger check    consistent" in out
        assert "sk_mer_" not in out and "sk_op_" not in out  # keys are never printed
        assert (tmp_path / "demo" / "haproxy.cfg").exists()
        assert not (tmp_path / "demo" / "tls" / "ca.key").exists()  # the CA's key is not kept
        # A fresh data dir on that database is refused clearly (its keys are not there).
        other = _demo(tmp_path / "other", database)
        assert other.returncode == 2
        assert "belongs to another data dir" in other.stderr
    finally:
        for url in (database, database + "_shop"):
            with contextlib.suppress(Exception):
                drop_database(url)
