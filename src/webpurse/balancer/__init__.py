"""HAProxy in front of N shop and M settlement processes (issue 17).

:func:`render_config` fills the package's template (``haproxy.cfg``): round-robin (or
another balance) over each process's own port, health checks on its ``/health``,
WebSocket and SSE passed through unbuffered, TLS ended with a certificate made at start
(:mod:`webpurse.balancer.tls`). :class:`Balancer` writes the file into a state directory,
checks it with ``haproxy -c`` and runs ``haproxy`` in the foreground (``-db``).

The servers behind it take the client's address from ``X-Forwarded-For`` only when the
connection comes from a trusted proxy (``WEBPURSE_TRUSTED_PROXIES``: see
:mod:`webpurse.listen`); the frontends replace any ``X-Forwarded-For`` a client sent.
"""

from __future__ import annotations

import csv
import shutil
import socket
import string
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from webpurse.balancer.tls import TlsFiles

HAPROXY = "haproxy"
BALANCES = ("roundrobin", "leastconn", "source", "first")


class BalancerError(Exception):
    """HAProxy is missing, or refused its configuration; the message says why."""


@dataclass(frozen=True)
class Backend:
    """One server process behind the balancer, checked on its own port."""

    name: str
    host: str
    port: int

    def line(self) -> str:
        return f"    server {self.name} {self.host}:{self.port} check"


@dataclass(frozen=True)
class Layout:
    """Where the balancer listens and what is behind it."""

    shop: Sequence[Backend]
    settlement: Sequence[Backend]
    shop_port: int
    shop_internal_port: int
    settlement_port: int
    host: str = "127.0.0.1"
    internal_host: str = "127.0.0.1"
    shop_balance: str = "roundrobin"
    settlement_balance: str = "roundrobin"


def template() -> str:
    return resources.files("webpurse.balancer").joinpath("haproxy.cfg").read_text("utf-8")


def _safe(value: str, what: str) -> str:
    if not value or any(c.isspace() or c in "#\\'\"$%{}" for c in value):
        raise BalancerError(f"{what} {value!r} cannot go into haproxy.cfg")
    return value


def render_config(layout: Layout, tls: TlsFiles, stats_socket: Path | None = None) -> str:
    """haproxy.cfg for ``layout``; bad input (no backends, odd names) is refused.

    ``stats_socket``: HAProxy's operator socket (default: beside the certificate)."""
    if not layout.shop or not layout.settlement:
        raise BalancerError("the balancer needs at least one shop and one settlement process")
    for balance in (layout.shop_balance, layout.settlement_balance):
        if balance not in BALANCES:
            raise BalancerError(f"unknown balance {balance!r} (one of {', '.join(BALANCES)})")
    for backend in (*layout.shop, *layout.settlement):
        _safe(backend.name, "server name")
        _safe(backend.host, "server address")
        if not 0 < backend.port < 65536:
            raise BalancerError(f"server {backend.name}: port {backend.port} out of range")
    return string.Template(template()).substitute(
        host=_safe(layout.host, "address"),
        internal_host=_safe(layout.internal_host, "address"),
        shop_port=layout.shop_port,
        shop_internal_port=layout.shop_internal_port,
        settlement_port=layout.settlement_port,
        bundle=_safe(str(tls.bundle), "certificate path"),
        stats_socket=_safe(str(stats_socket or tls.bundle.parent / "haproxy.sock"), "socket"),
        shop_balance=layout.shop_balance,
        settlement_balance=layout.settlement_balance,
        shop_servers="\n".join(b.line() for b in layout.shop),
        settlement_servers="\n".join(b.line() for b in layout.settlement),
    )


def haproxy_path() -> str | None:
    return shutil.which(HAPROXY) or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )


def write_config(directory: Path, layout: Layout, tls: TlsFiles) -> Path:
    """Write and check haproxy.cfg in ``directory``; returns its path."""
    binary = haproxy_path()
    if binary is None:
        raise BalancerError("haproxy is not installed (Debian: apt-get install haproxy)")
    path = directory / "haproxy.cfg"
    path.write_text(render_config(layout, tls, stats_path(directory)), encoding="utf-8")
    checked = subprocess.run(  # noqa: S603 - haproxy, our own argument list
        [binary, "-c", "-q", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if checked.returncode != 0:
        raise BalancerError(f"haproxy refused {path}: {checked.stderr.strip()[:500]}")
    return path


def stats_path(directory: Path) -> Path:
    """HAProxy's operator socket for a config written into ``directory``."""
    return directory / "haproxy.sock"


def server_stats(socket_path: Path) -> dict[tuple[str, str], dict[str, str]]:
    """``show stat`` from HAProxy's socket: (backend, server) → its counters (``stot``:
    sessions served, ``scur``: open now, ``status``: UP/DOWN…)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(str(socket_path))
        sock.sendall(b"show stat\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    lines = b"".join(chunks).decode("utf-8", "replace").splitlines()
    if not lines or not lines[0].startswith("# "):
        raise BalancerError(f"unexpected answer from {socket_path}: {lines[:1]}")
    rows = csv.DictReader([lines[0][2:], *[line for line in lines[1:] if line]])
    return {(row["pxname"], row["svname"]): dict(row) for row in rows}


def command(config: Path) -> list[str]:
    """Run HAProxy in the foreground on ``config`` (stopped with SIGTERM/SIGUSR1)."""
    binary = haproxy_path()
    if binary is None:
        raise BalancerError("haproxy is not installed (Debian: apt-get install haproxy)")
    return [binary, "-db", "-f", str(config)]
