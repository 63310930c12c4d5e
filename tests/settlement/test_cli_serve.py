"""``webpurse serve settlement [--workers N]``: each worker on its own socket of ours.

Our sockets: TCP_NODELAY on accepted connections; one ``SO_REUSEPORT`` socket per worker.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import httpx
import pytest

from tests.settlement.support import Http, Terminal, database_url, live_server
from webpurse.settlement import ledger
from webpurse.settlement.models import Merchant

PURCHASES = 12


_SYS_PIDFD_OPEN = 434  # the same number on every Linux architecture (generic table)
_SYS_PIDFD_GETFD = 438


def _tcp_inode(local_port: int, remote_port: int) -> int | None:
    """The inode of the IPv4 loopback TCP socket ``local_port`` → ``remote_port``."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], int(fields[9])
        if int(local.split(":")[1], 16) == local_port and (
            int(remote.split(":")[1], 16) == remote_port
        ):
            return inode
    return None


def _server_side_nodelay(server_port: int, client: socket.socket) -> int:
    """TCP_NODELAY of the socket a server process accepted for ``client``'s connection.

    The socket is found by its inode in /proc and borrowed with pidfd_getfd(2), so this
    reads the option on the server's own socket, whichever process (worker) accepted it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    client_port = client.getsockname()[1]
    inode = _tcp_inode(server_port, client_port)  # the server answered: it has accepted
    assert inode is not None, "no server-side socket for the connection"
    target = f"socket:[{inode}]"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) != target:
                    continue
            except OSError:
                continue
            pidfd = libc.syscall(_SYS_PIDFD_OPEN, int(proc.name), 0)
            if pidfd < 0:
                pytest.skip(f"pidfd_open unavailable: errno {ctypes.get_errno()}")
            try:
                borrowed = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fd.name), 0)
                if borrowed < 0:
                    pytest.skip(f"pidfd_getfd unavailable: errno {ctypes.get_errno()}")
                with socket.socket(fileno=borrowed) as sock:
                    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            finally:
                os.close(pidfd)
    raise AssertionError(f"no process holds {target}")


@pytest.mark.parametrize("workers", [1, 2])
def test_the_servers_accepted_connections_have_nagle_off(tmp_path: Path, workers: int) -> None:
    """Our guarantee, whatever uvicorn does: no ~40 ms delay on a response in two parts."""
    with (
        database_url("sqlite", tmp_path, migrated=True) as url,
        live_server(url, tmp_path, workers=workers) as server,
    ):
        port = int(server.base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert client.recv(12).startswith(b"HTTP/1.1 200")
            assert _server_side_nodelay(port, client) != 0


def _workers(pid: int) -> list[int]:
    """The uvicorn worker processes (multiprocessing spawn children) of ``pid``."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.postgres
def test_two_workers_serve_concurrent_purchases_and_the_ledger_balances(tmp_path: Path) -> None:
    with (
        database_url("postgresql", tmp_path, migrated=True) as url,
        live_server(url, tmp_path, workers=2) as server,
    ):
        assert server.pid is not None and len(_workers(server.pid)) == 2
        cards = [server.issue() for _ in range(3)]
        limits = httpx.Limits(max_connections=PURCHASES)
        with httpx.Client(base_url=server.base_url, timeout=60, limits=limits) as http:
            terminal = Terminal(cast(Http, http), server.merchant_key, server.terminal_id)
            for card in cards:
                terminal.load(card, 1_000)

            def buy(card_index: int) -> str:
                # One card is one shopper: its purchases run one after another.
                statuses = []
                for _ in range(PURCHASES // len(cards)):
                    statuses.append(terminal.purchase(cards[card_index], 10)["status"])
                return ",".join(statuses)

            with ThreadPoolExecutor(len(cards)) as pool:
                results = list(pool.map(buy, range(len(cards))))
        assert all(set(r.split(",")) == {"succeeded"} for r in results)
        with server.factory() as session:
            report = ledger.check(session)
            assert report.ok, report.problems
            merchant = session.query(Merchant).one()
            paid = ledger.balance(session, ledger.merchant_account(merchant.id))
            assert paid == PURCHASES * 10


def _listening_inodes(port: int) -> set[int]:
    """Inodes of the IPv4 TCP sockets in LISTEN state (0A) on ``port``."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
            inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def test_each_worker_listens_on_its_own_socket(tmp_path: Path) -> None:
    """``--workers 3``: three listening sockets on the port, one per worker, none shared."""
    with (
        database_url("sqlite", tmp_path, migrated=True) as url,
        live_server(url, tmp_path, workers=3) as server,
    ):
        port = int(server.base_url.rsplit(":", 1)[1])
        assert server.pid is not None
        workers = _workers(server.pid)
        assert len(workers) == 3
        deadline = time.monotonic() + 60
        listening = _listening_inodes(port)
        while len(listening) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)  # bounded polling for the other workers' start-up
            listening = _listening_inodes(port)
        assert len(listening) == 3, listening
        held = [_socket_inodes(worker) & listening for worker in workers]
        assert all(len(mine) == 1 for mine in held), held
        assert set().union(*held) == listening  # each socket in exactly one worker
        assert not _socket_inodes(server.pid) & listening  # the supervisor holds none
        for _ in range(6):  # every worker serves whichever socket the kernel picks
            assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if condition():
                return
        except FileNotFoundError:  # a process went away while /proc was read
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # bounded polling of the processes' state


def test_a_killed_worker_is_replaced_with_a_socket_of_its_own(tmp_path: Path) -> None:
    with (
        database_url("sqlite", tmp_path, migrated=True) as url,
        live_server(url, tmp_path, workers=2) as server,
    ):
        port = int(server.base_url.rsplit(":", 1)[1])
        assert server.pid is not None
        supervisor = server.pid
        _wait_for(lambda: len(_listening_inodes(port)) == 2, "both workers listening")
        victim, survivor = _workers(supervisor)
        os.kill(victim, signal.SIGKILL)
        _wait_for(
            lambda: len(_workers(supervisor)) == 2 and victim not in _workers(supervisor),
            "a replacement worker",
        )
        _wait_for(lambda: len(_listening_inodes(port)) == 2, "the replacement listening")
        assert survivor in _workers(supervisor)
        assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
