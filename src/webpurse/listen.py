"""The listening sockets our servers accept on, and running an ASGI app on them.

asyncio (Python 3.11) turns Nagle's algorithm off only on accepted sockets of a listener
made with ``IPPROTO_TCP``; a socket made with protocol 0 (what some uvicorn releases
bind) keeps Nagle on, which delays a response written in two parts (headers, then body)
by ~40 ms — the trap ``docs/performance.md`` describes. Whatever uvicorn does, every
server here listens on a socket made by :func:`tcp_listen_socket`, so the guarantee
"accepted connections have ``TCP_NODELAY``" is ours, not a library's.

``workers`` > 1 gives each worker process a listening socket of its own on the same port
(``SO_REUSEPORT``): the kernel spreads new connections over them, instead of every worker
waking on one shared socket and the busiest taking most of them (the settlement benchmark
found the machine half idle that way). Separate ``serve`` invocations may share a port the
same way (``reuse_port=True``, ``serve settlement --reuse-port``), or each take a port of its
own so a load balancer can health-check and drain it alone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import multiprocessing
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from multiprocessing.process import BaseProcess
from typing import Any

STARTUP_FAILURE = 3
"""A worker's exit status when it cannot start (uvicorn's; also ours when the port is taken)."""
WORKER_STOP_SECONDS = 30


TRUSTED_PROXIES_ENV = "WEBPURSE_TRUSTED_PROXIES"


class ProxySettingError(ValueError):
    """``WEBPURSE_TRUSTED_PROXIES`` names something that is not an address or network."""


def trusted_proxies(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The proxies whose ``X-Forwarded-For``/``-Proto`` our servers believe.

    ``WEBPURSE_TRUSTED_PROXIES``: comma-separated addresses or networks (``127.0.0.1``,
    ``10.0.0.0/8``). Unset or empty: none, and the headers are ignored: the client's
    address is the connection's peer. A wildcard is refused: it would let any client
    choose the address that rate limits count.
    """
    raw = (os.environ if env is None else env).get(TRUSTED_PROXIES_ENV, "")
    found: list[str] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        try:
            if "/" in item:
                item = str(ipaddress.ip_network(item, strict=False))
            else:
                item = str(ipaddress.ip_address(item))
        except ValueError:
            raise ProxySettingError(
                f"{TRUSTED_PROXIES_ENV}: {item!r} is not an IP address or network"
                " (a wildcard is not allowed)"
            ) from None
        found.append(item)
    return tuple(found)


def proxy_options(proxies: tuple[str, ...]) -> dict[str, Any]:
    """uvicorn's options for ``proxies``. uvicorn's own default believes the headers from
    127.0.0.1, so any local process could forge a client's address: always explicit."""
    if not proxies:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": list(proxies)}


def tcp_listen_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound TCP socket (``IPPROTO_TCP``, so accepted connections get ``TCP_NODELAY``).

    ``reuse_port`` sets ``SO_REUSEPORT`` before binding: every socket bound so to the same
    address and port (same user) gets its share of the new connections.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_asgi(
    app: Any,
    *,
    host: str,
    port: int,
    workers: int = 1,
    reuse_port: bool = False,
    **options: Any,
) -> None:
    """Serve ``app`` (an ASGI app, or an import string) on our own listening socket.

    ``workers`` > 1 needs an import string (each worker process imports its own app): the
    calling process then supervises that many workers (:func:`_supervise`), each listening
    on its own ``SO_REUSEPORT`` socket. ``reuse_port`` lets one process share its port with
    other processes that set it too.

    The client's address comes from ``X-Forwarded-For`` only when the peer is one of
    :func:`trusted_proxies` (``WEBPURSE_TRUSTED_PROXIES``), unless ``options`` say
    otherwise.
    """
    if "proxy_headers" not in options and "forwarded_allow_ips" not in options:
        options.update(proxy_options(trusted_proxies()))
    if workers > 1:
        if not isinstance(app, str):
            raise TypeError("workers > 1 needs the app as an import string")
        _supervise(app, host=host, port=port, workers=workers, options=options)
        return
    import uvicorn

    sock = tcp_listen_socket(host, port, reuse_port=reuse_port)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options)).run(sockets=[sock])


def _worker(app: str, host: str, port: int, options: dict[str, Any]) -> None:
    """One worker process: its own ``SO_REUSEPORT`` socket, then uvicorn on it."""
    import uvicorn

    try:
        sock = tcp_listen_socket(host, port, reuse_port=True)
    except OSError as exc:
        print(f"cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options)).run(sockets=[sock])


def _supervise(app: str, *, host: str, port: int, workers: int, options: dict[str, Any]) -> None:
    """Run ``workers`` worker processes until SIGINT or SIGTERM; replace one that dies.

    A worker that exits with :data:`STARTUP_FAILURE` (the app, or the port, is unusable)
    would fail the same way again: the supervisor then stops them all and exits with it.
    On SIGINT/SIGTERM each worker gets SIGTERM (uvicorn's graceful shutdown) and
    ``WORKER_STOP_SECONDS`` to finish.
    """
    context = multiprocessing.get_context("spawn")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    def spawn() -> BaseProcess:
        process = context.Process(
            target=_worker, args=(app, host, port, options), name="webpurse-worker"
        )
        process.start()
        return process

    processes = [spawn() for _ in range(workers)]
    failed = False
    while not stop.wait(0.5):  # a supervisor's periodic check, not synchronisation
        for index, process in enumerate(processes):
            if process.is_alive():
                continue
            if process.exitcode == STARTUP_FAILURE:
                print(f"worker {process.pid} failed to start; stopping", file=sys.stderr)
                failed = True
                stop.set()
                break
            print(f"worker {process.pid} died ({process.exitcode}); replacing it", file=sys.stderr)
            processes[index] = spawn()
    for process in processes:
        if process.is_alive() and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
    for process in processes:
        process.join(WORKER_STOP_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()
    if failed:
        sys.exit(STARTUP_FAILURE)
