"""The listening sockets our servers accept on, and running an ASGI app on them.

asyncio (Python 3.11) turns Nagle's algorithm off only on accepted sockets of a listener
made with ``IPPROTO_TCP``; a socket made with protocol 0 (what some uvicorn releases
bind) keeps Nagle on, which delays a response written in two parts (headers, then body)
by ~40 ms — the trap ``docs/performance.md`` describes. Whatever uvicorn does, every
server here listens on a socket made by :func:`tcp_listen_socket`, so the guarantee
"accepted connections have ``TCP_NODELAY``" is ours, not a library's.
"""

from __future__ import annotations

import socket
from typing import Any

WORKER_START_SECONDS = 60


def tcp_listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (``IPPROTO_TCP``, so accepted connections get ``TCP_NODELAY``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_asgi(app: Any, *, host: str, port: int, workers: int = 1, **options: Any) -> None:
    """Serve ``app`` (an ASGI app, or an import string) on our own listening socket.

    ``workers`` > 1 needs an import string (each worker process imports its own app) and
    runs uvicorn's process supervisor over the one inherited socket. The supervisor kills
    and respawns a worker that does not answer its health ping in time; its 5 s default
    is shorter than a worker's start-up (importing and building the app) on a busy
    2-core machine, which then restarts workers forever and never serves. A worker gets
    ``WORKER_START_SECONDS`` instead.
    """
    import uvicorn

    sock = tcp_listen_socket(host, port)
    if workers > 1:
        options.setdefault("timeout_worker_healthcheck", WORKER_START_SECONDS)
    config = uvicorn.Config(app, host=host, port=port, workers=workers, **options)
    if workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run(sockets=[sock])
