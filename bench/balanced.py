"""Settlement as the product scales it out: one-worker processes behind HAProxy (issue 20).

``bench versions`` serves each revision's settlement as one ``serve settlement --workers
2`` by default: two worker processes, each with its own ``SO_REUSEPORT`` socket, and the
kernel picks a worker for each connection by a hash of its addresses. The shop's client
keeps two batches in flight over two keep-alive connections, so in about half the windows
both land on the same worker and share one GIL (bench/findings.md, issue 20 session 6).
With ``WEBPURSE_BENCH_SETTLEMENT_LAYOUT=balanced`` the bench runs instead the layout of
``webpurse demo --cluster``: :data:`~bench.settlement.WORKERS` one-worker processes, each
on its own port, behind HAProxy with ``balance leastconn`` (in plain HTTP: the cluster's
frontend ends TLS, which this bench leaves out). HAProxy balances each request, not each
connection, so the two batches go to the two processes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Mapping, Sequence

from bench.servers import (
    SettlementEnvironment,
    SettlementProcess,
    SetupError,
    _wait_until_healthy,
    cpu_seconds,
    free_port,
    stop_process,
)
from webpurse.balancer import haproxy_path

LAYOUT_ENV = "WEBPURSE_BENCH_SETTLEMENT_LAYOUT"
WORKERS_LAYOUT = "workers"  # one server, N uvicorn workers on one SO_REUSEPORT port
BALANCED_LAYOUT = "balanced"  # N one-worker servers behind HAProxy (leastconn)
LAYOUTS = (WORKERS_LAYOUT, BALANCED_LAYOUT)


def layout_from_env(environ: Mapping[str, str] = os.environ) -> str:
    """The settlement layout asked for (default: the workers layout); unknown ones refused."""
    value = environ.get(LAYOUT_ENV, "").strip() or WORKERS_LAYOUT
    if value not in LAYOUTS:
        raise SetupError(f"{LAYOUT_ENV}={value!r}: one of {', '.join(LAYOUTS)}")
    return value


def haproxy_config(port: int, backends: Sequence[int], host: str = "127.0.0.1") -> str:
    """Plain-HTTP HAProxy in front of ``backends`` (ports on ``host``), leastconn, with the
    product template's timeouts and health checks (src/webpurse/balancer/haproxy.cfg)."""
    if not backends:
        raise SetupError("the balanced layout needs at least one settlement process")
    servers = "\n".join(
        f"    server settlement{i} {host}:{p} check" for i, p in enumerate(backends, start=1)
    )
    return f"""global
    maxconn 4096

defaults
    mode http
    option dontlognull
    option http-no-delay
    timeout connect 3s
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout client 65s
    timeout server 65s
    option redispatch
    retries 2
    default-server inter 1s fastinter 500ms downinter 1s fall 2 rise 2

frontend settlement
    bind {host}:{port}
    default_backend settlement

backend settlement
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
{servers}
"""


class BalancedSettlement:
    """``processes`` one-worker settlement servers behind HAProxy on a port of its own.

    :meth:`cpu_seconds` counts the settlement processes (what the workers layout counts);
    :meth:`balancer_cpu_seconds` counts HAProxy, reported beside it."""

    def __init__(self, environment: SettlementEnvironment, processes: int, name: str) -> None:
        self.servers = [
            SettlementProcess(environment, name=f"{name}-{i}") for i in range(1, processes + 1)
        ]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = environment.folder / f"{name}-haproxy.cfg"
        self.log = environment.folder / f"{name}-haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = haproxy_path()
        if binary is None:
            raise SetupError("haproxy is not installed (Debian: apt-get install haproxy)")
        for server in self.servers:
            server.start()
        self.config.write_text(haproxy_config(self.port, [s.port for s in self.servers]))
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        _wait_until_healthy(self.url, self.process, self.log)

    def cpu_seconds(self) -> float:
        return sum(server.cpu_seconds() for server in self.servers)

    def balancer_cpu_seconds(self) -> float:
        return cpu_seconds([self.process.pid]) if self.process is not None else 0.0

    def stop(self) -> None:
        stop_process(self.process)
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()
